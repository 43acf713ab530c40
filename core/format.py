"""The actsparse store format, defined once: names, ids, layout, dtypes, table schemas, the manifest, result kinds.

Nothing else in actsparse spells a store path or a column of a stored table: collection, readers, SQL views,
``verify``, ``pack``, the report and the demo all build them from here. ``docs/store-format.md`` describes the
same things for users, and ``tests/core/test_format.py`` holds the two together (every path and column defined
here is documented there).

Layout (store-relative POSIX paths)::

    actsparse-store.json                      {"format": "actsparse-store", "format_version": 1}
    catalogue.parquet                         one row per complete run (CATALOGUE_COLUMNS; the SQL view runs)
    models/<weights_id>/ffn.zarr/             FFN weights of every layer, shared by the runs of a model
    models/<weights_id>/checksums.json
    runs/<run_id>/manifest.json               provenance and status (:class:`Manifest`)
    runs/<run_id>/checksums.json              sha256 and size of every other file of the run
    runs/<run_id>/documents.parquet           DOCUMENTS_COLUMNS
    runs/<run_id>/activations.zarr/<site>     [layers, tokens, width]; chunk (1, T, width), shard (layers, T, width)
    runs/<run_id>/tokens/part-KKKKKK.parquet  TOKENS_COLUMNS of shard K; written last, it marks shard K complete
    runs/<run_id>/token_stats/site=<site>/part-KKKKKK.parquet   TOKEN_STATS_COLUMNS of shard K
    runs/<run_id>/analysis/<prefix>-<id>.parquet                 results (RESULT_KINDS)
    runs/<run_id>/analysis/evaluate-<eval_id>/                   an evaluation's per-value parts
    evaluations/<prefix>-<id>.parquet         evaluations of models or corpora never collected (no run)

Dense values are stored as ``uint16`` holding bfloat16 bit patterns (array attribute ``logical_dtype``),
because neither numpy nor zarr has bfloat16 (docs/pitfalls.md P5); ``float16`` only after an overflow check
(P6); ``float32`` on request. Writers own whole shards (P7); ``zarr_format=3`` is written explicitly and
consolidated metadata is not used (P8).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import SITES

# ---------------------------------------------------------------- names

FORMAT_NAME = "actsparse-store"
RUN_FORMAT = "actsparse-run"
FORMAT_VERSION = 1
STORE_FILE = "actsparse-store.json"
CATALOGUE = "catalogue.parquet"
RUNS = "runs"
MODELS = "models"
EVALUATIONS = "evaluations"  # store-level results: evaluations of models or corpora never collected
MANIFEST = "manifest.json"
CHECKSUMS = "checksums.json"
DOCUMENTS = "documents.parquet"
ACTIVATIONS = "activations.zarr"
WEIGHTS = "ffn.zarr"
ZARR_META = "zarr.json"
TOKENS = "tokens"
TOKEN_STATS = "token_stats"
ANALYSIS = "analysis"
LOCK = ".lock"  # one writer per run (runs/<id>/.lock) and per weights dir (models/<id>/.lock)
CHECKSUMS_LOCK = ".checksums.lock"
CATALOGUE_LOCK = ".catalogue.lock"
LOCKS = frozenset({LOCK, CHECKSUMS_LOCK, CATALOGUE_LOCK})
STAGING_PREFIXES = (".incoming-", ".unpack-")  # temporary directories of merge and unpack at a store's root
DERIVED_DIRS = (f"{ANALYSIS}/", f"{TOKEN_STATS}/")  # run files added after collection, recorded as written
UNLISTED = frozenset({CHECKSUMS, MANIFEST})  # files of a run or weights dir that checksums.json never lists

# ---------------------------------------------------------------- ids

ID_RE = re.compile(r"^[0-9a-f]{16}$")  # run, weights, analysis and evaluation ids
RUN_ID_RE = WEIGHTS_ID_RE = ID_RE


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) of what an id hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_hash(obj: Any, n: int = 16) -> str:
    """An id: the first ``n`` hex digits of the sha256 of ``canonical_json(obj)`` (docs/store-format.md "Ids")."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]


def check_id(value: object, what: str = "run") -> str:
    """``value`` if it is a valid id (16 lowercase hex digits), so that it may be used as a path component.

    Raises:
        ActsparseError: anything else, naming ``what`` (run, weights, analysis, evaluation).
    """
    if not isinstance(value, str) or not ID_RE.match(value):
        raise ActsparseError(f"invalid {what} id {value!r}")
    return value


def match_run(ref: str, run_ids: Iterable[str], where: str = "") -> str:
    """The one run id of ``run_ids`` that ``ref`` (a full id or a unique prefix) names.

    Raises:
        ActsparseError: no id or several ids start with ``ref``, listing the run ids.
    """
    ids = list(run_ids)
    matches = [i for i in ids if ref and i.startswith(str(ref))]
    if len(matches) != 1:
        what = f"run prefix '{ref}' is ambiguous" if matches else f"unknown run '{ref}'"
        raise ActsparseError(f"{what}{f' in {where}' if where else ''} (runs: {', '.join(ids) or 'none'})")
    return matches[0]


# ---------------------------------------------------------------- layout


def run_path(run_id: str, *parts: str) -> str:
    """Store-relative path of a run directory, or of ``parts`` inside it (``run_path(id, MANIFEST)``)."""
    return "/".join((RUNS, check_id(run_id), *parts))


def weights_path(weights_id: str, *parts: str) -> str:
    """Store-relative path of a weights directory (``models/<id>``), or of ``parts`` inside it."""
    return "/".join((MODELS, check_id(weights_id, "weights"), *parts))


def part_name(k: int) -> str:
    """File name of shard ``k``'s Parquet parts."""
    return f"part-{k:06d}.parquet"


def token_part(k: int) -> str:
    """Run-relative path of shard ``k``'s token rows (its existence marks the shard complete)."""
    return f"{TOKENS}/{part_name(k)}"


def stats_part(site: str, k: int) -> str:
    """Run-relative path of shard ``k``'s per-token statistics of ``site``."""
    return f"{TOKEN_STATS}/site={site}/{part_name(k)}"


STATS_GLOB = f"{TOKEN_STATS}/site=*/part-*.parquet"  # every statistics part of a run (run-relative)


def site_array(site: str) -> str:
    """Run-relative path of a site's zarr array."""
    return f"{ACTIVATIONS}/{site}"


def n_parts(n_tokens: int, chunk_tokens: int) -> int:
    """Shards (and token parts) of a run: ``ceil(n_tokens / chunk_tokens)``."""
    return -(-int(n_tokens) // int(chunk_tokens))


def shard_tokens(k: int, chunk_tokens: int, n_tokens: int) -> tuple[int, int]:
    """Token range ``[start, stop)`` of shard ``k``."""
    start = k * chunk_tokens
    return start, min(start + chunk_tokens, n_tokens)


def result_file(kind: ResultKind, ident: str) -> str:
    """Path of one result of ``kind``, relative to its base (``runs/<id>/analysis`` or ``evaluations``)."""
    return f"{kind.prefix}-{check_id(ident, kind.name)}.parquet"


def result_base(run_id: str | None) -> str:
    """Store-relative directory of results: a run's ``analysis/``, or the store-level ``evaluations/``."""
    return EVALUATIONS if run_id is None else run_path(run_id, ANALYSIS)


def evaluation_parts(eval_id: str) -> str:
    """Directory (relative to the result base) of an evaluation's per-value parts and its ``config.json``."""
    return f"evaluate-{check_id(eval_id, 'evaluation')}"


def value_part(value: float) -> str:
    """File name of one grid value's per-window sums inside :func:`evaluation_parts`."""
    return f"value-{float(value)!r}.parquet"


EVALUATION_CONFIG = "config.json"
# The per-window sums of one grid value (value_part): what an evaluation resumes from.
EVALUATION_VALUE_COLUMNS = (
    ("value", "DOUBLE"), ("window", "BIGINT"), ("n_pred", "BIGINT"), ("n_valid", "BIGINT"), ("nll_sparse", "DOUBLE"),
    ("nll_dense", "DOUBLE"), ("correct_sparse", "BIGINT"), ("correct_dense", "BIGINT"), ("kl", "DOUBLE"),
    ("hook_sparse", "BIGINT[]"),
)

_MEMBER_RE = re.compile(
    rf"^(README\.md|archive\.json|{re.escape(STORE_FILE)}|{RUNS}/[0-9a-f]{{16}}/.+"
    rf"|{MODELS}/[0-9a-f]{{16}}/({re.escape(CHECKSUMS)}|{re.escape(WEIGHTS)}/.+))$")


def is_archive_member(rel: str) -> bool:
    """Whether ``rel`` may be a member of a store archive: the card, the index, the marker, or a file of a
    run or weights directory (``actsparse pack`` writes nothing else, ``unpack`` accepts nothing else)."""
    return bool(_MEMBER_RE.match(rel))


def _path_kinds() -> list[tuple[re.Pattern, str, Columns | None]]:
    """Every file a store may hold: ``(store-relative path pattern, what it is, its columns if a table)``."""
    rid, hexid, part = r"[0-9a-f]{16}", r"[0-9a-f]{16}", r"part-\d{6}\.parquet"
    run, model = rf"{RUNS}/{rid}", rf"{MODELS}/{hexid}"
    kinds: list[tuple[str, str, Columns | None]] = [
        (re.escape(STORE_FILE), "store marker", None),
        (re.escape(CATALOGUE), "catalogue", CATALOGUE_COLUMNS),
        (rf"{run}/{re.escape(MANIFEST)}", "run manifest", None),
        (rf"{run}/{re.escape(CHECKSUMS)}", "run checksums", None),
        (rf"{run}/{re.escape(DOCUMENTS)}", "documents", DOCUMENTS_COLUMNS),
        (rf"{run}/{re.escape(ACTIVATIONS)}/{re.escape(ZARR_META)}", "activations group", None),
        (rf"{run}/{re.escape(ACTIVATIONS)}/[a-z]+/{re.escape(ZARR_META)}", "site array metadata", None),
        (rf"{run}/{re.escape(ACTIVATIONS)}/[a-z]+/c/0/\d+/0", "site array shard", None),
        (rf"{run}/{TOKENS}/{part}", "token part", ALL_TOKEN_COLUMNS),
        (rf"{run}/{TOKEN_STATS}/site=[a-z]+/{part}", "token statistics part", TOKEN_STATS_COLUMNS),
        (rf"{run}/{ANALYSIS}/evaluate-{hexid}/{re.escape(EVALUATION_CONFIG)}", "evaluation config", None),
        (rf"{run}/{ANALYSIS}/evaluate-{hexid}/value-[0-9.e+-]+\.parquet", "evaluation value part",
         EVALUATION_VALUE_COLUMNS),
        (rf"{EVALUATIONS}/evaluate-{hexid}/{re.escape(EVALUATION_CONFIG)}", "evaluation config", None),
        (rf"{EVALUATIONS}/evaluate-{hexid}/value-[0-9.e+-]+\.parquet", "evaluation value part",
         EVALUATION_VALUE_COLUMNS),
        (rf"{model}/{re.escape(CHECKSUMS)}", "weights checksums", None),
        (rf"{model}/{re.escape(WEIGHTS)}/{re.escape(ZARR_META)}", "weights group", None),
        (rf"{model}/{re.escape(WEIGHTS)}/[a-z_]+/{re.escape(ZARR_META)}", "weights array metadata", None),
        (rf"{model}/{re.escape(WEIGHTS)}/[a-z_]+/c/\d+/\d+/\d+", "weights chunk", None),
    ]
    for kind in RESULT_KINDS.values():
        kinds.append((rf"{run}/{ANALYSIS}/{kind.prefix}-{hexid}\.parquet", f"result: {kind.name}", kind.columns))
        if kind.store_level:
            kinds.append((rf"{EVALUATIONS}/{kind.prefix}-{hexid}\.parquet", f"result: {kind.name}", kind.columns))
    return [(re.compile(f"^{pattern}$"), what, columns) for pattern, what, columns in kinds]


def describe_path(rel: str) -> tuple[str, Columns | None] | None:
    """What a store-relative path is in the format (``(description, columns of its table or None)``), or None
    for a path the format does not define. Lock files (``.lock``) are not store content and are None."""
    for pattern, what, columns in _PATH_KINDS:
        if pattern.match(rel):
            return what, columns
    return None


@dataclass(frozen=True)
class StorePaths:
    """Local paths of a store rooted at ``root``; ids are validated before they become paths."""

    root: Path

    def run_dir(self, run_id: str) -> Path:
        return self.root / run_path(run_id)

    def weights_dir(self, weights_id: str) -> Path:
        """``models/<id>/ffn.zarr``: the zarr group of a model's FFN weights."""
        return self.root / weights_path(weights_id, WEIGHTS)

    def result_dir(self, run_id: str | None) -> Path:
        return self.root / result_base(run_id)


def check_store_marker(meta: object, where: str) -> int:
    """The format version of a store marker or manifest, if this actsparse reads it.

    Raises:
        ActsparseError: not an actsparse file, or a format version newer than ``FORMAT_VERSION``.
    """
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT_NAME, RUN_FORMAT):
        what = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ActsparseError(f"{where} is not an actsparse store file (format={what!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ActsparseError(f"{where} has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise ActsparseError(f"{where} has format version {version}, newer than this actsparse reads "
                             f"({FORMAT_VERSION}); upgrade actsparse")
    return version


def store_marker() -> dict:
    """The content of ``actsparse-store.json``."""
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}


# ---------------------------------------------------------------- dtypes (docs/pitfalls.md P5, P6)

STORED_DTYPES = ("bfloat16", "float16", "float32")
NUMPY_DTYPES = {"bfloat16": "uint16", "float16": "float16", "float32": "float32"}
FLOAT16_MAX = 65504.0


def numpy_dtype(dtype: str) -> str:
    """The numpy dtype a logical stored dtype is written as (bfloat16 as its ``uint16`` bit patterns)."""
    return NUMPY_DTYPES[dtype]


# ---------------------------------------------------------------- tables

# Per-token statistics (token_stats): the top-p values and absolute thresholds they are taken at.
TOPP_VALUES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
THRESHOLDS = (1e-3, 1e-2, 1e-1)
TOPP_COLUMNS = tuple(f"sparsity_p{round(p * 100)}" for p in TOPP_VALUES)
THRESHOLD_COLUMNS = ("frac_below_1e_3", "frac_below_1e_2", "frac_below_1e_1")
STAT_COLUMNS = ("l1", "l2", "max_abs", "top1_share", *THRESHOLD_COLUMNS, *TOPP_COLUMNS)
STATS_ROW_GROUP = 128 * 1024  # DuckDB parallelises a scan by row group: ~8 MB per group

# Columns as (name, DuckDB type); the Arrow types follow from ARROW_TYPES.
Columns = tuple[tuple[str, str], ...]
CATALOGUE_COLUMNS: Columns = (
    ("run_id", "VARCHAR"), ("model", "VARCHAR"), ("model_name", "VARCHAR"), ("architecture", "VARCHAR"),
    ("weights_sha256", "VARCHAR"), ("corpus", "VARCHAR"), ("corpus_sha256", "VARCHAR"), ("split", "VARCHAR"),
    ("sites", "VARCHAR[]"), ("n_layers", "INTEGER"), ("d_model", "INTEGER"), ("d_ff", "INTEGER"),
    ("activation", "VARCHAR"), ("n_tokens", "BIGINT"), ("n_sequences", "BIGINT"), ("seq_len", "INTEGER"),
    ("stored_dtype", "VARCHAR"), ("compute_dtype", "VARCHAR"), ("created", "VARCHAR"), ("completed", "VARCHAR"),
    ("bytes", "BIGINT"),
)
DOCUMENTS_COLUMNS: Columns = (("document_id", "INTEGER"), ("key", "VARCHAR"), ("split", "VARCHAR"),
                              ("n_chars", "BIGINT"))
TOKENS_COLUMNS: Columns = (
    ("token_index", "BIGINT"), ("sequence", "BIGINT"), ("position", "INTEGER"), ("token_id", "INTEGER"),
    ("token_text", "VARCHAR"), ("document_id", "INTEGER"), ("special", "BOOLEAN"),
)
# Generation and diffusion runs (docs/store-format.md "Generation and diffusion runs") hold more token columns:
# what fed each row (PHASES) and at which step; diffusion runs also the block, whether the position was still
# masked or noised, the classifier-free-guidance half and whether the row was still denoising.
GENERATION_COLUMNS: Columns = (("phase", "VARCHAR"), ("step", "INTEGER"))
DIFFUSION_COLUMNS: Columns = (*GENERATION_COLUMNS, ("block", "INTEGER"), ("noised", "BOOLEAN"),
                              ("cfg_half", "INTEGER"), ("active", "BOOLEAN"))
RUN_KINDS = ("text", "generation", "diffusion")
ALL_TOKEN_COLUMNS: Columns = (*TOKENS_COLUMNS, *DIFFUSION_COLUMNS)  # every column a token part may hold


def token_columns(kind: str) -> Columns:
    """The columns of the token parts of a run of ``kind`` (``RUN_KINDS``; ``Manifest.kind``)."""
    extra = {"text": (), "generation": GENERATION_COLUMNS, "diffusion": DIFFUSION_COLUMNS}[kind]
    return (*TOKENS_COLUMNS, *extra)


TOKEN_STATS_COLUMNS: Columns = (
    ("run_id", "VARCHAR"), ("site", "VARCHAR"), ("layer", "INTEGER"), ("token_index", "BIGINT"),
    ("sequence", "BIGINT"), ("position", "INTEGER"), ("token_id", "INTEGER"), ("special", "BOOLEAN"),
    *((c, "FLOAT") for c in STAT_COLUMNS),
)

ARROW_TYPES = {"VARCHAR": "string", "INTEGER": "int32", "BIGINT": "int64", "FLOAT": "float32",
               "DOUBLE": "float64", "BOOLEAN": "bool_", "VARCHAR[]": "list<string>"}


def arrow_schema(columns: Columns):
    """The pyarrow schema of a table given as ``(name, DuckDB type)`` columns."""
    import pyarrow as pa

    def typ(t: str):
        return pa.list_(pa.string()) if t == "VARCHAR[]" else getattr(pa, ARROW_TYPES[t])()

    return pa.schema([(name, typ(t)) for name, t in columns])


@dataclass(frozen=True)
class ResultKind:
    """A kind of analysis result a store holds: ``<base>/<prefix>-<id>.parquet`` files behind one SQL view.

    ``columns`` are the documented columns (name, DuckDB type) every file of the kind has; ``written_by`` names
    the command that writes it. Results live in a run's ``analysis/`` directory and, for evaluations of models
    or corpora never collected, in the store's ``evaluations/`` directory (``store_level``).
    """

    name: str
    prefix: str
    columns: Columns
    written_by: str
    store_level: bool = False

    @property
    def glob(self) -> str:
        """File-name pattern of the kind inside a result base directory."""
        return f"{self.prefix}-*.parquet"


_EVAL_META: Columns = (
    ("run_id", "VARCHAR"), ("eval_id", "VARCHAR"), ("model", "VARCHAR"), ("corpus", "VARCHAR"), ("split", "VARCHAR"),
    ("target", "VARCHAR"), ("rule", "VARCHAR"), ("power", "DOUBLE"),
)
# Per-step analyses of generation and diffusion runs: one row per (hook site, layer) and step; layer -1 is the
# model level (every hook, weighted by width), site "model" there.
_STEP_META: Columns = (
    ("run_id", "VARCHAR"), ("analysis_id", "VARCHAR"), ("target", "VARCHAR"), ("rule", "VARCHAR"),
    ("value", "DOUBLE"), ("layer", "BIGINT"), ("site", "VARCHAR"),
)
RESULT_KINDS: dict[str, ResultKind] = {k.name: k for k in (
    ResultKind("curves", "curves", (
        ("run_id", "VARCHAR"), ("target", "VARCHAR"), ("rule", "VARCHAR"), ("value", "DOUBLE"), ("layer", "BIGINT"),
        ("width", "BIGINT"), ("n_tokens", "BIGINT"), ("sparsity_mean", "DOUBLE"), ("sparsity_p10", "DOUBLE"),
        ("sparsity_p50", "DOUBLE"), ("sparsity_p90", "DOUBLE"), ("kept_l1_mean", "DOUBLE"), ("rel_err_mean", "DOUBLE"),
        ("rel_err_p90", "DOUBLE"), ("cos_mean", "DOUBLE"), ("err_vs_input_mean", "DOUBLE"), ("analysis_id", "VARCHAR"),
        ("label", "VARCHAR")), "actsparse curves"),
    ResultKind("critical_sparsity", "critical", (
        ("run_id", "VARCHAR"), ("target", "VARCHAR"), ("rule", "VARCHAR"), ("tolerance", "DOUBLE"),
        ("metric", "VARCHAR"), ("critical_sparsity_grid", "DOUBLE"), ("critical_value_grid", "DOUBLE"),
        ("critical_sparsity_interp", "DOUBLE"), ("label", "VARCHAR"), ("analysis_id", "VARCHAR")), "actsparse curves"),
    ResultKind("evaluations", "evaluate", (
        *_EVAL_META, ("value", "DOUBLE"), ("n_tokens", "BIGINT"), ("n_windows", "BIGINT"), ("n_boot", "BIGINT"),
        ("sparsity", "DOUBLE"), ("nll", "DOUBLE"), ("top1_acc", "DOUBLE"), ("kl", "DOUBLE"), ("dense_nll", "DOUBLE"),
        ("dense_acc", "DOUBLE"), ("acc_ratio", "DOUBLE"), ("dnll", "DOUBLE"), ("ppl", "DOUBLE"),
        ("dense_ppl", "DOUBLE"),
        ("nll_ratio", "DOUBLE"), ("sparsity_lo", "DOUBLE"), ("sparsity_hi", "DOUBLE"), ("acc_ratio_lo", "DOUBLE"),
        ("acc_ratio_hi", "DOUBLE"), ("dnll_lo", "DOUBLE"), ("dnll_hi", "DOUBLE"), ("label", "VARCHAR")),
        "actsparse evaluate", store_level=True),
    ResultKind("evaluation_layers", "evaluate_layers", (
        *_EVAL_META, ("value", "DOUBLE"), ("layer", "BIGINT"), ("hook", "VARCHAR"), ("width", "BIGINT"),
        ("n_positions", "BIGINT"), ("sparsity", "DOUBLE")), "actsparse evaluate", store_level=True),
    ResultKind("evaluation_critical", "evaluate_critical", (
        *_EVAL_META, ("criterion", "VARCHAR"), ("threshold", "DOUBLE"), ("critical_sparsity_grid", "DOUBLE"),
        ("critical_value_grid", "DOUBLE"), ("critical_sparsity_interp", "DOUBLE"), ("critical_lo", "DOUBLE"),
        ("critical_hi", "DOUBLE"), ("boot_undefined", "DOUBLE"), ("n_values", "BIGINT"), ("n_tokens", "BIGINT"),
        ("n_boot", "BIGINT"), ("label", "VARCHAR")), "actsparse evaluate", store_level=True),
    ResultKind("step_sparsity", "step_sparsity", (
        *_STEP_META, ("step", "BIGINT"), ("block", "BIGINT"), ("n_tokens", "BIGINT"), ("width", "BIGINT"),
        ("sparsity", "DOUBLE"), ("n_noised", "BIGINT"), ("sparsity_noised", "DOUBLE"), ("label", "VARCHAR")),
        "actsparse steps"),
    ResultKind("step_stability", "step_stability", (
        *_STEP_META, ("kind", "VARCHAR"), ("delta", "BIGINT"), ("step", "BIGINT"), ("ref_step", "BIGINT"),
        ("n_intersection", "BIGINT"), ("n_union", "BIGINT"), ("token_jaccard_sum", "DOUBLE"), ("n_tokens", "BIGINT"),
        ("global_jaccard", "DOUBLE"), ("token_jaccard", "DOUBLE"), ("label", "VARCHAR")), "actsparse steps"),
    ResultKind("generation_evaluations", "evaluate_generation", (
        *_EVAL_META, ("value", "DOUBLE"), ("max_new_tokens", "BIGINT"), ("n_prompts", "BIGINT"),
        ("n_prefill", "BIGINT"), ("n_generation", "BIGINT"), ("n_boot", "BIGINT"),
        *((f"sparsity_{ph}{end}", "DOUBLE") for ph in ("prefill", "generation", "total") for end in ("", "_lo", "_hi")),
        ("token_agreement", "DOUBLE"), ("token_agreement_lo", "DOUBLE"), ("token_agreement_hi", "DOUBLE"),
        ("exact_match", "DOUBLE"), ("exact_match_lo", "DOUBLE"), ("exact_match_hi", "DOUBLE"),
        ("dense_generated_mean", "DOUBLE"), ("label", "VARCHAR")), "actsparse evaluate --generate", store_level=True),
    ResultKind("diffusion_evaluations", "evaluate_diffusion", (
        *_EVAL_META, ("value", "DOUBLE"), ("step", "BIGINT"), ("block", "BIGINT"), ("n_prompts", "BIGINT"),
        ("n_positions", "BIGINT"), ("n_boot", "BIGINT"), ("sparsity", "DOUBLE"), ("sparsity_lo", "DOUBLE"),
        ("sparsity_hi", "DOUBLE"), ("token_agreement", "DOUBLE"), ("token_agreement_lo", "DOUBLE"),
        ("token_agreement_hi", "DOUBLE"), ("exact_match", "DOUBLE"), ("exact_match_lo", "DOUBLE"),
        ("exact_match_hi", "DOUBLE"), ("label", "VARCHAR")), "actsparse evaluate --diffusion", store_level=True),
)}
CURVES, CRITICAL = RESULT_KINDS["curves"], RESULT_KINDS["critical_sparsity"]
EVALUATION, EVALUATION_LAYERS = RESULT_KINDS["evaluations"], RESULT_KINDS["evaluation_layers"]
EVALUATION_CRITICAL = RESULT_KINDS["evaluation_critical"]
STEP_SPARSITY, STEP_STABILITY = RESULT_KINDS["step_sparsity"], RESULT_KINDS["step_stability"]
GENERATION_EVALUATION = RESULT_KINDS["generation_evaluations"]
DIFFUSION_EVALUATION = RESULT_KINDS["diffusion_evaluations"]

_PATH_KINDS = _path_kinds()

# The SQL views of a store: the catalogue, the per-layer summary, the token tables, then one per result kind.
VIEWS = ("runs", "layers", "tokens", "token_stats", *RESULT_KINDS)
LAYERS_COLUMNS: Columns = (
    ("run_id", "VARCHAR"), ("model", "VARCHAR"), ("site", "VARCHAR"), ("layer", "INTEGER"), ("n_layers", "INTEGER"),
    ("depth", "DOUBLE"), ("width", "INTEGER"), ("n_tokens", "BIGINT"), *((f"{c}_mean", "DOUBLE") for c in STAT_COLUMNS),
)

# ---------------------------------------------------------------- manifest

STATUSES = ("incomplete", "complete")
# Sane bounds on every size a manifest holds: it drives loops, allocations and reads (docs/pitfalls.md,
# "hostile stores"), so a value beyond these is refused before it is used.
MAX_TOKENS = 1 << 40
MAX_CHUNK_TOKENS = 1 << 24
MAX_LAYERS = 1 << 12
MAX_WIDTH = 1 << 20


def _need(d: dict, key: str, typ: type | tuple, where: str):
    v = d.get(key)
    ok = isinstance(v, typ) and not (isinstance(v, bool) and typ in (int, (int, float)))
    if not ok:
        name = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise ActsparseError(f"{where}: manifest field '{key}' is missing or not a{'n' if name[0] in 'aeiou' else ''} "
                             f"{name}")
    return v


def _bounded(d: dict, key: str, lo: int, hi: int, where: str) -> int:
    v = _need(d, key, int, where)
    if not lo <= v <= hi:
        raise ActsparseError(f"{where}: manifest field '{key}' is {v}, outside [{lo}, {hi}]")
    return v


def _opt_str(d: dict, key: str) -> str | None:
    v = d.get(key)
    return v if isinstance(v, str) else None


@dataclass(frozen=True)
class FFNInfo:
    """The resolved FFN of a model (``pipeline.sites.FFNArchitecture.describe``): pattern (``glu``,
    ``glu-fused``, ``mlp``), activation (an ACT2FN key), widths, layer count and module paths of layer 0."""

    pattern: str
    activation: str
    d_model: int
    d_ff: int
    n_layers: int
    layers_path: str = ""
    layer0_modules: dict = field(default_factory=dict)

    @property
    def glu(self) -> bool:
        """True for gated FFNs (``glu`` and ``glu-fused``)."""
        return self.pattern != "mlp"

    def width(self, site: str) -> int:
        """Width of a site's vectors: d_model for ``input``/``output``, d_ff otherwise."""
        return self.d_model if site in ("input", "output") else self.d_ff

    @classmethod
    def from_dict(cls, d: object, where: str) -> FFNInfo:
        if not isinstance(d, dict):
            raise ActsparseError(f"{where}: manifest field 'model.ffn' is not an object")
        w = f"{where} (model.ffn)"
        return cls(pattern=_need(d, "pattern", str, w), activation=_need(d, "activation", str, w),
                   d_model=_bounded(d, "d_model", 1, MAX_WIDTH, w), d_ff=_bounded(d, "d_ff", 1, MAX_WIDTH, w),
                   n_layers=_bounded(d, "n_layers", 1, MAX_LAYERS, w), layers_path=_opt_str(d, "layers_path") or "",
                   layer0_modules=d.get("layer0_modules") if isinstance(d.get("layer0_modules"), dict) else {})


@dataclass(frozen=True)
class ModelInfo:
    """The model of a run: spec as given, name, source, licence, weights sha256 and the stored weights' id."""

    spec: str
    name: str
    weights_sha256: str
    weights_id: str
    ffn: FFNInfo
    source: str | None = None
    license: str | None = None
    architecture: str | None = None
    model_type: str | None = None
    max_position_embeddings: int | None = None
    vocab_size: int | None = None
    tokenizer: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: object, where: str) -> ModelInfo:
        if not isinstance(d, dict):
            raise ActsparseError(f"{where}: manifest field 'model' is not an object")
        w = f"{where} (model)"
        wid = d.get("weights_id")
        if not isinstance(wid, str) or not ID_RE.match(wid):
            raise ActsparseError(f"{where}: manifest weights_id {wid!r} is not a valid id")
        ints = {k: d[k] if isinstance(d.get(k), int) and not isinstance(d.get(k), bool) else None
                for k in ("max_position_embeddings", "vocab_size")}
        return cls(spec=_need(d, "spec", str, w), name=_need(d, "name", str, w),
                   weights_sha256=_need(d, "weights_sha256", str, w), weights_id=wid,
                   ffn=FFNInfo.from_dict(d.get("ffn"), where), source=_opt_str(d, "source"),
                   license=_opt_str(d, "license"), architecture=_opt_str(d, "architecture"),
                   model_type=_opt_str(d, "model_type"), tokenizer=d.get("tokenizer") or {}, **ints)


@dataclass(frozen=True)
class CorpusInfo:
    """The corpus of a run: its canonical spec (``pipeline.corpora.Corpus.spec``), name, sha256 and licence."""

    spec: str
    name: str
    sha256: str
    license: str | None = None
    description: str | None = None
    n_documents: int | None = None

    @classmethod
    def from_dict(cls, d: object, where: str) -> CorpusInfo:
        if not isinstance(d, dict):
            raise ActsparseError(f"{where}: manifest field 'corpus' is not an object")
        w = f"{where} (corpus)"
        n = d.get("n_documents")
        return cls(spec=_need(d, "spec", str, w), name=_need(d, "name", str, w), sha256=_need(d, "sha256", str, w),
                   license=_opt_str(d, "license"), description=_opt_str(d, "description"),
                   n_documents=n if isinstance(n, int) and not isinstance(n, bool) else None)


@dataclass(frozen=True)
class ArraySpec:
    """One stored site: ``shape [layers, tokens, width]``, chunks ``[1, T, width]``, shards ``[layers, T, width]``,
    the numpy dtype written and the logical dtype it holds."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    shards: tuple[int, ...]
    numpy_dtype: str
    logical_dtype: str
    width: int

    @classmethod
    def for_site(cls, n_layers: int, n_tokens: int, chunk_tokens: int, width: int, dtype: str) -> ArraySpec:
        """The layout collection writes (one chunk per layer and ``chunk_tokens`` tokens, one shard per
        ``chunk_tokens`` tokens holding every layer)."""
        t = min(chunk_tokens, max(n_tokens, 1))
        return cls((n_layers, n_tokens, width), (1, t, width), (n_layers, t, width), numpy_dtype(dtype), dtype, width)

    @classmethod
    def from_dict(cls, d: object, where: str) -> ArraySpec:
        if not isinstance(d, dict):
            raise ActsparseError(f"{where} is not an object")

        def dims(key: str) -> tuple[int, ...]:
            v = d.get(key)
            if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                   and 1 <= x <= MAX_TOKENS for x in v)):
                raise ActsparseError(f"{where}: '{key}' is not three positive integers")
            return tuple(v)

        logical = d.get("logical_dtype")
        if logical not in STORED_DTYPES or d.get("numpy_dtype") != NUMPY_DTYPES[logical]:
            raise ActsparseError(f"{where}: dtypes {logical!r} / {d.get('numpy_dtype')!r} are not a stored dtype pair")
        return cls(dims("shape"), dims("chunks"), dims("shards"), d["numpy_dtype"], logical,
                   _bounded(d, "width", 1, MAX_WIDTH, where))

    def to_dict(self) -> dict:
        return dict(shape=list(self.shape), chunks=list(self.chunks), shards=list(self.shards),
                    numpy_dtype=self.numpy_dtype, logical_dtype=self.logical_dtype, width=self.width)


@dataclass(frozen=True)
class Manifest:
    """A run's ``manifest.json``: provenance, layout and status (``incomplete`` until its last byte is written).

    :meth:`from_dict` validates everything a reader relies on before anything is used: ids, status, every
    size against sane bounds (``MAX_*``) and against the other records (array shapes against the layer and
    token counts, widths against the FFN, chunk layout against ``chunk_tokens``). :meth:`to_dict` gives back
    the JSON object, key for key.
    """

    run_id: str
    status: str
    created: str
    config: dict
    model: ModelInfo
    corpus: CorpusInfo
    arrays: dict[str, ArraySpec]
    n_tokens: int
    n_sequences: int
    chunk_tokens: int
    identity: dict = field(default_factory=dict)
    tokenization: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    completed: str | None = None
    stats: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def sites(self) -> tuple[str, ...]:
        """The stored sites, in the order they were stored."""
        return tuple(self.arrays)

    @property
    def ffn(self) -> FFNInfo:
        return self.model.ffn

    @property
    def n_layers(self) -> int:
        return self.model.ffn.n_layers

    @property
    def n_parts(self) -> int:
        """Shards (and token parts) of the run."""
        return n_parts(self.n_tokens, self.chunk_tokens)

    @property
    def weights_id(self) -> str:
        return self.model.weights_id

    @property
    def split(self) -> str:
        return str(self.config.get("split", "collect"))

    @property
    def seq_len(self) -> int | None:
        v = self.config.get("seq_len")
        return v if isinstance(v, int) else None

    @property
    def stored_dtype(self) -> str:
        return str(self.config.get("dtype", "bfloat16"))

    @property
    def compute_dtype(self) -> str:
        return str(self.config.get("compute_dtype", "float32"))

    @property
    def kind(self) -> str:
        """``text`` (teacher-forced windows), ``generation`` or ``diffusion`` (``config.decoding.kind``)."""
        decoding = self.config.get("decoding")
        return decoding["kind"] if isinstance(decoding, dict) else "text"

    @property
    def token_columns(self) -> Columns:
        """The columns of this run's token parts."""
        return token_columns(self.kind)

    @property
    def model_spec(self) -> str:
        """The model as the user named it when collecting (alias, path or HF id)."""
        return str(self.config.get("model", self.model.spec))

    @classmethod
    def from_dict(cls, d: object, where: str) -> Manifest:
        """Validate a parsed ``manifest.json``.

        Raises:
            ActsparseError: one line naming the first field that is missing, of the wrong type, out of
                bounds or inconsistent with the others.
        """
        if not isinstance(d, dict):
            raise ActsparseError(f"{where}: manifest is not a JSON object")
        version = check_store_marker(d, where)
        run_id = d.get("run_id")
        if not isinstance(run_id, str) or not ID_RE.match(run_id):
            raise ActsparseError(f"{where}: manifest run_id {run_id!r} is not a valid run id")
        status = d.get("status")
        if status not in STATUSES:
            raise ActsparseError(f"{where}: manifest status {status!r} is not one of {', '.join(STATUSES)}")
        for key in ("config", "arrays"):
            _need(d, key, dict, where)
        decoding = d["config"].get("decoding")
        if decoding is not None and not (isinstance(decoding, dict) and decoding.get("kind") in RUN_KINDS[1:]):
            raise ActsparseError(f"{where}: manifest field 'config.decoding' is not a generation or diffusion setting")
        model, corpus = ModelInfo.from_dict(d.get("model"), where), CorpusInfo.from_dict(d.get("corpus"), where)
        n_tokens = _bounded(d, "n_tokens", 1, MAX_TOKENS, where)
        chunk_tokens = _bounded(d, "chunk_tokens", 1, MAX_CHUNK_TOKENS, where)
        n_sequences = d.get("n_sequences", 1)
        if not isinstance(n_sequences, int) or isinstance(n_sequences, bool) or not 1 <= n_sequences <= n_tokens:
            raise ActsparseError(f"{where}: manifest field 'n_sequences' is {n_sequences!r}, not in [1, n_tokens]")
        if not d["arrays"]:
            raise ActsparseError(f"{where}: manifest lists no arrays")
        arrays = {}
        for site, spec in d["arrays"].items():
            if site not in SITES:
                raise ActsparseError(f"{where}: manifest names unknown site {site!r}")
            a = ArraySpec.from_dict(spec, f"{where}: array {site}")
            want = ArraySpec.for_site(model.ffn.n_layers, n_tokens, chunk_tokens, model.ffn.width(site),
                                      a.logical_dtype)
            if a != want:
                raise ActsparseError(f"{where}: array {site} has shape {list(a.shape)}, chunks {list(a.chunks)}, "
                                     f"shards {list(a.shards)}; the manifest's layers, tokens and widths give "
                                     f"{list(want.shape)}, {list(want.chunks)}, {list(want.shards)}")
            arrays[site] = a
        dicts = {k: d[k] if isinstance(d.get(k), dict) else {} for k in ("identity", "tokenization", "versions",
                                                                            "stats")}
        return cls(run_id=run_id, status=status, created=str(d.get("created", "")), config=d["config"], model=model,
                   corpus=corpus, arrays=arrays, n_tokens=n_tokens, n_sequences=n_sequences, chunk_tokens=chunk_tokens,
                   completed=_opt_str(d, "completed"), format_version=version, **dicts)

    @classmethod
    def from_json(cls, raw: bytes | str, where: str) -> Manifest:
        """Parse and validate ``manifest.json`` bytes.

        Raises:
            ActsparseError: not JSON, or invalid as :meth:`from_dict` says.
        """
        try:
            d = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise ActsparseError(f"{where}: manifest is not valid JSON ({str(e).splitlines()[0][:120]})") from None
        return cls.from_dict(d, where)

    def to_dict(self) -> dict:
        """The JSON object of ``manifest.json`` (``completed`` and ``stats`` only once they exist)."""
        model = dataclasses.asdict(self.model)
        d = dict(format=RUN_FORMAT, format_version=self.format_version, run_id=self.run_id, status=self.status,
                 created=self.created, config=self.config, identity=self.identity, model=model,
                 corpus=dataclasses.asdict(self.corpus), tokenization=self.tokenization,
                 arrays={s: a.to_dict() for s, a in self.arrays.items()}, n_tokens=self.n_tokens,
                 n_sequences=self.n_sequences, chunk_tokens=self.chunk_tokens, versions=self.versions)
        if self.completed is not None:
            d["completed"] = self.completed
        if self.stats:
            d["stats"] = self.stats
        return d

    def catalogue_row(self) -> dict:
        """The run's row of ``catalogue.parquet`` (and of the SQL view ``runs``): CATALOGUE_COLUMNS."""
        ffn = self.model.ffn
        return dict(
            run_id=self.run_id, model=self.model_spec, model_name=self.model.name, architecture=self.model.architecture,
            weights_sha256=self.model.weights_sha256, corpus=self.corpus.spec, corpus_sha256=self.corpus.sha256,
            split=self.split, sites=list(self.config.get("sites") or self.sites), n_layers=ffn.n_layers,
            d_model=ffn.d_model, d_ff=ffn.d_ff, activation=ffn.activation, n_tokens=self.n_tokens,
            n_sequences=self.n_sequences, seq_len=self.seq_len, stored_dtype=self.stored_dtype,
            compute_dtype=self.compute_dtype, created=self.created, completed=self.completed,
            bytes=self.stats.get("bytes_on_disk"),
        )
