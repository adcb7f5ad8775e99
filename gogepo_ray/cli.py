"""The ``gogepo`` command line: train, eval, sweep, export, render, compare (and cluster job commands).

A user's mistake (bad config, missing checkpoint, unknown env) prints one ``error:`` line
that names the problem and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gogepo_ray.analysis.compare import CompareError
from gogepo_ray.analysis.local import load_learner, rollouts
from gogepo_ray.checkpoint import CheckpointError
from gogepo_ray.config import ConfigError
from gogepo_ray.envs import EnvError
from gogepo_ray.errors import TrainingError
from gogepo_ray.integrations.jobs import JobsError
from gogepo_ray.render import RenderError

USER_ERRORS = (ConfigError, CheckpointError, EnvError, JobsError, RenderError, CompareError)


def _add_overrides(p: argparse.ArgumentParser, hint: str) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value (repeatable); {hint}",
    )


def _add_command(p: argparse.ArgumentParser, hint: str) -> None:
    p.add_argument("--command", type=float, default=None, help=f"desired return ({hint})")


def _add_context(p: argparse.ArgumentParser, hint: str) -> None:
    p.add_argument(
        "--context",
        type=float,
        nargs="+",
        default=None,
        metavar="X",
        help=f"task-family runs: the task, one number per context dimension; {hint}",
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


def _add_which(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        dest="which",
        choices=["best", "latest"],
        default=None,
        help="with a run directory: best (checkpoints/best.pt, the generator of the best "
        "evaluation) or latest (the end of training); default: best where the run has one",
    )


def _add_checkpoint_cmds(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate G(command) from a checkpoint")
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    _add_which(p)
    _add_command(
        p,
        "default: the command of the checkpoint's evaluation (run.eval_command); for a task "
        "family the estimated best of the context",
    )
    _add_context(p, "default: every held-out context")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("sweep", help="achieved vs commanded return over the env's return range")
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    _add_which(p)
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
    _add_which(p)
    _add_command(p, "GoGePo runs; ARS runs take none")
    _add_context(p, "required there")
    p.add_argument("--out", required=True, help="output file, e.g. policy.pt")


def _add_views(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "render",
        help="a video (mp4) of a run's evaluation policy, rendered offscreen by MuJoCo",
        description="Render evaluation episodes of a run's policy to an mp4. MUJOCO_GL picks the "
        "OpenGL backend (default on Linux: egl where a GPU is visible, else osmesa); docs/results.md "
        "'Rendering a policy video' lists the system packages each needs.",
    )
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    _add_which(p)
    _add_command(p, "default: the command of the checkpoint's evaluation; ARS policies take none")
    _add_context(p, "default: the first held-out context")
    p.add_argument("--episodes", type=int, default=1, help="episodes, one after the other")
    p.add_argument("--max-steps", type=int, default=None, help="at most this many steps an episode")
    p.add_argument("--fps", type=float, default=None, help="default: the env's render_fps")
    p.add_argument("--out", default=None, help="mp4 file (default: <run_dir>/policy.mp4)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser(
        "compare",
        help="evaluation return of runs against env steps and wall-clock seconds (PNG + CSV)",
        description="One line per run; runs whose configs differ only in run.seed are one line, "
        "the mean over seeds, with a band from the lowest to the highest seed.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--out", default="compare.png", help="plot file; the CSV goes beside it (.csv)")
    p.add_argument(
        "--x",
        choices=["steps", "seconds", "both"],
        default="both",
        help="x axis: training env steps, wall-clock seconds, or both panels (default)",
    )


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


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve G(command) over HTTP on Ray Serve: POST /policy, POST /act, GET /info",
        description="Serve a run's generator on Ray Serve (the local Ray, or the cluster in "
        "RAY_ADDRESS) until Ctrl-C: POST /policy writes G(command) in gogepo export's format, "
        "POST /act returns actions (batched, policies cached), GET /info, GET /healthz. "
        "docs/serving.md has curl and Python examples.",
    )
    p.add_argument("checkpoint", metavar="RUN_DIR", help="run directory or checkpoint file")
    _add_which(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument(
        "--token",
        default=None,
        help="bearer token required on every endpoint but /healthz (default: $GOGEPO_SERVE_TOKEN)",
    )
    p.add_argument(
        "--follow",
        action="store_true",
        help="watch the run directory and serve each new checkpoint (a run in progress)",
    )
    p.add_argument("--replicas", type=int, default=1, help="replicas (default: 1)")
    p.add_argument("--max-ongoing-requests", type=int, default=64, help="per replica (default: 64)")
    p.add_argument(
        "--num-cpus", type=float, default=0.25, help="logical CPUs per replica (default: 0.25)"
    )
    p.add_argument(
        "--max-batch-size", type=int, default=32, help="/act requests per forward (default: 32)"
    )
    p.add_argument("--batch-wait-ms", type=float, default=1.0, help="batch wait in ms (default: 1)")
    p.add_argument(
        "--cache-size", type=int, default=128, help="policies cached per replica (default: 128)"
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="largest request (default: 1 MiB)"
    )
    p.add_argument(
        "--ingress",
        default=None,
        help="what stands in front of the replicas on the Ray this command starts: proxy "
        "(Serve's Python proxy) or haproxy (faster; docs/serving.md). Default: haproxy where "
        "RAY_SERVE_ENABLE_HA_PROXY=1, else proxy",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gogepo", description=__doc__.splitlines()[0])
    from gogepo_ray import __version__

    parser.add_argument("--version", action="version", version=f"gogepo-ray {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_train(sub)
    _add_checkpoint_cmds(sub)
    _add_views(sub)
    _add_jobs(sub)
    _add_serve(sub)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from gogepo_ray import checkpoint as ckpt
    from gogepo_ray.callbacks import JsonlMetrics, ProgressBar
    from gogepo_ray.config import load_config
    from gogepo_ray.tracking import MLflowTracker
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


def _checkpoint_run_dir(checkpoint: str | Path) -> Path:
    """The run directory a checkpoint belongs to: RUN for RUN/checkpoints/x.pt, else the
    checkpoint file's folder."""
    from gogepo_ray import checkpoint as ckpt

    path = ckpt.resolve(checkpoint, None if Path(checkpoint).is_file() else "latest")
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def _record_failures(checkpoint: str, batch, source: str, which: str | None = None) -> int:
    """Append the failed episodes of ``batch`` to the run directory's failures.jsonl (the
    file training writes; rows tagged with ``source`` and the checkpoint) and warn once on
    stderr. Returns how many episodes failed."""
    from gogepo_ray import checkpoint as ckpt
    from gogepo_ray.analysis.evaluation import failure_rows

    rows = failure_rows(batch, source=source, checkpoint=str(ckpt.resolve(checkpoint, which)))
    if not rows:
        return 0
    path = _checkpoint_run_dir(checkpoint) / "failures.jsonl"
    try:
        with open(path, "a") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)
        where = f"all failures: {path}"
    except OSError as exc:
        where = f"could not write {path}: {exc}"
    print(
        f"warning: {len(rows)} of {len(batch.failures)} episodes failed and are left out of the "
        f"results: {rows[0]['reason']} ({where})",
        file=sys.stderr,
    )
    return len(rows)


def _context(cfg, values: list[float] | None):
    """The ``--context`` of a command as a (1, k) array, checked against the run's task
    family; None when not given."""
    import numpy as np

    if values is None:
        return None
    if cfg.context is None:
        raise ConfigError(
            f"--context: this run's env {cfg.env.id} was not trained as a task family (no context section)"
        )
    from gogepo_ray.envs import family_of
    from gogepo_ray.envs.families import check_context

    space, names = family_of(cfg.env.id, cfg.env.kwargs)
    try:
        return np.asarray(check_context(space, names, values), np.float64).reshape(1, -1)
    except ValueError as exc:
        raise ConfigError(f"--context: {exc}") from None


def _check_command(command: float | None) -> None:
    import math

    if command is not None and not math.isfinite(command):
        raise ConfigError(f"--command must be a finite number, got {command}")


def cmd_eval(args: argparse.Namespace) -> int:
    from gogepo_ray.analysis.evaluation import finished_returns, mean_std
    from gogepo_ray.metrics import json_metric

    if args.episodes < 1:
        raise ConfigError("--episodes must be at least 1")
    from gogepo_ray.algorithms import takes_commands

    cfg, spec, learner = load_learner(args.checkpoint, args.which)
    if not takes_commands(cfg) and args.command is not None:
        raise ConfigError(f"--command: this is an {cfg.algorithm} run; its policy takes no command")
    _check_command(args.command)
    context = _context(cfg, args.context)
    if cfg.context is not None:
        return _eval_family(args, cfg, spec, learner, context)
    command = learner.eval_command() if args.command is None else args.command
    result = rollouts(cfg, spec).run(learner.propose_eval([command], args.episodes))
    failed = _record_failures(args.checkpoint, result, "gogepo eval", args.which)
    lengths = result.lengths[result.ok()].tolist()
    mean, std = mean_std(finished_returns(result))
    out = {
        "env_id": cfg.env.id,
        "algorithm": cfg.algorithm,
        "command": command if takes_commands(cfg) else None,
        "episodes": args.episodes - failed,  # the episodes in the mean
        "failed_episodes": failed,  # left out of the mean; NaN mean when none finished
        "return_mean": mean,
        "return_std": std,
        "length_mean": sum(lengths) / len(lengths) if lengths else float("nan"),
    }
    if args.json:
        print(
            json.dumps({k: json_metric(v) if isinstance(v, float) else v for k, v in out.items()})
        )
    else:
        left_out = f" ({failed} failed, left out)" if failed else ""
        what = f"command {command:.1f}" if takes_commands(cfg) else f"{cfg.algorithm} policy"
        print(
            f"{cfg.env.id}  {what}  ->  return {mean:.1f} ± {std:.1f}"
            f"  over {out['episodes']} episodes{left_out}"
        )
    return 1 if failed == args.episodes else 0


def _eval_family(args, cfg, spec, learner, context) -> int:
    """``gogepo eval`` on a task-family run: the given context, or every held-out one, each
    at ``--command`` or at its estimated best return."""
    from gogepo_ray.analysis.evaluation import context_label, per_context
    from gogepo_ray.metrics import json_metric

    contexts = learner.contexts.heldout if context is None else context
    commands = None if args.command is None else [args.command] * len(contexts)
    result = rollouts(cfg, spec).run(learner.propose_eval(commands, args.episodes, contexts))
    failed = _record_failures(args.checkpoint, result, "gogepo eval", args.which)
    groups = per_context(result)
    cmds = result.commands.reshape(len(contexts), args.episodes)[:, 0]
    rows = [
        {
            "context": [float(v) for v in x],
            "command": float(c),
            "episodes": args.episodes - f,
            "failed_episodes": f,
            "return_mean": m,
            "return_std": s,
        }
        for x, c, (m, s, f) in zip(contexts, cmds, groups.values())
    ]
    if args.json:
        rows = [
            {k: json_metric(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows
        ]
        out = {"env_id": cfg.env.id, "algorithm": cfg.algorithm, "contexts": rows}
        print(json.dumps(out | (rows[0] if len(rows) == 1 else {})))
    else:
        for r, x in zip(rows, contexts):
            left_out = f" ({r['failed_episodes']} failed, left out)" if r["failed_episodes"] else ""
            print(
                f"{cfg.env.id}  context {context_label(x)}  command {r['command']:.1f}  ->  return "
                f"{r['return_mean']:.1f} ± {r['return_std']:.1f}  over {r['episodes']} episodes{left_out}"
            )
    return 1 if failed == len(result.failures) else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from gogepo_ray.algorithms import takes_commands
    from gogepo_ray.analysis.evaluation import command_sweep

    if args.episodes < 1:
        raise ConfigError("--episodes must be at least 1")
    cfg, spec, learner = load_learner(args.checkpoint, args.which)
    if not takes_commands(cfg):
        raise ConfigError(
            f"sweep applies to GoGePo runs: this is an {cfg.algorithm} run, whose one policy takes "
            "no command; use gogepo eval for its return"
        )
    if args.commands is not None:
        if args.commands < 2:
            raise ConfigError("--commands must be at least 2")
        cfg = cfg.model_copy(
            update={"run": cfg.run.model_copy(update={"sweep_commands": args.commands})}
        )
    runner = rollouts(cfg, spec)
    batches = []

    def run(batch):
        batches.append(runner.run(batch))
        return batches[-1]

    sweep = command_sweep(cfg, learner.propose_eval, run, args.episodes)
    for batch in batches:
        _record_failures(args.checkpoint, batch, "gogepo sweep", args.which)
    stem = Path(args.out) if args.out else _checkpoint_run_dir(args.checkpoint) / "sweep"
    total = sum(len(b.failures) for b in batches)
    paths = sweep.write(stem, cfg.env.id)
    if cfg.context is not None:
        print(sweep.table_markdown())
    else:
        print(f"{'command':>10} {'achieved':>10} {'std':>8} {'failed':>6}")
        for c, m, s, f in zip(sweep.commands, sweep.mean, sweep.std, sweep.failed):
            print(f"{c:10.1f} {m:10.1f} {s:8.1f} {f:6d}")
        print(f"mean |achieved − commanded| = {sweep.mean_abs_error:.1f}")
    _print_fidelity(sweep, learner)
    if sweep.failed_episodes:
        cell = "cell" if cfg.context is not None else "command"
        print(
            f"{sweep.failed_episodes} of {total} episodes failed and are left out "
            f"of the means (nan: every episode of that {cell} failed)"
        )
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 1 if sweep.failed_episodes == total else 0


def _print_fidelity(sweep, learner) -> None:
    low, high = learner.lowest_return, learner.best_return
    if low is None or high is None:
        return
    print(
        f"command fidelity = {sweep.fidelity(low, high):.3f}  (mean |achieved − commanded| over "
        f"the commands in the training returns seen, [{low:.1f}, {high:.1f}], over that range; "
        "training returns, survival offset included)"
    )


def cmd_export(args: argparse.Namespace) -> int:
    from gogepo_ray.algorithms import takes_commands
    from gogepo_ray.export import export_policy

    cfg, _, learner = load_learner(args.checkpoint, args.which)
    if takes_commands(cfg) and args.command is None:
        raise ConfigError("--command is required: the desired return of the policy to export")
    if not takes_commands(cfg) and args.command is not None:
        raise ConfigError(f"--command: this is an {cfg.algorithm} run; its policy takes no command")
    _check_command(args.command)
    context = _context(cfg, args.context)
    if cfg.context is not None and context is None:
        raise ConfigError(
            "--context is required for a task-family run: the task the policy is written for "
            f"({cfg.env.id}; held-out examples in its config)"
        )
    path = export_policy(learner, args.command, args.out, None if context is None else context[0])
    what = f"G({args.command:g})" if takes_commands(cfg) else f"the {cfg.algorithm} policy"
    if context is not None:
        what = f"G({args.command:g}, context {' '.join(f'{v:g}' for v in context[0])})"
    print(
        f"wrote {path}: {what} as a plain torch nn.Sequential "
        "(load with gogepo_ray.export.load_policy, or the loader in docs/results.md 'Export a policy')"
    )
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    import math

    from gogepo_ray.render import describe, prepare_gl, render_policy

    if args.episodes < 1:
        raise ConfigError("--episodes must be at least 1")
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError("--max-steps must be at least 1")
    if args.fps is not None and not args.fps > 0:
        raise ConfigError("--fps must be positive")
    if args.out and Path(args.out).suffix.lower() != ".mp4":
        raise ConfigError(f"--out must be an .mp4 file, got {args.out!r}")
    prepare_gl()  # a machine that cannot render says so before anything is loaded
    cfg, spec, learner = load_learner(args.checkpoint, args.which)
    _check_command(args.command)
    context = _context(cfg, args.context)
    if cfg.context is not None and context is None:
        context = learner.contexts.heldout[:1]
    run_dir = _checkpoint_run_dir(args.checkpoint)
    commands = None if args.command is None else [args.command]
    result = render_policy(
        cfg,
        spec,
        lambda: learner.propose_eval(commands, 1, context),
        Path(args.out) if args.out else run_dir / "policy.mp4",
        episodes=args.episodes,
        max_steps=args.max_steps,
        fps=args.fps,
    )
    if args.command is not None and not any(math.isfinite(c) for c in result.commands):
        print(
            f"note: {cfg.env.id} policies of this run take no command; --command was ignored",
            file=sys.stderr,
        )
    if args.json:
        print(
            json.dumps(
                {
                    "path": str(result.path),
                    "frames": result.frames,
                    "fps": result.fps,
                    "backend": result.backend,
                    "returns": result.returns,
                    "lengths": result.lengths,
                }
            )
        )
    else:
        print(describe(result))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from gogepo_ray.analysis.compare import compare_runs

    result = compare_runs(args.runs, args.out, args.x)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for group, b in zip(result.groups, next(iter(result.bands.values()))):
        last = f"{b.mean[-1]:.1f}" if b is not None and len(b.x) else "-"
        print(f"{group.label}: {len(group.runs)} run(s), last mean evaluation return {last}")
    print(f"wrote {result.png} and {result.csv}")
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
    from gogepo_ray.integrations import jobs

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
    from gogepo_ray.integrations import jobs

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


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from gogepo_ray.integrations.serve import HAPROXY_ENV, TOKEN_ENV, ServeSettings, run_cli

    settings = ServeSettings(
        host=args.host,
        port=args.port,
        token=args.token if args.token is not None else os.environ.get(TOKEN_ENV),
        replicas=args.replicas,
        max_ongoing_requests=args.max_ongoing_requests,
        num_cpus=args.num_cpus,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        cache_size=args.cache_size,
        max_body_bytes=args.max_body_bytes,
        ingress=args.ingress or ("haproxy" if os.environ.get(HAPROXY_ENV) == "1" else "proxy"),
    )
    return run_cli(args.checkpoint, args.which, settings, args.follow)


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "sweep": cmd_sweep,
    "export": cmd_export,
    "render": cmd_render,
    "compare": cmd_compare,
    "submit": cmd_submit,
    "jobs": cmd_jobs,
    "serve": cmd_serve,
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
