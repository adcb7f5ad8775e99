"""Config loading and validation: every shipped config loads, and each kind of mistake is
rejected with a ConfigError whose message names the offending field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gogepo_ray.config import (
    Config,
    ConfigError,
    build_config,
    load_config,
    parse_override,
)
from gogepo_ray.envs import EnvError, check_env_id, make_env, policy_spec

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def error_of(overrides: list[str], path=None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path, overrides)
    return str(exc.value)


# ---------------------------------------------------------------- shipped configs
def test_there_are_configs():
    """Every config the README, the docs and the Makefile name is shipped, and every env
    the config reference promises a config for has one (GoGePo and task families; the
    ARS baseline's are ars_*.yaml)."""
    import yaml

    names = {p.name for p in CONFIGS}
    texts = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md"))]
    cited = {name for t in texts for name in re.findall(r"configs/(\w+\.yaml)", t.read_text())}
    assert {"inverted_pendulum_fast.yaml", "hopper.yaml"} <= cited  # the quick start's
    assert cited <= names, f"named in the docs but not shipped: {sorted(cited - names)}"
    shipped = [yaml.safe_load(p.read_text()) for p in CONFIGS]
    gogepo = {c["env"]["id"] for c in shipped if c.get("algorithm", "gogepo") == "gogepo"}
    ars = {c["env"]["id"] for c in shipped if c.get("algorithm") == "ars"}
    assert {
        "InvertedPendulum-v5",
        "MountainCarContinuous-v0",
        "Swimmer-v5",
        "Hopper-v5",
        "HalfCheetah-v5",
        "Walker2d-v5",
        "Ant-v5",
        "PointGoal-v0",
        "HalfCheetahVel-v0",
        "AntDir-v0",
    } <= gogepo, gogepo
    assert {"Hopper-v5", "HalfCheetah-v5", "Swimmer-v5", "InvertedPendulum-v5"} <= ars, ars


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    import yaml

    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert raw and cfg != Config(), "a shipped config says something the defaults do not"
    # What the file says is what the config holds; the rest are defaults.
    for section, values in raw.items():
        if not isinstance(values, dict):  # a top-level key: algorithm
            assert getattr(cfg, section) == values, section
            continue
        # the file's keys plus the defaults, with shorthand read as the validators read it
        # (context.heldout: [0.5, 1.5] holds [[0.5], [1.5]])
        model = getattr(cfg, section)
        assert model == type(model).model_validate(values), section
    assert cfg.env.return_max > cfg.env.return_min
    spec = policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs)
    assert spec.obs_dim >= 1 and spec.act_dim >= 1
    # The dump loads back to the same config.
    again = build_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_defaults():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.generator.lr == 2e-6 and cfg.critic.lr == 5e-3
    assert cfg.exploration.drive == 20.0 and cfg.exploration.param_noise == 0.1
    assert cfg.buffer.recency_exponent == 1.1
    flat = cfg.flat()
    assert flat["generator.lr"] == 2e-6 and flat["policy.hidden"] == [256, 256]
    assert flat["env.kwargs"] == {}


# ---------------------------------------------------------------- overrides
def test_override_parsing():
    assert parse_override("generator.hidden=[64,64]") == (["generator", "hidden"], [64, 64])
    assert parse_override("generator.lr=0.5") == (["generator", "lr"], 0.5)
    assert parse_override("run.name=a=b") == (["run", "name"], "a=b")
    assert parse_override("run.name=") == (["run", "name"], "")
    cfg = load_config(None, ["generator.hidden=[64,64]", "run.workers=3", "env.survival_offset=-1"])
    assert cfg.generator.hidden == [64, 64] and isinstance(cfg.generator.hidden, list)
    assert cfg.run.workers == 3 and cfg.env.survival_offset == -1.0
    with pytest.raises(ConfigError):
        parse_override("generator.lr")
    with pytest.raises(ConfigError):
        parse_override("=3")
    with pytest.raises(ConfigError):
        parse_override("generator.hidden=[64,")


def test_override_scientific_notation_is_a_number():
    """parse_override's own docstring: ``generator.lr=1e-5`` -> (["generator", "lr"], 1e-05).
    Learning rates are written this way; the value must be a float, not the string '1e-5'
    (which would reach env.kwargs, a dict of Any, unconverted)."""
    assert load_config(None, ["generator.lr=1e-5"]).generator.lr == 1e-5
    assert parse_override("generator.lr=1e-5") == (["generator", "lr"], 1e-5)
    cfg = load_config(None, ["env.kwargs={reset_noise_scale: 1e-3}"])
    assert cfg.env.kwargs == {"reset_noise_scale": 1e-3}


def test_override_on_top_of_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("generator:\n  lr: 0.001\n  tile: 8\n")
    cfg = load_config(p, ["generator.lr=0.5"])
    assert cfg.generator.lr == 0.5 and cfg.generator.tile == 8
    # An override cannot descend into a value that is not a section.
    msg = error_of(["generator.lr.x=1"], p)
    assert msg == "override 'generator.lr.x=1': lr is not a section", msg


# ---------------------------------------------------------------- rejected values
def test_unknown_key():
    msg = error_of(["generator.lrr=1"])
    assert "generator.lrr" in msg and "unknown key" in msg
    msg = error_of(["genrator.lr=1"])
    assert "genrator" in msg and "unknown key" in msg


@pytest.mark.parametrize(
    "override,field",
    [
        ("run.workers=abc", "run.workers"),
        ("run.workers=-1", "run.workers"),
        ("run.workers=0", "run.workers"),
        ("generator.batch_size=0", "generator.batch_size"),
        ("critic.lr=0", "critic.lr"),
        ("generator.lr=-1", "generator.lr"),
        ("generator.tile=0", "generator.tile"),
        ("generator.saturation_penalty=-1e-4", "generator.saturation_penalty"),
        ("generator.saturation_penalty=inf", "generator.saturation_penalty"),
        ("policy.hidden=[16,0]", "policy.hidden"),
        ("buffer.capacity=0", "buffer.capacity"),
        ("exploration.param_noise=-0.1", "exploration.param_noise"),
        ("learner.device=tpu", "learner.device"),
        ("learner.precision=fp8", "learner.precision"),
        ("run.sweep_commands=1", "run.sweep_commands"),
        ("env.max_episode_steps=0", "env.max_episode_steps"),
    ],
)
def test_bad_values_name_the_field(override, field):
    msg = error_of([override])
    assert field in msg, msg


def test_several_errors_reported_together():
    msg = error_of(["critic.lr=0", "generator.lrr=1"])
    assert "critic.lr" in msg and "generator.lrr" in msg


@pytest.mark.parametrize("lo,hi", [(100, 100), (100, 50)])
def test_return_range(lo, hi):
    msg = error_of([f"env.return_min={lo}", f"env.return_max={hi}"])
    assert "env" in msg and "return_max must be greater than return_min" in msg


@pytest.mark.parametrize(
    "env_id,words",
    [
        ("NoSuchEnv-v9", ["unknown env id", "NoSuchEnv-v9"]),
        ("CartPole-v1", ["action space must be a Box", "Discrete"]),  # Discrete actions
        ("Blackjack-v1", ["observation space must be a Box", "Tuple"]),  # Tuple observations
        ("tests.envs:DictObsEnv", ["observation space must be a Box", "Dict"]),
        ("tests.envs:ImageObsEnv", ["1-D"]),
        ("tests.envs:UnboundedActionEnv", ["finite"]),
        ("tests.envs:NotAnEnv", ["gymnasium.Env"]),
        ("tests.envs:NoSuchClass", ["no attribute"]),
        ("tests.no_such_module:Env", ["cannot import"]),
    ],
)
def test_unusable_envs_name_env_id(env_id, words):
    msg = error_of([f"env.id={env_id}"])
    assert "env.id" in msg, msg
    for w in words:
        assert w in msg, msg


def test_env_errors_are_env_errors():
    with pytest.raises(EnvError):
        check_env_id("CartPole-v1")
    with pytest.raises(EnvError):
        check_env_id("NoSuchEnv-v9")


# ---------------------------------------------------------------- files
def test_malformed_yaml_names_the_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("env:\n  id: [InvertedPendulum-v5\n  return_max: 5\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(p) in str(exc.value)


def test_non_mapping_yaml_and_missing_file(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(p) in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(exc.value)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()


def test_invalid_file_content_names_file_and_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("critic:\n  lr: 0\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(p) in str(exc.value) and "critic.lr" in str(exc.value)


# ---------------------------------------------------------------- entry-point envs
def test_entry_point_env():
    spec = policy_spec("tests.envs:NoisyPointEnv", [8])
    assert spec.obs_dim == 3 and spec.act_dim == 2 and spec.hidden == (8,)
    assert spec.action_low == (0.0, -1.0) and spec.action_high == (2.0, 1.0)
    cfg = load_config(None, ["env.id=tests.envs:NoisyPointEnv", "env.kwargs={noise: 0.2}"])
    assert cfg.env.id == "tests.envs:NoisyPointEnv" and cfg.env.kwargs == {"noise": 0.2}
    env = make_env(cfg.env.id, cfg.env.kwargs, max_episode_steps=5)
    assert env.unwrapped.noise == 0.2
    env.close()


def test_env_validated_with_its_kwargs():
    """env.kwargs belong to the env: validation must build the env with them. An env whose
    constructor requires an argument is valid when env.kwargs supplies it, and its spaces
    are those built with the kwargs."""
    cfg = load_config(None, ["env.id=tests.envs:SizedEnv", "env.kwargs={obs_dim: 6}"])
    assert cfg.env.kwargs == {"obs_dim": 6}
    assert policy_spec(cfg.env.id, [4], cfg.env.kwargs).obs_dim == 6
    msg = error_of(["env.id=tests.envs:NoisyPointEnv", "env.kwargs={no_such_argument: 1}"])
    assert "env" in msg


def test_env_kwargs_from_yaml_lists_work():
    """YAML writes sequences as lists (e.g. Ant-v5's contact_force_range); a config that
    validates must also give a policy spec (trainer.py and cli.py call policy_spec with
    cfg.env.kwargs)."""
    cfg = load_config(None, ["env.id=tests.envs:NoisyPointEnv", "env.kwargs={target: [1.0, 0.0]}"])
    spec = policy_spec(cfg.env.id, [4], cfg.env.kwargs)
    assert spec.obs_dim == 3 and spec.act_dim == 2


def test_precision_auto_follows_the_hardware():
    from gogepo_ray.sysinfo import bf16_flags, resolve_precision

    assert load_config(None).learner.precision == "auto"
    expected = "bf16" if bf16_flags() else "fp32"
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("auto", "cpu", 70_000) == expected
    assert resolve_precision("auto", "cpu", 1_500) == "fp32"  # casts cost more than they save
    assert resolve_precision("auto", "cuda:0") == "bf16"
    assert resolve_precision("auto", "cuda:0", 50) == "bf16"
    assert resolve_precision("fp32", "cuda") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"


@pytest.mark.parametrize("value", ["0", "-1", "65", "fast"])
def test_updates_per_episode_must_be_a_positive_number(value):
    with pytest.raises(ConfigError, match="learner.updates_per_episode"):
        load_config(None, [f"learner.updates_per_episode={value}"])
