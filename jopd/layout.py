"""Where everything of a run lives: one object owns every path under ``RUN_DIR`` (see docs/data-formats.md).

``RunLayout(run_dir)`` knows the fixed layout. ``RunLayout.for_config(cfg)`` also resolves the paths a config
can move elsewhere (external teachers, an external base student or tokenizer), so no other module spells a path
out. Nothing here touches the disk.

::

    RUN_DIR/config.yaml  run.log  summary.json  report.md  plots/  metrics/NAME.jsonl  tb/NAME/  wandb/
            fingerprint_cache.json
            <stage>/STARTED.json  <stage>/DONE.json
            prepare/   tokenizer/  prompts/{sft,opd,eval}.jsonl  teachers/NAME/  student_base/  work/
            teacher_data/  sft.jsonl  meta.json  parts/NNNNN.jsonl
            sft/       store/ (the SFT rows as a RolloutStore)  ckpt/  model/  meta.json  adapter/ (LoRA SFT)
            rollout/   store/
            precompute/NAME/store/
            arms/NAME/ ckpt/  model/  meta.json  adapter/ (LoRA arms)  generations/GGGG/store (refresh schedule; multi-teacher:
                       generations/GGGG/TEACHER/store)
            eval/      results.json
            export/    (HF directory)  export_check.json  adapter/ (export.adapter)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """Every path of a run directory. ``teacher_paths`` / ``student_path`` / ``tokenizer_path``: paths a config
    points outside the run (None = the in-run one under ``prepare/``)."""

    root: Path
    teacher_paths: tuple[tuple[str, str | None], ...] = ()
    student_path: str | None = None
    tokenizer_path: str | None = None

    @classmethod
    def for_config(cls, cfg: Any, run_dir: str | Path | None = None) -> RunLayout:
        """The layout of ``cfg.run_dir`` (or ``run_dir``), with the config's external model paths."""
        return cls(Path(run_dir if run_dir is not None else cfg.run_dir),
                   tuple((name, t.path) for name, t in cfg.teachers.items()), cfg.student.path,
                   cfg.tokenizer.path)

    # ---- run-level files ------------------------------------------------------------------------------
    @property
    def config_yaml(self) -> Path:
        return self.root / "config.yaml"

    @property
    def run_log(self) -> Path:
        return self.root / "run.log"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def fingerprint_cache(self) -> Path:
        return self.root / "fingerprint_cache.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def metrics(self, name: str) -> Path:
        """JSONL metrics of one training loop (``sft``, ``teacher_A``, ``arm_NAME``)."""
        return self.root / "metrics" / f"{name}.jsonl"

    def tensorboard(self, name: str) -> Path:
        return self.root / "tb" / name

    @property
    def wandb(self) -> Path:
        """W&B's own files (offline runs to ``wandb sync``) and ``run_ids.json`` (each loop's W&B run id)."""
        return self.root / "wandb"

    # ---- stages ---------------------------------------------------------------------------------------
    def stage(self, name: str) -> Path:
        return self.root / name

    def started(self, stage: str) -> Path:
        return self.stage(stage) / "STARTED.json"

    def done(self, stage: str) -> Path:
        return self.stage(stage) / "DONE.json"

    # prepare
    def prompts(self, split: str) -> Path:
        """``{"prompt", "label", "prompt_ids"}`` rows of a split (sft, opd, eval)."""
        return self.stage("prepare") / "prompts" / f"{split}.jsonl"

    @property
    def built_tokenizer(self) -> Path:
        return self.stage("prepare") / "tokenizer"

    @property
    def tokenizer(self) -> Path:
        """The run's tokenizer: the configured one, else the external student's, else the built-in one."""
        if self.tokenizer_path:
            return Path(self.tokenizer_path)
        if self.student_path:
            return Path(self.student_path)
        return self.built_tokenizer

    def teacher(self, name: str) -> Path:
        """A teacher's HF directory: its configured path, else the in-run one."""
        external = dict(self.teacher_paths).get(name)
        return Path(external) if external else self.stage("prepare") / "teachers" / name

    def pretrain_work(self, teacher: str) -> Path:
        """Store and checkpoints of an in-run teacher's training."""
        return self.stage("prepare") / "work" / f"teacher_{teacher}"

    @property
    def student_base(self) -> Path:
        return Path(self.student_path) if self.student_path else self.stage("prepare") / "student_base"

    # teacher_data
    @property
    def sft_jsonl(self) -> Path:
        return self.stage("teacher_data") / "sft.jsonl"

    @property
    def teacher_data_meta(self) -> Path:
        return self.stage("teacher_data") / "meta.json"

    @property
    def teacher_data_parts(self) -> Path:
        return self.stage("teacher_data") / "parts"

    # sft
    @property
    def sft_store(self) -> Path:
        return self.stage("sft") / "store"

    @property
    def sft_ckpt(self) -> Path:
        return self.stage("sft") / "ckpt"

    @property
    def sft_model(self) -> Path:
        return self.stage("sft") / "model"

    @property
    def sft_meta(self) -> Path:
        return self.stage("sft") / "meta.json"

    @property
    def sft_adapter(self) -> Path:
        """LoRA SFT: the adapter alone (PEFT format), for the base student."""
        return self.stage("sft") / "adapter"

    # rollout / precompute
    @property
    def rollout_store(self) -> Path:
        return self.stage("rollout") / "store"

    def teacher_store(self, teacher: str) -> Path:
        return self.stage("precompute") / teacher / "store"

    # arms
    def arm(self, name: str) -> Path:
        return self.root / "arms" / name

    def arm_ckpt(self, name: str) -> Path:
        return self.arm(name) / "ckpt"

    def arm_model(self, name: str) -> Path:
        return self.arm(name) / "model"

    def arm_meta(self, name: str) -> Path:
        return self.arm(name) / "meta.json"

    def arm_adapter(self, name: str) -> Path:
        """A LoRA arm's adapter alone (PEFT format), for the SFT model."""
        return self.arm(name) / "adapter"

    def arm_generation(self, name: str, generation: int, teacher: str | None = None) -> Path:
        """The store of refresh generation ``generation`` (>= 1) of arm ``name``; of a multi-teacher arm, the
        store of ``teacher`` (the generation's rows of the routes the arm gives it)."""
        gen = self.arm(name) / "generations" / f"{generation:04d}"
        return (gen if teacher is None else gen / teacher) / "store"

    # eval / export
    @property
    def eval_results(self) -> Path:
        return self.stage("eval") / "results.json"

    @property
    def export(self) -> Path:
        return self.stage("export")

    @property
    def export_check(self) -> Path:
        return self.export / "export_check.json"

    @property
    def export_adapter(self) -> Path:
        return self.export / "adapter"

    def relative(self, path: str | Path) -> str:
        """``path`` relative to the run directory when inside it (records stay valid if the run dir moves)."""
        path = Path(path).resolve()
        try:
            return str(path.relative_to(self.root.resolve()))
        except ValueError:
            return str(path)
