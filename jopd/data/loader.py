"""Grain input pipeline over a `RolloutStore`: deterministic, shardable, resumable.

Pipeline (all index arithmetic, so any step can be reached without replaying the previous ones)::

    MapDataset.range(N)                       row indices of the RolloutSource
      .shuffle(seed)                          per-epoch permutation (Grain folds the epoch into the seed)
      [:E] or pad to E                        E = epoch length, a multiple of global_batch_size (padding: -1)
      process blocks                          this process's E / process_count rows of every epoch: rows
                                              [i*b, (i+1)*b) of every global batch, b = G / process_count
      .repeat(num_epochs)                     epoch e reads shuffle epoch e -> reshuffled every epoch
      .to_iter_dataset(read_options)          (unthreaded by default: the elements are indices)
      .batch(global_batch_size // process_count)
      .map(read the batch's rows)             one TensorStore read per field for the whole batch

Because E is a multiple of the global batch, no batch straddles an epoch and every process yields the same
number of batches. Global batch s is always epoch positions [s*G, (s+1)*G) whatever the process count, and
process i holds its contiguous block [s*G + i*b, s*G + (i+1)*b), which is where
``jax.make_array_from_process_local_data`` places it: the global batch, row for row, does not depend on how many
hosts read it (so neither does any sum over it, to the bit). With drop_remainder=True, E = N rounded
down (the dropped rows differ per epoch); with drop_remainder=False, E = N rounded up and the extra rows are all
zeros (response_mask 0, row_index -1), so shapes stay static and the loss ignores them.

The iterator's `get_state()` is a small JSON-serialisable dict; `set_state()` resumes exactly.

Packed batches (`make_packed_dataset`): a batch is a token budget, ``rows`` rows of ``row_len`` tokens, each row
holding several whole sequences back to back (``segment_ids`` 1, 2, ... per sequence, 0 on padding; ``positions``
within each sequence), so long and short responses waste no padding::

    PackingPlan(lengths, rows, row_len, seed)   epoch e: rows shuffled by (seed, e), then greedily placed in
                                                first-fit order into the open batch's rows; a row that fits
                                                none stays for the next batch (lookahead `window`)
    MapDataset.range(num_steps)                 global batch index s
      .map(read this process's rows of batch s) [rows / process_count, row_len] per field
      .to_iter_dataset(read_options)            threaded, order-preserving prefetch

The plan is a pure function of the row lengths and the seed, computed identically on every process, so a
global batch holds the same sequences whatever the process count, and the iterator state (the batch index)
resumes exactly. Every epoch trains on every row once; its last batch may be partly empty.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence
from typing import Any, Literal

import grain
import jax
import numpy as np

from jopd.data.routing import stratified_order
from jopd.data.store import ARRAYS, RolloutStore, StoreError
from jopd.sharding import round_up

DEFAULT_FIELDS = ("tokens", "response_mask", "teacher_logprobs", "behaviour_logprobs")
TOPK_FIELDS = ("teacher_topk_ids", "teacher_topk_logprobs")
ROW_INDEX = "row_index"  # optional computed field: int32 [] store row of the example (-1 for padding rows)
# Static sequence lengths are rounded up to a multiple of this: one compiled shape per store, at most 15 padding
# tokens per row (64 padded the demo's 92-token online rows to 128: 28% of an update was padding).
SEQ_LEN_BUCKET = 16


def round_seq_len(longest: int, max_len: int, bucket: int = SEQ_LEN_BUCKET) -> int:
    """The static sequence length for rows of at most `longest` tokens: rounded up to `bucket`, capped at L."""
    return min(max_len, round_up(longest, bucket))


def epoch_steps(num_rows: int, global_batch_size: int, drop_remainder: bool = True) -> int:
    """Number of global batches per epoch for a store of `num_rows` rows."""
    return num_rows // global_batch_size if drop_remainder else -(-num_rows // global_batch_size)


class RolloutSource:
    """Grain random-access source: row i of a store as a dict of numpy arrays.

    Per-token fields are [seq_len] (top-k [seq_len, k]), per-row fields are scalars, `response_mask` is int32.
    Picklable: TensorStore handles are opened lazily in each process (and reopened after a fork).
    """

    def __init__(self, path: str | os.PathLike[str], fields: Sequence[str] | None = None, *,
                 seq_len: int | Literal["auto"] | None = None, cache_bytes: int = 64 << 20):
        """Validates the store and resolves `seq_len` once, so every worker sees the same static shapes.

        Args:
          path: store directory.
          fields: names to return (store arrays, "response_mask", "row_index"); default DEFAULT_FIELDS plus the
            top-k arrays when the store has them.
          seq_len: None -> L; "auto" -> longest row rounded up to a multiple of 16; int -> that length (must be
            >= the longest row, so nothing is silently cut).
          cache_bytes: TensorStore decoded-chunk cache per process; rows of one chunk share one decode.
        """
        self._path = os.path.abspath(os.fspath(path))
        self._cache_bytes = int(cache_bytes)
        store = RolloutStore.open(self._path, "r", cache_bytes=self._cache_bytes)
        if fields is None:
            fields = DEFAULT_FIELDS + (TOPK_FIELDS if store.topk > 0 else ())
        self._fields = tuple(fields)
        unknown = [f for f in self._fields if f not in store.fields + (ROW_INDEX,)]
        if unknown or len(set(self._fields)) != len(self._fields):
            raise ValueError(f"{self._path}: bad fields {list(self._fields)} (unknown: {unknown}); available: "
                             f"{store.fields + (ROW_INDEX,)}")
        # response_mask is computed from rollout fields; row_index needs no stored data.
        groups = {ARRAYS[f][1] if f in ARRAYS else "rollout" for f in self._fields if f != ROW_INDEX}
        for group in sorted(groups):
            if not store.is_complete(group):
                missing = sorted(set(range(store.num_chunks)) - set(store.done_chunks(group)))
                raise StoreError(f"{self._path}: cannot load fields {list(self._fields)}: {group!r} group is "
                                 f"incomplete, chunks {missing[:20]} not written")
        if seq_len is None:
            seq_len = store.max_len
        elif seq_len == "auto":
            seq_len = round_seq_len(store.max_row_len(), store.max_len)
        elif not isinstance(seq_len, int) or not store.max_row_len() <= seq_len <= store.max_len:
            raise ValueError(f"{self._path}: seq_len must be 'auto', None or an int in [longest row = "
                             f"{store.max_row_len()}, max_len = {store.max_len}], got {seq_len!r}")
        self._seq_len = int(seq_len)
        self._num_rows, self._topk = store.num_rows, store.topk
        self._store: RolloutStore | None = store
        self._pid = os.getpid()
        self._lock = threading.Lock()  # Grain reads from several threads; open the handles only once

    @property
    def seq_len(self) -> int:
        """Static length of every per-token field."""
        return self._seq_len

    @property
    def fields(self) -> tuple[str, ...]:
        return self._fields

    @property
    def topk(self) -> int:
        """k of the store's top-k arrays (0: none)."""
        return self._topk

    def _get_store(self) -> RolloutStore:
        # TensorStore handles are not fork-safe: reopen in a new process (Grain workers, pickled copies).
        with self._lock:
            if self._store is None or self._pid != os.getpid():
                self._store = RolloutStore.open(self._path, "r", cache_bytes=self._cache_bytes)
                self._pid = os.getpid()
            return self._store

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_store"], state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._store, self._lock = None, threading.Lock()

    def __repr__(self) -> str:
        # Stable (no handle ids), since Grain may compare source reprs when restoring iterator state.
        return f"RolloutSource(path={self._path!r}, fields={self._fields!r}, seq_len={self._seq_len})"

    def __len__(self) -> int:
        return self._num_rows

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._getitems([index])[0]

    def read(self, indices: Sequence[int], seq_len: int | None = None) -> dict[str, np.ndarray]:
        """Rows `indices` as arrays ``[n, seq_len]`` (default: the source's static length), one async TensorStore
        read per field."""
        stored = [f for f in self._fields if f != ROW_INDEX]
        rows = self._get_store().read_rows(indices, stored, seq_len=seq_len or self._seq_len)
        if ROW_INDEX in self._fields:
            rows[ROW_INDEX] = np.asarray(indices, dtype=np.int32)
        return rows

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        rows = self.read(indices)
        return [{f: rows[f][j] for f in self._fields} for j in range(len(indices))]

    def padding_row(self) -> dict[str, np.ndarray]:
        """An all-zero row with the shapes/dtypes of a real one (row_index -1): weight 0 in any masked loss."""
        row = {}
        for f in self._fields:
            if f in ("response_mask", ROW_INDEX):
                shape, dtype = ((self._seq_len,) if f == "response_mask" else ()), np.dtype(np.int32)
            else:
                dtype, _, kind = ARRAYS[f]
                shape = {"row": (), "token": (self._seq_len,), "topk": (self._seq_len, self._topk)}[kind]
            row[f] = np.zeros(shape, dtype)
        if ROW_INDEX in row:
            row[ROW_INDEX] = np.full((), -1, np.int32)
        return row


@dataclasses.dataclass(frozen=True)
class StoreSlices:
    """Rows of several stores read as one (multi-teacher arms: each route's rows in its teacher's store).

    ``parts``: ``(store path, first row, end row)`` per part; row i of the whole is part p's row
    ``first + i - offset_p`` (parts one after another). Every part is a group of the batches' stratified order
    (`jopd.data.routing.stratified_order`): shuffled or not, each batch holds the parts in proportion to their
    rows (to within a row or two), instead of a uniform shuffle's proportion in expectation only. The stores
    must share ``max_len`` and ``topk`` (they hold rows of one rollout store, or of one refresh generation).
    """

    parts: tuple[tuple[str, int, int], ...]

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("StoreSlices needs at least one part")
        for path, lo, hi in self.parts:
            if not 0 <= lo < hi:
                raise ValueError(f"StoreSlices: part {path} rows [{lo}, {hi}) is empty or negative")

    @property
    def groups(self) -> np.ndarray:
        """int64 [N]: the part of every row."""
        return np.repeat(np.arange(len(self.parts)), [hi - lo for _, lo, hi in self.parts])

    def describe(self, indices: Sequence[int]) -> str:
        """Which part rows whole-source rows ``indices`` are (``path[row, ...]``), for messages."""
        offsets = np.cumsum([0] + [hi - lo for _, lo, hi in self.parts])
        named: dict[str, list[int]] = {}
        for i in indices:
            if i < 0:
                continue
            p = int(np.searchsorted(offsets, i, side="right")) - 1
            path, lo, _ = self.parts[p]
            named.setdefault(path, []).append(int(lo + i - offsets[p]))
        return "; ".join(f"{path} rows {rows}" for path, rows in named.items())


class SlicedSource:
    """Grain random-access source over `StoreSlices`: a `RolloutSource` per store, rows renumbered part after part
    (``row_index`` = the whole source's row). Same interface as `RolloutSource`."""

    def __init__(self, slices: StoreSlices, fields: Sequence[str] | None = None, *,
                 seq_len: int | Literal["auto"] | None = None, cache_bytes: int = 64 << 20):
        self.slices = slices
        stores = {path: RolloutStore.open(path, "r") for path in dict.fromkeys(p for p, _, _ in slices.parts)}
        shapes = {(st.max_len, st.topk) for st in stores.values()}
        if len(shapes) != 1:
            raise ValueError(f"StoreSlices: the stores differ in (max_len, topk): "
                             f"{ {p: (st.max_len, st.topk) for p, st in stores.items()} }")
        for path, lo, hi in slices.parts:
            if hi > stores[path].num_rows:
                raise ValueError(f"StoreSlices: {path} has {stores[path].num_rows} rows, not [{lo}, {hi})")
        max_len = next(iter(stores.values())).max_len
        if seq_len is None:
            seq_len = max_len
        elif seq_len == "auto":
            seq_len = round_seq_len(max(st.max_row_len() for st in stores.values()), max_len)
        own = None if fields is None else tuple(f for f in fields if f != ROW_INDEX)  # row_index: computed here
        self._sources = {path: RolloutSource(path, own, seq_len=seq_len, cache_bytes=cache_bytes) for path in stores}
        first = next(iter(self._sources.values()))
        self._fields = first.fields if fields is None else tuple(fields)
        self._seq_len, self._topk = first.seq_len, first.topk
        self._offsets = np.cumsum([0] + [hi - lo for _, lo, hi in slices.parts])

    seq_len = property(lambda self: self._seq_len, doc="Static length of every per-token field.")
    fields = property(lambda self: self._fields)
    topk = property(lambda self: self._topk, doc="k of the stores' top-k arrays (0: none).")

    def __repr__(self) -> str:
        return f"SlicedSource(parts={self.slices.parts!r}, fields={self._fields!r}, seq_len={self._seq_len})"

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rows = self.read([index])
        return {f: rows[f][0] for f in self._fields}

    def read(self, indices: Sequence[int], seq_len: int | None = None) -> dict[str, np.ndarray]:
        """Rows ``indices`` of the whole as arrays ``[n, seq_len]``, one read per part touched."""
        idx = np.asarray(indices, np.int64)
        part = np.searchsorted(self._offsets, idx, side="right") - 1
        out: dict[str, np.ndarray] | None = None
        for p in np.unique(part):
            path, lo, _ = self.slices.parts[p]
            where = np.flatnonzero(part == p)
            got = self._sources[path].read((lo + idx[where] - self._offsets[p]).tolist(), seq_len=seq_len)
            if out is None:
                out = {f: np.zeros((len(idx),) + v.shape[1:], v.dtype) for f, v in got.items()}
            for f, v in got.items():
                out[f][where] = v
        if out is None:  # no rows
            out = {f: np.zeros((0,) + v.shape, v.dtype) for f, v in self.padding_row().items()}
        if ROW_INDEX in self._fields:
            out[ROW_INDEX] = idx.astype(np.int32)
        return {f: out[f] for f in self._fields}

    def padding_row(self) -> dict[str, np.ndarray]:
        row = next(iter(self._sources.values())).padding_row()
        if ROW_INDEX in self._fields:
            row[ROW_INDEX] = np.full((), -1, np.int32)
        return {f: row[f] for f in self._fields}


def open_source(store: str | os.PathLike[str] | StoreSlices, fields: Sequence[str] | None = None, *,
                seq_len: int | Literal["auto"] | None = None,
                cache_bytes: int = 64 << 20) -> RolloutSource | SlicedSource:
    """The Grain source of a store directory, or of `StoreSlices`."""
    if isinstance(store, StoreSlices):
        return SlicedSource(store, fields, seq_len=seq_len, cache_bytes=cache_bytes)
    return RolloutSource(store, fields, seq_len=seq_len, cache_bytes=cache_bytes)


class _StratifiedMapDataset(grain.MapDataset):
    """Epoch e of `parent` in `stratified_order(groups, rng(seed, e))` (without shuffle: the groups interleaved in
    row order, the same every epoch). Index e * N + j maps to parent row order_e[j], like Grain's shuffle."""

    def __init__(self, parent: grain.MapDataset, groups: np.ndarray, seed: int, shuffle: bool):
        super().__init__(parent)
        self._groups, self._seed, self._shuffle = np.asarray(groups), seed, shuffle
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._groups)

    def _order(self, epoch: int) -> np.ndarray:
        key = epoch if self._shuffle else 0
        with self._lock:
            if key not in self._orders:
                if len(self._orders) > 2:  # epochs are read in order: keep the current ones only
                    self._orders.pop(min(self._orders))
                rng = np.random.default_rng([self._seed, key]) if self._shuffle else None
                self._orders[key] = stratified_order(self._groups, rng)
            return self._orders[key]

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return self.slice(index)
        epoch, j = divmod(index, len(self))
        return self._parent[int(self._order(epoch)[j])]

    def __str__(self) -> str:
        return f"_StratifiedMapDataset(groups={len(np.unique(self._groups))}, shuffle={self._shuffle})"


class _PadEpochsMapDataset(grain.MapDataset):
    """Lengthens every epoch of `parent` from len(parent) to `epoch_len` elements with trailing `pad` elements.

    Index e * epoch_len + j maps to parent index e * len(parent) + j, so upstream per-epoch reshuffling is kept.
    """

    def __init__(self, parent: grain.MapDataset, epoch_len: int, pad: int):
        super().__init__(parent)
        self._parent_len, self._epoch_len, self._pad = len(parent), epoch_len, pad

    def __len__(self) -> int:
        return self._epoch_len

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return self.slice(index)
        epoch, j = divmod(index, self._epoch_len)
        if j >= self._parent_len:
            return self._pad
        return self._parent[epoch * self._parent_len + j]

    def __str__(self) -> str:
        return f"_PadEpochsMapDataset(epoch_len={self._epoch_len})"


class _ProcessBlocksMapDataset(grain.MapDataset):
    """Process ``index``'s rows of every global batch of ``parent``: its contiguous block of ``local`` rows.

    Local position e * L + j (L = len(parent) / count, epoch e) maps to parent index
    e * len(parent) + (j // local) * (local * count) + index * local + j % local.
    """

    def __init__(self, parent: grain.MapDataset, local: int, index: int, count: int):
        super().__init__(parent)
        self._parent_len, self._local, self._index, self._count = len(parent), local, index, count

    def __len__(self) -> int:
        return self._parent_len // self._count

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return self.slice(index)
        epoch, j = divmod(index, len(self))
        step, r = divmod(j, self._local)
        return self._parent[epoch * self._parent_len + step * self._local * self._count + self._index * self._local + r]

    def __str__(self) -> str:
        return f"_ProcessBlocksMapDataset(local={self._local}, index={self._index}, count={self._count})"


def make_dataset(store_path: str | os.PathLike[str] | StoreSlices, *, global_batch_size: int, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None, process_index: int | None = None, process_count: int | None = None,
                 drop_remainder: bool = True, fields: Sequence[str] | None = None,
                 seq_len: int | Literal["auto"] | None = None, read_options: grain.ReadOptions | None = None,
                 cache_bytes: int = 64 << 20) -> grain.IterDataset:
    """Builds the pipeline described in the module docstring; elements are dicts of [b, ...] numpy arrays.

    b = global_batch_size // process_count (must divide). process_index / process_count default to JAX's.
    num_epochs=None repeats forever. See `RolloutSource` for `fields`, `seq_len` and `cache_bytes`. With
    `StoreSlices` of several parts, each epoch takes the rows in `stratified_order` of the parts instead of a
    uniform shuffle (shuffled within each part with ``shuffle``).
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must lie in [0, 2**32), got {seed}")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None (forever), got {num_epochs}")
    source = open_source(store_path, fields, seq_len=seq_len, cache_bytes=cache_bytes)
    steps = epoch_steps(len(source), global_batch_size, drop_remainder)
    if steps == 0:
        raise ValueError(f"{store_path}: {len(source)} rows < global_batch_size={global_batch_size} with "
                         f"drop_remainder=True: an epoch would have no batch")
    epoch_len = steps * global_batch_size
    # The per-element pipeline carries row indices only and a batch's rows are read at once (one TensorStore read
    # per field): rows read one by one through Grain's thread pool cost 0.42 s per 512-row batch of the demo's
    # store (a fifth of its OPD step), this 18 ms.
    ds = grain.MapDataset.range(len(source))
    if isinstance(store_path, StoreSlices) and len(store_path.parts) > 1:
        ds = _StratifiedMapDataset(ds, store_path.groups, seed, shuffle)
    elif shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds[:epoch_len] if epoch_len <= len(source) else _PadEpochsMapDataset(ds, epoch_len, PADDING_INDEX)
    local_batch = global_batch_size // process_count
    if process_count > 1:
        ds = _ProcessBlocksMapDataset(ds, local_batch, process_index, process_count)
    ds = ds.repeat(num_epochs)
    if read_options is None:
        # No threads: the elements are indices, and Grain's per-element thread hand-off alone costs ~1 ms each.
        read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return ds.to_iter_dataset(read_options).batch(local_batch, drop_remainder=True).map(_BatchReader(source))


PADDING_INDEX = -1  # an epoch's padding element: read as `padding_row()`


class _BatchReader:
    """Grain map: a batch of row indices ``[b]`` (PADDING_INDEX = a padding row) -> ``{field: [b, ...]}``."""

    def __init__(self, source: RolloutSource | SlicedSource):
        self.source = source

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        real = np.flatnonzero(indices != PADDING_INDEX)
        if len(real) == len(indices):
            return self.source.read(indices.tolist())
        pad = self.source.padding_row()
        out = {f: np.broadcast_to(v, (len(indices),) + v.shape).copy() for f, v in pad.items()}
        if len(real):
            for f, v in self.source.read(indices[real].tolist()).items():
                out[f][real] = v
        return out

    def __repr__(self) -> str:
        return f"_BatchReader({self.source!r})"


def make_loader(store_path: str | os.PathLike[str] | StoreSlices, *, global_batch_size: int, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, process_index: int | None = None, process_count: int | None = None,
                drop_remainder: bool = True, fields: Sequence[str] | None = None,
                seq_len: int | Literal["auto"] | None = None, read_options: grain.ReadOptions | None = None,
                cache_bytes: int = 64 << 20) -> grain.DatasetIterator:
    """`iter(make_dataset(...))`: a checkpointable iterator (get_state() / set_state(), JSON-serialisable)."""
    return iter(make_dataset(store_path, global_batch_size=global_batch_size, seed=seed, shuffle=shuffle,
                             num_epochs=num_epochs, process_index=process_index, process_count=process_count,
                             drop_remainder=drop_remainder, fields=fields, seq_len=seq_len,
                             read_options=read_options, cache_bytes=cache_bytes))


# --------------------------------------------------------------------------------------------- packing
PACK_WINDOW = 512  # rows looked ahead to fill a batch's rows; larger packs tighter but strays further from the shuffle
PACKED_FIELDS = ("segment_ids", "positions")


def pack_epoch(lengths: np.ndarray, order: np.ndarray, *, rows: int, row_len: int,
               window: int = PACK_WINDOW) -> list[list[list[int]]]:
    """Batches of ``rows`` rows (lists of sequence indices, lengths summing to <= ``row_len``) covering ``order``.

    Sequences are taken in ``order``: each goes to the first row of the open batch with room; a sequence that fits
    no row is kept (in order) for the next batch, and the batch closes once none of the next ``window`` pending
    sequences fits. Deterministic; O(len(order) * rows) in numpy.
    """
    if len(order) and int(lengths[order].max()) > row_len:
        raise ValueError(f"a sequence of {int(lengths[order].max())} tokens does not fit in row_len={row_len}")
    pending = [int(i) for i in order]
    batches: list[list[list[int]]] = []
    while pending:
        free = np.full(rows, row_len, np.int64)
        bins: list[list[int]] = [[] for _ in range(rows)]
        kept: list[int] = []
        misses = 0
        for pos, idx in enumerate(pending):
            fits = np.flatnonzero(free >= lengths[idx])
            if fits.size:
                free[fits[0]] -= lengths[idx]
                bins[fits[0]].append(idx)
                misses = 0
                continue
            kept.append(idx)
            misses += 1
            if misses >= window:
                kept.extend(pending[pos + 1:])
                break
        batches.append(bins)
        pending = kept
    return batches


class PackingPlan:
    """Which store rows (sequences) make up each packed global batch; batch ``s`` is a function of (seed, s).

    Epochs are planned lazily (and cached), so any step can be looked up. Thread-safe.
    """

    def __init__(self, lengths: np.ndarray, *, rows: int, row_len: int, seed: int, shuffle: bool = True,
                 window: int = PACK_WINDOW, groups: np.ndarray | None = None):
        self.lengths = np.asarray(lengths, np.int64)
        # groups (int [N], e.g. the routes of StoreSlices): sequences taken in their stratified order
        self.groups = None if groups is None else np.asarray(groups)
        self.rows, self.row_len, self.seed, self.shuffle, self.window = rows, row_len, seed, shuffle, window
        self._epochs: list[list[list[list[int]]]] = []
        self._starts: list[int] = []  # first global batch index of each planned epoch
        self._lock = threading.Lock()

    def _plan_epoch(self, epoch: int) -> list[list[list[int]]]:
        n = len(self.lengths)
        if self.groups is not None:
            order = stratified_order(self.groups, np.random.default_rng([self.seed, epoch]) if self.shuffle else None)
        else:
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return pack_epoch(self.lengths, order, rows=self.rows, row_len=self.row_len, window=self.window)

    def batch(self, step: int) -> list[list[int]]:
        """Rows of global batch ``step`` (0-based): ``rows`` lists of store row indices."""
        with self._lock:
            while not self._starts or step >= self._starts[-1] + len(self._epochs[-1]):
                start = self._starts[-1] + len(self._epochs[-1]) if self._starts else 0
                self._epochs.append(self._plan_epoch(len(self._epochs)))
                self._starts.append(start)
            e = int(np.searchsorted(self._starts, step, side="right")) - 1
            return self._epochs[e][step - self._starts[e]]

    def epoch_of(self, step: int) -> int:
        self.batch(step)
        return int(np.searchsorted(self._starts, step, side="right")) - 1

    def describe(self, step: int) -> str:
        """The store rows of global batch ``step`` (0-based), for error messages."""
        return f"store rows {sorted(i for row in self.batch(step) for i in row)}"


class _ReadPackedBatch:
    """Grain map: global batch index -> this process's packed rows ``{field: [rows_local, row_len]}``."""

    def __init__(self, source: RolloutSource | SlicedSource, plan: PackingPlan, process_index: int,
                 process_count: int):
        self.source, self.plan = source, plan
        local = plan.rows // process_count
        self.row_range = (process_index * local, (process_index + 1) * local)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        lo, hi = self.row_range
        rows = self.plan.batch(int(step))[lo:hi]
        indices = [i for row in rows for i in row]
        length = self.plan.row_len
        fields = self.source.fields
        out = {}
        for f in fields:
            dtype, _, kind = ARRAYS[f] if f in ARRAYS else (np.dtype(np.int32), "rollout", "token")
            tail = (self.source.topk,) if kind == "topk" else ()
            out[f] = np.zeros((hi - lo, length) + tail, dtype)
        out["segment_ids"] = np.zeros((hi - lo, length), np.int32)
        out["positions"] = np.zeros((hi - lo, length), np.int32)
        if not indices:
            return out
        lens = self.plan.lengths[indices]
        data = self.source.read(indices, seq_len=int(lens.max()))
        k = 0
        for r, row in enumerate(rows):
            t = 0
            for seg, _ in enumerate(row, start=1):
                n = int(lens[k])
                for f in fields:
                    out[f][r, t:t + n] = data[f][k, :n]
                out["segment_ids"][r, t:t + n] = seg
                out["positions"][r, t:t + n] = np.arange(n)
                t += n
                k += 1
        return out


def sequence_lengths(store_path: str | os.PathLike[str] | StoreSlices) -> np.ndarray:
    """prompt_len + response_len of every row of a store (or of `StoreSlices`, part after part), int64 [N]."""
    if isinstance(store_path, StoreSlices):
        return np.concatenate([sequence_lengths(path)[lo:hi] for path, lo, hi in store_path.parts])
    store = RolloutStore.open(store_path, "r")
    lens = store.read_rows(range(store.num_rows), ["prompt_len", "response_len"])
    return (lens["prompt_len"] + lens["response_len"]).astype(np.int64)


def make_packed_dataset(store_path: str | os.PathLike[str] | StoreSlices, *, token_budget: int, num_steps: int, seed: int,
                        row_len: int | None = None, shuffle: bool = True, process_index: int | None = None,
                        process_count: int | None = None, fields: Sequence[str] | None = None,
                        read_options: grain.ReadOptions | None = None, cache_bytes: int = 64 << 20,
                        window: int = PACK_WINDOW) -> tuple[grain.IterDataset, PackingPlan]:
    """Packed batches of ``token_budget`` token slots (``token_budget // row_len`` rows) for steps 0..num_steps-1.

    Elements: every per-token field in ``fields`` (default: the store's per-token fields among DEFAULT_FIELDS)
    plus ``segment_ids`` and ``positions``, each ``[rows / process_count, row_len]`` (top-k ``[.., k]``).
    ``row_len`` None = the longest sequence rounded up to 16. Returns the dataset and its PackingPlan.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    lengths = sequence_lengths(store_path)
    if row_len is None:
        row_len = round_up(int(lengths.max()), SEQ_LEN_BUCKET)
    if row_len < int(lengths.max()):
        raise ValueError(f"{store_path}: row_len={row_len} is shorter than its longest sequence "
                         f"({int(lengths.max())} tokens)")
    if token_budget % row_len:
        raise ValueError(f"token_budget={token_budget} must be a multiple of row_len={row_len}")
    rows = token_budget // row_len
    if rows % process_count:
        raise ValueError(f"token_budget={token_budget} gives {rows} rows of {row_len} tokens, not a multiple of "
                         f"the {process_count} processes")
    source = open_source(store_path, fields, cache_bytes=cache_bytes)
    bad = [f for f in source.fields if f in ARRAYS and ARRAYS[f][2] == "row" or f == ROW_INDEX]
    if bad:
        raise ValueError(f"packed batches hold per-token fields only; not {bad}")
    groups = store_path.groups if isinstance(store_path, StoreSlices) and len(store_path.parts) > 1 else None
    plan = PackingPlan(lengths, rows=rows, row_len=row_len, seed=seed, shuffle=shuffle, window=window,
                       groups=groups)
    if read_options is None:
        read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    ds = grain.MapDataset.range(num_steps).map(_ReadPackedBatch(source, plan, process_index, process_count))
    return ds.to_iter_dataset(read_options), plan
