"""Data: the on-disk rollout store and the Grain loader that feeds training."""

from jopd.data.loader import RolloutSource, epoch_steps, make_dataset, make_loader
from jopd.data.store import RolloutStore, StoreCorruptError, StoreError

__all__ = [
    "RolloutSource",
    "RolloutStore",
    "StoreCorruptError",
    "StoreError",
    "epoch_steps",
    "make_dataset",
    "make_loader",
]
