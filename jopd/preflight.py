"""Checks before any stage runs: what can be found wrong from the config and the files it names is found before
the first minute of work, not after the stages before it have run.

``jopd.config.validate`` checks each value and the references between sections; this module reads the files:

- model directories (``teachers.NAME.path``, ``student.path``): config.json parses and names a supported
  architecture; the safetensors files are there and whole; every tensor the config implies is present with the
  shape it implies (a tensor stored transposed is caught here), none is left over, all are floating point;
- tokenizers: the configured directory, or the external student's (the run's tokenizer then), holds one;
- prompt files: readable, UTF-8, well-formed rows with the required fields (``jopd.data.splits`` reads them
  exactly as ``prepare`` will); multi-teacher runs: every prompt's route mapped to a teacher, every route with
  prompts in every split (``jopd.data.routing.assign_routes``, the arithmetic task's problems generated for it);
- sizes across sections: enough SFT and OPD rows for one batch of the configured size, enough in-run teacher
  examples for one pre-training batch.

Every problem is collected and reported at once (:class:`PreflightError`, a user error: exit 2, nothing
written). The checks read headers and prompt files only, so they take well under a second for the demo and a
few seconds for the paper's configs (DAPO-Math-17k, an 8B checkpoint's headers).
"""

from __future__ import annotations

from pathlib import Path

from jopd.config import Config

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class PreflightError(ValueError):
    """Problems found before any stage ran, each naming its config field and file."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("the run cannot start:\n  " + "\n  ".join(problems))


def _model_problems(cfg: Config) -> list[str]:
    from jopd.models.hf import checkpoint_problems

    dirs = [(f"teachers.{name}.path", t.path) for name, t in cfg.teachers.items() if t.path]
    if cfg.student.path:
        dirs.append(("student.path", cfg.student.path))
    return [f"{field}: {problem}" for field, path in dirs for problem in checkpoint_problems(path)]


def _tokenizer_problems(cfg: Config) -> list[str]:
    if cfg.tokenizer.path:
        field, path = "tokenizer.path", cfg.tokenizer.path
    elif cfg.student.path:
        field, path = "student.path", cfg.student.path  # the run's tokenizer is the external student's
    else:
        return []  # prepare builds the character tokenizer of the arithmetic task
    if not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        what = ("the run's tokenizer is the student's when tokenizer.path is not set"
                if field == "student.path" else "it must hold a tokenizer")
        return [f"{field}: {path!r} has no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}); {what}. "
                "Copy the tokenizer files next to the weights or set tokenizer.path"]
    return []


def _split_sizes(cfg: Config) -> tuple[dict[str, int], list[str]]:
    """The number of SFT / OPD / eval prompts the run will have, read as ``prepare`` reads them."""
    from jopd.data.prompt_files import PromptFileError
    from jopd.data.routing import assign_routes
    from jopd.data.splits import load_problems

    t = cfg.task
    if t.kind == "arithmetic" and not cfg.routing.enabled:  # generated: the configured counts (nothing to read)
        return {"sft": t.num_sft_prompts, "opd": t.num_opd_prompts, "eval": t.num_eval_prompts}, []
    try:
        splits = load_problems(cfg)
        if cfg.routing.enabled:  # multi-teacher: every prompt's route has a teacher, every route has prompts
            assign_routes(splits, task_kind=t.kind, field=cfg.routing.field, routes=cfg.routing.teachers)
    except PromptFileError as e:
        return {}, [str(e)]
    except ImportError as e:  # Parquet without pyarrow
        return {}, [f"task: a Parquet prompt file needs pyarrow ({e}); `pip install pyarrow`, or convert it to JSONL"]
    except OSError as e:
        return {}, [f"task: prompt file {e.filename or ''}: {e.strerror or e}"]
    return {k: len(v) for k, v in splits.items()}, []


def _size_problems(cfg: Config, sizes: dict[str, int]) -> list[str]:
    """One batch of every loop must fit in its rows (padded batches drop the remainder of an epoch)."""
    from jopd.data.splits import heldout_count

    problems: list[str] = []
    stages = set(cfg.stages)
    if sizes.get("sft") is not None and not cfg.sft.token_budget and stages & {"teacher_data", "sft"}:
        train = sizes["sft"] - heldout_count(sizes["sft"], cfg.sft.holdout_fraction)
        if train < cfg.sft.batch_size:
            problems.append(f"sft.batch_size: {cfg.sft.batch_size} is larger than the {train} SFT training rows "
                            f"({sizes['sft']} SFT prompts, {sizes['sft'] - train} held out by "
                            f"sft.holdout_fraction={cfg.sft.holdout_fraction}); lower it or add SFT prompts "
                            "(task.num_sft_prompts)")
    lightning = [a.name for a in cfg.arms if a.mode == "lightning"]
    if sizes.get("opd") is not None and lightning and not cfg.opd.token_budget and "train" in stages:
        rows = sizes["opd"] * cfg.rollout.samples_per_prompt
        if rows < cfg.opd.batch_size:
            problems.append(f"opd.batch_size: {cfg.opd.batch_size} is larger than the {rows} OPD rollout rows "
                            f"({sizes['opd']} OPD prompts x rollout.samples_per_prompt="
                            f"{cfg.rollout.samples_per_prompt}) the lightning arms ({', '.join(lightning)}) train "
                            "on; lower it or add OPD prompts (task.num_opd_prompts)")
    if sizes.get("eval") == 0 and stages & {"eval", "train", "online"}:
        problems.append("task.num_eval_prompts: the run has no eval prompts (evaluation needs at least one)")
    for name, t in cfg.teachers.items():
        if t.path is None and t.init is not None and "prepare" in stages:
            train = t.pretrain_examples - heldout_count(t.pretrain_examples, 0.05)
            if train < t.pretrain.batch_size:
                problems.append(f"teachers.{name}.pretrain.batch_size: {t.pretrain.batch_size} is larger than the "
                                f"{train} training examples of teachers.{name}.pretrain_examples="
                                f"{t.pretrain_examples} (5% held out)")
    return problems


def problems(cfg: Config) -> list[str]:
    """Everything found wrong with the files the config names and the sizes they imply (empty = can start)."""
    out = _model_problems(cfg) + _tokenizer_problems(cfg)
    sizes, prompt_problems = _split_sizes(cfg)
    return out + prompt_problems + _size_problems(cfg, sizes)


def check(cfg: Config) -> None:
    """Raise :class:`PreflightError` listing every problem, before any stage runs."""
    found = problems(cfg)
    if found:
        raise PreflightError(found)

