"""The service inside the rest of the Ray stack: RLlib and Tune (``rllib``, with its lazy
registration in ``rllib_hook``), Ray Jobs (``jobs``) and Ray Serve (``serve``). Each calls the
same ``Trainer`` or checkpoint loader as the CLI."""
