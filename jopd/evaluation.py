"""Held-out evaluation of a policy: task accuracy and a sampled estimate of reverse KL(student ‖ teacher).

Accuracy
    ``samples_per_prompt`` (k) responses per prompt (greedy by default, then k must be 1) that stop at the chat
    template's end-of-turn id or any of the model's EOS ids, decoded with ``skip_special_tokens=True`` and
    checked against the prompt's label by ``check_answer`` (the task's grader). The accuracy is the mean over
    all responses (avg@k, the paper's metric); its standard error and 95% t interval are taken over prompts
    (the k responses to one prompt are not independent). pass@j for j = 1, 2, 4, ... up to k (and k itself) is
    the unbiased estimator 1 - C(k-c, j) / C(k, j) per prompt with c of its k responses correct (Chen et al.
    2021), averaged over prompts, with its 95% t interval over prompts (``jopd.report.stats``).

Reverse KL
    ``KL(π_s ‖ π_t) = E_{y ~ π_s}[Σ_t log π_s(y_t | ·) − log π_t(y_t | ·)]``, estimated on *fresh* student
    samples drawn at temperature 1 with no top-k/top-p truncation, so the sampler's behaviour log-probs are
    the student's own. The teacher scores the same prompt + response tokens with :func:`token_logprobs`.
    Reported both per token (``reverse_kl``: sum of all log-ratios / number of response tokens) and per
    sequence (``reverse_kl_seq``: mean over samples of each sample's summed log-ratio). Each term is an
    unbiased single-sample estimate of the per-position KL in expectation, so small or even negative values
    are possible when student and teacher are close.

Only pure functions and the given models are used: nothing is read from or written to disk.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jopd.data.grading import check_answer
from jopd.data.tokenizer import stop_ids
from jopd.models import token_logprobs
from jopd.models.hf import Model
from jopd.report.stats import mean_interval, pass_at_k_estimate
from jopd.sampling import GenerationResult, bucket, generate, sequences
from jopd.sharding import to_host

__all__ = ["evaluate_policy", "pass_at_k_levels", "reverse_kl_estimate"]

# How many (prompt, response, correct) examples evaluate_policy returns for the report.
NUM_SAMPLES = 4
# Shortest padded sequence length of the teacher scoring pass (lengths are rounded up to powers of two).
MIN_SEQ_BUCKET = 16


def _pad(a: np.ndarray, rows: int, width: int) -> np.ndarray:
    """``a [n, m]`` cut or zero-padded to ``[rows, width]`` (rows >= n)."""
    out = np.zeros((rows, width), a.dtype)
    a = a[:, :width]
    out[:a.shape[0], :a.shape[1]] = a
    return out


def pass_at_k_levels(k: int) -> list[int]:
    """The j of the pass@j a k-sample evaluation reports: 1, 2, 4, ... below k, and k."""
    return sorted({2 ** i for i in range(k.bit_length()) if 2 ** i < k} | {k})


def reverse_kl_estimate(teacher: Model, prompts: Sequence[Sequence[int]], student: GenerationResult, *,
                        batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence sums of ``student_lp − teacher_lp`` over response tokens, and the response lengths.

    ``student`` holds the responses to ``prompts`` (``N`` rows) and their behaviour log-probs. Each batch of
    prompt + response rows is padded to a power-of-two row count and length, so repeated evaluations reuse
    the compiled teacher forward pass.

    Returns:
        ``(log_ratio_sums [N] float64, response_lengths [N] int64)``.
    """
    seqs = sequences(prompts, student)
    total = seqs["prompt_len"] + seqs["response_len"]
    n = len(total)
    sums = np.zeros(n, np.float64)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        rows, width = bucket(stop - start), bucket(int(total[start:stop].max()), MIN_SEQ_BUCKET)
        tokens, mask, response_mask, student_lp = (
            _pad(seqs[k][start:stop], rows, width) for k in ("tokens", "mask", "response_mask", "behaviour_logprobs"))
        # Unused rows keep one real token so every row is a valid (trivially short) sequence.
        mask[stop - start:, 0] = 1
        teacher_lp = to_host(token_logprobs(teacher, tokens, mask)).astype(np.float64)
        ratio = np.where(response_mask == 1, student_lp.astype(np.float64) - teacher_lp, 0.0)
        sums[start:stop] = ratio[:stop - start].sum(axis=1)
    return sums, seqs["response_len"].astype(np.int64)


def evaluate_policy(model: Model, prompts: Sequence[Mapping[str, Any]], tokenizer: Any, *, max_new_tokens: int,
                    temperature: float = 0.0, samples_per_prompt: int = 1, top_p: float = 1.0, batch_size: int = 64,
                    seed: int = 0, kl_teacher: Model | None = None, kl_samples: int = 1,
                    eos_token_id: int | Sequence[int] | None = None,
                    generate_fn: Callable[..., GenerationResult] = generate) -> dict[str, Any]:
    """Accuracy (and optionally reverse KL to ``kl_teacher``) of ``model`` on held-out prompts.

    Args:
        model: The policy to evaluate.
        prompts: Rows with ``"prompt_ids"`` (chat-templated ids) and ``"label"``; ``"prompt"`` (text) is
            used for the returned examples when present.
        tokenizer: The run's tokenizer (decoding and the end-of-turn id).
        max_new_tokens: Response length limit (the stop id included).
        temperature: Sampling temperature of the accuracy responses (0 = greedy).
        samples_per_prompt: Responses per prompt for the accuracy (avg@k); must be 1 when greedy.
        top_p: Nucleus truncation of the accuracy responses (1 = none).
        batch_size: Prompts per generate call / rows per teacher scoring pass.
        seed: Sampling seed (accuracy samples use ``seed``, KL samples ``seed + 1``).
        kl_teacher: Teacher for the reverse-KL estimate; None skips it.
        kl_samples: Student samples per prompt for the KL estimate.
        eos_token_id: Stop ids; default :func:`jopd.data.tokenizer.stop_ids` (end-of-turn + the model's EOS ids).
        generate_fn: The sampler, called like :func:`jopd.sampling.generate` (the default).

    Returns:
        ``accuracy`` (avg@k), ``accuracy_se`` (standard error over prompts), ``accuracy_ci95`` (half-width of
        its 95% t interval over prompts; None with one prompt), ``samples_per_prompt`` (k), ``pass_at_k`` and
        ``pass_at_k_ci95`` (``{"j": value}`` for j in `pass_at_k_levels`), ``per_prompt_accuracy`` (the
        fraction of each prompt's k responses that were correct, in prompt order: paired comparisons between
        models evaluated on the same prompts), ``num_prompts``,
        ``num_responses``, ``num_correct``, ``eos_rate`` (fraction of responses that ended with a
        stop id rather than hitting ``max_new_tokens``), ``mean_response_len`` (tokens, stop id included),
        ``generated_tokens``, ``samples`` (a few ``{"prompt", "response", "label", "correct"}``) and, with a
        teacher, ``reverse_kl``, ``reverse_kl_seq``, ``kl_num_sequences``, ``kl_response_tokens``,
        ``kl_mean_response_len`` and ``kl_eos_rate``.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if kl_samples < 1:
        raise ValueError(f"kl_samples must be >= 1, got {kl_samples}")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    if temperature == 0.0 and samples_per_prompt != 1:
        raise ValueError(f"greedy evaluation (temperature 0) gives one response per prompt; "
                         f"samples_per_prompt={samples_per_prompt} needs temperature > 0")
    stops: int | Sequence[int] = eos_token_id if eos_token_id is not None else stop_ids(tokenizer, model.config)
    prompt_ids = [list(map(int, row["prompt_ids"])) for row in prompts]
    out: dict[str, Any] = {"num_prompts": len(prompt_ids)}
    if not prompt_ids:
        raise ValueError("evaluate_policy needs at least one prompt")

    k = samples_per_prompt
    gen = generate_fn(model, [p for p in prompt_ids for _ in range(k)], max_new_tokens=max_new_tokens,
                      temperature=temperature, top_p=top_p, eos_token_id=stops, seed=seed, batch_size=batch_size)
    correct: list[bool] = []
    samples: list[dict[str, Any]] = []
    for j in range(len(gen.lengths)):
        row, ids = prompts[j // k], prompt_ids[j // k]  # responses come prompt-major, k per prompt
        text = tokenizer.decode(gen.response(j), skip_special_tokens=True)
        ok = bool(check_answer(text, str(row.get("label", ""))))
        correct.append(ok)
        if len(samples) < NUM_SAMPLES and j % k == 0:  # the first response of each of the first prompts
            prompt_text = row.get("prompt") or tokenizer.decode(ids, skip_special_tokens=True)
            samples.append({"prompt": prompt_text, "response": text, "label": str(row.get("label", "")),
                            "correct": ok})
    lengths = gen.lengths.astype(np.float64)
    per_prompt_correct = np.asarray(correct, np.int64).reshape(len(prompt_ids), k).sum(axis=1)
    per_prompt = per_prompt_correct / k
    n = len(per_prompt)
    passes = {j: pass_at_k_estimate(per_prompt_correct.tolist(), k, j) for j in pass_at_k_levels(k)}
    out.update({
        "accuracy": float(per_prompt.mean()),
        "accuracy_se": float(per_prompt.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
        "accuracy_ci95": mean_interval(per_prompt.tolist()).half_width,
        "samples_per_prompt": k,
        "pass_at_k": {str(j): iv.mean for j, iv in passes.items()},
        "pass_at_k_ci95": {str(j): iv.half_width for j, iv in passes.items()},
        "per_prompt_accuracy": per_prompt.tolist(),
        "num_responses": len(correct),
        "num_correct": int(np.sum(correct)),
        "eos_rate": float(np.mean(gen.ended_with_eos)),
        "mean_response_len": float(lengths.mean()),
        "generated_tokens": int(lengths.sum()),
        "samples": samples,
    })

    if kl_teacher is not None:
        kl_prompts = [p for p in prompt_ids for _ in range(kl_samples)]
        # Temperature 1 and no truncation: the behaviour log-probs are the student's own distribution.
        kl_gen = generate_fn(model, kl_prompts, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
                             top_k=0, eos_token_id=stops, seed=seed + 1, batch_size=batch_size)
        sums, resp_lens = reverse_kl_estimate(kl_teacher, kl_prompts, kl_gen, batch_size=batch_size)
        total_tokens = int(resp_lens.sum())
        out.update({
            "reverse_kl": float(sums.sum() / max(total_tokens, 1)),
            "reverse_kl_seq": float(sums.mean()),
            "kl_num_sequences": len(kl_prompts),
            "kl_response_tokens": total_tokens,
            "kl_mean_response_len": float(resp_lens.mean()),
            "kl_eos_rate": float(np.mean(kl_gen.ended_with_eos)),
        })
        out["generated_tokens"] += total_tokens
    return out
