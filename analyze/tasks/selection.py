"""Which lm-eval tasks ``--tasks`` names: lm-eval present and offline, task names, files and directories resolved
into leaf tasks with a ``TaskManager`` that can load them, and a fingerprint of each task's definition and data.

lm-eval facts relied on (0.4.13): ``TaskManager(include_path=..., include_defaults=False)`` indexes a task
directory in milliseconds, while the built-in index takes about 18 s here, so it is built only when a name is
not found otherwise; YAMLs that fail to parse in an include path are skipped silently (a debug log line), so
every given or included YAML is parsed here first to give a real error.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError

LM_EVAL_REQUIREMENT = "lm-eval>=0.4.13,<0.5"
_LM_EVAL_RANGE = ((0, 4, 13), (0, 5, 0))
EXTRA = "actsparse[tasks]"
AVERAGE = "average"  # the task-average rows of the result tables; no task may have this name


def require_lm_eval() -> str:
    """lm-eval's version, after checking that it is installed in the supported range.

    Also switches the HF hub and datasets to offline mode (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``, unless
    already set) before lm-eval imports ``datasets``: a task whose data is not local fails instead of waiting
    on the network.

    Raises:
        ActsparseError: lm-eval (or a library it needs) cannot be imported, or its version is outside
            :data:`LM_EVAL_REQUIREMENT`.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (imports accelerate and datasets)
    except ImportError as e:
        raise ActsparseError(f"actsparse evaluate --tasks needs lm-evaluation-harness, the 'tasks' extra: "
                             f"pip install '{EXTRA}' ({LM_EVAL_REQUIREMENT}; {e})") from None
    version = getattr(lm_eval, "__version__", "0")
    parts = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    if not _LM_EVAL_RANGE[0] <= parts < _LM_EVAL_RANGE[1]:
        raise ActsparseError(f"lm-eval {version} is installed; actsparse supports {LM_EVAL_REQUIREMENT} "
                             "(it relies on lm-eval's HF batching internals, docs/pitfalls.md P22)")
    return version


@dataclass
class TaskSelection:
    """Leaf task names to run (in the order given, tags expanded), the lm-eval ``TaskManager`` that knows them,
    and its include directories."""

    names: list[str]
    task_manager: object
    include_paths: list[Path]


def load_task_yaml(path: Path) -> dict:
    """A task YAML as lm-eval reads it (``include:`` resolved, ``!function`` left unresolved).

    Raises:
        ActsparseError: the file does not parse or is not a mapping.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(path, resolve_func=False, recursive=True)
    except Exception as e:  # noqa: BLE001 - yaml.YAMLError, OSError, a bad include: all mean "does not parse"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ActsparseError(f"task file {path} does not parse: {first}") from None
    if not isinstance(cfg, dict):
        raise ActsparseError(f"task file {path} does not parse: expected a mapping, got {type(cfg).__name__}")
    return cfg


def _task_file_names(path: Path, *, require: bool = True) -> list[str]:
    """Task names a YAML file defines, or every YAML of a directory (sorted, each parsed strictly).

    With ``require``, a directory without any task YAML is an error (an include path may hold groups only).
    """
    files = sorted(path.rglob("*.yaml")) if path.is_dir() else [path]
    names = []
    for f in files:
        cfg = load_task_yaml(f)
        if isinstance(cfg.get("task"), str):
            names.append(cfg["task"])
        elif not path.is_dir():
            raise ActsparseError(f"task file {f} has no 'task:' name (groups and templates cannot be run directly)")
    if require and not names:
        raise ActsparseError(f"task directory {path} holds no task YAML (files with a 'task:' key)")
    return names


def _split_spec(spec: str | Sequence[str]) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip() for s in items if s and s.strip()]
    if not items:
        raise ActsparseError("--tasks is empty; give task names, a task YAML file or a directory of them")
    return items


def select_tasks(spec: str | Sequence[str], include_paths: Sequence[str | Path] = (), *,
                 shipped: bool = True) -> TaskSelection:
    """Resolve ``--tasks`` into leaf task names and a TaskManager that can load them.

    Args:
        spec: comma-separated (or a list of) items, each a registered lm-eval task or tag name (a tag expands to
            its tasks, sorted), a task YAML file, or a directory of task YAMLs (all its tasks).
        include_paths: extra directories of task YAMLs (lm-eval's ``--include_path``).
        shipped: also register actsparse's shipped tasks (``build.shipped_task_dir``).

    Raises:
        ActsparseError: lm-eval missing, an unknown name (close matches suggested), a YAML file that does not
            exist or does not parse, a group (its tasks must be named), a task named ``average``.
    """
    require_lm_eval()
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    includes = [Path(p).resolve() for p in include_paths]
    for p in includes:
        if not p.is_dir():
            raise ActsparseError(f"task include path {p} is not a directory")
        _task_file_names(p, require=False)  # every YAML must parse: lm-eval would skip a broken one silently
    if shipped:
        from actsparse.analyze.tasks.build import shipped_task_dir

        includes.insert(0, shipped_task_dir())
    wanted: list[str] = []
    for item in _split_spec(spec):
        path = Path(item).expanduser()
        if path.suffix in (".yaml", ".yml") or path.is_dir() or os.sep in item:
            if not path.exists():
                raise ActsparseError(f"task file {item} does not exist")
            includes.append((path if path.is_dir() else path.parent).resolve())
            wanted.extend(_task_file_names(path.resolve()))
        else:
            wanted.append(item)

    tm = TaskManager(include_path=[str(p) for p in includes], include_defaults=False)
    if any(n not in tm.task_index for n in wanted):
        tm = _with_builtin_tasks(tuple(str(p) for p in includes))
    names: list[str] = []
    for n in wanted:
        entry = tm.task_index.get(n)
        if entry is None:
            close = difflib.get_close_matches(n, tm.all_tasks, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ActsparseError(f"unknown lm-eval task '{n}'{hint}")
        if entry.kind == Kind.GROUP:
            raise ActsparseError(f"'{n}' is an lm-eval group; name its tasks instead (group aggregation is not "
                                 "reproduced: task averages are over leaf tasks)")
        leaves = sorted(entry.tags) if entry.kind == Kind.TAG else [n]
        names.extend(x for x in leaves if x not in names)
    if AVERAGE in names:
        raise ActsparseError(f"a task may not be named '{AVERAGE}' (the name of the task-average rows)")
    return TaskSelection(names, tm, includes)


@lru_cache(maxsize=4)
def _with_builtin_tasks(includes: tuple[str, ...]):
    """A TaskManager of lm-eval's built-in tasks and ``includes``, built once per process and include list (its
    index of several thousand YAMLs takes about 18 s here)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(includes), include_defaults=True)


def task_fingerprint(task_manager, task: str) -> str:
    """sha256 of a task's resolved YAML config and, for local ``json`` datasets, of its data files: a stored run
    of the task is reused only while this is unchanged (docs/pitfalls.md P16)."""
    entry = task_manager.task_index[task]
    if entry.yaml_path is None:
        return fmt.content_hash(dict(task=task), 64)
    cfg = load_task_yaml(Path(entry.yaml_path))
    data = {}
    if cfg.get("dataset_path") == "json":
        files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
        for split, paths in sorted(files.items() if isinstance(files, dict) else [("", files)]):
            for p in [paths] if isinstance(paths, str) else paths:
                f = Path(p)
                data[f"{split}:{p}"] = hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "missing"
    return fmt.content_hash(dict(config=cfg, data=data), 64)
