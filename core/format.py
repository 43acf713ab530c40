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
    runs/<run_id>/activations.zarr/<group>/<name>   mixture-of-experts arrays (MOE_GROUPS; :class:`MoELayout`)
    runs/<run_id>/shards/part-KKKKKK.json     digests of shard K's files (crc32c), checked when a run resumes
    runs/<run_id>/tokens/part-KKKKKK.parquet  TOKENS_COLUMNS of shard K; written last, it marks shard K complete
    runs/<run_id>/token_stats/site=<site>/part-KKKKKK.parquet   TOKEN_STATS_COLUMNS of shard K
    runs/<run_id>/analysis/<prefix>-<id>.parquet                 results (RESULT_KINDS)
    runs/<run_id>/analysis/evaluate-<eval_id>/                   an evaluation's per-value parts
    runs/<run_id>/analysis/tasks-<eval_id>/                      a task evaluation's per-run parts
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
# Mixture-of-experts runs: the arrays of routed experts, the shared expert and the dense layers of mixed
# models are zarr groups inside activations.zarr (docs/store-format.md "Mixture-of-experts runs").
ROUTED, SHARED, DENSE = "routed", "shared", "dense"
MOE_GROUPS = (ROUTED, SHARED, DENSE)
EXPERT_SITES = ("gate", "act", "up", "intermediate")  # the sites stored per routed slot / shared expert / dense layer
EXPERT_ID, ROUTING_WEIGHT = "expert_id", "weight"
TOKENS = "tokens"
TOKEN_STATS = "token_stats"
SHARDS = "shards"  # runs/<id>/shards/part-K.json: the digests of shard K's files, written before its token part
ANALYSIS = "analysis"
LOCK = ".lock"  # one writer per run (runs/<id>/.lock) and per weights dir (models/<id>/.lock)
CHECKSUMS_LOCK = ".checksums.lock"
CATALOGUE_LOCK = ".catalogue.lock"
LOCKS = frozenset({LOCK, CHECKSUMS_LOCK, CATALOGUE_LOCK})
STAGING_PREFIXES = (".incoming-", ".unpack-")  # temporary directories of merge and unpack at a store's root
PROBE_PREFIX = ".visible-"  # a file at a store's root for a moment: do a cluster's workers see the store?
DERIVED_DIRS = (f"{ANALYSIS}/", f"{TOKEN_STATS}/")  # run files added after collection, recorded as written
UNLISTED = frozenset({CHECKSUMS, MANIFEST})  # files of a run or weights dir that checksums.json never lists

# ---------------------------------------------------------------- ids

ID_RE = re.compile(r"^[0-9a-f]{16}$")  # run, weights, analysis and evaluation ids
RUN_ID_RE = WEIGHTS_ID_RE = ID_RE


def visibility_probe(token: str) -> str:
    """Store-relative name of the probe file holding ``token`` (32 hex digits), written by ``--executor ray`` to
    check that every worker sees the store.

    Raises:
        ActsparseError: ``token`` is not 32 hex digits.
    """
    if not re.fullmatch(r"[0-9a-f]{32}", str(token)):
        raise ActsparseError(f"invalid probe token {token!r}")
    return PROBE_PREFIX + token


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


def shard_record(k: int) -> str:
    """Run-relative path of shard ``k``'s digests (``SHARD_RECORD_FORMAT``): written, flushed to disk with the
    files it lists, just before the shard's token part; what a resumed collection checks the shard against."""
    return f"{SHARDS}/part-{k:06d}.json"


def site_shard(site: str, k: int, ndim: int = 3) -> str:
    """Run-relative path of shard ``k``'s file of an activation array of ``ndim`` dimensions (zarr v3 key
    ``c/0/k/0``; a mixture-of-experts slot array ``[layers, tokens, k, width]``: ``c/0/k/0/0``)."""
    return f"{ACTIVATIONS}/{site}/c/0/{k}" + "/0" * (ndim - 2)


# {"format": SHARD_RECORD_FORMAT, "format_version": 1, "shard": k, "algorithm": "crc32c",
#  "files": {run-relative path: {"crc32c": 8 hex digits, "size": bytes}}}
SHARD_RECORD_FORMAT = "actsparse-shard"


def site_array(site: str) -> str:
    """Run-relative path of a site's zarr array (``site`` may be a mixture-of-experts array name, e.g.
    ``routed/gate``: :func:`moe_array`)."""
    return f"{ACTIVATIONS}/{site}"


def moe_array(group: str, name: str) -> str:
    """The name of a mixture-of-experts array inside ``activations.zarr``: ``<group>/<name>`` (``routed/gate``,
    ``routed/expert_id``, ``shared/weight``, ``dense/intermediate``)."""
    if group not in MOE_GROUPS:
        raise ActsparseError(f"unknown mixture-of-experts array group {group!r} (choose {', '.join(MOE_GROUPS)})")
    return f"{group}/{name}"


def dimension_names(name: str) -> tuple[str, ...]:
    """The zarr dimension names of an array of ``activations.zarr``: ``(layer, token, feature)`` for a site,
    ``(layer, token, slot)`` for ``routed/expert_id`` and ``routed/weight``, ``(layer, token, slot, feature)``
    for the other routed arrays, ``(layer, token, scalar)`` for ``shared/weight``."""
    group, _, leaf = name.rpartition("/")
    if group == ROUTED:
        return ("layer", "token", "slot") if leaf in (EXPERT_ID, ROUTING_WEIGHT) else ("layer", "token", "slot",
                                                                                        "feature")
    if group == SHARED and leaf == ROUTING_WEIGHT:
        return ("layer", "token", "scalar")
    return ("layer", "token", "feature")


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


def task_parts(eval_id: str) -> str:
    """Directory (relative to the result base) of a task evaluation's per-run parts and its ``config.json``."""
    return f"tasks-{check_id(eval_id, 'task evaluation')}"


def task_part(task: str, value: float | None) -> str:
    """File name of one lm-eval task run inside :func:`task_parts`: ``dense-<t>.parquet`` for the dense
    reference, ``value-<v>-<t>.parquet`` for grid value v, where ``<t>`` is ``content_hash(task)`` (task names
    are user text, never a path component)."""
    t = content_hash(str(task))
    return f"dense-{t}.parquet" if value is None else f"value-{float(value)!r}-{t}.parquet"


EVALUATION_CONFIG = "config.json"
# The per-window sums of one grid value (value_part): what an evaluation resumes from.
EVALUATION_VALUE_COLUMNS = (
    ("value", "DOUBLE"), ("window", "BIGINT"), ("n_pred", "BIGINT"), ("n_valid", "BIGINT"), ("nll_sparse", "DOUBLE"),
    ("nll_dense", "DOUBLE"), ("correct_sparse", "BIGINT"), ("correct_dense", "BIGINT"), ("kl", "DOUBLE"),
    ("hook_sparse", "BIGINT[]"), ("hook_rows", "BIGINT[]"),
)

# The per-example rows of one lm-eval task run (task_part): what a task evaluation resumes from. value is
# null for the dense reference; the run-level columns (metric .. generated_tokens) repeat on every row.
TASK_PART_COLUMNS = (
    ("task", "VARCHAR"), ("value", "DOUBLE"), ("doc_id", "BIGINT"), ("score", "DOUBLE"), ("response", "VARCHAR"),
    ("metric", "VARCHAR"), ("aggregate", "DOUBLE"), ("n_shot", "BIGINT"), ("seconds", "DOUBLE"),
    ("fingerprint", "VARCHAR"), ("zeroed_prefill", "BIGINT[]"), ("positions_prefill", "BIGINT"),
    ("zeroed_generation", "BIGINT[]"), ("positions_generation", "BIGINT"), ("generated_tokens", "BIGINT"),
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
    task_run = rf"(dense|value-[0-9.e+-]+)-{hexid}\.parquet"
    run, model = rf"{RUNS}/{rid}", rf"{MODELS}/{hexid}"
    groups = f"({'|'.join(MOE_GROUPS)})"
    kinds: list[tuple[str, str, Columns | None]] = [
        (re.escape(STORE_FILE), "store marker", None),
        (re.escape(CATALOGUE), "catalogue", CATALOGUE_COLUMNS),
        (rf"{run}/{re.escape(MANIFEST)}", "run manifest", None),
        (rf"{run}/{re.escape(CHECKSUMS)}", "run checksums", None),
        (rf"{run}/{re.escape(DOCUMENTS)}", "documents", DOCUMENTS_COLUMNS),
        (rf"{run}/{re.escape(ACTIVATIONS)}/{re.escape(ZARR_META)}", "activations group", None),
        (rf"{run}/{re.escape(ACTIVATIONS)}/{groups}/{re.escape(ZARR_META)}", "expert array group", None),
        (rf"{run}/{re.escape(ACTIVATIONS)}/{groups}/[a-z_]+/{re.escape(ZARR_META)}", "expert array metadata", None),
        (rf"{run}/{re.escape(ACTIVATIONS)}/{groups}/[a-z_]+/c/0/\d+/0(/0)?", "expert array shard", None),
        (rf"{run}/{re.escape(ACTIVATIONS)}/[a-z]+/{re.escape(ZARR_META)}", "site array metadata", None),
        (rf"{run}/{re.escape(ACTIVATIONS)}/[a-z]+/c/0/\d+/0", "site array shard", None),
        (rf"{run}/{TOKENS}/{part}", "token part", ALL_TOKEN_COLUMNS),
        (rf"{run}/{SHARDS}/part-\d{{6}}\.json", "shard digests", None),
        (rf"{run}/{TOKEN_STATS}/site=[a-z]+/{part}", "token statistics part", TOKEN_STATS_COLUMNS),
        (rf"{run}/{ANALYSIS}/evaluate-{hexid}/{re.escape(EVALUATION_CONFIG)}", "evaluation config", None),
        (rf"{run}/{ANALYSIS}/evaluate-{hexid}/value-[0-9.e+-]+\.parquet", "evaluation value part",
         EVALUATION_VALUE_COLUMNS),
        (rf"{EVALUATIONS}/evaluate-{hexid}/{re.escape(EVALUATION_CONFIG)}", "evaluation config", None),
        (rf"{EVALUATIONS}/evaluate-{hexid}/value-[0-9.e+-]+\.parquet", "evaluation value part",
         EVALUATION_VALUE_COLUMNS),
        (rf"{run}/{ANALYSIS}/tasks-{hexid}/{re.escape(EVALUATION_CONFIG)}", "task evaluation config", None),
        (rf"{run}/{ANALYSIS}/tasks-{hexid}/{task_run}", "task run part", TASK_PART_COLUMNS),
        (rf"{EVALUATIONS}/tasks-{hexid}/{re.escape(EVALUATION_CONFIG)}", "task evaluation config", None),
        (rf"{EVALUATIONS}/tasks-{hexid}/{task_run}", "task run part", TASK_PART_COLUMNS),
        (rf"{model}/{re.escape(CHECKSUMS)}", "weights checksums", None),
        (rf"{model}/{re.escape(WEIGHTS)}/{re.escape(ZARR_META)}", "weights group", None),
        (rf"{model}/{re.escape(WEIGHTS)}/[a-z_]+/{re.escape(ZARR_META)}", "weights array metadata", None),
        (rf"{model}/{re.escape(WEIGHTS)}/[a-z_]+/c/\d+/\d+/\d+(/\d+)?", "weights chunk", None),
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


# Expert ids of mixture-of-experts runs (routed/expert_id) and routing weights (routed/weight, shared/weight):
# ids as int16 (MAX_EXPERTS fits), weights always float32 (a few values per token; the offline block output
# is a weighted sum, so they are kept exact).
INDEX_DTYPE = "int16"
WEIGHT_DTYPE = "float32"


def numpy_dtype(dtype: str) -> str:
    """The numpy dtype a logical stored dtype is written as (bfloat16 as its ``uint16`` bit patterns;
    ``int16`` expert ids as themselves)."""
    return INDEX_DTYPE if dtype == INDEX_DTYPE else NUMPY_DTYPES[dtype]


# ---------------------------------------------------------------- tables

# Per-token statistics (token_stats): the top-p values and absolute thresholds they are taken at.
TOPP_VALUES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
THRESHOLDS = (1e-3, 1e-2, 1e-1)
TOPP_COLUMNS = tuple(f"sparsity_p{round(p * 100)}" for p in TOPP_VALUES)
THRESHOLD_COLUMNS = ("frac_below_1e_3", "frac_below_1e_2", "frac_below_1e_1")
STAT_COLUMNS = ("l1", "l2", "max_abs", "top1_share", *THRESHOLD_COLUMNS, *TOPP_COLUMNS)
STATS_ROW_GROUP = 128 * 1024  # DuckDB parallelises a scan by row group: ~8 MB per group

# Columns as (name, DuckDB type); the Arrow types follow from ARROW_TYPES (``T[]``: a list of T).
Columns = tuple[tuple[str, str], ...]
CATALOGUE_COLUMNS: Columns = (
    ("run_id", "VARCHAR"), ("model", "VARCHAR"), ("model_name", "VARCHAR"), ("architecture", "VARCHAR"),
    ("weights_sha256", "VARCHAR"), ("corpus", "VARCHAR"), ("corpus_sha256", "VARCHAR"), ("split", "VARCHAR"),
    ("sites", "VARCHAR[]"), ("n_layers", "INTEGER"), ("d_model", "INTEGER"), ("d_ff", "INTEGER"),
    ("activation", "VARCHAR"), ("n_tokens", "BIGINT"), ("n_sequences", "BIGINT"), ("seq_len", "INTEGER"),
    ("stored_dtype", "VARCHAR"), ("compute_dtype", "VARCHAR"), ("created", "VARCHAR"), ("completed", "VARCHAR"),
    ("bytes", "BIGINT"), ("n_params", "BIGINT"), ("model_type", "VARCHAR"), ("n_experts", "INTEGER"),
    ("top_k", "INTEGER"),
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
               "DOUBLE": "float64", "BOOLEAN": "bool_"}


def arrow_schema(columns: Columns):
    """The pyarrow schema of a table given as ``(name, DuckDB type)`` columns."""
    import pyarrow as pa

    def typ(t: str):
        return pa.list_(typ(t[:-2])) if t.endswith("[]") else getattr(pa, ARROW_TYPES[t])()

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
# Per-expert rows of mixture-of-experts runs: one per (layer, unit, expert) and rule value; unit is ``expert``
# (a routed expert), ``shared`` (the shared expert) or ``dense`` (a dense layer of a mixed model), expert -1
# for the last two.
_EXPERT_KEY: Columns = (("layer", "BIGINT"), ("unit", "VARCHAR"), ("expert", "BIGINT"))
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
    ResultKind("effective_rank", "erank", (
        ("run_id", "VARCHAR"), ("site", "VARCHAR"), ("layer", "BIGINT"), ("depth", "DOUBLE"), ("n_tokens", "BIGINT"),
        ("width", "BIGINT"), ("max_rank", "BIGINT"), ("erank", "DOUBLE"), ("erank_norm", "DOUBLE"),
        ("include_special", "BOOLEAN"), ("label", "VARCHAR"), ("analysis_id", "VARCHAR")), "actsparse rank"),
    ResultKind("batch_union", "batch_union", (
        ("run_id", "VARCHAR"), ("site", "VARCHAR"), ("rule", "VARCHAR"), ("value", "DOUBLE"), ("layer", "BIGINT"),
        ("batching", "VARCHAR"), ("batch_size", "BIGINT"), ("n_batches", "BIGINT"), ("width", "BIGINT"),
        ("token_sparsity", "DOUBLE"), ("union_sparsity", "DOUBLE"), ("analysis_id", "VARCHAR")),
        "actsparse deployment"),
    ResultKind("nm_sparsity", "nm", (
        ("run_id", "VARCHAR"), ("site", "VARCHAR"), ("layer", "BIGINT"), ("pattern", "VARCHAR"), ("n", "BIGINT"),
        ("m", "BIGINT"), ("n_tokens", "BIGINT"), ("sparsity", "DOUBLE"), ("rel_err_nm", "DOUBLE"),
        ("rel_err_unstructured", "DOUBLE"), ("out_err_nm", "DOUBLE"), ("out_err_unstructured", "DOUBLE"),
        ("analysis_id", "VARCHAR")), "actsparse deployment"),
    ResultKind("neurons", "neurons", (
        ("run_id", "VARCHAR"), ("site", "VARCHAR"), ("rule", "VARCHAR"), ("value", "DOUBLE"), ("layer", "BIGINT"),
        ("neuron", "BIGINT"), ("n_tokens", "BIGINT"), ("keep_rate", "DOUBLE"), ("mean_abs", "DOUBLE"),
        ("analysis_id", "VARCHAR")), "actsparse deployment"),
    ResultKind("expert_curves", "expert_curves", (
        ("run_id", "VARCHAR"), ("target", "VARCHAR"), ("rule", "VARCHAR"), ("value", "DOUBLE"), *_EXPERT_KEY,
        ("width", "BIGINT"), ("rows", "BIGINT"), ("load", "DOUBLE"), ("weight_mean", "DOUBLE"),
        ("sparsity", "DOUBLE"), ("rel_err_mean", "DOUBLE"), ("analysis_id", "VARCHAR"), ("label", "VARCHAR")),
        "actsparse curves"),
    ResultKind("evaluation_experts", "evaluate_experts", (
        *_EVAL_META, ("value", "DOUBLE"), *_EXPERT_KEY, ("hook", "VARCHAR"), ("width", "BIGINT"),
        ("n_positions", "BIGINT"), ("rows", "BIGINT"), ("load", "DOUBLE"), ("sparsity", "DOUBLE")),
        "actsparse evaluate", store_level=True),
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
# lm-eval task evaluations (actsparse.analyze.tasks): the same leading columns, then the task's.
_TASK_META: Columns = (
    ("run_id", "VARCHAR"), ("eval_id", "VARCHAR"), ("model", "VARCHAR"), ("target", "VARCHAR"), ("rule", "VARCHAR"),
    ("power", "DOUBLE"), ("count_mode", "VARCHAR"),
)
RESULT_KINDS.update({k.name: k for k in (
    ResultKind("task_evaluations", "tasks", (
        *_TASK_META, ("task", "VARCHAR"), ("metric", "VARCHAR"), ("value", "DOUBLE"), ("n_examples", "BIGINT"),
        ("n_shot", "BIGINT"), ("acc", "DOUBLE"), ("dense_acc", "DOUBLE"), ("acc_ratio", "DOUBLE"),
        ("acc_ratio_lo", "DOUBLE"), ("acc_ratio_hi", "DOUBLE"), ("sparsity", "DOUBLE"), ("sparsity_prefill", "DOUBLE"),
        ("sparsity_generation", "DOUBLE"), ("positions_prefill", "BIGINT"), ("positions_generation", "BIGINT"),
        ("generated_tokens", "BIGINT"), ("seconds", "DOUBLE"), ("label", "VARCHAR")),
        "actsparse evaluate --tasks", store_level=True),
    ResultKind("task_examples", "tasks_examples", (
        *_TASK_META, ("task", "VARCHAR"), ("metric", "VARCHAR"), ("value", "DOUBLE"), ("doc_id", "BIGINT"),
        ("score", "DOUBLE"), ("dense_score", "DOUBLE")), "actsparse evaluate --tasks", store_level=True),
    ResultKind("task_critical", "tasks_critical", (
        *_TASK_META, ("task", "VARCHAR"), ("metric", "VARCHAR"), ("phase", "VARCHAR"), ("threshold", "DOUBLE"),
        ("critical_sparsity_grid", "DOUBLE"), ("critical_value_grid", "DOUBLE"), ("critical_sparsity_interp", "DOUBLE"),
        ("critical_lo", "DOUBLE"), ("critical_hi", "DOUBLE"), ("boot_undefined", "DOUBLE"), ("dense_acc", "DOUBLE"),
        ("n_values", "BIGINT"), ("n_examples", "BIGINT"), ("n_boot", "BIGINT"), ("label", "VARCHAR")),
        "actsparse evaluate --tasks", store_level=True),
)})
CURVES, CRITICAL = RESULT_KINDS["curves"], RESULT_KINDS["critical_sparsity"]
EVALUATION, EVALUATION_LAYERS = RESULT_KINDS["evaluations"], RESULT_KINDS["evaluation_layers"]
EVALUATION_CRITICAL = RESULT_KINDS["evaluation_critical"]
EFFECTIVE_RANK = RESULT_KINDS["effective_rank"]
BATCH_UNION, NM_SPARSITY, NEURONS = RESULT_KINDS["batch_union"], RESULT_KINDS["nm_sparsity"], RESULT_KINDS["neurons"]
EXPERT_CURVES, EVALUATION_EXPERTS = RESULT_KINDS["expert_curves"], RESULT_KINDS["evaluation_experts"]
TASK_EVALUATION, TASK_EXAMPLES = RESULT_KINDS["task_evaluations"], RESULT_KINDS["task_examples"]
TASK_CRITICAL = RESULT_KINDS["task_critical"]
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
MAX_SHARDS = 1 << 20  # ceil(n_tokens / chunk_tokens): the shards (and token parts) a run may have
MAX_LAYERS = 1 << 12
MAX_WIDTH = 1 << 20
MAX_EXPERTS = 1 << 12
MAX_BYTES = 1 << 62  # a file size or byte count
# Files read whole into memory are refused beyond these sizes before they are parsed.
MAX_METADATA_BYTES = 1 << 24  # actsparse-store.json, manifest.json, a shard's digests, an evaluation's config
MAX_CHECKSUMS_BYTES = 1 << 31  # checksums.json and archive.json (up to actsparse.core.checksums.MAX_ENTRIES)
MAX_CATALOGUE_BYTES = 1 << 30
MAX_PART_BYTES = 1 << 31  # one token part


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


def _int_or_none(v: object, lo: int, hi: int) -> int | None:
    """``v`` if it is an integer in ``[lo, hi]`` (an optional record: anything else reads as absent)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi else None


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
    n_params: int | None = None

    @classmethod
    def from_dict(cls, d: object, where: str) -> ModelInfo:
        if not isinstance(d, dict):
            raise ActsparseError(f"{where}: manifest field 'model' is not an object")
        w = f"{where} (model)"
        wid = d.get("weights_id")
        if not isinstance(wid, str) or not ID_RE.match(wid):
            raise ActsparseError(f"{where}: manifest weights_id {wid!r} is not a valid id")
        ints = {k: _int_or_none(d.get(k), 1, MAX_TOKENS) for k in ("max_position_embeddings", "vocab_size", "n_params")}
        return cls(spec=_need(d, "spec", str, w), name=_need(d, "name", str, w),
                   weights_sha256=_need(d, "weights_sha256", str, w), weights_id=wid,
                   ffn=FFNInfo.from_dict(d.get("ffn"), where), source=_opt_str(d, "source"),
                   license=_opt_str(d, "license"), architecture=_opt_str(d, "architecture"),
                   model_type=_opt_str(d, "model_type"),
                   tokenizer=d["tokenizer"] if isinstance(d.get("tokenizer"), dict) else {}, **ints)


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
                   n_documents=_int_or_none(n, 0, MAX_TOKENS))


@dataclass(frozen=True)
class ArraySpec:
    """One stored array: ``shape [layers, tokens, *inner]``, chunks ``[1, T, *inner]``, shards
    ``[layers, T, *inner]``, the numpy dtype written and the logical dtype it holds; ``width`` is the last
    dimension. Sites are ``[layers, tokens, width]``; mixture-of-experts arrays may have one more dimension
    (the routed slot: ``[moe layers, tokens, k, d_moe]``)."""

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
        return cls.for_array(n_layers, n_tokens, chunk_tokens, (width,), dtype)

    @classmethod
    def for_array(cls, n_layers: int, n_tokens: int, chunk_tokens: int, inner: tuple[int, ...],
                  dtype: str) -> ArraySpec:
        """The same layout for an array ``[layers, tokens, *inner]`` (``inner`` whole in every chunk)."""
        t = min(chunk_tokens, max(n_tokens, 1))
        inner = tuple(inner)
        return cls((n_layers, n_tokens, *inner), (1, t, *inner), (n_layers, t, *inner), numpy_dtype(dtype), dtype,
                   inner[-1])

    @property
    def inner(self) -> tuple[int, ...]:
        """The dimensions after the token axis (``(width,)`` for a site)."""
        return self.shape[2:]

    @classmethod
    def from_dict(cls, d: object, where: str, *, ndims: tuple[int, ...] = (3,),
                  dtypes: tuple[str, ...] = STORED_DTYPES) -> ArraySpec:
        """Validate an array record of the manifest: ``ndims`` dimensions, a logical dtype of ``dtypes``.

        Raises:
            ActsparseError: naming the first field that does not fit.
        """
        if not isinstance(d, dict):
            raise ActsparseError(f"{where} is not an object")

        def dims(key: str) -> tuple[int, ...]:
            v = d.get(key)
            if not (isinstance(v, list) and len(v) in ndims and all(isinstance(x, int) and not isinstance(x, bool)
                                                                      and 1 <= x <= MAX_TOKENS for x in v)):
                count = " or ".join(str(n) for n in ndims)
                raise ActsparseError(f"{where}: '{key}' is not {_NUMBERS.get(count, count)} positive integers")
            return tuple(v)

        logical = d.get("logical_dtype")
        if logical not in dtypes or d.get("numpy_dtype") != numpy_dtype(logical):
            raise ActsparseError(f"{where}: dtypes {logical!r} / {d.get('numpy_dtype')!r} are not a stored dtype pair")
        return cls(dims("shape"), dims("chunks"), dims("shards"), d["numpy_dtype"], logical,
                   _bounded(d, "width", 1, MAX_WIDTH, where))

    def to_dict(self) -> dict:
        return dict(shape=list(self.shape), chunks=list(self.chunks), shards=list(self.shards),
                    numpy_dtype=self.numpy_dtype, logical_dtype=self.logical_dtype, width=self.width)


_NUMBERS = {"3": "three", "3 or 4": "three or four"}


@dataclass(frozen=True)
class MoELayout:
    """The mixture-of-experts layout of a run's model (``pipeline.moe.MoEArchitecture.describe``), manifest
    field ``moe``: which decoder layers hold a MoE block (``moe_layers``) and which a dense FFN
    (``dense_layers``, mixed models), the experts (``n_experts``, routed ``top_k`` per token, width
    ``d_moe``), the shared expert (``d_shared``, scaled by ``shared_gate``: ``sigmoid``; None without one),
    the dense layers' width ``d_ff_dense`` and whether the router renormalises its top-k weights.

    Array ``i`` of a ``routed``/``shared`` group is decoder layer ``moe_layers[i]``, of the ``dense`` group
    ``dense_layers[i]`` (:meth:`position`). :meth:`array_specs` gives the arrays a run of this layout holds;
    :meth:`differences` is what an evaluation refuses (e.g. a top-k changed since collection).
    """

    model_class: str
    block_class: str
    experts_class: str
    activation: str
    n_layers: int
    moe_layers: tuple[int, ...]
    dense_layers: tuple[int, ...]
    n_experts: int
    top_k: int
    d_model: int
    d_moe: int
    d_shared: int | None = None
    shared_gate: str | None = None
    d_ff_dense: int | None = None
    renormalized: bool = False
    layers_path: str = ""
    block_name: str = ""

    # Fields whose change makes stored tensors and a model incompatible (the names and paths may differ).
    COMPARED = ("block_class", "activation", "n_layers", "moe_layers", "dense_layers", "n_experts", "top_k",
                "d_model", "d_moe", "d_shared", "shared_gate", "d_ff_dense", "renormalized")

    def position(self, layer: int) -> tuple[str, int]:
        """``(group, index)`` of decoder layer ``layer`` in the arrays: ``(ROUTED, i)`` for a MoE layer (its
        routed and shared arrays), ``(DENSE, j)`` for a dense one.

        Raises:
            ActsparseError: not a decoder layer of the layout.
        """
        if layer in self.moe_layers:
            return ROUTED, self.moe_layers.index(layer)
        if layer in self.dense_layers:
            return DENSE, self.dense_layers.index(layer)
        raise ActsparseError(f"layer {layer} out of range: the model has {self.n_layers} decoder layers")

    def array_specs(self, sites, n_tokens: int, chunk_tokens: int, dtype: str) -> dict[str, ArraySpec]:
        """The mixture-of-experts arrays of a run storing ``sites`` (EXPERT_SITES among them), by name
        (:func:`moe_array`): ``routed/expert_id`` int16 and ``routed/weight`` float32 ``[moe layers, tokens, k]``
        always; ``routed/<site>`` ``[moe layers, tokens, k, d_moe]``; with a shared expert ``shared/<site>``
        ``[moe layers, tokens, d_shared]`` and ``shared/weight`` float32 ``[moe layers, tokens, 1]``; with dense
        layers ``dense/<site>`` ``[dense layers, tokens, d_ff_dense]``. ``input`` and ``output`` are ordinary
        sites over every decoder layer (``Manifest.arrays``)."""
        n_moe, k = len(self.moe_layers), self.top_k

        def spec(n: int, inner: tuple[int, ...], dt: str) -> ArraySpec:
            return ArraySpec.for_array(n, n_tokens, chunk_tokens, inner, dt)

        specs = {moe_array(ROUTED, EXPERT_ID): spec(n_moe, (k,), INDEX_DTYPE),
                 moe_array(ROUTED, ROUTING_WEIGHT): spec(n_moe, (k,), WEIGHT_DTYPE)}
        sites = [s for s in EXPERT_SITES if s in sites]
        specs |= {moe_array(ROUTED, s): spec(n_moe, (k, self.d_moe), dtype) for s in sites}
        if self.d_shared is not None:
            specs |= {moe_array(SHARED, s): spec(n_moe, (self.d_shared,), dtype) for s in sites}
            specs[moe_array(SHARED, ROUTING_WEIGHT)] = spec(n_moe, (1,), WEIGHT_DTYPE)
        if self.dense_layers:
            specs |= {moe_array(DENSE, s): spec(len(self.dense_layers), (self.d_ff_dense,), dtype) for s in sites}
        return specs

    def differences(self, other: MoELayout) -> list[str]:
        """``field: stored X, model Y`` for every :data:`COMPARED` field that differs (self: the stored one)."""
        return [f"{k}: stored {getattr(self, k)!r}, model {getattr(other, k)!r}" for k in self.COMPARED
                if getattr(self, k) != getattr(other, k)]

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"kind": "moe", **d, "moe_layers": list(self.moe_layers), "dense_layers": list(self.dense_layers)}

    @classmethod
    def from_dict(cls, d: object, where: str) -> MoELayout:
        """Validate a manifest's ``moe`` record (or a layout description).

        Raises:
            ActsparseError: a missing or mistyped field, a size beyond its bound, layer lists that are not a
                partition of the decoder layers, ``top_k`` above ``n_experts``, a shared-expert or dense width
                without its counterpart.
        """
        w = f"{where} (moe)"
        if not isinstance(d, dict) or d.get("kind") != "moe":
            raise ActsparseError(f"{where}: manifest field 'moe' is not a mixture-of-experts layout")
        n_layers = _bounded(d, "n_layers", 1, MAX_LAYERS, w)

        def layer_list(key: str) -> tuple[int, ...]:
            v = d.get(key)
            if not (isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
                raise ActsparseError(f"{w}: manifest field '{key}' is not a list of layer indices")
            return tuple(v)

        moe_layers, dense_layers = layer_list("moe_layers"), layer_list("dense_layers")
        if not moe_layers or sorted(moe_layers + dense_layers) != list(range(n_layers)) \
                or list(moe_layers) != sorted(moe_layers) or list(dense_layers) != sorted(dense_layers):
            raise ActsparseError(f"{w}: moe_layers {list(moe_layers)} and dense_layers {list(dense_layers)} are not "
                                 f"a partition of the {n_layers} decoder layers with at least one MoE layer")
        n_experts = _bounded(d, "n_experts", 1, MAX_EXPERTS, w)
        top_k = _bounded(d, "top_k", 1, n_experts, w)

        def opt_width(key: str) -> int | None:
            return None if d.get(key) is None else _bounded(d, key, 1, MAX_WIDTH, w)

        d_shared, d_ff_dense = opt_width("d_shared"), opt_width("d_ff_dense")
        shared_gate = _opt_str(d, "shared_gate")
        if (d_shared is None) != (shared_gate is None) or (d_ff_dense is None) != (not dense_layers):
            raise ActsparseError(f"{w}: d_shared {d_shared!r} / shared_gate {shared_gate!r} and d_ff_dense "
                                 f"{d_ff_dense!r} / dense_layers {list(dense_layers)} do not match")
        renormalized = d.get("renormalized")
        if not isinstance(renormalized, bool):
            raise ActsparseError(f"{w}: manifest field 'renormalized' is not a boolean")
        return cls(model_class=_need(d, "model_class", str, w), block_class=_need(d, "block_class", str, w),
                   experts_class=_need(d, "experts_class", str, w), activation=_need(d, "activation", str, w),
                   n_layers=n_layers, moe_layers=moe_layers, dense_layers=dense_layers, n_experts=n_experts,
                   top_k=top_k, d_model=_bounded(d, "d_model", 1, MAX_WIDTH, w),
                   d_moe=_bounded(d, "d_moe", 1, MAX_WIDTH, w), d_shared=d_shared, shared_gate=shared_gate,
                   d_ff_dense=d_ff_dense, renormalized=renormalized, layers_path=_opt_str(d, "layers_path") or "",
                   block_name=_opt_str(d, "block_name") or "")


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
    moe: MoELayout | None = None
    moe_arrays: dict[str, ArraySpec] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def sites(self) -> tuple[str, ...]:
        """The stored sites (``[layers, tokens, width]`` arrays over every decoder layer), in the order they
        were stored; a mixture-of-experts run lists ``input``/``output`` here and the rest in ``moe_arrays``."""
        return tuple(self.arrays)

    @property
    def array_names(self) -> tuple[str, ...]:
        """Every zarr array of ``activations.zarr``: the sites, then the mixture-of-experts arrays."""
        return (*self.arrays, *self.moe_arrays)

    def array_spec(self, name: str) -> ArraySpec:
        """The record of one array of :attr:`array_names`.

        Raises:
            ActsparseError: the run has no such array.
        """
        spec = self.arrays.get(name) or self.moe_arrays.get(name)
        if spec is None:
            raise ActsparseError(f"run {self.run_id} has no array '{name}' (stored: {', '.join(self.array_names)})")
        return spec

    @property
    def collected_sites(self) -> list[str]:
        """The stored sites in the order the collection config lists them (``sites`` is in manifest order)."""
        given = self.config.get("sites")
        if isinstance(given, list) and sorted(map(str, given)) == sorted(self.arrays):
            return [str(s) for s in given]
        return list(self.sites)

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
        return _int_or_none(self.config.get("seq_len"), 1, MAX_TOKENS)

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
        if n_parts(n_tokens, chunk_tokens) > MAX_SHARDS:
            raise ActsparseError(f"{where}: manifest's n_tokens {n_tokens} in chunks of {chunk_tokens} make "
                                 f"{n_parts(n_tokens, chunk_tokens)} shards, more than {MAX_SHARDS}")
        n_sequences = d.get("n_sequences", 1)
        if not isinstance(n_sequences, int) or isinstance(n_sequences, bool) or not 1 <= n_sequences <= n_tokens:
            raise ActsparseError(f"{where}: manifest field 'n_sequences' is {n_sequences!r}, not in [1, n_tokens]")
        if not d["arrays"] and not d.get("moe_arrays"):
            raise ActsparseError(f"{where}: manifest lists no arrays")
        moe = MoELayout.from_dict(d["moe"], where) if d.get("moe") is not None else None
        arrays = {}
        for site, spec in d["arrays"].items():
            if site not in SITES:
                raise ActsparseError(f"{where}: manifest names unknown site {site!r}")
            if moe is not None and site not in ("input", "output"):
                raise ActsparseError(f"{where}: a mixture-of-experts run lists site {site!r} among its arrays "
                                     "(its expert sites are moe_arrays)")
            a = ArraySpec.from_dict(spec, f"{where}: array {site}")
            want = ArraySpec.for_site(model.ffn.n_layers, n_tokens, chunk_tokens, model.ffn.width(site),
                                      a.logical_dtype)
            if a != want:
                raise ActsparseError(f"{where}: array {site} has shape {list(a.shape)}, chunks {list(a.chunks)}, "
                                     f"shards {list(a.shards)}; the manifest's layers, tokens and widths give "
                                     f"{list(want.shape)}, {list(want.chunks)}, {list(want.shards)}")
            arrays[site] = a
        moe_arrays = _moe_arrays(d, moe, model.ffn, n_tokens, chunk_tokens, where)
        dicts = {k: d[k] if isinstance(d.get(k), dict) else {} for k in ("identity", "tokenization", "versions",
                                                                            "stats")}
        return cls(run_id=run_id, status=status, created=str(d.get("created", "")), config=d["config"], model=model,
                   corpus=corpus, arrays=arrays, n_tokens=n_tokens, n_sequences=n_sequences, chunk_tokens=chunk_tokens,
                   completed=_opt_str(d, "completed"), format_version=version, moe=moe, moe_arrays=moe_arrays,
                   **dicts)

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
        if model.get("n_params") is None:
            model.pop("n_params", None)  # runs collected before the field existed keep their manifest bytes
        d = dict(format=RUN_FORMAT, format_version=self.format_version, run_id=self.run_id, status=self.status,
                 created=self.created, config=self.config, identity=self.identity, model=model,
                 corpus=dataclasses.asdict(self.corpus), tokenization=self.tokenization,
                 arrays={s: a.to_dict() for s, a in self.arrays.items()}, n_tokens=self.n_tokens,
                 n_sequences=self.n_sequences, chunk_tokens=self.chunk_tokens, versions=self.versions)
        if self.moe is not None:
            d["moe"] = self.moe.to_dict()
            d["moe_arrays"] = {name: a.to_dict() for name, a in self.moe_arrays.items()}
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
            split=self.split, sites=self.collected_sites, n_layers=ffn.n_layers,
            d_model=ffn.d_model, d_ff=ffn.d_ff, activation=ffn.activation, n_tokens=self.n_tokens,
            n_sequences=self.n_sequences, seq_len=self.seq_len, stored_dtype=self.stored_dtype,
            compute_dtype=self.compute_dtype, created=self.created, completed=self.completed,
            bytes=_int_or_none(self.stats.get("bytes_on_disk"), 0, MAX_BYTES), n_params=self.model.n_params,
            model_type=self.model.model_type, n_experts=self.moe.n_experts if self.moe else None,
            top_k=self.moe.top_k if self.moe else None,
        )


def _moe_arrays(d: dict, moe: MoELayout | None, ffn: FFNInfo, n_tokens: int, chunk_tokens: int,
                where: str) -> dict[str, ArraySpec]:
    """The validated ``moe_arrays`` of a manifest: each one's record equal to what the layout, the token count
    and the chunk size give (:meth:`MoELayout.array_specs`), the routing arrays present, none without a layout.

    Raises:
        ActsparseError: naming the array, or the layout field that disagrees with ``model.ffn``.
    """
    raw = d.get("moe_arrays") or {}
    if moe is None:
        if raw:
            raise ActsparseError(f"{where}: manifest lists moe_arrays but no moe layout")
        return {}
    if not isinstance(raw, dict):
        raise ActsparseError(f"{where}: manifest field 'moe_arrays' is not an object")
    if (moe.n_layers, moe.d_model) != (ffn.n_layers, ffn.d_model):
        raise ActsparseError(f"{where}: the moe layout has {moe.n_layers} layers of width {moe.d_model}, model.ffn "
                             f"{ffn.n_layers} of width {ffn.d_model}")
    out = {}
    for name, spec in raw.items():
        a = ArraySpec.from_dict(spec, f"{where}: array {name}", ndims=(3, 4), dtypes=(*STORED_DTYPES, INDEX_DTYPE))
        site_dtype = a.logical_dtype if a.logical_dtype in STORED_DTYPES else WEIGHT_DTYPE  # ids are never sites
        want = moe.array_specs(EXPERT_SITES, n_tokens, chunk_tokens, site_dtype).get(name)
        if want is None or want.logical_dtype != a.logical_dtype:
            raise ActsparseError(f"{where}: manifest names unknown mixture-of-experts array {name!r} "
                                 f"(or with dtype {a.logical_dtype})")
        if a != want:
            raise ActsparseError(f"{where}: array {name} has shape {list(a.shape)}, chunks {list(a.chunks)}, shards "
                                 f"{list(a.shards)}; the moe layout, tokens and chunk size give {list(want.shape)}, "
                                 f"{list(want.chunks)}, {list(want.shards)}")
        out[name] = a
    missing = [n for n in (moe_array(ROUTED, EXPERT_ID), moe_array(ROUTED, ROUTING_WEIGHT)) if n not in out]
    if moe.d_shared is not None and moe_array(SHARED, ROUTING_WEIGHT) not in out:
        missing.append(moe_array(SHARED, ROUTING_WEIGHT))
    if missing:
        raise ActsparseError(f"{where}: a mixture-of-experts run without its array(s) {', '.join(missing)}")
    return out
