"""Command line: ``python -m jopd.main --config configs/X.yaml [--run-dir DIR] [--stages a,b] [key.sub=value ...]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import yaml


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jopd.main", description=__doc__)
    p.add_argument("--config", required=True, help="YAML config (see docs/config.md)")
    p.add_argument("--run-dir", default=None, help="override run_dir")
    p.add_argument("--stages", default=None, help="comma-separated subset of the config's stages to run")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of a user error too (it always goes to RUN_DIR/run.log)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. opd.steps=10 arms.0.teacher=B")
    return p.parse_intermixed_args(argv)  # overrides may come before and after the options


def user_errors() -> tuple[type[BaseException], ...]:
    """What bad input raises (a config, an override, a prompt file, a model directory, a tokenizer, a store, a
    run directory, a permission): each names its file / field and what was expected, so the CLI shows the
    message alone and exits 2. Anything else is a programming error and keeps its traceback."""
    from jopd.config import ConfigValidationError
    from jopd.data.prompt_files import PromptFileError
    from jopd.data.store import StoreError
    from jopd.data.tokenizer import VocabMismatchError
    from jopd.models.config import ConfigError
    from jopd.models.hf import CheckpointError
    from jopd.pipeline import StageError
    from jopd.preflight import PreflightError

    return (ConfigValidationError, PreflightError, ConfigError, CheckpointError, VocabMismatchError, PromptFileError, StoreError,
            StageError, OSError, yaml.YAMLError)


def _user_error_message(err: BaseException) -> str:
    if isinstance(err, yaml.YAMLError):
        return f"not valid YAML: {err}"
    if isinstance(err, OSError) and err.filename is not None:
        what = err.strerror or type(err).__name__
        return f"{err.filename}: {what}" + (f" ({err.filename2})" if err.filename2 else "")
    return str(err)


def main(argv: list[str] | None = None, hooks: Sequence[Any] = ()) -> int:
    """The CLI. ``hooks``: extra ``jopd.loop.Hook`` objects every training loop of the run also calls (a
    profiler, a tracker, a fault injector), for callers that start a run from Python."""
    args = parse_args(argv)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, datefmt="%H:%M:%S")
    log = logging.getLogger("jopd")
    # Orbax/absl log every checkpoint-manager detail at INFO; keep the run log readable.
    for noisy in ("absl", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from jopd.config import ConfigValidationError, load_config

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.stages:
        overrides.append(f"stages=[{args.stages}]")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigValidationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except user_errors() as e:  # an unreadable config file, an override that is not YAML, ...
        print(f"error: {_user_error_message(e)}", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return 2

    import jax

    if _should_initialize(cfg.distributed):
        d = cfg.distributed
        kw = {k: v for k, v in (("coordinator_address", d.coordinator_address), ("num_processes", d.num_processes),
                                ("process_id", d.process_id)) if v is not None}
        jax.distributed.initialize(**kw, heartbeat_timeout_seconds=d.heartbeat_timeout_s)
    if jax.process_count() == 1:
        return _run(cfg, log, fmt, debug=args.debug, hooks=hooks)
    try:
        code = _run(cfg, log, fmt, debug=args.debug, hooks=hooks)
    except BaseException:  # noqa: BLE001 - a programming error: shown, then the same fast exit as below
        traceback.print_exc()
        code = 1
    if code != 0:
        # A failed process must end the job, not wait for the others at JAX's shutdown barrier while they wait
        # for it in a collective: exit without it; its heartbeats stop and the coordination service ends every
        # other process with this process named (after distributed.heartbeat_timeout_s).
        log.error("process %d of %d failed (exit %d): ending the job", jax.process_index(), jax.process_count(), code)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _should_initialize(section) -> bool:
    """``distributed.initialize``: true / false, or ``auto``: only where JAX detects a cluster environment."""
    if section.initialize != "auto":
        return bool(section.initialize)
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    try:  # the environments jax.distributed.initialize() auto-detects (TPU VM, SLURM, Open MPI, K8s, ...)
        from jax._src.clusters import ClusterEnv
    except ImportError:  # private module moved: fall back to the common launchers' variables
        return any(int(os.environ.get(v, "1") or 1) > 1 for v in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
    return any(not env.opt_in_only_method and env.is_env_present() for env in ClusterEnv._cluster_types)


def _run(cfg, log: logging.Logger, fmt: str, *, debug: bool = False, hooks: Sequence[Any] = ()) -> int:
    """The pipeline in RUN_DIR, or with ``seeds`` once per seed in RUN_DIR/seed_S and then the report over them."""
    if not cfg.seeds:
        return _run_pipeline(cfg, log, fmt, debug=debug, hooks=hooks)
    import jax

    for seed in cfg.seeds:
        log.info("seed %d (%d of %d): %s", seed, cfg.seeds.index(seed) + 1, len(cfg.seeds), cfg.for_seed(seed).run_dir)
        code = _run_pipeline(cfg.for_seed(seed), log, fmt, debug=debug, hooks=hooks)
        if code != 0:
            return code
    if "report" in cfg.stages and jax.process_index() == 0:
        from jopd.report.seeds import write_seeds_report

        write_seeds_report(cfg)
    return 0


def _run_pipeline(cfg, log: logging.Logger, fmt: str, *, debug: bool = False, hooks: Sequence[Any] = ()) -> int:
    import jax

    from jopd import preflight, sharding
    from jopd.config import to_dict
    from jopd.io import atomic_write_json
    from jopd.loop import TrainingError
    from jopd.pipeline import Run, RunDirLock, run_stage
    from jopd.stages import stage

    try:
        mesh = sharding.make_mesh(sharding.MeshConfig(**vars(cfg.mesh)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The run log's own logger: what only run.log gets (a user error's traceback).
    file_log = logging.getLogger("jopd.run_log")
    file_log.propagate = False
    file_log.addHandler(logging.NullHandler())  # before run.log is open: nowhere (not Python's stderr fallback)
    summary = {}
    lock = handler = None
    try:
        preflight.check(cfg)  # before anything is written: a refused run leaves the run directory as it was
        run = Run.create(cfg, mesh, hooks=tuple(hooks), config_text=yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if run.is_main:
            lock = RunDirLock(run.layout.root / ".lock")
            lock.acquire()
            handler = logging.FileHandler(run.layout.run_log)
            handler.setFormatter(logging.Formatter(fmt))
            logging.getLogger().addHandler(handler)
            file_log.addHandler(handler)
        log.info("run_dir %s | devices %d (%s) | mesh %s | processes %d", run.layout.root, jax.device_count(),
                 jax.devices()[0].platform, dict(mesh.shape), jax.process_count())
        for name in cfg.stages:
            summary[name] = run_stage(stage(name), run)
    except TrainingError as e:  # a run that went wrong (a non-finite loss), not bad input
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except user_errors() as e:
        message = _user_error_message(e)
        file_log.error("error: %s", message, exc_info=True)  # the traceback: run.log only (console: --debug)
        print(f"error: {message}", file=sys.stderr)
        if debug:
            traceback.print_exc()
        return 2
    finally:
        if lock is not None:
            lock.release()
        if handler is not None:  # the next run of a seeds run logs to its own run.log
            logging.getLogger().removeHandler(handler)
            file_log.removeHandler(handler)
            handler.close()
    if run.is_main:
        atomic_write_json(run.layout.summary, summary)
    log.info("all stages done: %s", ", ".join(cfg.stages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
