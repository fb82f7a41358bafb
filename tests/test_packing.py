"""Sequence packing is exact: random sequences packed several to a row give the same per-token log-probs, OPD /
SFT losses, metrics and gradients, and the same parameters after a sharded train step, as the same sequences
unpacked (one per right-padded row), which is the reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import eight_devices, one_device

from jopd import losses, models, sharding, steps
from jopd.models import ModelConfig

QWEN3 = ModelConfig(model_type="qwen3", vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=4, qk_norm=True, tie_word_embeddings=False,
                    logits_chunk_size=7)
LLAMA = ModelConfig(model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2,
                    num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=True, rope_theta=500.0,
                    logits_chunk_size=5)
TOL = {"rtol": 1e-5, "atol": 1e-6}

# 8 sequences into 4 rows of ROW_LEN; sequence 2 has no response token (seq_mean must not count it).
BINS = ((0, 5), (1, 2, 7), (3, 4), (6,))
ROW_LEN = 24
PER_TOKEN = ("tokens", "response_mask", "teacher_logprobs", "behaviour_logprobs")


def _sequences(vocab: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Whole sequences (prompt + response) of different lengths with random per-token values."""
    rng = np.random.default_rng(seed)
    seqs = []
    for i in range(8):
        prompt, response = int(rng.integers(1, 5)), 0 if i == 2 else int(rng.integers(1, 7))
        n = prompt + response
        mask = np.zeros(n, np.int32)
        mask[prompt:] = 1
        seqs.append({
            "tokens": rng.integers(1, vocab, n).astype(np.int32),
            "response_mask": mask,
            "teacher_logprobs": (-rng.exponential(1.5, n) - 0.05).astype(np.float32),
            "behaviour_logprobs": (-rng.exponential(1.5, n) - 0.05).astype(np.float32),
        })
    return seqs


def _pad(seqs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Unpacked reference layout: one sequence per row, right-padded with zeros (plus one padding column)."""
    length = max(len(s["tokens"]) for s in seqs) + 1
    out = {k: np.zeros((len(seqs), length), seqs[0][k].dtype) for k in PER_TOKEN}
    for i, s in enumerate(seqs):
        for k in PER_TOKEN:
            out[k][i, :len(s[k])] = s[k]
    return out


def _pack(seqs: list[dict[str, np.ndarray]], bins=BINS, row_len: int = ROW_LEN) -> dict[str, np.ndarray]:
    """Packed layout: the sequences of ``bins[r]`` back to back in row r, with segment ids and positions."""
    out = {k: np.zeros((len(bins), row_len), seqs[0][k].dtype) for k in PER_TOKEN}
    out["segment_ids"] = np.zeros((len(bins), row_len), np.int32)
    out["positions"] = np.zeros((len(bins), row_len), np.int32)
    for r, members in enumerate(bins):
        offset = 0
        for seg, i in enumerate(members, start=1):
            n = len(seqs[i]["tokens"])
            for k in PER_TOKEN:
                out[k][r, offset:offset + n] = seqs[i][k]
            out["segment_ids"][r, offset:offset + n] = seg
            out["positions"][r, offset:offset + n] = np.arange(n)
            offset += n
        assert offset <= row_len
    return out


def _unpack(x: np.ndarray, seqs, bins=BINS) -> list[np.ndarray]:
    """Per-sequence slices of a packed per-token array ``[R, L]``, in sequence order."""
    parts: dict[int, np.ndarray] = {}
    for r, members in enumerate(bins):
        offset = 0
        for i in members:
            n = len(seqs[i]["tokens"])
            parts[i] = x[r, offset:offset + n]
            offset += n
    return [parts[i] for i in range(len(seqs))]


def _params(cfg: ModelConfig, seed: int = 0) -> dict:
    # Larger than the init scale so that the log-probs (and their gradients) are far from uniform.
    return jax.tree.map(lambda x: x * 3.0, models.init_params(cfg, seed=seed))


def _single_mesh():
    return sharding.make_mesh(sharding.MeshConfig(fsdp=1), devices=one_device())


def _assert_tree_close(got, ref) -> None:
    """Leaf-wise ``|got - ref| <= 1e-5 * (|ref| + max|ref|)``: relative to each leaf's scale, because a float32
    gradient summed over many tokens is itself only that accurate (vs float64) whatever the layout."""
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(y))))


# ----------------------------------------------------------------------------------------------------------
# (a) per-token log-probs
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [QWEN3, LLAMA], ids=["qwen3", "llama"])
def test_packed_logprobs_equal_unpacked(cfg):
    seqs = _sequences(cfg.vocab_size, seed=1)
    flat, packed = _pad(seqs), _pack(seqs)
    params = _params(cfg, seed=2)
    real_flat = (flat["tokens"] > 0).astype(np.int32)  # score every real token, prompt included
    real_packed = (packed["segment_ids"] > 0).astype(np.int32)
    fn = jax.jit(functools.partial(models.logprobs_fn, config=cfg))
    ref = np.asarray(fn(params, tokens=flat["tokens"], mask=real_flat))
    got = np.asarray(fn(params, tokens=packed["tokens"], mask=real_packed, segment_ids=packed["segment_ids"],
                        positions=packed["positions"]))
    for i, part in enumerate(_unpack(got, seqs)):
        assert part[0] == 0.0  # no prediction of a sequence's first token from the previous sequence
        np.testing.assert_allclose(part, ref[i, :len(part)], **TOL)
        assert np.all(part[1:] < 0)
    np.testing.assert_array_equal(got[real_packed == 0], 0.0)

    # The top-k head and the model-level entry point take the same packed inputs.
    topk = jax.jit(functools.partial(models.logprobs_and_topk_fn, config=cfg, topk=3))
    _, ref_ids, ref_vals = topk(params, tokens=flat["tokens"], mask=real_flat)
    lp, ids, vals = topk(params, tokens=packed["tokens"], mask=real_packed, segment_ids=packed["segment_ids"],
                         positions=packed["positions"])
    np.testing.assert_allclose(np.asarray(lp), got, **TOL)
    for i, (part_ids, part_vals) in enumerate(zip(_unpack(np.asarray(ids), seqs),
                                                  _unpack(np.asarray(vals), seqs))):
        np.testing.assert_array_equal(part_ids, np.asarray(ref_ids)[i, :len(part_ids)])
        np.testing.assert_allclose(part_vals, np.asarray(ref_vals)[i, :len(part_vals)], **TOL)
    model = models.from_params(cfg, params, mesh=_single_mesh())
    via_model = models.token_logprobs(model, packed["tokens"], real_packed, segment_ids=packed["segment_ids"],
                                      positions=packed["positions"])
    np.testing.assert_allclose(np.asarray(via_model), got, **TOL)


def test_packed_cudnn_config_takes_the_masked_path():
    """The fused cudnn branch is plain causal attention; packed batches must not reach it (on CPU, where it
    cannot run, reaching it would fail outright)."""
    seqs = _sequences(QWEN3.vocab_size, seed=3)
    packed = _pack(seqs)
    params = _params(QWEN3, seed=4)
    args = (params, packed["tokens"], packed["response_mask"])
    kw = {"segment_ids": packed["segment_ids"], "positions": packed["positions"]}
    xla = models.logprobs_fn(*args[:1], QWEN3, *args[1:], **kw)
    cudnn = models.logprobs_fn(*args[:1], QWEN3.replace(attention_impl="cudnn"), *args[1:], **kw)
    np.testing.assert_array_equal(np.asarray(cudnn), np.asarray(xla))


def test_segment_ids_without_positions_is_an_error():
    packed = _pack(_sequences(QWEN3.vocab_size))
    with pytest.raises(ValueError, match="positions"):
        models.hidden_states(_params(QWEN3), QWEN3, packed["tokens"], segment_ids=packed["segment_ids"])


# ----------------------------------------------------------------------------------------------------------
# (b, c) losses, metrics and gradients, with and without micro-batch accumulation
# ----------------------------------------------------------------------------------------------------------
def _accumulate(objective, params, batch: dict[str, np.ndarray], micro_rows: int):
    """Sum over micro-batches of whole rows of (loss, grads), with the full-batch denominators; the metrics of
    a single full-batch call (micro-batch metrics are per call)."""
    nt, ns = losses.loss_denominators(batch["response_mask"], batch.get("segment_ids"))
    grad_fn = jax.jit(jax.value_and_grad(objective, has_aux=True))
    rows = batch["tokens"].shape[0]
    loss, grads, metrics = 0.0, None, None
    for start in range(0, rows, micro_rows):
        mb = {k: v[start:start + micro_rows] for k, v in batch.items()}
        (l_mb, metrics), g = grad_fn(params, mb, nt, ns)
        loss = loss + l_mb
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    return float(loss), grads, (metrics if micro_rows == rows else None)


OPD_CASES = {
    "token_mean": steps.OPDLossConfig(aggregation="token_mean", tis_cap=1.3),
    "seq_mean": steps.OPDLossConfig(aggregation="seq_mean", tis_cap=1.3),
    "seq_mean_kl": steps.OPDLossConfig(aggregation="seq_mean", tis_cap=1.3, kl_coef=0.1),
}


@pytest.mark.parametrize("micro", [False, True], ids=["full", "micro"])
@pytest.mark.parametrize("case", list(OPD_CASES))
def test_opd_loss_metrics_and_grads_packed_equal_unpacked(case, micro):
    loss_cfg = OPD_CASES[case]
    seqs = _sequences(QWEN3.vocab_size, seed=5)
    flat, packed = _pad(seqs), _pack(seqs)
    params = _params(QWEN3, seed=6)
    ref_params = _params(QWEN3, seed=7) if loss_cfg.kl_coef else None

    def objective(p, b, nt, ns):
        return steps.opd_objective(p, QWEN3, b, loss_cfg, nt, ns, ref_params)

    # micro-batches of whole rows: 4 x 2 sequences unpacked, 2 x 2 rows packed
    ref_loss, ref_grads, ref_metrics = _accumulate(objective, params, flat, 2 if micro else len(seqs))
    loss, grads, metrics = _accumulate(objective, params, packed, 2 if micro else len(BINS))
    assert ref_loss != 0.0
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    _assert_tree_close(grads, ref_grads)
    if not micro:
        assert metrics.keys() == ref_metrics.keys()
        assert float(metrics["num_seqs"]) == len(seqs) - 1  # sequence 2 has no response token
        assert 0.0 < float(metrics["tis_clip_frac"]) < 1.0  # the truncation is really exercised
        for k in metrics:
            np.testing.assert_allclose(float(metrics[k]), float(ref_metrics[k]), err_msg=k, **TOL)


def test_normalized_advantages_packed_equal_unpacked():
    """Advantage whitening uses per-token statistics, so it is layout-independent on a full batch."""
    loss_cfg = steps.OPDLossConfig(aggregation="seq_mean", normalize_advantages=True)
    seqs = _sequences(QWEN3.vocab_size, seed=8)
    params = _params(QWEN3, seed=9)

    def objective(p, b, nt, ns):
        return steps.opd_objective(p, QWEN3, b, loss_cfg, nt, ns)

    ref_loss, ref_grads, _ = _accumulate(objective, params, _pad(seqs), len(seqs))
    loss, grads, _ = _accumulate(objective, params, _pack(seqs), len(BINS))
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    _assert_tree_close(grads, ref_grads)


@pytest.mark.parametrize("micro", [False, True], ids=["full", "micro"])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_sft_loss_and_grads_packed_equal_unpacked(aggregation, micro):
    seqs = _sequences(LLAMA.vocab_size, seed=10)
    flat, packed = _pad(seqs), _pack(seqs)
    params = _params(LLAMA, seed=11)

    def objective(p, b, nt, ns):
        return steps.sft_objective(p, LLAMA, b, aggregation, nt, ns)

    ref_loss, ref_grads, ref_metrics = _accumulate(objective, params, flat, 2 if micro else len(seqs))
    loss, grads, metrics = _accumulate(objective, params, packed, 2 if micro else len(BINS))
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    _assert_tree_close(grads, ref_grads)
    if not micro:
        for k in ("nll", "num_tokens", "num_seqs"):
            np.testing.assert_allclose(float(metrics[k]), float(ref_metrics[k]), err_msg=k, **TOL)
        eval_loss = steps.make_eval_loss(LLAMA, mesh=_single_mesh(), aggregation=aggregation)
        got, ref = eval_loss(params, packed), eval_loss(params, flat)
        for k in ref:
            np.testing.assert_allclose(float(got[k]), float(ref[k]), err_msg=k, **TOL)
        np.testing.assert_allclose(float(got["loss"]), ref_loss, **TOL)


# ----------------------------------------------------------------------------------------------------------
# (d) full train steps
# ----------------------------------------------------------------------------------------------------------
def _one_step(make, cfg, mesh, batch, **kw):
    model = models.from_params(cfg, _params(cfg, seed=12), mesh=mesh)
    # eps=1: Adam's first update is ~ lr * g rather than lr * sign(g), so round-off in tiny gradient entries
    # cannot flip a sign and look like a mismatch.
    opt = steps.make_optimizer(lr=1e-2, total_steps=10, eps=1.0)
    state = steps.init_state(model.params, opt)
    step = make(cfg, opt, mesh=mesh, state=state, batch_size=batch["tokens"].shape[0], **kw)
    state, metrics = step(state, steps.shard_batch(batch, mesh))
    return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("micro", [False, True], ids=["full", "micro"])
def test_sharded_opd_step_packed_equals_unpacked(micro):
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=4, tensor=2), devices=eight_devices())
    seqs = _sequences(QWEN3.vocab_size, seed=13)
    loss_cfg = steps.OPDLossConfig(aggregation="seq_mean", tis_cap=1.3)
    make = functools.partial(steps.make_opd_step, loss_cfg=loss_cfg, with_behaviour=True)
    ref_params, ref_metrics = _one_step(make, QWEN3, mesh, _pad(seqs), micro_batch_size=4 if micro else None)
    params, metrics = _one_step(make, QWEN3, mesh, _pack(seqs), micro_batch_size=2 if micro else None,
                                packed=True)
    assert not bool(metrics["nonfinite"])
    for k in ("loss", "grad_norm", "num_seqs", "num_tokens"):
        np.testing.assert_allclose(float(metrics[k]), float(ref_metrics[k]), err_msg=k, **TOL)
    _assert_tree_close(params, ref_params)


def test_sft_step_packed_equals_unpacked():
    seqs = _sequences(LLAMA.vocab_size, seed=14)
    make = functools.partial(steps.make_sft_step, aggregation="seq_mean")
    sft_keys = ("tokens", "response_mask", "segment_ids", "positions")
    flat, packed = ({k: v for k, v in b.items() if k in sft_keys} for b in (_pad(seqs), _pack(seqs)))
    ref_params, ref_metrics = _one_step(make, LLAMA, _single_mesh(), flat)
    params, metrics = _one_step(make, LLAMA, _single_mesh(), packed, packed=True)
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), **TOL)
    _assert_tree_close(params, ref_params)
