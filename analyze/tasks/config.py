"""What a task evaluation is (:class:`TaskEvalConfig`), its identity, and its result (:class:`TaskEvaluation`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from actsparse.analyze.evaluate.config import DEFAULT_GRID, grid_values
from actsparse.analyze.sparsifier import UNCALIBRATED_RULES, check_closed_loop
from actsparse.analyze.tasks.counting import count_mode
from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError

TASKS_VERSION = 1
ACC_RATIO = 0.99  # docs/paper-notes.md §1.5: keep >= 99% of dense accuracy
N_BOOT = 200


@dataclass(frozen=True)
class TaskEvalConfig:
    """What a task evaluation computes.

    Attributes:
        model: alias, HF id or checkpoint path (None: the run's model, when a run is given).
        target: input | gate | up | intermediate | all-inputs.
        rule: top-p | top-k | max-p | wina-top-k | wina-top-p (``actsparse.analyze.sparsifier.UNCALIBRATED_RULES``).
        grid: rule values; duplicates dropped, order kept.
        power: top-p power q >= 1.
        count_mode: ``real`` | ``authors`` (``actsparse.analyze.tasks.counting``).
        limit: examples per task (an int), or a fraction of each task's examples (a float < 1); None: all.
        num_fewshot: few-shot examples per prompt (None: the task's default).
        batch_size: requests per forward pass (lm-eval's batch size; an integer, docs/pitfalls.md P15).
        metric: the accuracy metric (``name`` or ``name,filter``; None: ``acc``, else the task's first).
        compute_dtype: float32 | bfloat16 | float16 model dtype.
    """

    model: str | None = None
    target: str = "intermediate"
    rule: str = "top-p"
    grid: tuple[float, ...] = DEFAULT_GRID
    power: float = 1.0
    count_mode: str = "real"
    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    metric: str | None = None
    compute_dtype: str = "float32"
    trust_remote_code: bool = False

    def values(self) -> tuple[float, ...]:
        """The grid as closed-loop evaluation reads it: floats, duplicates dropped, in order."""
        return grid_values(self.grid)

    def validate(self) -> None:
        """Raise ActsparseError for settings that cannot work, before lm-eval or the model is loaded."""
        if not self.values():
            raise ActsparseError("the grid is empty; give at least one rule value")
        check_closed_loop(self.target, self.rule, self.values(), self.power, UNCALIBRATED_RULES)
        count_mode(self.count_mode)
        if self.limit is not None and not (self.limit >= 1 and float(self.limit).is_integer() or 0 < self.limit < 1):
            raise ActsparseError(f"--limit must be a positive integer or a fraction in (0, 1) (got {self.limit})")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ActsparseError(f"--num-fewshot must be >= 0 (got {self.num_fewshot})")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ActsparseError(f"--batch-size must be a positive integer (got {self.batch_size!r})")
        if self.compute_dtype not in fmt.STORED_DTYPES:
            raise ActsparseError(f"unknown compute dtype '{self.compute_dtype}' "
                                 f"(choose {', '.join(fmt.STORED_DTYPES)})")

    @property
    def lm_eval_limit(self) -> int | float | None:
        """``limit`` as lm-eval takes it: an int for a count, a float for a fraction."""
        return None if self.limit is None else int(self.limit) if self.limit >= 1 else float(self.limit)


def task_identity(cfg: TaskEvalConfig, weights_sha256: str, lm_eval_version: str) -> dict:
    """What identifies a task evaluation (its ``eval_id`` is the content hash of this dict): the weights' sha256,
    every setting that changes a number, and the torch, transformers and lm-eval versions. Neither the grid nor
    the task list is part of it: runs are added per (grid value, task) as they are computed."""
    import torch
    import transformers

    return dict(kind="tasks", version=TASKS_VERSION, weights_sha256=weights_sha256, target=cfg.target, rule=cfg.rule,
                power=cfg.power, count_mode=cfg.count_mode, limit=cfg.lm_eval_limit, num_fewshot=cfg.num_fewshot,
                batch_size=cfg.batch_size, metric=cfg.metric, compute_dtype=cfg.compute_dtype,
                torch=torch.__version__, transformers=transformers.__version__, lm_eval=lm_eval_version)


@dataclass
class TaskEvaluation:
    """The result of ``evaluate_tasks``.

    ``summary`` (one row per task and grid value, plus the task average), ``examples`` (per-example scores)
    and ``critical`` (per task and the average) are polars DataFrames as stored (``docs/store-format.md``);
    they cover every task and grid value stored under ``eval_id`` so far, not only this call's. ``computed``
    and ``reused`` list this call's runs as ``(task, value)`` pairs, value None for the dense reference.
    """

    eval_id: str
    base: Path | None
    config: dict
    tasks: list[str]
    summary: object
    examples: object
    critical: object
    computed: list[tuple[str, float | None]] = field(default_factory=list)
    reused: list[tuple[str, float | None]] = field(default_factory=list)
