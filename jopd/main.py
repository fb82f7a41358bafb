"""Command line: ``python -m jopd.main --config configs/X.yaml [--run-dir DIR] [--stages a,b] [key.sub=value ...]``."""

from __future__ import annotations

import argparse
import logging
import sys

import yaml


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jopd.main", description=__doc__)
    p.add_argument("--config", required=True, help="YAML config (see docs/config.md)")
    p.add_argument("--run-dir", default=None, help="override run_dir")
    p.add_argument("--stages", default=None, help="comma-separated subset of the config's stages to run")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. opd.steps=10 arms.0.teacher=B")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, datefmt="%H:%M:%S")
    log = logging.getLogger("jopd")
    # Orbax/absl log every checkpoint-manager detail at INFO; keep the run log readable.
    for noisy in ("absl", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from jopd.config import ConfigValidationError, load_config, to_dict

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

    import jax

    if cfg.distributed.initialize:
        kw = {k: v for k, v in (("coordinator_address", cfg.distributed.coordinator_address),
                                ("num_processes", cfg.distributed.num_processes),
                                ("process_id", cfg.distributed.process_id)) if v is not None}
        jax.distributed.initialize(**kw)

    from jopd import sharding
    from jopd.io import atomic_write_json, atomic_write_text
    from jopd.loop import TrainingError
    from jopd.pipeline import Run, StageError, run_stage
    from jopd.stages import stage

    try:
        mesh = sharding.make_mesh(sharding.MeshConfig(**vars(cfg.mesh)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = Run.create(cfg, mesh)
    if run.is_main:
        atomic_write_text(run.layout.config_yaml, yaml.safe_dump(to_dict(cfg), sort_keys=False))
        handler = logging.FileHandler(run.layout.run_log)
        handler.setFormatter(logging.Formatter(fmt))
        logging.getLogger().addHandler(handler)
    log.info("run_dir %s | devices %d (%s) | mesh %s | processes %d", run.layout.root, jax.device_count(),
             jax.devices()[0].platform, dict(mesh.shape), jax.process_count())
    summary = {}
    try:
        for name in cfg.stages:
            summary[name] = run_stage(stage(name), run)
    except (StageError, TrainingError) as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 1
    if run.is_main:
        atomic_write_json(run.layout.summary, summary)
    log.info("all stages done: %s", ", ".join(cfg.stages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
