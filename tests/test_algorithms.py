"""The algorithm registry: nothing outside it tests an algorithm's name, a tiny third
algorithm trains through the CLI and RLlib once registered, and the package has no import
cycle."""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import pytest

from gogepo_ray import algorithms
from gogepo_ray.config import ConfigError, build_config
from tests import tiny_algorithm

PACKAGE = Path(__file__).resolve().parents[1] / "gogepo_ray"

# An algorithm-name test: `algorithm ==/!=/in`, or a built-in name compared or listed.
NAME_TEST = re.compile(
    r"algorithm\s*(==|!=|\bin\b|\bnot in\b)"
    r"|(==|!=)\s*['\"](gogepo|ars)['\"]"
    r"|['\"](gogepo|ars)['\"]\s*(==|!=|\bin\b)"
    r"|isinstance\([^)]*(ArsLearner|Learner)\b"
)


def test_no_algorithm_name_test_outside_the_registry():
    hits = [
        f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
        for path in PACKAGE.rglob("*.py")
        if "algorithms" not in path.relative_to(PACKAGE).parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if NAME_TEST.search(line)
    ]
    assert hits == []


def test_the_pattern_sees_a_name_test():
    # the grep above is only worth something if it catches the branches it is meant to
    for line in [
        'if cfg.algorithm == "ars":',
        'x = y if a != "gogepo" else z',
        "algorithm in (1,)",
    ]:
        assert NAME_TEST.search(line), line


def test_unknown_algorithm_names_the_registered_ones():
    with pytest.raises(ConfigError) as err:
        build_config({"algorithm": "ppo", "env": {"id": "InvertedPendulum-v5"}})
    assert "algorithm" in str(err.value) and "'ppo'" in str(err.value)
    assert "gogepo" in str(err.value) and "ars" in str(err.value)


def test_builtin_entries_load_their_learners():
    assert set(algorithms.BUILTIN) <= set(algorithms.names())
    for name in algorithms.BUILTIN:
        entry = algorithms.get(name)
        module, _, cls = entry.learner.partition(":")
        assert hasattr(__import__(module, fromlist=[cls]), cls), entry.learner
    assert algorithms.get("gogepo").takes_commands and not algorithms.get("ars").takes_commands


@pytest.fixture()
def hillclimb():
    entry = tiny_algorithm.install()
    yield entry
    algorithms._REGISTRY.pop(entry.name, None)


TINY = [
    "algorithm=hillclimb",
    "env.id=InvertedPendulum-v5",
    "env.return_max=1000",
    "env.max_episode_steps=200",
    "run.workers=1",
    "run.total_env_steps=1200",
    "run.eval_every=600",
    "run.eval_episodes=3",
    "tracking.enabled=false",
]


@pytest.mark.e2e
def test_a_registered_third_algorithm_trains_through_the_cli(
    hillclimb, ray_session, tmp_path, capsys
):
    from gogepo_ray import checkpoint as ckpt
    from gogepo_ray.cli import main

    config = tmp_path / "hillclimb.yaml"
    config.write_text(
        "algorithm: hillclimb\nenv:\n  id: InvertedPendulum-v5\npolicy:\n  hidden: []\n"
    )
    sets = [a for kv in [*TINY[2:], f"run.output_dir={tmp_path}"] for a in ("--set", kv)]
    run = tmp_path / "run"
    assert main(["train", str(config), *sets, "--no-progress", "--run-dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["env_steps"] >= 1200 and summary["episodes"] > 0
    assert summary["command_fidelity"] is None and not (run / "sweep.csv").exists()
    payload = ckpt.load(run, "latest")
    assert payload["config"]["algorithm"] == "hillclimb"
    assert payload["learner"]["theta"].shape == (5,)  # InvertedPendulum's linear policy
    # the hill climber keeps the best training policy: its θ's return is the run's best
    assert payload["learner"]["theta_return"] == pytest.approx(summary["best_train_return"])
    capsys.readouterr()
    assert main(["eval", str(run), "--episodes", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["algorithm"] == "hillclimb" and out["command"] is None and out["episodes"] == 2
    assert main(["eval", str(run), "--command", "100"]) == 2  # its policy takes no command
    assert "takes no command" in capsys.readouterr().err


@pytest.mark.e2e
def test_a_registered_third_algorithm_trains_through_rllib(
    hillclimb, ray_session, tmp_path, monkeypatch
):
    from gogepo_ray.integrations.rllib import GoGePoConfig, algorithm_class

    monkeypatch.setattr(
        "ray.tune.trainable.trainable.DEFAULT_STORAGE_PATH", str(tmp_path / "ray_results")
    )
    cls = algorithm_class("hillclimb")
    assert cls.__name__ == "GoGePoHillClimb" and algorithm_class("hillclimb") is cls
    config = (
        cls.get_default_config()
        .environment("InvertedPendulum-v5")
        .env_runners(num_env_runners=1)
        .training(
            gogepo={
                "env": {"max_episode_steps": 200},
                "policy": {"hidden": []},
                "run": {"eval_every": 300},
            },
            return_max=1000,
            steps_per_iteration=300,
        )
    )
    assert config.tune_name() == "GoGePoHillClimb"
    algo = config.build_algo()
    try:
        first, second = algo.train(), algo.train()
        assert (
            second["num_env_steps_sampled_lifetime"]
            >= 600
            > first["num_env_steps_sampled_lifetime"] - 1
        )
        assert math.isfinite(second["hill"]["theta_return"])  # its own metric, by namespace
    finally:
        algo.stop()
    # a builder of another algorithm names the one to use
    with pytest.raises(ConfigError, match="GoGePoHillClimb"):
        GoGePoConfig().environment("InvertedPendulum-v5").training(
            gogepo={"algorithm": "hillclimb"}
        ).to_gogepo_config()


def _module_imports(path: Path, name: str) -> set[str]:
    """The gogepo_ray modules ``path`` imports, at its top or inside a function (an import
    that runs later is still a dependency), leaving out those under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m.split(".")[0] == "gogepo_ray"}


def test_no_import_cycle_inside_the_package():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        modules[".".join(parts)] = path
    graph = {
        name: {m for m in _module_imports(path, name) if m in modules and m != name}
        for name, path in modules.items()
    }
    # a package's own __init__ importing its submodules is not a cycle with them
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    cycles, state = [], {}

    def walk(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert cycles == []
