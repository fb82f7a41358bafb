"""Tests for jopd.data.loader: batch contents, static shapes, determinism, resume, sharding, epoch reshuffle."""

from __future__ import annotations

import itertools
import json
import pickle
from pathlib import Path
from typing import Any

import grain
import numpy as np
import pytest

from jopd.data.loader import RolloutSource, epoch_steps, make_loader
from jopd.data.store import RolloutStore, StoreError

N, L, RPC, K = 22, 100, 8, 2  # 3 chunks, the last one short (rows 16:22)
MAX_ROW = 50  # longest row is exactly this long -> seq_len="auto" = 64


def _write_store(path: Path, *, teacher: bool = True) -> None:
    rng = np.random.default_rng(1234)
    store = RolloutStore.create(path, num_rows=N, max_len=L, rows_per_chunk=RPC, topk=K)
    for c in range(store.num_chunks):
        start, stop = store.chunk_rows(c)
        n = stop - start
        plen = rng.integers(1, 20, n)
        rlen = rng.integers(1, MAX_ROW - plen + 1)
        if c == 0:
            rlen[0] = MAX_ROW - plen[0]
        tokens = rng.integers(1, 500, (n, L))
        tokens[np.arange(L)[None, :] >= (plen + rlen)[:, None]] = 0
        store.write_rollout_chunk(c, tokens=tokens, prompt_len=plen, response_len=rlen,
                                  behaviour_logprobs=-rng.random((n, L)) - 0.1, ended_with_eos=np.ones(n, bool),
                                  truncated=np.zeros(n, bool), prompt_index=np.arange(start, stop),
                                  sample_index=np.zeros(n, np.int32))
        if teacher:
            store.write_teacher_chunk(c, -rng.random((n, L)) - 0.1, rng.integers(0, 500, (n, L, K)),
                                      -rng.random((n, L, K)) - 0.1)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("loader") / "store"
    _write_store(path)
    return str(path)


def loader(path: str, **kwargs: Any) -> grain.DatasetIterator:
    """make_loader with test defaults: one process, batch 4, row_index included."""
    kwargs = {"global_batch_size": 4, "seed": 7, "process_index": 0, "process_count": 1,
              "fields": ("tokens", "response_mask", "teacher_logprobs", "row_index"), **kwargs}
    return make_loader(path, **kwargs)


def take(it: Any, n: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(it, n))


def assert_batches_equal(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batches_match_store(store_path: str) -> None:
    it = make_loader(store_path, global_batch_size=4, seed=0, process_index=0, process_count=1,
                     fields=("tokens", "response_mask", "teacher_logprobs", "behaviour_logprobs",
                             "teacher_topk_ids", "teacher_topk_logprobs", "prompt_len", "row_index"))
    store = RolloutStore.open(store_path)
    for batch in take(it, epoch_steps(N, 4)):
        want = store.read_rows(batch["row_index"], [k for k in batch if k != "row_index"])
        for key, value in want.items():
            np.testing.assert_array_equal(batch[key], value, err_msg=key)
            assert batch[key].dtype == value.dtype
        assert batch["response_mask"].dtype == np.int32 and batch["row_index"].shape == (4,)


def test_default_fields_and_static_shapes(store_path: str) -> None:
    it = make_loader(store_path, global_batch_size=4, seed=0, process_index=0, process_count=1)
    batch = next(it)
    assert set(batch) == {"tokens", "response_mask", "teacher_logprobs", "behaviour_logprobs",
                          "teacher_topk_ids", "teacher_topk_logprobs"}
    assert batch["tokens"].shape == (4, L) and batch["teacher_topk_ids"].shape == (4, L, K)
    # "auto": the longest row (50) rounded up to 64 (a multiple of 16), identical for every batch of every epoch,
    # padded or not.
    for drop in (True, False):
        shapes = {(b["tokens"].shape, b["teacher_logprobs"].shape, b["response_mask"].shape)
                  for b in take(loader(store_path, seq_len="auto", drop_remainder=drop), 3 * epoch_steps(N, 4))}
        assert shapes == {((4, 64), (4, 64), (4, 64))}
    assert next(loader(store_path, seq_len=MAX_ROW))["tokens"].shape == (4, MAX_ROW)
    with pytest.raises(ValueError, match=r"longest row = 50"):
        loader(store_path, seq_len=MAX_ROW - 1)  # would silently cut responses


def test_determinism_and_seed(store_path: str) -> None:
    a, b = take(loader(store_path), 8), take(loader(store_path), 8)
    assert_batches_equal(a, b)
    c = take(loader(store_path, seed=8), 8)
    assert not all(np.array_equal(x["row_index"], y["row_index"]) for x, y in zip(a, c, strict=True))
    ordered = take(loader(store_path, shuffle=False), 2)
    np.testing.assert_array_equal(np.concatenate([x["row_index"] for x in ordered]), np.arange(8))


def test_epochs_reshuffle_and_end(store_path: str) -> None:
    batches = list(loader(store_path, num_epochs=3, drop_remainder=False))
    steps = epoch_steps(N, 4, drop_remainder=False)
    assert len(batches) == 3 * steps == 18
    epochs = [np.concatenate([x["row_index"] for x in batches[e * steps:(e + 1) * steps]]) for e in range(3)]
    for rows in epochs:  # every real row exactly once, then 2 padding rows at the end of the epoch
        np.testing.assert_array_equal(np.sort(rows[rows >= 0]), np.arange(N))
        np.testing.assert_array_equal(rows[N:], [-1, -1])
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # drop_remainder: 5 batches per epoch, the 2 dropped rows differ between epochs.
    batches = list(loader(store_path, num_epochs=2))
    assert len(batches) == 2 * epoch_steps(N, 4) == 10
    kept = np.concatenate([x["row_index"] for x in batches]).reshape(2, 20)
    assert all(len(set(k.tolist())) == 20 for k in kept)
    assert set(kept[0].tolist()) != set(kept[1].tolist())


def test_padding_rows_are_zero(store_path: str) -> None:
    batches = take(loader(store_path, drop_remainder=False, shuffle=False), epoch_steps(N, 4, False))
    last = batches[-1]
    np.testing.assert_array_equal(last["row_index"], [20, 21, -1, -1])
    assert not last["tokens"][2:].any() and not last["response_mask"][2:].any()
    assert not last["teacher_logprobs"][2:].any()


def test_resume_across_epoch_boundary(store_path: str) -> None:
    it = loader(store_path)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    expected = take(it, 6)  # steps 3..8 cross the epoch boundary at step 5
    resumed = loader(store_path)
    next(resumed)  # a fresh iterator that has already moved: set_state must override that
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 6), expected)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_process_sharding(store_path: str, drop_remainder: bool) -> None:
    steps = epoch_steps(N, 4, drop_remainder)
    shards = [take(loader(store_path, process_index=p, process_count=2, drop_remainder=drop_remainder), steps)
              for p in range(2)]
    single = take(loader(store_path, drop_remainder=drop_remainder), steps)
    assert all(b["tokens"].shape == (2, L) for shard in shards for b in shard)
    rows = [np.concatenate([b["row_index"] for b in shard]) for shard in shards]
    real = [r[r >= 0] for r in rows]
    assert not set(real[0].tolist()) & set(real[1].tolist())  # disjoint
    union = np.sort(np.concatenate(real))
    if drop_remainder:
        assert len(union) == 20 and len(set(union.tolist())) == 20
    else:
        np.testing.assert_array_equal(union, np.arange(N))  # every row exactly once
    for step in range(steps):  # a global batch is the same rows in the same order whatever the process count
        both = np.concatenate([shards[0][step]["row_index"], shards[1][step]["row_index"]])
        np.testing.assert_array_equal(both, single[step]["row_index"])
    # ... and so in every later (reshuffled) epoch
    later = [take(loader(store_path, process_index=p, process_count=2, drop_remainder=drop_remainder), 3 * steps)
             for p in range(2)]
    single = take(loader(store_path, drop_remainder=drop_remainder), 3 * steps)
    for step in range(3 * steps):
        np.testing.assert_array_equal(np.concatenate([later[0][step]["row_index"], later[1][step]["row_index"]]),
                                      single[step]["row_index"])
    assert not np.array_equal(single[0]["row_index"], single[steps]["row_index"])  # epochs are reshuffled


def test_source_pickle_and_repr(store_path: str) -> None:
    src = RolloutSource(store_path, ("tokens", "response_mask", "row_index"), seq_len="auto")
    clone = pickle.loads(pickle.dumps(src))
    assert repr(clone) == repr(src) == (f"RolloutSource(path={store_path!r}, "
                                        "fields=('tokens', 'response_mask', 'row_index'), seq_len=64)")
    assert len(clone) == N and clone.seq_len == 64
    row = clone[5]
    assert row["tokens"].shape == (64,) and int(row["row_index"]) == 5
    np.testing.assert_array_equal(row["tokens"], src[5]["tokens"])
    batched = clone._getitems([7, 2, 7])  # Grain's batched-read hook: one TensorStore read per field
    assert [int(r["row_index"]) for r in batched] == [7, 2, 7]
    np.testing.assert_array_equal(batched[1]["response_mask"], src[2]["response_mask"])


def test_loader_errors(store_path: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        loader(store_path, global_batch_size=4, process_count=3)
    with pytest.raises(ValueError, match="22 rows < global_batch_size=32"):
        loader(store_path, global_batch_size=32)
    with pytest.raises(ValueError, match="unknown: \\['nope'\\]"):
        loader(store_path, fields=("tokens", "nope"))
    _write_store(tmp_path / "partial", teacher=False)
    with pytest.raises(StoreError, match=r"'teacher' group is incomplete, chunks \[0, 1, 2\]"):
        loader(str(tmp_path / "partial"))
    assert next(loader(str(tmp_path / "partial"), fields=("tokens", "behaviour_logprobs")))["tokens"].shape == (4, L)


def test_jax_process_defaults(store_path: str) -> None:
    it = make_loader(store_path, global_batch_size=4, seed=7, fields=("row_index",))
    assert next(it)["row_index"].shape == (4,)  # single-process JAX: the whole global batch
