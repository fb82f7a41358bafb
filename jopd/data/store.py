"""On-disk store of student rollouts and teacher log-probs (TensorStore, zarr v3).

The store is written in two stages -- sampling ("rollout" group), then teacher scoring ("teacher" group) -- and
read many times by training. Every array is chunked by rows ([rows_per_chunk, ...]), so a row-chunk is the unit
of writing, progress tracking and integrity checking: writers that own disjoint row-chunks (e.g. one JAX process
each, see `pending_chunks`) never touch the same file.

Layout of ``<root>/`` (local filesystem)::

    meta.json                        {"format", "schema_version", "num_rows", "max_len", "rows_per_chunk",
                                      "topk", "attrs"}; replaced atomically (temp file + os.replace)
    <array>/zarr.json                zarr v3 metadata (blosc-zstd, byte shuffle, fill value 0)
    <array>/c/<chunk>/0[/0]          one storage chunk per row-chunk (always materialised, even if all zero)
    progress/<group>/<chunk:06d>.json  completion marker: rows + SHA-256 of every array's chunk data

Arrays (N rows, L = max_len, k = topk); per-token arrays are aligned with token positions:
    rollout: tokens int32 [N, L] (prompt then response, right-padded with 0), behaviour_logprobs float32 [N, L],
             prompt_len, response_len, prompt_index, sample_index int32 [N], ended_with_eos, truncated bool [N]
    teacher: teacher_logprobs float32 [N, L]; if k > 0 also teacher_topk_ids int32 [N, L, k] and
             teacher_topk_logprobs float32 [N, L, k]
Per-token values outside the response (t < prompt_len or t >= prompt_len + response_len) are stored as 0, so the
stored bytes are canonical: a resumed writer produces a store byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import tensorstore as ts

from jopd.io import atomic_write_json

FORMAT = "jopd.rollout_store"
SCHEMA_VERSION = 1

# name -> (dtype, group, kind); kind "row" = [N], "token" = [N, L], "topk" = [N, L, k].
ARRAYS: dict[str, tuple[np.dtype, str, str]] = {
    "tokens": (np.dtype(np.int32), "rollout", "token"),
    "behaviour_logprobs": (np.dtype(np.float32), "rollout", "token"),
    "prompt_len": (np.dtype(np.int32), "rollout", "row"),
    "response_len": (np.dtype(np.int32), "rollout", "row"),
    "ended_with_eos": (np.dtype(np.bool_), "rollout", "row"),
    "truncated": (np.dtype(np.bool_), "rollout", "row"),
    "prompt_index": (np.dtype(np.int32), "rollout", "row"),
    "sample_index": (np.dtype(np.int32), "rollout", "row"),
    "teacher_logprobs": (np.dtype(np.float32), "teacher", "token"),
    "teacher_topk_ids": (np.dtype(np.int32), "teacher", "topk"),
    "teacher_topk_logprobs": (np.dtype(np.float32), "teacher", "topk"),
}
GROUPS = ("rollout", "teacher")
COMPUTED_FIELDS = ("response_mask",)  # int32 [n, L], derived from prompt_len / response_len on read


class StoreError(Exception):
    """The store is missing, not a store, of another schema version, read-only, or incomplete."""


class StoreCorruptError(StoreError):
    """Stored bytes do not match what was written (missing, truncated or altered chunk / metadata)."""


def _sha256(x: np.ndarray) -> str:
    # Hash the logical little-endian C-order bytes (not the compressed file), so verification can recompute the
    # hash from a TensorStore read independently of codec settings.
    return hashlib.sha256(np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()).hexdigest()


def _response_mask(prompt_len: np.ndarray, response_len: np.ndarray, length: int) -> np.ndarray:
    """[n], [n] -> int32 [n, length]: 1 where prompt_len <= t < prompt_len + response_len."""
    t = np.arange(length)[None, :]
    start = prompt_len[:, None]
    return ((t >= start) & (t < start + response_len[:, None])).astype(np.int32)


class RolloutStore:
    """A directory of row-chunked zarr v3 arrays; construct with `create` or `open`."""

    def __init__(self, path: str, meta: dict[str, Any], arrays: dict[str, ts.TensorStore], mode: str):
        self._path, self._meta, self._arrays, self._mode = path, meta, arrays, mode
        self._complete: set[str] = set()  # groups seen complete; a group never becomes incomplete again

    # ----------------------------------------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: str | os.PathLike[str], *, num_rows: int, max_len: int, rows_per_chunk: int = 64,
               topk: int = 0, attrs: Mapping[str, Any] | None = None, overwrite: bool = False) -> RolloutStore:
        """Creates an empty store (all arrays, no chunks written) and returns it opened in mode "r+"."""
        path = os.path.abspath(os.fspath(path))
        for name, value, lo in (("num_rows", num_rows, 1), ("max_len", max_len, 2),
                                ("rows_per_chunk", rows_per_chunk, 1), ("topk", topk, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
                raise ValueError(f"RolloutStore.create({path}): {name} must be an int >= {lo}, got {value!r}")
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            if not overwrite:
                raise StoreError(f"{path} already exists and is not empty (pass overwrite=True to replace a store)")
            if not os.path.isfile(os.path.join(path, "meta.json")):
                # Refuse to rmtree a directory that is not a store: overwrite=True must never eat unrelated data.
                raise StoreError(f"refusing to overwrite {path}: it is not a RolloutStore (no meta.json)")
            shutil.rmtree(path)
        os.makedirs(path, exist_ok=True)
        meta = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "num_rows": int(num_rows),
                "max_len": int(max_len), "rows_per_chunk": int(rows_per_chunk), "topk": int(topk),
                "attrs": cls._check_attrs(path, attrs or {})}
        # meta.json first: a crash later leaves a recognisable (if broken) store that overwrite=True may replace.
        atomic_write_json(os.path.join(path, "meta.json"), meta)
        for group in GROUPS:
            os.makedirs(os.path.join(path, "progress", group), exist_ok=True)
        return cls._open_arrays(path, meta, "r+", create=True, cache_bytes=0)

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: Literal["r", "r+"] = "r", *,
             cache_bytes: int = 0) -> RolloutStore:
        """Opens an existing store. `cache_bytes` sizes TensorStore's decoded-chunk cache (useful for row reads)."""
        if mode not in ("r", "r+"):
            raise ValueError(f"RolloutStore.open: mode must be 'r' or 'r+', got {mode!r}")
        path = os.path.abspath(os.fspath(path))
        return cls._open_arrays(path, cls._read_meta(path), mode, create=False, cache_bytes=cache_bytes)

    @staticmethod
    def _read_meta(path: str) -> dict[str, Any]:
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isdir(path):
            raise StoreError(f"{path}: no such directory (not a RolloutStore)")
        if not os.path.isfile(meta_path):
            raise StoreError(f"{path} is not a RolloutStore: no meta.json (create one with RolloutStore.create)")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise StoreCorruptError(f"{meta_path} is unreadable or garbled: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise StoreError(f"{path} is not a RolloutStore: meta.json has no format={FORMAT!r}")
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{path}: store schema version {meta.get('schema_version')!r}, but this code reads "
                             f"version {SCHEMA_VERSION}; re-create the store")
        missing = [k for k in ("num_rows", "max_len", "rows_per_chunk", "topk", "attrs") if k not in meta]
        if missing:
            raise StoreCorruptError(f"{meta_path} lacks keys {missing}")
        return meta

    @classmethod
    def _open_arrays(cls, path: str, meta: dict[str, Any], mode: str, *, create: bool,
                     cache_bytes: int) -> RolloutStore:
        context = ts.Context({"cache_pool": {"total_bytes_limit": int(cache_bytes)}})
        n, length, rpc, k = meta["num_rows"], meta["max_len"], meta["rows_per_chunk"], meta["topk"]
        futures, shapes = {}, {}
        for name, (dtype, _, kind) in ARRAYS.items():
            if kind == "topk" and k == 0:
                continue
            tail = {"row": [], "token": [length], "topk": [length, k]}[kind]
            shapes[name] = [n, *tail]
            spec: dict[str, Any] = {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(path, name)},
                                    # Without this, an all-zero chunk (e.g. `truncated`) would not be written and
                                    # its file could not be told apart from a deleted one.
                                    "store_data_equal_to_fill_value": True}
            if create:
                spec["metadata"] = {
                    "shape": shapes[name], "data_type": dtype.name,
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [rpc, *tail]}},
                    "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
                    "fill_value": False if dtype == np.bool_ else 0,
                    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                               {"name": "blosc", "configuration": {"cname": "zstd", "clevel": 3, "shuffle": "shuffle",
                                                                  "typesize": dtype.itemsize, "blocksize": 0}}]}
            futures[name] = ts.open(spec, create=create, open=not create, read=True, write=mode == "r+",
                                    context=context, dtype=dtype, shape=shapes[name])
        arrays = {}
        for name, fut in futures.items():
            try:
                arrays[name] = fut.result()
            except ValueError as e:  # missing, garbled or mismatching zarr.json
                raise StoreCorruptError(f"{path}: cannot open array {name!r} as {ARRAYS[name][0].name} "
                                        f"{shapes[name]}: {e}") from e
        return cls(path, meta, arrays, mode)

    @staticmethod
    def _check_attrs(path: str, attrs: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return json.loads(json.dumps(dict(attrs), sort_keys=True))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: attrs must be JSON-serialisable: {e}") from e

    # ------------------------------------------------------------------------------------------- properties
    @property
    def path(self) -> str:
        """Absolute path of the store directory."""
        return self._path

    @property
    def mode(self) -> str:
        """"r" or "r+"."""
        return self._mode

    @property
    def num_rows(self) -> int:
        """N."""
        return int(self._meta["num_rows"])

    @property
    def max_len(self) -> int:
        """L."""
        return int(self._meta["max_len"])

    @property
    def rows_per_chunk(self) -> int:
        return int(self._meta["rows_per_chunk"])

    @property
    def topk(self) -> int:
        """k (0: no top-k arrays)."""
        return int(self._meta["topk"])

    @property
    def num_chunks(self) -> int:
        return -(-self.num_rows // self.rows_per_chunk)

    @property
    def fields(self) -> tuple[str, ...]:
        """Names readable with read_rows: the stored arrays plus computed ones."""
        return tuple(self._arrays) + COMPUTED_FIELDS

    @property
    def attrs(self) -> dict[str, Any]:
        """A copy of the free-form attributes in meta.json."""
        return json.loads(json.dumps(self._meta["attrs"]))

    def __repr__(self) -> str:
        return (f"RolloutStore({self._path!r}, mode={self._mode!r}, num_rows={self.num_rows}, "
                f"max_len={self.max_len}, rows_per_chunk={self.rows_per_chunk}, topk={self.topk})")

    def group_fields(self, group: str) -> tuple[str, ...]:
        """Stored arrays that belong to `group` ("rollout" or "teacher")."""
        self._check_group(group)
        return tuple(name for name in self._arrays if ARRAYS[name][1] == group)

    def chunk_rows(self, chunk_idx: int) -> tuple[int, int]:
        """Row range [start, stop) of a row-chunk; the last chunk may be short."""
        if not 0 <= chunk_idx < self.num_chunks:
            raise IndexError(f"{self._path}: chunk {chunk_idx} out of range [0, {self.num_chunks})")
        start = chunk_idx * self.rows_per_chunk
        return start, min(start + self.rows_per_chunk, self.num_rows)

    def update_attrs(self, updates: Mapping[str, Any]) -> None:
        """Merges `updates` into attrs and rewrites meta.json atomically (call from one process only)."""
        self._require_writable()
        meta = self._read_meta(self._path)  # merge into the on-disk version, not a possibly stale copy
        meta["attrs"] = self._check_attrs(self._path, {**meta["attrs"], **updates})
        atomic_write_json(os.path.join(self._path, "meta.json"), meta)
        self._meta = meta

    # --------------------------------------------------------------------------------------------- progress
    def _check_group(self, group: str) -> None:
        if group not in GROUPS:
            raise ValueError(f"{self._path}: unknown field group {group!r}; expected one of {GROUPS}")

    def _marker_path(self, group: str, chunk_idx: int) -> str:
        return os.path.join(self._path, "progress", group, f"{chunk_idx:06d}.json")

    def done_chunks(self, group: str) -> list[int]:
        """Sorted indices of the row-chunks of `group` whose completion marker exists."""
        self._check_group(group)
        names = os.listdir(os.path.join(self._path, "progress", group))
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def is_complete(self, group: str) -> bool:
        """True when every row-chunk of `group` has been written."""
        if group not in self._complete and len(self.done_chunks(group)) == self.num_chunks:
            self._complete.add(group)
        return group in self._complete

    def pending_chunks(self, group: str, *, process_index: int = 0, process_count: int = 1) -> list[int]:
        """Not-yet-written chunks of `group` owned by this process (chunk i belongs to process i % count)."""
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
        done = set(self.done_chunks(group))
        return [c for c in range(process_index, self.num_chunks, process_count) if c not in done]

    def _require_done(self, group: str, chunks: Iterable[int], what: str) -> None:
        if group in self._complete:
            return
        done = set(self.done_chunks(group))
        if len(done) == self.num_chunks:
            self._complete.add(group)
            return
        missing = sorted(set(chunks) - done)
        if missing:
            shown = missing[:20] + (["..."] if len(missing) > 20 else [])
            raise StoreError(f"{self._path}: {what} needs {group!r} chunks {shown} which are not written yet "
                             f"({len(done)}/{self.num_chunks} {group} chunks done)")

    # ---------------------------------------------------------------------------------------------- writing
    def _require_writable(self) -> None:
        if self._mode != "r+":
            raise StoreError(f"{self._path} is opened read-only; use RolloutStore.open(path, mode='r+')")

    def _coerce(self, chunk_idx: int, name: str, x: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """Checks shape / dtype kind of one input array and converts it to the stored dtype."""
        a = np.asarray(x)
        where = f"{self._path}: {name} for chunk {chunk_idx}"
        if a.shape != shape:
            raise ValueError(f"{where} must have shape {shape}, got {a.shape}")
        if dtype == np.bool_:
            if a.dtype != np.bool_ and not (a.dtype.kind in "iu" and np.isin(a, (0, 1)).all()):
                raise ValueError(f"{where} must be bool (or 0/1 integers), got {a.dtype}")
        elif dtype.kind == "i":
            if a.dtype.kind not in "iu":
                raise ValueError(f"{where} must be an integer array, got {a.dtype}")
            info = np.iinfo(dtype)
            if a.size and (a.min() < info.min or a.max() > info.max):
                raise ValueError(f"{where} has values outside the {dtype.name} range")
        elif a.dtype.kind != "f":
            raise ValueError(f"{where} must be a floating-point array, got {a.dtype}")
        return a.astype(dtype)

    def _commit(self, group: str, chunk_idx: int, data: dict[str, np.ndarray]) -> None:
        """Writes all arrays of one group's chunk concurrently, then records the completion marker."""
        start, stop = self.chunk_rows(chunk_idx)
        # Drop markers first: if we crash mid-rewrite, the chunk must not look done with half-old data. A rewritten
        # rollout chunk also invalidates the teacher scores computed from it.
        for g in ("rollout", "teacher") if group == "rollout" else ("teacher",):
            if os.path.exists(self._marker_path(g, chunk_idx)):
                os.remove(self._marker_path(g, chunk_idx))
                self._complete.discard(g)
        futures = [self._arrays[name][start:stop].write(value) for name, value in data.items()]
        for fut in futures:
            fut.commit.result()  # data durable before the marker claims it is
        marker = {"group": group, "chunk": chunk_idx, "rows": [start, stop],
                  "sha256": {name: _sha256(value) for name, value in sorted(data.items())}}
        atomic_write_json(self._marker_path(group, chunk_idx), marker)

    def write_rollout_chunk(self, chunk_idx: int, *, tokens: Any, prompt_len: Any, response_len: Any,
                            behaviour_logprobs: Any, ended_with_eos: Any, truncated: Any, prompt_index: Any,
                            sample_index: Any) -> None:
        """Writes the rollout group of one row-chunk; inputs cover its n rows ([n, L] / [n]).

        behaviour_logprobs outside each row's response are stored as 0; tokens past prompt_len + response_len
        must already be 0 (right padding).
        """
        self._require_writable()
        start, stop = self.chunk_rows(chunk_idx)
        n, length = stop - start, self.max_len
        inputs = {"tokens": tokens, "behaviour_logprobs": behaviour_logprobs, "prompt_len": prompt_len,
                  "response_len": response_len, "ended_with_eos": ended_with_eos, "truncated": truncated,
                  "prompt_index": prompt_index, "sample_index": sample_index}
        data = {name: self._coerce(chunk_idx, name, x, ARRAYS[name][0], (n, length) if ARRAYS[name][2] == "token"
                                   else (n,)) for name, x in inputs.items()}
        where = f"{self._path}: chunk {chunk_idx} (rows {start}:{stop})"
        plen, rlen = data["prompt_len"], data["response_len"]
        checks = (("prompt_len", plen < 1, "must be >= 1"),
                  ("response_len", (rlen < 0) | (rlen > length), f"must lie in [0, max_len={length}]"),
                  ("prompt_index", data["prompt_index"] < 0, "must be >= 0"),
                  ("sample_index", data["sample_index"] < 0, "must be >= 0"))
        for name, bad_rows, expected in checks:
            bad = np.flatnonzero(bad_rows)
            if bad.size:
                raise ValueError(f"{where}: {name} {expected}; row {start + bad[0]} has {data[name][bad[0]]}")
        bad = np.flatnonzero((data["tokens"] < 0).any(axis=1))
        if bad.size:
            raise ValueError(f"{where}: tokens must be >= 0; row {start + bad[0]} has a negative id")
        bad = np.flatnonzero(plen + rlen > length)
        if bad.size:
            raise ValueError(f"{where}: prompt_len + response_len exceeds max_len={length} at row {start + bad[0]} "
                             f"({plen[bad[0]]} + {rlen[bad[0]]})")
        t = np.arange(length)[None, :]
        bad = np.flatnonzero(((t >= (plen + rlen)[:, None]) & (data["tokens"] != 0)).any(axis=1))
        if bad.size:
            raise ValueError(f"{where}: tokens must be 0 after prompt_len + response_len (right padding); "
                             f"row {start + bad[0]} is not")
        mask = _response_mask(plen, rlen, length).astype(bool)
        if not np.isfinite(data["behaviour_logprobs"][mask]).all():
            raise ValueError(f"{where}: behaviour_logprobs has non-finite values inside the response")
        data["behaviour_logprobs"] = np.where(mask, data["behaviour_logprobs"], np.float32(0))
        self._commit("rollout", chunk_idx, data)

    def write_teacher_chunk(self, chunk_idx: int, teacher_logprobs: Any, topk_ids: Any = None,
                            topk_logprobs: Any = None) -> None:
        """Writes the teacher group of one row-chunk: [n, L] log-probs (+ [n, L, k] top-k when topk > 0).

        The chunk's rollout must be written first (its lengths define the response mask); values outside the
        response are stored as 0.
        """
        self._require_writable()
        start, stop = self.chunk_rows(chunk_idx)
        n, length, k = stop - start, self.max_len, self.topk
        where = f"{self._path}: teacher chunk {chunk_idx} (rows {start}:{stop})"
        if (topk_ids is None) != (topk_logprobs is None) or (k > 0) != (topk_ids is not None):
            raise ValueError(f"{where}: store has topk={k}; pass both topk_ids and topk_logprobs iff topk > 0")
        self._require_done("rollout", [chunk_idx], f"writing teacher chunk {chunk_idx}")
        lens = self.read_rows(range(start, stop), ["prompt_len", "response_len"])
        mask = _response_mask(lens["prompt_len"], lens["response_len"], length).astype(bool)
        data = {"teacher_logprobs": self._coerce(chunk_idx, "teacher_logprobs", teacher_logprobs, np.dtype(np.float32),
                                                 (n, length))}
        if k > 0:
            data["teacher_topk_ids"] = self._coerce(chunk_idx, "topk_ids", topk_ids, np.dtype(np.int32), (n, length, k))
            data["teacher_topk_logprobs"] = self._coerce(chunk_idx, "topk_logprobs", topk_logprobs,
                                                         np.dtype(np.float32), (n, length, k))
            if (data["teacher_topk_ids"][mask] < 0).any():
                raise ValueError(f"{where}: topk_ids must be >= 0 inside the response")
        for name, value in data.items():
            if name != "teacher_topk_ids" and not np.isfinite(value[mask]).all():
                raise ValueError(f"{where}: {name} has non-finite values inside the response")
            data[name] = np.where(mask if value.ndim == 2 else mask[..., None], value, value.dtype.type(0))
        self._commit("teacher", chunk_idx, data)

    # ---------------------------------------------------------------------------------------------- reading
    def read_rows(self, indices: Sequence[int] | np.ndarray | range, fields: Sequence[str] | None = None, *,
                  seq_len: int | None = None) -> dict[str, np.ndarray]:
        """Reads rows `indices` ([n], any order, repeats allowed) of `fields` (default: all of `self.fields`).

        Returns {name: [n, seq_len(, k)] or [n]}; per-token arrays are cut to their first `seq_len` positions
        (default L). Raises StoreError naming the chunks when a requested field's group is not written there.
        """
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"{self._path}: indices must be 1-D, got shape {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(f"{self._path}: row indices must lie in [0, {self.num_rows}), got "
                             f"{idx.min()}..{idx.max()}")
        fields = self.fields if fields is None else tuple(fields)
        unknown = [f for f in fields if f not in self.fields]
        if unknown:
            raise ValueError(f"{self._path}: unknown fields {unknown}; available: {self.fields}")
        seq_len = self.max_len if seq_len is None else seq_len
        if not 1 <= seq_len <= self.max_len:
            raise ValueError(f"{self._path}: seq_len must lie in [1, {self.max_len}], got {seq_len}")
        stored = [f for f in fields if f in self._arrays]
        if "response_mask" in fields:
            stored += [f for f in ("prompt_len", "response_len") if f not in stored]
        chunks = np.unique(idx // self.rows_per_chunk).tolist()
        for group in GROUPS:
            needed = [f for f in stored if ARRAYS[f][1] == group]
            if needed:
                self._require_done(group, chunks, f"reading {needed}")
        # A contiguous ascending run (e.g. a whole chunk) reads as a plain slice; anything else as an index array.
        contiguous = idx.size > 0 and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size))
        sel: Any = slice(int(idx[0]), int(idx[0]) + idx.size) if contiguous else idx
        out: dict[str, np.ndarray] = {}
        if idx.size:
            futures = {name: (self._arrays[name][sel] if ARRAYS[name][2] == "row"
                              else self._arrays[name][sel, :seq_len]).read() for name in stored}
            for name, fut in futures.items():
                try:
                    out[name] = fut.result()
                except ValueError as e:
                    raise StoreCorruptError(f"{self._path}: reading {name!r} rows {idx.tolist()[:8]}... failed: "
                                            f"{e}") from e
        else:
            for name in stored:
                dtype, _, kind = ARRAYS[name]
                out[name] = np.zeros({"row": (0,), "token": (0, seq_len), "topk": (0, seq_len, self.topk)}[kind],
                                     dtype)
        if "response_mask" in fields:
            out["response_mask"] = _response_mask(out["prompt_len"], out["response_len"], seq_len)
        return {f: out[f] for f in fields}

    def max_row_len(self) -> int:
        """Longest prompt_len + response_len over all rows (requires the rollout group)."""
        lens = self.read_rows(range(self.num_rows), ["prompt_len", "response_len"])
        return int((lens["prompt_len"] + lens["response_len"]).max())

    # ------------------------------------------------------------------------------------------------ verify
    def verify(self, groups: Sequence[str] = GROUPS, *, require_complete: bool = True) -> dict[str, int]:
        """Re-reads every written chunk of `groups` from disk and checks it against its marker's SHA-256.

        Raises StoreCorruptError listing every problem (array, chunk, rows): unreadable/changed meta.json or
        zarr.json, a missing marker (when `require_complete`), a missing chunk file, undecodable or altered data.
        Returns {group: number of chunks verified}.
        """
        for g in groups:
            self._check_group(g)
        meta = self._read_meta(self._path)  # garbled meta.json -> StoreCorruptError
        shape_keys = ("num_rows", "max_len", "rows_per_chunk", "topk")
        if any(meta[key] != self._meta[key] for key in shape_keys):
            raise StoreCorruptError(f"{self._path}/meta.json changed shape keys {shape_keys} since the store was opened")
        fresh = self._open_arrays(self._path, meta, "r", create=False, cache_bytes=0)  # no cached bytes
        problems: list[str] = []
        counts = dict.fromkeys(groups, 0)
        for group in groups:
            names = self.group_fields(group)
            for c in range(self.num_chunks):
                start, stop = self.chunk_rows(c)
                where = f"chunk {c} (rows {start}:{stop})"
                try:
                    with open(self._marker_path(group, c)) as f:
                        expected = json.load(f)["sha256"]
                except FileNotFoundError:
                    if require_complete:
                        problems.append(f"group {group!r} {where}: not written (no completion marker)")
                    continue
                except (OSError, ValueError, KeyError, TypeError) as e:
                    problems.append(f"group {group!r} {where}: garbled completion marker ({e})")
                    continue
                futures = {}
                for name in names:
                    chunk_file = os.path.join(self._path, name, "c", str(c), *["0"] * (fresh._arrays[name].ndim - 1))
                    if not os.path.isfile(chunk_file):
                        problems.append(f"array {name!r} {where}: chunk file {chunk_file} is missing")
                    else:
                        futures[name] = fresh._arrays[name][start:stop].read()
                for name, fut in futures.items():
                    try:
                        ok = _sha256(fut.result()) == expected.get(name)
                    except ValueError as e:
                        problems.append(f"array {name!r} {where}: unreadable chunk ({e})")
                        continue
                    if not ok:
                        problems.append(f"array {name!r} {where}: SHA-256 mismatch (data altered)")
                counts[group] += 1
        if problems:
            raise StoreCorruptError(f"{self._path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
        return counts


def write_sequences(path: str | os.PathLike[str], prompts: Sequence[Sequence[int]],
                    responses: Sequence[Sequence[int]], *, rows_per_chunk: int = 256,
                    attrs: Mapping[str, Any] | None = None) -> RolloutStore:
    """A store of fixed (prompt, response) pairs, e.g. SFT data: the rollout group with zero behaviour log-probs.

    Built beside ``path`` and renamed into place, so ``path`` holds a complete store or none; an existing store
    at ``path`` is left alone (and returned) -- the caller's fingerprints decide when it is stale.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(os.path.join(path, "meta.json")):
        return RolloutStore.open(path, "r")
    if len(prompts) != len(responses) or not len(prompts):
        raise ValueError(f"{path}: need as many responses as prompts (>= 1), got {len(prompts)} / {len(responses)}")
    max_len = max(2, max(len(p) + len(r) for p, r in zip(prompts, responses)))
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    store = RolloutStore.create(tmp, num_rows=len(prompts), max_len=max_len, rows_per_chunk=rows_per_chunk,
                                attrs=attrs)
    for c in range(store.num_chunks):
        lo, hi = store.chunk_rows(c)
        n = hi - lo
        tokens = np.zeros((n, max_len), np.int32)
        plen = np.array([len(p) for p in prompts[lo:hi]], np.int32)
        rlen = np.array([len(r) for r in responses[lo:hi]], np.int32)
        for i, (p, r) in enumerate(zip(prompts[lo:hi], responses[lo:hi])):
            tokens[i, :plen[i]] = p
            tokens[i, plen[i]:plen[i] + rlen[i]] = r
        store.write_rollout_chunk(c, tokens=tokens, prompt_len=plen, response_len=rlen,
                                  behaviour_logprobs=np.zeros((n, max_len), np.float32),
                                  ended_with_eos=np.ones(n, bool), truncated=np.zeros(n, bool),
                                  prompt_index=np.arange(lo, hi, dtype=np.int32), sample_index=np.zeros(n, np.int32))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.replace(tmp, path)
    return RolloutStore.open(path, "r")


def create_atomically(path: str | os.PathLike[str], **create_kwargs: Any) -> None:
    """`RolloutStore.create` into a temporary sibling renamed into place: the store appears complete or not at all
    (``create`` writes meta.json, then one zarr.json per array). Call from one process only."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    for stale in os.listdir(parent):  # leftovers of a crash during an earlier create
        if stale.startswith(f"{name}.tmp-"):
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    if os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    RolloutStore.create(tmp, **create_kwargs)
    os.replace(tmp, path)
