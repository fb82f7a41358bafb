"""Tests for jopd.data.store.RolloutStore: roundtrip, resume byte-identity, integrity checks, input validation."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts

from jopd.data.store import SCHEMA_VERSION, RolloutStore, StoreCorruptError, StoreError

N, L, RPC, K = 10, 24, 4, 3  # 3 chunks, the last one short (rows 8:10)


def rollout_data(seed: int, start: int, stop: int, length: int = L) -> dict[str, np.ndarray]:
    """Random, non-zero rollout arrays for rows [start, stop), a pure function of (seed, start)."""
    rng = np.random.default_rng([seed, start])
    n = stop - start
    plen = rng.integers(1, length // 2, n)
    rlen = rng.integers(0, length - plen + 1)
    rlen[0] = length - plen[0]  # one row filling the whole length
    tokens = rng.integers(1, 1000, (n, length))
    tokens[np.arange(length)[None, :] >= (plen + rlen)[:, None]] = 0
    return {"tokens": tokens, "prompt_len": plen, "response_len": rlen,
            "behaviour_logprobs": -rng.random((n, length), dtype=np.float32) * 5 - 0.01,  # non-zero everywhere
            "ended_with_eos": rng.random(n) < 0.5, "truncated": rng.random(n) < 0.3,
            "prompt_index": np.arange(start, stop) // 2, "sample_index": np.arange(start, stop) % 2}


def teacher_data(seed: int, start: int, stop: int, k: int = K) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, start, 1])
    n = stop - start
    out = {"teacher_logprobs": -rng.random((n, L), dtype=np.float32) * 5 - 0.01}
    if k:
        out["topk_ids"] = rng.integers(0, 1000, (n, L, k))
        out["topk_logprobs"] = -rng.random((n, L, k), dtype=np.float32) * 5 - 0.01
    return out


def write_chunk(store: RolloutStore, group: str, c: int, seed: int = 0) -> None:
    start, stop = store.chunk_rows(c)
    if group == "rollout":
        store.write_rollout_chunk(c, **rollout_data(seed, start, stop))
    else:
        store.write_teacher_chunk(c, **teacher_data(seed, start, stop, store.topk))


def make_store(path: Path, *, k: int = K, teacher: bool = True, seed: int = 0) -> RolloutStore:
    store = RolloutStore.create(path, num_rows=N, max_len=L, rows_per_chunk=RPC, topk=k, attrs={"temp": 1.0})
    for c in range(store.num_chunks):
        write_chunk(store, "rollout", c, seed)
        if teacher:
            write_chunk(store, "teacher", c, seed)
    return store


def expected_rows(seed: int = 0, k: int = K) -> dict[str, np.ndarray]:
    """All rows as they should read back: per-token values zeroed outside the response."""
    parts = [{**rollout_data(seed, s, min(s + RPC, N)), **teacher_data(seed, s, min(s + RPC, N), k)}
             for s in range(0, N, RPC)]
    rows = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    t = np.arange(L)[None, :]
    mask = (t >= rows["prompt_len"][:, None]) & (t < (rows["prompt_len"] + rows["response_len"])[:, None])
    rows["response_mask"] = mask.astype(np.int32)
    for key in ("behaviour_logprobs", "teacher_logprobs"):
        rows[key] = np.where(mask, rows[key], 0)
    if k:
        rows["teacher_topk_ids"] = np.where(mask[..., None], rows.pop("topk_ids"), 0)
        rows["teacher_topk_logprobs"] = np.where(mask[..., None], rows.pop("topk_logprobs"), 0)
    return rows


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ roundtrip
def test_roundtrip_every_field(tmp_path: Path) -> None:
    make_store(tmp_path / "s")
    store = RolloutStore.open(tmp_path / "s")
    want = expected_rows()
    assert store.num_chunks == 3 and store.chunk_rows(2) == (8, 10)
    assert store.is_complete("rollout") and store.is_complete("teacher")
    idx = np.array([9, 0, 3, 3, 8, 5])  # unordered, repeated, spanning all chunks
    got = store.read_rows(idx)
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value[idx], err_msg=key)
    assert got["tokens"].dtype == np.int32 and got["teacher_logprobs"].dtype == np.float32
    assert got["ended_with_eos"].dtype == np.bool_ and got["response_mask"].dtype == np.int32
    assert got["teacher_topk_ids"].shape == (6, L, K)
    # Contiguous (slice) read path, seq_len cut, field subset.
    cut = store.read_rows(range(2, 9), ["tokens", "response_mask", "teacher_topk_logprobs"], seq_len=10)
    np.testing.assert_array_equal(cut["tokens"], want["tokens"][2:9, :10])
    np.testing.assert_array_equal(cut["response_mask"], want["response_mask"][2:9, :10])
    np.testing.assert_array_equal(cut["teacher_topk_logprobs"], want["teacher_topk_logprobs"][2:9, :10])
    assert store.read_rows([], ["tokens", "prompt_len"])["tokens"].shape == (0, L)
    assert store.max_row_len() == L
    assert store.verify() == {"rollout": 3, "teacher": 3}


def test_meta_and_attrs(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", k=0, teacher=False)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["schema_version"] == SCHEMA_VERSION
    assert (meta["num_rows"], meta["max_len"], meta["rows_per_chunk"], meta["topk"]) == (N, L, RPC, 0)
    store.update_attrs({"teacher": "t-1", "fingerprint": {"a": [1, 2]}})
    assert RolloutStore.open(tmp_path / "s").attrs == {"temp": 1.0, "teacher": "t-1", "fingerprint": {"a": [1, 2]}}
    assert not list((tmp_path / "s").glob("meta.json.tmp*"))  # atomic write leaves no temp file
    assert "teacher_topk_ids" not in store.fields
    with pytest.raises(ValueError, match="JSON-serialisable"):
        store.update_attrs({"bad": object()})


def test_rewriting_rollout_invalidates_teacher(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s")
    write_chunk(store, "rollout", 1, seed=5)
    assert store.done_chunks("teacher") == [0, 2] and not store.is_complete("teacher")
    with pytest.raises(StoreError, match=r"chunks \[1\]"):
        store.read_rows([5], ["teacher_logprobs"])


# ------------------------------------------------------------------------------------------- resume
def test_resume_is_byte_identical(tmp_path: Path) -> None:
    make_store(tmp_path / "a")

    store = RolloutStore.create(tmp_path / "b", num_rows=N, max_len=L, rows_per_chunk=RPC, topk=K,
                                attrs={"temp": 1.0})
    write_chunk(store, "rollout", 0)
    write_chunk(store, "rollout", 2)
    write_chunk(store, "teacher", 0)
    # A crash in the middle of chunk 1: its data landed partially (garbage), but no completion marker was written.
    raw = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "b" / "tokens")}}).result()
    raw[4:8].write(np.full((4, L), 7, np.int32)).result()
    del store, raw

    store = RolloutStore.open(tmp_path / "b", mode="r+")
    assert store.done_chunks("rollout") == [0, 2] and store.done_chunks("teacher") == [0]
    assert store.pending_chunks("rollout") == [1]
    assert store.pending_chunks("teacher", process_index=1, process_count=2) == [1]
    assert store.pending_chunks("teacher", process_index=0, process_count=2) == [2]
    for group in ("rollout", "teacher"):
        for c in store.pending_chunks(group):
            write_chunk(store, group, c)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")


def _write_owned_chunks(path: str, process_index: int, process_count: int) -> list[int]:
    """Body of one writer process: write the rollout then teacher chunks this process owns."""
    store = RolloutStore.open(path, mode="r+")
    written = []
    for group in ("rollout", "teacher"):
        for c in store.pending_chunks(group, process_index=process_index, process_count=process_count):
            write_chunk(store, group, c)
            written.append(c)
    return written


def test_two_processes_write_disjoint_chunks(tmp_path: Path) -> None:
    make_store(tmp_path / "a")
    RolloutStore.create(tmp_path / "b", num_rows=N, max_len=L, rows_per_chunk=RPC, topk=K, attrs={"temp": 1.0})
    ctx = multiprocessing.get_context("spawn")  # like separate JAX processes: no state shared with the parent
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        owned = list(pool.map(_write_owned_chunks, [str(tmp_path / "b")] * 2, [0, 1], [2, 2]))
    assert owned == [[0, 2, 0, 2], [1, 1]]
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    assert RolloutStore.open(tmp_path / "b").verify() == {"rollout": 3, "teacher": 3}


# --------------------------------------------------------------------------------------- corruption
def test_verify_detects_altered_chunk(tmp_path: Path) -> None:
    make_store(tmp_path / "s")
    chunk_file = tmp_path / "s" / "teacher_logprobs" / "c" / "1" / "0"
    original = chunk_file.read_bytes()
    for offset in (0, 17, len(original) // 2, len(original) - 1):  # header, start, middle and end of the payload
        data = bytearray(original)
        data[offset] ^= 0x01
        chunk_file.write_bytes(bytes(data))
        with pytest.raises(StoreCorruptError, match=r"'teacher_logprobs' chunk 1 \(rows 4:8\)"):
            RolloutStore.open(tmp_path / "s").verify()
        RolloutStore.open(tmp_path / "s").verify(["rollout"])  # the other group is unaffected
    chunk_file.write_bytes(original)
    RolloutStore.open(tmp_path / "s").verify()


def test_verify_detects_missing_and_truncated_chunk_files(tmp_path: Path) -> None:
    make_store(tmp_path / "s")
    (tmp_path / "s" / "truncated" / "c" / "2").unlink()  # an all-zero-able bool chunk is still a file
    tokens_file = tmp_path / "s" / "tokens" / "c" / "0" / "0"
    tokens_file.write_bytes(tokens_file.read_bytes()[:20])
    with pytest.raises(StoreCorruptError) as err:
        RolloutStore.open(tmp_path / "s").verify()
    msg = str(err.value)
    assert "'truncated' chunk 2 (rows 8:10)" in msg and "missing" in msg
    assert "'tokens' chunk 0 (rows 0:4)" in msg


def test_verify_detects_missing_marker_and_meta_damage(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s")
    (tmp_path / "s" / "progress" / "teacher" / "000002.json").unlink()
    with pytest.raises(StoreCorruptError, match=r"group 'teacher' chunk 2 \(rows 8:10\): not written"):
        store.verify()
    assert store.verify(require_complete=False) == {"rollout": 3, "teacher": 2}
    meta = tmp_path / "s" / "meta.json"
    meta.write_bytes(meta.read_bytes()[:30])
    with pytest.raises(StoreCorruptError, match="meta.json"):
        store.verify()
    with pytest.raises(StoreCorruptError, match="meta.json"):
        RolloutStore.open(tmp_path / "s")


def test_open_detects_garbled_array_metadata(tmp_path: Path) -> None:
    make_store(tmp_path / "s", teacher=False)
    (tmp_path / "s" / "prompt_len" / "zarr.json").write_text("{not json")
    with pytest.raises(StoreCorruptError, match="'prompt_len'"):
        RolloutStore.open(tmp_path / "s")


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.update(tokens=d["tokens"][:, :-1]), r"tokens for chunk 0 must have shape \(4, 24\)"),
        (lambda d: d.update(tokens=d["tokens"].astype(np.float32)), "tokens .* must be an integer array"),
        (lambda d: d.update(behaviour_logprobs=d["tokens"]), "behaviour_logprobs .* floating-point"),
        (lambda d: d["response_len"].__setitem__(1, L + 1), r"response_len must lie in \[0, max_len=24\]"),
        (lambda d: d["prompt_len"].__setitem__(2, 0), "prompt_len must be >= 1"),
        (lambda d: d.update(prompt_len=d["prompt_len"] + 3), "prompt_len \\+ response_len exceeds max_len=24"),
        (lambda d: d["tokens"].__setitem__((1, -1), 5), "tokens must be 0 after prompt_len"),
        (lambda d: d["behaviour_logprobs"].__setitem__((0, L - 1), np.nan), "non-finite"),
        (lambda d: d.update(truncated=np.full(4, 2)), "truncated .* must be bool"),
    ],
)
def test_bad_rollout_input(tmp_path: Path, change: Callable[[dict[str, np.ndarray]], object], match: str) -> None:
    store = RolloutStore.create(tmp_path / "s", num_rows=N, max_len=L, rows_per_chunk=RPC)
    data = rollout_data(0, 0, 4)
    change(data)
    with pytest.raises(ValueError, match=match):
        store.write_rollout_chunk(0, **data)
    assert store.done_chunks("rollout") == []


def test_bad_teacher_input_and_state_errors(tmp_path: Path) -> None:
    store = RolloutStore.create(tmp_path / "s", num_rows=N, max_len=L, rows_per_chunk=RPC, topk=K)
    with pytest.raises(StoreError, match=r"'rollout' chunks \[1\]"):
        write_chunk(store, "teacher", 1)  # teacher before rollout
    write_chunk(store, "rollout", 1)
    with pytest.raises(IndexError, match="chunk 3 out of range"):
        store.write_rollout_chunk(3, **rollout_data(0, 0, 2))
    good = teacher_data(0, 4, 8)
    with pytest.raises(ValueError, match="topk=3"):
        store.write_teacher_chunk(1, good["teacher_logprobs"])
    with pytest.raises(ValueError, match=r"topk_ids for chunk 1 must have shape \(4, 24, 3\)"):
        store.write_teacher_chunk(1, good["teacher_logprobs"], good["topk_ids"][..., :2], good["topk_logprobs"])
    with pytest.raises(StoreError, match=r"reading \['teacher_logprobs'\] needs 'teacher' chunks \[1\]"):
        store.read_rows([4, 5], ["tokens", "teacher_logprobs"])
    with pytest.raises(StoreError, match=r"'rollout' chunks \[0\]"):
        store.read_rows([0], ["tokens"])
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        store.read_rows([10], ["tokens"])
    with pytest.raises(ValueError, match="unknown fields"):
        store.read_rows([4], ["nope"])
    with pytest.raises(StoreError, match="read-only"):
        RolloutStore.open(tmp_path / "s").write_teacher_chunk(1, **good)


def test_open_and_create_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such directory"):
        RolloutStore.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "data.txt").write_text("precious")
    with pytest.raises(StoreError, match="not a RolloutStore: no meta.json"):
        RolloutStore.open(tmp_path / "plain")
    with pytest.raises(StoreError, match="refusing to overwrite"):
        RolloutStore.create(tmp_path / "plain", num_rows=N, max_len=L, overwrite=True)
    assert (tmp_path / "plain" / "data.txt").exists()
    with pytest.raises(ValueError, match="rows_per_chunk must be an int >= 1"):
        RolloutStore.create(tmp_path / "x", num_rows=N, max_len=L, rows_per_chunk=0)
    make_store(tmp_path / "s", teacher=False)
    with pytest.raises(StoreError, match="already exists"):
        RolloutStore.create(tmp_path / "s", num_rows=N, max_len=L)
    meta_path = tmp_path / "s" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        RolloutStore.open(tmp_path / "s")
    fresh = RolloutStore.create(tmp_path / "s", num_rows=4, max_len=8, rows_per_chunk=2, overwrite=True)
    assert fresh.num_rows == 4 and fresh.done_chunks("rollout") == []
    assert not os.path.exists(tmp_path / "s" / "teacher_topk_ids")
