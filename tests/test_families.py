"""Task-family envs (gogepo_ray.envs.families): the context protocol and each family's reward."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

import gogepo_ray.envs  # noqa: F401 - the import that registers the ids where Ray workers run
from gogepo_ray.envs import families
from gogepo_ray.envs.families import check_context, context_space_of

FAMILY_IDS = {"PointGoal-v0": 100, "HalfCheetahVel-v0": 200, "AntDir-v0": 200}
BASE_OF = {"HalfCheetahVel-v0": "HalfCheetah-v5", "AntDir-v0": "Ant-v5"}


def _make(env_id, **kwargs):
    return gym.make(env_id, disable_env_checker=True, **kwargs)


def _actions(env, n, seed=0):
    rng = np.random.default_rng(seed)
    space = env.action_space
    return [rng.uniform(space.low, space.high).astype(space.dtype) for _ in range(n)]


def _run(env, actions, seed, options=None):
    """(rewards, infos) of one seeded episode prefix; stops early on termination."""
    env.reset(seed=seed, options=options)
    rewards, infos = [], []
    for a in actions:
        _, r, terminated, truncated, info = env.step(a)
        rewards.append(float(r))
        infos.append(info)
        if terminated or truncated:
            break
    return np.array(rewards), infos


# ----------------------------------------------------------------------------- protocol


@pytest.mark.parametrize("env_id", FAMILY_IDS)
def test_family_makes_and_follows_the_protocol(env_id):
    env = gym.make(env_id)  # with gymnasium's env checker
    try:
        assert env.spec.max_episode_steps == FAMILY_IDS[env_id]
        base = env.unwrapped
        space, names = context_space_of(env)
        assert space is type(base).context_space and names == type(base).context_names
        assert space.dtype == np.float64 and space.shape == (len(names),)
        assert base.context.dtype == np.float64
        assert base.context.tolist() == list(base.default_context)
        assert space.contains(base.context)
        obs, _ = env.reset(seed=0)
        assert obs.shape == env.observation_space.shape
        assert obs.dtype == np.float64
        obs, *_ = env.step(env.action_space.sample())
        assert obs.shape == env.observation_space.shape
    finally:
        env.close()


@pytest.mark.parametrize("env_id", FAMILY_IDS)
def test_context_is_not_in_the_observation(env_id):
    env = _make(env_id)
    space, _ = context_space_of(env)
    a, b = space.low + 0.25 * (space.high - space.low), space.high
    actions = _actions(env, 3)
    obs_a = [env.reset(seed=5, options={"context": a})[0]]
    obs_a += [env.step(x)[0] for x in actions]
    obs_b = [env.reset(seed=5, options={"context": b})[0]]
    obs_b += [env.step(x)[0] for x in actions]
    np.testing.assert_array_equal(np.array(obs_a), np.array(obs_b))
    if env_id in BASE_OF:  # same observation as the plain v5 env
        base = _make(BASE_OF[env_id])
        assert base.observation_space.shape == env.observation_space.shape
        base.close()
    env.close()


def test_reset_switches_and_keeps_the_context():
    env = _make("PointGoal-v0", context=[1.0, -1.0])
    base = env.unwrapped
    assert base.context.tolist() == [1.0, -1.0]
    env.reset(seed=0)
    assert base.context.tolist() == [1.0, -1.0]
    env.reset(options={"context": (-0.5, 0.25)})
    assert base.context.tolist() == [-0.5, 0.25]
    env.reset()  # no options: keeps the current context
    assert base.context.tolist() == [-0.5, 0.25]
    with pytest.raises(ValueError, match="goal_y = 9"):
        env.reset(options={"context": [0.0, 9.0]})
    assert base.context.tolist() == [-0.5, 0.25]  # a rejected context changes nothing
    with pytest.raises(ValueError):  # the context is validated, not written in place
        base.context[0] = 5.0


def test_constructor_validates_the_context():
    with pytest.raises(ValueError, match="target_velocity = 4 is outside"):
        families.HalfCheetahVel(context=4.0)
    with pytest.raises(ValueError, match="this family takes 2"):
        _make("PointGoal-v0", context=[0.1])


def test_pickle_keeps_the_current_context():
    env = families.HalfCheetahVel(context=2.0)
    env.reset(options={"context": [2.5]})
    clone = pickle.loads(pickle.dumps(env))
    assert clone.context.tolist() == [2.5]
    env.close()
    clone.close()


def test_context_space_of():
    hopper = _make("Hopper-v5")
    assert context_space_of(hopper) is None
    hopper.close()
    for cls in (families.PointGoal, families.HalfCheetahVel, families.AntDir):
        assert context_space_of(cls.__new__(cls)) == (cls.context_space, cls.context_names)
    space, names = context_space_of(_make("AntDir-v0"))
    assert names == ("direction",)
    np.testing.assert_allclose([space.low[0], space.high[0]], [-math.pi, math.pi])


def test_registration_is_idempotent():
    code = (
        "import importlib, warnings\n"
        "import gymnasium as gym\n"
        "import gogepo_ray.envs.families as f\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    importlib.reload(f)\n"
        "assert not caught, [str(w.message) for w in caught]\n"
        "gym.make('PointGoal-v0', disable_env_checker=True)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------- check_context

GOAL = (families.PointGoal.context_space, families.PointGoal.context_names)
VEL = (families.HalfCheetahVel.context_space, families.HalfCheetahVel.context_names)


def test_check_context_accepts_valid_values():
    out = check_context(*GOAL, [2, -2])
    assert out.dtype == np.float64 and out.tolist() == [2.0, -2.0]
    assert check_context(*VEL, 1.5).tolist() == [1.5]  # a scalar for a 1-D family
    assert check_context(*VEL, np.array([0.0])).tolist() == [0.0]


@pytest.mark.parametrize(
    ("spec", "value", "message"),
    [
        (GOAL, [0.5], "context has 1 value, this family takes 2 (goal_x, goal_y)"),
        (GOAL, [0.1, 0.2, 0.3], "context has 3 values, this family takes 2"),
        (GOAL, 0.5, "context has 1 value, this family takes 2"),
        (VEL, [1.0, 2.0], "context has 2 values, this family takes 1 (target_velocity)"),
        (GOAL, [[0.1, 0.2]], "flat list of numbers"),
        (GOAL, [float("nan"), 0.0], "context goal_x is nan"),
        (GOAL, [0.0, float("inf")], "context goal_y is inf"),
        (
            GOAL,
            [2.5, 0.0],
            "context goal_x = 2.5 is outside the family's valid range [-2, 2]",
        ),
        (VEL, -0.5, "context target_velocity = -0.5 is outside the family's valid range [0, 3]"),
        (VEL, "fast", "context must be numbers"),
        (VEL, None, "context is None"),
    ],
)
def test_check_context_errors_name_the_problem(spec, value, message):
    with pytest.raises(ValueError) as err:
        check_context(*spec, value)
    assert message in str(err.value)


# ------------------------------------------------------------------------------ PointGoal


def test_point_goal_reward_is_minus_distance():
    env = _make("PointGoal-v0", context=[1.0, -0.5])
    obs, _ = env.reset(seed=1)
    assert np.all(np.abs(obs) <= 0.01)
    for a in _actions(env, 30, seed=1) + [np.array([5.0, -5.0])]:  # the last one is clipped
        prev = obs
        obs, r, terminated, truncated, info = env.step(a)
        assert not terminated and not truncated
        np.testing.assert_allclose(obs - prev, np.clip(a, -0.1, 0.1), atol=1e-12)
        assert r == pytest.approx(-np.linalg.norm(obs - [1.0, -0.5]))
        assert info["distance"] == pytest.approx(-r)
    env.close()


def test_point_goal_stays_in_the_arena_and_runs_to_the_time_limit():
    env = _make("PointGoal-v0", context=[2.0, 2.0])
    env.reset(seed=0)
    steps, truncated = 0, False
    while not truncated:
        obs, _, terminated, truncated, _ = env.step(np.array([0.1, 0.1]))
        assert not terminated
        steps += 1
    assert steps == 100
    assert obs.tolist() == [2.0, 2.0]


def _point_return(env, goal, policy):
    obs, _ = env.reset(seed=0, options={"context": goal})
    total, done = 0.0, False
    while not done:
        obs, r, terminated, truncated, _ = env.step(policy(obs, np.asarray(goal)))
        total += r
        done = terminated or truncated
    return total


def _toward(obs, goal):
    d = goal - obs
    n = np.linalg.norm(d)
    return d if n <= 0.1 else 0.1 * d / n


def test_point_goal_moving_to_the_goal_beats_standing_still():
    env = _make("PointGoal-v0")
    goal = (1.5, -1.0)
    still = _point_return(env, goal, lambda obs, g: np.zeros(2))
    moving = _point_return(env, goal, _toward)
    assert moving > still + 50  # standing still costs ~1.8 per step, arriving ~0.1
    env.close()


def test_point_goal_switching_the_goal_changes_rewards():
    env = _make("PointGoal-v0")
    actions = _actions(env, 10)
    r_a, _ = _run(env, actions, seed=2, options={"context": [1.0, 1.0]})
    r_b, _ = _run(env, actions, seed=2, options={"context": [-1.0, 1.0]})
    assert not np.allclose(r_a, r_b)
    r_a2, _ = _run(env, actions, seed=2, options={"context": [1.0, 1.0]})
    np.testing.assert_array_equal(r_a, r_a2)


def test_point_goal_seeded_resets_are_reproducible():
    env = _make("PointGoal-v0")
    first = [env.reset(seed=7)[0] for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    assert not np.array_equal(first[0], env.reset(seed=8)[0])
    actions = _actions(env, 5)
    np.testing.assert_array_equal(_run(env, actions, 3)[0], _run(env, actions, 3)[0])


def test_point_goal_rejects_bad_actions():
    env = families.PointGoal()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="not finite"):
        env.step(np.array([np.nan, 0.0]))
    with pytest.raises(ValueError, match="2-D action"):
        env.step(np.zeros(3))


def test_point_goal_rgb_array_render():
    env = _make("PointGoal-v0", render_mode="rgb_array", context=[1.0, 1.0])
    env.reset(seed=0)
    img = env.render()
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8
    assert img.ndim == 3 and img.shape[2] == 3
    red = (img[..., 0] > 200) & (img[..., 1] < 100)
    rows, cols = np.nonzero(red)
    # the goal (1, 1) is drawn in the upper right quarter
    assert rows.mean() < img.shape[0] / 2 < cols.mean()
    env.step(np.array([0.1, -0.1]))
    assert not np.array_equal(img, env.render())
    env.close()
    with pytest.raises(ValueError, match="render_mode"):
        families.PointGoal(render_mode="human")


# ------------------------------------------------------------------------- HalfCheetahVel


def test_half_cheetah_vel_reward_tracks_the_target_velocity():
    env = _make("HalfCheetahVel-v0")
    actions = _actions(env, 12, seed=3)
    r_slow, info_slow = _run(env, actions, seed=11, options={"context": [0.5]})
    r_fast, info_fast = _run(env, actions, seed=11, options={"context": [2.0]})
    v = np.array([i["x_velocity"] for i in info_slow])
    np.testing.assert_array_equal(v, [i["x_velocity"] for i in info_fast])
    # same seed and actions: only the |v - v*| term differs
    np.testing.assert_allclose(r_slow - r_fast, -np.abs(v - 0.5) + np.abs(v - 2.0), atol=1e-9)
    assert info_fast[0]["target_velocity"] == 2.0
    np.testing.assert_allclose([i["velocity_error"] for i in info_fast], v - 2.0)
    for key in ("x_position", "x_velocity", "reward_forward", "reward_ctrl"):
        assert key in info_fast[0]

    # the control cost is HalfCheetah-v5's own: its reward is x_velocity - ctrl_cost
    base = _make("HalfCheetah-v5")
    r_base, info_base = _run(base, actions, seed=11)
    np.testing.assert_array_equal(v, [i["x_velocity"] for i in info_base])
    np.testing.assert_allclose(r_fast, -np.abs(v - 2.0) - (v - r_base), atol=1e-9)
    env.close()
    base.close()


# -------------------------------------------------------------------------------- AntDir


def test_ant_dir_direction_zero_is_ant_v5():
    env = _make("AntDir-v0", context=0.0)
    base = _make("Ant-v5")
    actions = _actions(env, 15, seed=4)
    r_dir, info_dir = _run(env, actions, seed=21)
    r_base, info_base = _run(base, actions, seed=21)
    assert len(r_dir) == len(r_base) > 0
    np.testing.assert_allclose(r_dir, r_base, atol=1e-9)
    for a, b in zip(info_dir, info_base):
        assert a["reward_forward"] == pytest.approx(a["x_velocity"])
        assert a["x_velocity"] == b["x_velocity"]
    env.close()
    base.close()


def test_ant_dir_quarter_turn_uses_y_velocity():
    env = _make("AntDir-v0")
    actions = _actions(env, 15, seed=5)
    r_y, infos = _run(env, actions, seed=22, options={"context": [math.pi / 2]})
    r_x, _ = _run(env, actions, seed=22, options={"context": [0.0]})
    vx = np.array([i["x_velocity"] for i in infos])
    vy = np.array([i["y_velocity"] for i in infos])
    costs = np.array([i["reward_survive"] + i["reward_ctrl"] + i["reward_contact"] for i in infos])
    np.testing.assert_allclose(r_y, vy + costs, atol=1e-9)
    np.testing.assert_allclose(r_y - r_x[: len(r_y)], vy - vx, atol=1e-9)
    assert infos[0]["direction"] == pytest.approx(math.pi / 2)
    env.close()
