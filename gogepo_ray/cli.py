"""The ``gogepo`` command line: train, eval, sweep, export (and cluster job commands).

A user's mistake (bad config, missing checkpoint, unknown env) prints one ``error:`` line
that names the problem and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gogepo_ray.checkpoint import CheckpointError
from gogepo_ray.config import ConfigError
from gogepo_ray.envs import EnvError
from gogepo_ray.errors import TrainingError
from gogepo_ray.jobs import JobsError

USER_ERRORS = (ConfigError, CheckpointError, EnvError, JobsError)


def _add_overrides(p: argparse.ArgumentParser, hint: str) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value (repeatable); {hint}",
    )


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a generator on a local Ray instance (or the cluster in RAY_ADDRESS)"
    )
    p.add_argument("config", nargs="?", help="YAML config, e.g. configs/inverted_pendulum.yaml")
    _add_overrides(p, "e.g. --set generator.lr=1e-5")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint"
    )
    p.add_argument(
        "--run-dir", help="run directory (default: <run.output_dir>/<env>-<time>-s<seed>)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_checkpoint_cmds(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate G(command) from a checkpoint")
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument(
        "--command", type=float, default=None, help="desired return (default: best training return)"
    )
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("sweep", help="achieved vs commanded return over the env's return range")
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument(
        "--commands",
        type=int,
        default=None,
        help="number of commands (default: run.sweep_commands)",
    )
    p.add_argument("--episodes", type=int, default=3, help="episodes per command")
    p.add_argument("--out", default=None, help="output stem (default: <run_dir>/sweep)")

    p = sub.add_parser("export", help="write G(command) as a standalone torch policy file")
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument("--command", type=float, required=True, help="desired return")
    p.add_argument("--out", required=True, help="output file, e.g. policy.pt")


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        help="the cluster's dashboard, http://HOST:8265 (default: $RAY_ADDRESS, else http://127.0.0.1:8265)",
    )


def _add_jobs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="run `gogepo train CONFIG` on a Ray cluster as a Ray Job",
        description="Submit a training run as a Ray Job. The working directory (default: the "
        "current one) is uploaded and the job runs `python -m gogepo_ray train CONFIG` in it. "
        "Clusters with token auth need RAY_AUTH_MODE=token and the token (RAY_AUTH_TOKEN, "
        "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token). MLFLOW_TRACKING_URI is passed on to the job.",
    )
    p.add_argument(
        "config", help="YAML config inside the working directory, e.g. configs/hopper.yaml"
    )
    _add_overrides(p, "on a cluster always set run.workers")
    _add_address(p)
    p.add_argument(
        "--working-dir",
        default=".",
        help="directory uploaded as the job's working directory (default: .)",
    )
    p.add_argument(
        "--no-working-dir",
        action="store_true",
        help="upload nothing: run the code and CONFIG path already on the cluster (e.g. the image's /app)",
    )
    p.add_argument(
        "--pip",
        action="append",
        default=[],
        metavar="REQUIREMENT",
        help="extra pip package installed for the job (repeatable; the cluster needs a package index)",
    )
    p.add_argument(
        "--submission-id", default=None, help="job id to use (default: Ray picks raysubmit_...)"
    )
    p.add_argument(
        "--follow",
        action="store_true",
        help="stream the job's logs until it ends; exit status 0 only if it SUCCEEDED",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --follow: stop following after this long (the job keeps running)",
    )

    p = sub.add_parser("jobs", help="status, logs, stop and list of Ray Jobs on a cluster")
    jobs = p.add_subparsers(dest="jobs_cmd", required=True)
    q = jobs.add_parser("status", help="print a job's status")
    q.add_argument("job_id", metavar="ID", help="submission id, e.g. raysubmit_...")
    _add_address(q)
    q = jobs.add_parser("logs", help="print a job's logs")
    q.add_argument("job_id", metavar="ID", help="submission id")
    _add_address(q)
    q.add_argument(
        "--follow",
        action="store_true",
        help="stream until the job ends; exit 0 only if it SUCCEEDED",
    )
    q.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --follow: stop after this long",
    )
    q = jobs.add_parser("stop", help="stop a running job")
    q.add_argument("job_id", metavar="ID", help="submission id")
    _add_address(q)
    q = jobs.add_parser("list", help="list the cluster's submitted jobs")
    _add_address(q)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gogepo", description=__doc__.splitlines()[0])
    from gogepo_ray import __version__

    parser.add_argument("--version", action="version", version=f"gogepo-ray {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_train(sub)
    _add_checkpoint_cmds(sub)
    _add_jobs(sub)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from gogepo_ray import checkpoint as ckpt
    from gogepo_ray.callbacks import JsonlMetrics, MLflowTracker, ProgressBar
    from gogepo_ray.config import load_config
    from gogepo_ray.trainer import Trainer, load_resume

    if args.resume and (args.config or args.overrides):
        raise ConfigError(
            "--resume continues a run with its own config; give no CONFIG or --set with it"
        )
    if not args.resume and not args.config:
        raise ConfigError(
            "give a CONFIG file (e.g. configs/inverted_pendulum.yaml) or --resume RUN_DIR"
        )
    payload = load_resume(args.resume) if args.resume else None
    cfg = ckpt.config_of(payload) if payload else load_config(args.config, args.overrides)
    callbacks: list = [ProgressBar(disable=args.no_progress), JsonlMetrics()]
    tracker = MLflowTracker(experiment=cfg.tracking.experiment) if cfg.tracking.enabled else None
    if tracker is not None:
        callbacks.append(tracker)
    run_dir = args.resume or args.run_dir
    trainer = Trainer(cfg, run_dir=run_dir, callbacks=callbacks, resume=payload)
    print(f"run directory: {trainer.run_dir}", file=sys.stderr)
    try:
        trainer.run_until(trainer.cfg.run.total_env_steps)
        summary = trainer.finish()
    except KeyboardInterrupt:
        trainer.save_checkpoint()
        if tracker is not None:
            tracker.fail()
        print(
            f"\ninterrupted; checkpoint saved. Continue with: gogepo train --resume {trainer.run_dir}",
            file=sys.stderr,
        )
        return 130
    except BaseException:
        if tracker is not None:
            tracker.fail()
        raise
    finally:
        trainer.shutdown()
    print(json.dumps({k: v for k, v in summary.items() if k != "eval_history"}, indent=2))
    print(
        f"run directory: {trainer.run_dir}  (summary.json, checkpoints/, sweep.png)",
        file=sys.stderr,
    )
    return 0


def _local_learner(path: str):
    from gogepo_ray import checkpoint as ckpt
    from gogepo_ray.core.learner import Learner
    from gogepo_ray.envs import policy_spec

    payload = ckpt.load(path)
    cfg = ckpt.config_of(payload)
    spec = policy_spec(cfg.env.id, cfg.policy.hidden, cfg.env.kwargs)
    learner = Learner(cfg, spec)
    try:
        learner.load_state_dict(payload["learner"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: checkpoint does not match its env/architecture ({cfg.env.id}, hidden {cfg.policy.hidden}): {exc}"
        ) from None
    return cfg, spec, learner


def _rollouts(cfg, spec):
    from gogepo_ray.rollout import Rollouts

    return Rollouts(
        cfg.env.id, spec, env_kwargs=cfg.env.kwargs, max_episode_steps=cfg.env.max_episode_steps
    )


def cmd_eval(args: argparse.Namespace) -> int:
    if args.episodes < 1:
        raise ConfigError("--episodes must be at least 1")
    cfg, spec, learner = _local_learner(args.checkpoint)
    command = learner.eval_command() if args.command is None else args.command
    result = _rollouts(cfg, spec).run(learner.propose_eval([command], args.episodes))
    out = {
        "env_id": cfg.env.id,
        "command": command,
        "episodes": args.episodes,
        "return_mean": float(result.returns.mean()),
        "return_std": float(result.returns.std()),
        "length_mean": float(result.lengths.mean()),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{cfg.env.id}  command {command:.1f}  ->  return {out['return_mean']:.1f} ± {out['return_std']:.1f}"
            f"  over {args.episodes} episodes"
        )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from gogepo_ray import checkpoint as ckpt
    from gogepo_ray.evaluation import SweepResult, sweep_commands

    if args.episodes < 1:
        raise ConfigError("--episodes must be at least 1")
    cfg, spec, learner = _local_learner(args.checkpoint)
    if args.commands is not None:
        if args.commands < 2:
            raise ConfigError("--commands must be at least 2")
        cfg = cfg.model_copy(
            update={"run": cfg.run.model_copy(update={"sweep_commands": args.commands})}
        )
    commands = sweep_commands(cfg)
    result = _rollouts(cfg, spec).run(learner.propose_eval(commands, args.episodes))
    sweep = SweepResult.from_batch(result, len(commands), args.episodes)
    ckpt_path = ckpt.resolve(args.checkpoint)
    run_dir = (
        ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    )
    stem = Path(args.out) if args.out else run_dir / "sweep"
    csv_path, png_path = sweep.write(stem, cfg.env.id)
    print(f"{'command':>10} {'achieved':>10} {'std':>8}")
    for c, m, s in zip(sweep.commands, sweep.mean, sweep.std):
        print(f"{c:10.1f} {m:10.1f} {s:8.1f}")
    print(f"mean |achieved − commanded| = {sweep.mean_abs_error:.1f}")
    print(f"wrote {csv_path} and {png_path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gogepo_ray.export import export_policy

    _, _, learner = _local_learner(args.checkpoint)
    path = export_policy(learner, args.command, args.out)
    print(
        f"wrote {path}: G({args.command:g}) as a plain torch nn.Sequential "
        "(load with gogepo_ray.export.load_policy, or the loader in README 'Export a policy')"
    )
    return 0


def _follow(cluster, job_id: str, timeout: float | None) -> int:
    try:
        status = cluster.follow(job_id, timeout=timeout)
    except KeyboardInterrupt:
        print(
            f"stopped following; the job keeps running (gogepo jobs stop {job_id} to stop it)",
            file=sys.stderr,
        )
        return 130
    _, line = cluster.status(job_id)
    print(line)
    if status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        print(
            f"still {status} after --timeout {timeout:g} s; the job keeps running "
            f"(gogepo jobs logs {job_id} --follow)",
            file=sys.stderr,
        )
    return 0 if status == "SUCCEEDED" else 1


def cmd_submit(args: argparse.Namespace) -> int:
    from gogepo_ray import jobs

    working_dir = None if args.no_working_dir else args.working_dir
    submission = jobs.build_submission(args.config, args.overrides, working_dir, args.pip)
    cluster = jobs.Cluster(args.address)
    job_id = cluster.submit(submission, submission_id=args.submission_id)
    print(job_id)
    hint = "" if args.address is None else f" --address {cluster.address}"
    print(
        f"submitted to {cluster.address}: gogepo jobs logs {job_id} --follow{hint}", file=sys.stderr
    )
    return _follow(cluster, job_id, args.timeout) if args.follow else 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from gogepo_ray import jobs

    cluster = jobs.Cluster(args.address)
    if args.jobs_cmd == "status":
        print(cluster.status(args.job_id)[1])
    elif args.jobs_cmd == "logs":
        if args.follow:
            return _follow(cluster, args.job_id, args.timeout)
        sys.stdout.write(cluster.logs(args.job_id))
    elif args.jobs_cmd == "stop":
        if cluster.stop(args.job_id):
            print(f"stop requested for {args.job_id}")
        else:
            print(f"{args.job_id} was not running ({cluster.status(args.job_id)[0]})")
    else:
        print("\n".join(cluster.list_lines()))
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "sweep": cmd_sweep,
    "export": cmd_export,
    "submit": cmd_submit,
    "jobs": cmd_jobs,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
