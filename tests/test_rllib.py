"""GoGePo as an RLlib Algorithm on a real local Ray and real MuJoCo: the config builder,
``algo.train()``, RLlib checkpoints, Tune by name, and MLflow runs nested per sweep."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from gogepo_ray import checkpoint as ckpt
from gogepo_ray.config import ConfigError
from gogepo_ray.integrations.rllib import PAYLOAD_FILE, GoGePo, GoGePoConfig, tune_with_mlflow
from tests.conftest import assert_same_state

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]

# Small networks so that an iteration takes seconds; the code paths are the real ones.
SMALL = {
    "policy": {"hidden": [32, 32]},
    "generator": {"hidden": [64, 64], "tile": 8, "lr": 2e-4},
    "critic": {"hidden": [64, 64], "probing_states": 50},
    "run": {"eval_every": 150, "eval_episodes": 3, "sweep_commands": 3, "checkpoint_every": 10**6},
}


def small_config(workers: int = 2, steps_per_iteration: int = 300) -> GoGePoConfig:
    return (
        GoGePoConfig()
        .environment("InvertedPendulum-v5")
        .env_runners(num_env_runners=workers)
        .training(gogepo=SMALL, return_max=1000, steps_per_iteration=steps_per_iteration)
    )


# ---------------------------------------------------------------------- config builder
def test_config_builder_gives_validated_config():
    config = (
        small_config(workers=3)
        .training(gogepo={"generator": {"lr": 1e-4}}, survival_offset=-1.0, total_env_steps=5000)
        .training(gogepo={"critic": {"lr": 1e-3}})  # merges with what came before
        .debugging(seed=7)
    )
    config.validate()
    cfg = config.to_gogepo_config()
    assert cfg.env.id == "InvertedPendulum-v5" and cfg.env.survival_offset == -1.0
    assert cfg.run.workers == 3 and cfg.run.seed == 7 and cfg.run.total_env_steps == 5000
    assert cfg.generator.lr == 1e-4 and cfg.generator.tile == 8 and cfg.critic.lr == 1e-3
    assert cfg.policy.hidden == [32, 32] and cfg.learner.device == "cpu"
    assert cfg.tracking.enabled is False  # Tune records results; MLflow on request

    # Tune hands the trial a dict (AlgorithmConfig.to_dict): it must come back identical.
    again = GoGePoConfig().update_from_dict(config.to_dict())
    assert again.to_gogepo_config() == cfg and again.steps_per_iteration == 300

    gpu = small_config().learners(num_gpus_per_learner=1).to_gogepo_config()
    assert gpu.learner.device == "cuda"
    bundles = GoGePo.default_resource_request(
        small_config().learners(num_gpus_per_learner=1)
    ).bundles
    # driver, learner (2 CPUs by default, + the GPU), then one bundle per rollout worker
    assert bundles == [{"CPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]
    assert (
        GoGePo.default_resource_request(config.to_dict()).bundles
        == [{"CPU": 1.0}, {"CPU": 2.0}] + [{"CPU": 1.0}] * 3
    )

    entry = GoGePoConfig().environment("tests.envs:NoisyPointEnv").env_runners(num_env_runners=1)
    assert entry.to_gogepo_config().env.id == "tests.envs:NoisyPointEnv"
    from tests.envs import NoisyPointEnv

    by_class = GoGePoConfig().environment(NoisyPointEnv, env_config={"noise": 0.1})
    assert by_class.to_gogepo_config().env.id == "tests.envs:NoisyPointEnv"
    assert by_class.to_gogepo_config().env.kwargs == {"noise": 0.1}


@pytest.mark.parametrize(
    "build, names",
    [
        (lambda c: c.training(gogepo={"generatr": {"lr": 1e-4}}), "generatr: unknown key"),
        (
            lambda c: c.training(gogepo={"generator": {"lr_rate": 1e-4}}),
            "generator.lr_rate: unknown key",
        ),
        (lambda c: c.training(gogepo={"generator": {"lr": -1.0}}), "generator.lr"),
        (lambda c: c.training(gogepo={"critic": {"hidden": "big"}}), "critic.hidden"),
        (
            lambda c: c.training(return_min=10, return_max=5),
            "env: return_max must be greater than return_min",
        ),
        (lambda c: c.training(steps_per_iteration=0), "steps_per_iteration"),
        (lambda c: c.training(gogepo={"run": {"workers": 5}}), "run.workers"),
        (lambda c: c.env_runners(num_env_runners=0), "num_env_runners"),
        (lambda c: c.learners(num_gpus_per_learner=2), "num_gpus_per_learner"),
        (lambda c: c.environment("NoSuchEnv-v9"), "env.id"),
        (lambda c: c.environment(None), "env:"),
    ],
)
def test_config_errors_name_the_key(build, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        build(small_config()).validate()


def test_rllib_training_settings_are_refused():
    with pytest.raises(ConfigError, match="lr: RLlib training setting"):
        GoGePoConfig().training(lr=1e-3)
    with pytest.raises(ConfigError, match="gogepo: must be a dict"):
        GoGePoConfig().training(gogepo=[1, 2])


def test_registered_by_name_whatever_the_import_order():
    """`import gogepo_ray` stays free of Ray, and "GoGePo" resolves in Tune either way round."""
    first = (
        "import sys, gogepo_ray\n"
        "assert 'ray' not in sys.modules, 'import gogepo_ray pulled in ray'\n"
        "from ray.tune.registry import get_trainable_cls\n"
        "print(get_trainable_cls('GoGePo').__module__)\n"
    )
    second = (
        "from ray.rllib.algorithms.registry import ALGORITHMS\n"
        "import gogepo_ray\n"
        "print(ALGORITHMS['GoGePo']()[0].__module__)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for code in (first, second)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
        assert out.strip().splitlines()[-1] == "gogepo_ray.integrations.rllib", out


# ---------------------------------------------------------------------- train + checkpoints
def _assert_same_learner(a: dict, b: dict) -> None:
    """Two GoGePo checkpoint payloads hold the same run: the whole learner state (networks,
    optimisers, buffer contents, observation statistics, RNG states, counters), the
    driver's counters and evaluations, and the policies that were out on workers."""
    assert_same_state(a["learner"], b["learner"])
    assert_same_state(a["progress"], b["progress"], skip={"wall_seconds"})
    assert_same_state(a["inflight"], b["inflight"])


def test_train_save_and_restore_round_trip(ray_session, tmp_path, monkeypatch):
    # Outside Tune an Algorithm's logdir (= its GoGePo run directory) is a fresh
    # directory under ~/ray_results; keep this test's under tmp_path.
    monkeypatch.setattr(
        "ray.tune.trainable.trainable.DEFAULT_STORAGE_PATH", str(tmp_path / "ray_results")
    )
    algo = small_config(workers=2, steps_per_iteration=300).build_algo()
    assert Path(algo.logdir).is_relative_to(tmp_path)
    try:
        result = algo.train()
        for key in [
            "num_env_steps_sampled_lifetime",
            "num_episodes_lifetime",
            "num_env_steps_trained_lifetime",
            "training_iteration",
            "time_this_iter_s",
            "done",
        ]:
            assert key in result, key
        runners = result["env_runners"]
        assert {
            "episode_return_mean",
            "num_env_steps_sampled_lifetime",
            "num_episodes_lifetime",
        } <= runners.keys()
        assert (
            result["num_env_steps_sampled_lifetime"] >= 300 and result["num_episodes_lifetime"] > 0
        )
        assert result["timers"]["training_iteration"] > 0 and "learner_seconds" in result["timers"]
        assert {"critic", "generator"} <= result["losses"].keys() and "best_return" in result[
            "train"
        ]
        assert result["done"] is False and result["training_iteration"] == 1

        path = Path(algo.save_to_path(tmp_path / "ckpt"))
        assert {
            "rllib_checkpoint.json",
            "class_and_ctor_args.pkl",
            "algorithm_state.pkl",
            PAYLOAD_FILE,
        } <= {p.name for p in path.iterdir()}
        saved = ckpt.load(path / PAYLOAD_FILE)  # a plain GoGePo checkpoint, loaded without pickle
        learner = saved["learner"]  # a state worth comparing: nothing in it is still fresh
        assert len(learner["buffer"]["returns"]) > 0 and int(learner["obs_stats"]["count"]) > 0
        assert learner["generator_opt"]["state"] and learner["critic_opt"]["state"]
        assert saved["progress"]["env_steps"] == result["num_env_steps_sampled_lifetime"]
        # every result the driver counted is in the learner state: none left waiting
        assert saved["learner"]["counters"]["env_steps"] == saved["progress"]["env_steps"]
        assert saved["learner"]["counters"]["episodes"] == saved["progress"]["episodes"]
        # each worker left the iteration with policies out, and the checkpoint holds them
        assert len(saved["inflight"]) == 2, saved["inflight"]
        assert all(len(batch["episode_ids"]) > 0 for batch in saved["inflight"])
        _assert_same_learner(saved, algo.trainer.state())  # the running learner has not moved on
    finally:
        algo.stop()  # finishes the run: final eval, sweep, summary.json in its logdir
    summary = Path(algo.logdir) / "summary.json"
    assert summary.is_file() and (Path(algo.logdir) / "checkpoints" / "final.pt").is_file()

    from ray.rllib.algorithms.algorithm import Algorithm

    restored = Algorithm.from_checkpoint(path)
    try:
        assert isinstance(restored, GoGePo) and restored.iteration == 1
        assert restored.config.to_gogepo_config() == algo.config.to_gogepo_config()
        live = restored.trainer.state()  # from the learner actor started with the payload
        _assert_same_learner(saved, live)  # progress and unfinished policies included

        again = restored.train()
        assert again["training_iteration"] == 2
        # The unfinished training policies of the checkpoint were issued again, not dropped
        # or replaced: the episodes taken in since are theirs plus those of the ids drawn
        # after the checkpoint, less those still out on workers.
        after = restored.trainer.state()

        def train_ids(inflight: list[dict]) -> set[int]:
            return {int(i) for b in inflight if b["kind"] == "train" for i in b["episode_ids"]}

        was, now = saved["learner"]["counters"], after["learner"]["counters"]
        reissued = train_ids(saved["inflight"]) - train_ids(after["inflight"])
        drawn = set(range(was["next_train_id"], now["next_train_id"])) - train_ids(
            after["inflight"]
        )
        assert reissued, "none of the checkpoint's unfinished policies ran after the restore"
        taken = (now["episodes"] + now["failed_episodes"]) - (
            was["episodes"] + was["failed_episodes"]
        )
        assert taken == len(reissued) + len(drawn), (taken, sorted(reissued), len(drawn))
        assert (
            again["num_env_steps_sampled_lifetime"]
            >= 600
            > result["num_env_steps_sampled_lifetime"]
        )
        assert again["num_episodes_lifetime"] > result["num_episodes_lifetime"]
        evaluation = restored.evaluate()["evaluation"][
            "env_runners"
        ]  # G(best return), no noise, now
        assert evaluation["num_episodes"] == 3 and math.isfinite(evaluation["episode_return_mean"])

        # restore_from_path into a running algorithm goes back to the checkpoint.
        restored.restore_from_path(path)
        assert restored.iteration == 1
        _assert_same_learner(saved, restored.trainer.state())
    finally:
        restored.stop()


# ---------------------------------------------------------------------- Tune + MLflow
def test_tune_grid_search_nested_mlflow_runs(ray_session, tmp_path):
    from mlflow.tracking import MlflowClient
    from ray import tune

    # Each trial asks for 0.5 (driver) + 0.5 (learner) + 1 (worker) CPUs: both run at once.
    # Mixed bundle sizes: each actor is pinned to its own bundle, so none blocks another.
    config = (
        small_config(workers=1, steps_per_iteration=200)
        .resources(num_cpus_for_main_process=0.5)
        .learners(num_cpus_per_learner=0.5)
        .training(gogepo={"run": {"output_dir": str(tmp_path / "runs")}})
    )
    assert GoGePo.default_resource_request(config).bundles == [
        {"CPU": 0.5},
        {"CPU": 0.5},
        {"CPU": 1.0},
    ]
    config.training(gogepo={"generator": {"lr": tune.grid_search([1e-4, 2e-4])}})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results, parent_id = tune_with_mlflow(
        config,
        tracking_uri=uri,
        experiment="rllib-sweep",
        tune_config=tune.TuneConfig(time_budget_s=300),  # a scheduling bug fails, not hangs
        run_config=tune.RunConfig(
            name="sweep",
            storage_path=str(tmp_path / "ray_results"),
            stop={"num_env_steps_sampled_lifetime": 400},
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=True),
            verbose=0,
        ),
    )
    assert not results.errors, results.errors
    assert len(results) == 2
    lrs = []
    for r in results:
        assert r.metrics["num_env_steps_sampled_lifetime"] >= 400
        assert r.checkpoint is not None
        with r.checkpoint.as_directory() as d:
            assert (Path(d) / PAYLOAD_FILE).is_file()
            payload = ckpt.load(Path(d) / PAYLOAD_FILE)
        assert payload["progress"]["env_steps"] >= 400
        # the trial's grid value reached the run: its config and the generator's optimiser
        trial_lr = r.config["gogepo"]["generator"]["lr"]
        assert ckpt.config_of(payload).generator.lr == trial_lr
        groups = payload["learner"]["generator_opt"]["param_groups"]
        assert [g["lr"] for g in groups] == [trial_lr] * len(groups), groups
        lrs.append(groups[0]["lr"])
    assert sorted(lrs) == [1e-4, 2e-4]

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("rllib-sweep")
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert len(children) == 2
    assert sorted(c.data.params["generator.lr"] for c in children) == ["0.0001", "0.0002"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert "eval/return_mean" in child.data.metrics and "losses/critic" in child.data.metrics
