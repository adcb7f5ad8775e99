"""The streaming schedule on a real local Ray: with one worker and one round per episode
the learner runs the paper's sequence; fractional rounds carry over with several workers;
evaluations are reported at the training steps their generator had learned from."""

from __future__ import annotations

import pytest

from gogepo_ray.config import load_config
from gogepo_ray.trainer import Trainer
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.e2e

IP = str(ROOT / "configs" / "inverted_pendulum.yaml")


class _Record:
    def __init__(self) -> None:
        self.evals: list[int] = []
        self.stats = []

    def on_start(self, trainer) -> None: ...
    def on_train(self, trainer, stats) -> None:
        self.stats.append(stats)

    def on_eval(self, trainer, env_steps, mean, std) -> None:
        self.evals.append(env_steps)

    def on_checkpoint(self, trainer, path) -> None: ...
    def on_end(self, trainer, summary) -> None: ...


def _run(tmp_path, *sets: str, steps: int) -> tuple[Trainer, _Record]:
    cfg = load_config(
        IP,
        [*TINY, "run.eval_every=300", "run.eval_episodes=2", f"run.output_dir={tmp_path}", *sets],
    )
    record = _Record()
    trainer = Trainer(cfg, callbacks=[record])
    try:
        trainer.run_until(steps)
        trainer._drain_inflight()
    finally:
        trainer.shutdown()
    return trainer, record


def test_one_worker_one_round_per_episode_is_the_papers_sequence(ray_session, tmp_path):
    trainer, record = _run(tmp_path, "run.workers=1", steps=1200)
    last = record.stats[-1]
    # every learner step took in exactly one episode and ran exactly one round after it
    assert len(record.stats) == last.episodes == last.rounds == trainer.progress.episodes
    assert [s.episodes for s in record.stats] == list(range(1, last.episodes + 1))
    assert [s.rounds for s in record.stats] == list(range(1, last.episodes + 1))
    # the k-th evaluation, due at k x 300 steps, evaluates a generator that has learned from
    # every training step counted when it was proposed: never fewer than its due step
    assert record.evals, "no evaluation ran"
    for k, steps in enumerate(record.evals, start=1):
        assert 300 * k <= steps <= trainer.progress.env_steps


def test_fractional_rounds_with_several_workers(ray_session, tmp_path):
    trainer, record = _run(
        tmp_path, "run.workers=2", "learner.updates_per_episode=0.25", steps=1500
    )
    last = record.stats[-1]
    assert last.episodes == trainer.progress.episodes
    assert last.rounds == last.episodes // 4  # whole rounds only; the rest carries over
    # ... at every learner step, not only at the end: a quarter round per episode, exactly
    assert [s.rounds for s in record.stats] == [s.episodes // 4 for s in record.stats]
    # each step took in every result that had arrived since the last one: at least one,
    # and at most one per worker (a worker waits for the step that writes its next policies)
    counts = [s.episodes for s in record.stats]
    taken = [b - a for a, b in zip([0, *counts], counts)]
    assert all(1 <= n <= 2 for n in taken), taken
