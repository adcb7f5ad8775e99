"""Errors that end a run and are reported to the user in one line."""


class TrainingError(RuntimeError):
    """The run cannot go on (every episode fails, workers keep dying)."""
