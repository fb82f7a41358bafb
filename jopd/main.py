"""Command line: ``python -m jopd.main --config configs/X.yaml [--run-dir DIR] [key.sub=value ...]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
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
    from jopd.stages import RunContext, StageError, get_stage, run_stage
    from jopd.stages.base import atomic_write_json

    try:
        mesh = sharding.make_mesh(sharding.MeshConfig(**vars(cfg.mesh)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(cfg.run_dir)
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "config.yaml.tmp", "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        os.replace(run_dir / "config.yaml.tmp", run_dir / "config.yaml")
        handler = logging.FileHandler(run_dir / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
    log.info("run_dir %s | devices %d (%s) | mesh %s | processes %d", run_dir, jax.device_count(),
             jax.devices()[0].platform, dict(mesh.shape), jax.process_count())
    ctx = RunContext(cfg=cfg, run_dir=run_dir, mesh=mesh)
    summary = {}
    try:
        for name in cfg.stages:
            summary[name] = run_stage(get_stage(name), ctx)
    except StageError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        atomic_write_json(run_dir / "summary.json", summary)
    log.info("all stages done: %s", ", ".join(cfg.stages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
