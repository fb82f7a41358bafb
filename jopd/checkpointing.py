"""Training checkpoints: a thin wrapper over Orbax's ``CheckpointManager``.

One checkpoint (``DIR/<step>/``) holds up to three Orbax items:

- ``state``: the :class:`jopd.steps.TrainState` (step, params, opt_state) as sharded arrays
  (``StandardSave``); restored onto the shardings of an abstract target built from the live state, so a
  resumed run gets exactly the layout it would have had (FSDP/TP included) without a host round trip;
- ``data``: the Grain iterator state, saved with Grain's own Orbax handler, which writes one JSON file per
  process (each process reads its own slice of the data);
- ``extra``: small JSON metadata (prompt cursor, cumulative seconds, ...), written by Orbax from the primary
  process only -- never by hand from every process.

Saving is asynchronous when asked (device-to-host copies happen before ``save`` returns, so the caller may
donate the state buffers to the next step right away); ``wait()`` blocks until the last save is durable.
Orbax writes into a temporary directory and renames it when complete, so ``latest_step()`` never returns a
half-written checkpoint. ``keep`` bounds how many checkpoints stay on disk.

Example::

    ckpt = Checkpointer(work_dir / "ckpt", keep=2, async_save=True)
    if (s := ckpt.latest_step()) is not None:
        state, extra = ckpt.restore(s, state, data_iterator=it)
    ...
    ckpt.save(step, state, data_iterator=it, extra={"time_s": t})
    ckpt.close()
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger("jopd")

_STATE, _DATA, _EXTRA = "state", "data", "extra"


def abstract_like(tree: Any) -> Any:
    """``ShapeDtypeStruct``s (with the leaves' shardings) describing ``tree``: the restore target.

    Leaves may already be ``ShapeDtypeStruct``s (e.g. from ``jax.eval_shape``); those keep their sharding.
    """

    def leaf(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(leaf, tree)


class Checkpointer:
    """Save / restore train state, data-iterator state and JSON metadata by step."""

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 2, async_save: bool = True):
        """
        Args:
          directory: checkpoint root (created on first save); one sub-directory per step.
          keep: checkpoints kept (older ones deleted after a newer one is complete); None keeps all.
          async_save: write in a background thread (``save`` returns after the device-to-host copy).
        """
        self.directory = os.path.abspath(os.fspath(directory))
        handlers = {_STATE: ocp.StandardCheckpointHandler(), _DATA: grain.checkpoint.CheckpointHandler(),
                    _EXTRA: ocp.JsonCheckpointHandler()}
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep and keep > 0 else None, enable_async_checkpointing=async_save, create=True,
            # Every step we are asked to save is saved: the caller decides the cadence.
            save_interval_steps=1)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # ------------------------------------------------------------------------------------------- queries
    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint (None when there is none)."""
        self._mngr.reload()  # pick up checkpoints written by an earlier (interrupted) process
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def has_data(self, step: int) -> bool:
        """Whether the checkpoint of ``step`` holds a data-iterator state."""
        return os.path.isdir(os.path.join(self.directory, str(step), _DATA))

    # ------------------------------------------------------------------------------------------ save/load
    def save(self, step: int, state: Any, *, data_iterator: grain.DatasetIterator | None = None,
             extra: dict[str, Any] | None = None) -> bool:
        """Save a checkpoint for ``step`` (no-op returning False if one already exists for that step).

        ``state``: a pytree of jax arrays (the TrainState); ``data_iterator``: a Grain iterator whose
        ``get_state()`` is recorded now (per process); ``extra``: JSON-serialisable metadata.
        """
        if step in self._mngr.all_steps():
            return False
        items: dict[str, Any] = {_STATE: ocp.args.StandardSave(state),
                                 _EXTRA: ocp.args.JsonSave(dict(extra or {}))}
        if data_iterator is not None:
            items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
        log.debug("checkpoint step %d -> %s (saved=%s)", step, self.directory, saved)
        return bool(saved)

    def restore(self, step: int, target_state: Any, *, data_iterator: grain.DatasetIterator | None = None
                ) -> tuple[Any, dict[str, Any]]:
        """Restore checkpoint ``step`` -> ``(state, extra)``.

        ``target_state``: the live state (or its abstract version); the restored arrays get its structure,
        dtypes and shardings. ``data_iterator``: if given, its state is set to the saved one in place (the
        checkpoint must hold one).
        """
        self.wait()
        items: dict[str, Any] = {_STATE: ocp.args.StandardRestore(abstract_like(target_state)),
                                 _EXTRA: ocp.args.JsonRestore()}
        if data_iterator is not None:
            if not self.has_data(step):
                raise ValueError(f"checkpoint {self.directory}/{step} holds no data-iterator state")
            items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
        extra = restored[_EXTRA] or {}
        return restored[_STATE], dict(extra)

    def wait(self) -> None:
        """Block until any in-flight asynchronous save has finished."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release Orbax's resources."""
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
