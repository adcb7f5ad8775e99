"""What a user reads off a run: evaluation and command sweeps (``evaluation``), learning
curves and plots (``plotting``), run-against-run comparisons (``compare``), and the local
learner that ``gogepo eval``, ``sweep``, ``export``, ``render`` and ``serve`` load from a
checkpoint (``local``)."""
