"""The store format (``actsparse.core.format``): the manifest validates itself, paths are built from validated
ids, and ``docs/store-format.md`` documents every path and column the module defines, while a store holds
nothing the module does not define."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import SITES
from tests.helpers import ROOT

DOC = (ROOT / "docs" / "store-format.md").read_text()
DOC_NAMES = set(re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", DOC, flags=re.DOTALL)))


@pytest.fixture(scope="module")
def manifest_dict(two_model_store) -> dict:
    path, a, _ = two_model_store
    return json.loads((path / fmt.run_path(a, fmt.MANIFEST)).read_text())


def test_manifest_round_trips_key_for_key(manifest_dict):
    m = fmt.Manifest.from_dict(manifest_dict, "run x")
    assert m.to_dict() == manifest_dict
    assert m.complete and m.n_parts == -(-m.n_tokens // m.chunk_tokens) and m.sites == tuple(manifest_dict["arrays"])
    assert m.catalogue_row()["n_layers"] == manifest_dict["model"]["ffn"]["n_layers"]
    assert m.catalogue_row()["sites"] == manifest_dict["config"]["sites"]  # a list, in the order collected


def _set(d: dict, dotted: str, value) -> dict:
    d = copy.deepcopy(d)
    *parents, last = dotted.split(".")
    target = d
    for p in parents:
        target = target[p]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return d


_DELETE = object()
CASES = [
    ("n_tokens", 10**400, "'n_tokens' is"),
    ("n_tokens", 2**41, "outside"),
    ("n_tokens", True, "'n_tokens' is missing or not an int"),
    ("n_tokens", "600", "'n_tokens' is missing or not an int"),
    ("chunk_tokens", 0, "outside"),
    ("n_sequences", 10**9, "'n_sequences'"),
    ("run_id", "../../etc", "not a valid run id"),
    ("status", "done", "status 'done'"),
    ("format_version", 99, "newer than this actsparse reads"),
    ("format", "other", "not an actsparse store file"),
    ("model.weights_id", "x/y", "weights_id"),
    ("model.ffn.n_layers", 10**6, "outside"),
    ("model.ffn", _DELETE, "'model.ffn' is not an object"),
    ("arrays", {}, "lists no arrays"),
    ("arrays.gate.shape", [3, 10**12, 64], "array gate has shape"),
    ("arrays.gate.width", 65, "array gate has shape"),
    ("arrays.gate.numpy_dtype", "float32", "not a stored dtype pair"),
    ("arrays.gate.chunks", [1, 2], "'chunks' is not three positive integers"),
    ("corpus", [], "'corpus' is not an object"),
]


@pytest.mark.parametrize("field, value, words", CASES)
def test_a_manifest_that_fails_names_the_field(manifest_dict, field, value, words):
    with pytest.raises(ActsparseError, match=re.escape(words)):
        fmt.Manifest.from_dict(_set(manifest_dict, field, value), "run x")


def test_manifest_with_an_unknown_site_or_invalid_json_is_refused(manifest_dict):
    bad = copy.deepcopy(manifest_dict)
    bad["arrays"]["attn"] = bad["arrays"]["gate"]
    with pytest.raises(ActsparseError, match="unknown site 'attn'"):
        fmt.Manifest.from_dict(bad, "run x")
    with pytest.raises(ActsparseError, match="not valid JSON"):
        fmt.Manifest.from_json(b"{" * 100_000, "run x")


def test_paths_are_built_from_validated_ids():
    rid = "0123456789abcdef"
    assert fmt.run_path(rid, fmt.token_part(3)) == f"runs/{rid}/tokens/part-000003.parquet"
    assert fmt.run_path(rid, fmt.stats_part("gate", 0)) == f"runs/{rid}/token_stats/site=gate/part-000000.parquet"
    assert fmt.result_base(None) == "evaluations" and fmt.result_base(rid) == f"runs/{rid}/analysis"
    assert fmt.result_file(fmt.CURVES, rid) == f"curves-{rid}.parquet"
    assert fmt.n_parts(1025, 1024) == 2 and fmt.shard_tokens(1, 1024, 1025) == (1024, 1025)
    for bad in ("../x", "0123456789ABCDEF", "0123", rid + "0", None):
        with pytest.raises(ActsparseError, match="invalid"):
            fmt.run_path(bad)
    assert fmt.is_archive_member(f"runs/{rid}/tokens/part-000000.parquet")
    assert not fmt.is_archive_member("etc/passwd") and not fmt.is_archive_member(f"models/{rid}/other")


def test_every_defined_name_and_column_is_documented():
    for name in (fmt.STORE_FILE, fmt.CATALOGUE, fmt.MANIFEST, fmt.CHECKSUMS, fmt.DOCUMENTS, fmt.EVALUATION_CONFIG,
                 *fmt.LOCKS):
        assert name in DOC, name
    for site in SITES:
        assert f"`{site}`" in DOC, site
    for name in (*(f"`{group}/" for group in fmt.MOE_GROUPS), fmt.EXPERT_ID, fmt.ROUTING_WEIGHT, "`moe`",
                 "`moe_arrays`"):
        assert name in DOC, name
    for directory in (fmt.RUNS, fmt.MODELS, fmt.EVALUATIONS, fmt.ACTIVATIONS, fmt.WEIGHTS, fmt.TOKENS,
                      fmt.TOKEN_STATS, fmt.ANALYSIS, *fmt.STAGING_PREFIXES, fmt.PROBE_PREFIX):
        assert directory in DOC, directory
    tables = [fmt.CATALOGUE_COLUMNS, fmt.DOCUMENTS_COLUMNS, fmt.ALL_TOKEN_COLUMNS, fmt.TOKEN_STATS_COLUMNS,
              fmt.LAYERS_COLUMNS, fmt.EVALUATION_VALUE_COLUMNS, *(k.columns for k in fmt.RESULT_KINDS.values())]
    undocumented = sorted({c for columns in tables for c, _ in columns} - DOC_NAMES)
    assert not undocumented, undocumented
    for kind in fmt.RESULT_KINDS.values():
        assert f"{kind.prefix}-<" in DOC and f"`{kind.name}`" in DOC, kind.name
    for view in fmt.VIEWS:
        assert f"`{view}`" in DOC, view


def kinds_in(store: Path) -> set[str]:
    """What each file of a store is (``fmt.describe_path``), asserting every one is defined by the format and
    every Parquet file has only documented columns."""
    seen = set()
    for p in sorted(store.rglob("*")):
        rel = p.relative_to(store).as_posix()
        if p.is_dir() or p.name in fmt.LOCKS:
            continue
        described = fmt.describe_path(rel)
        assert described is not None, f"{rel} is not defined by the store format"
        what, columns = described
        seen.add(what)
        if rel.endswith(".parquet"):
            written = pq.read_schema(p).names
            assert columns is not None and set(written) <= {c for c, _ in columns}, (rel, written)
    return seen


def test_a_store_holds_only_what_the_format_defines(two_model_store, tmp_path):
    """Every file of a store with every kind of result (curves, critical, an evaluation with a run and one
    without) is a path the format defines, and every Parquet file has only documented columns."""
    from actsparse.analyze.curves import compute_curves
    from actsparse.analyze.evaluate import EvalConfig, evaluate

    src, a, _ = two_model_store
    store = Path(shutil.copytree(src, tmp_path / "S"))
    compute_curves(store, a, targets=("intermediate",), grids={"top-p": [1.0, 0.9]})
    cfg = EvalConfig(target="intermediate", grid=(1.0, 0.9), max_tokens=256, seq_len=64, batch_size=4)
    evaluate(cfg, store, run=a, n_boot=10, log=lambda m: None)
    m = json.loads((store / fmt.run_path(a, fmt.MANIFEST)).read_text())
    evaluate(EvalConfig(model=m["config"]["model"], corpus=m["corpus"]["spec"], target="input", grid=(1.0,),
                        max_tokens=256, seq_len=64, batch_size=4), store, n_boot=10, log=lambda m: None)
    seen = kinds_in(store)
    assert {"result: curves", "result: critical_sparsity", "result: evaluations", "result: evaluation_layers",
            "result: evaluation_critical", "evaluation value part", "token statistics part"} <= seen


# ---------------------------------------------------------------- mixture-of-experts runs


@pytest.fixture(scope="module")
def moe_manifest(moe_store) -> dict:
    path, ids = moe_store
    return json.loads((path / fmt.run_path(ids["qwen2moe"], fmt.MANIFEST)).read_text())


def test_a_moe_manifest_round_trips_with_its_layout(moe_manifest):
    m = fmt.Manifest.from_dict(moe_manifest, "run x")
    assert m.to_dict() == moe_manifest
    assert m.moe.top_k == 2 and m.moe.d_shared == 24 and m.sites == ("input", "output")
    assert m.array_names == (*m.arrays, *m.moe_arrays) and m.array_spec("routed/gate").shape == (3, 400, 2, 16)
    assert m.moe.position(2) == (fmt.ROUTED, 2)
    with pytest.raises(ActsparseError, match="layer 3 out of range"):
        m.moe.position(3)


MOE_CASES = [
    ("moe.top_k", 5, "'top_k' is 5, outside [1, 4]"),
    ("moe.moe_layers", [0, 1], "are not a partition of the 3 decoder layers"),
    ("moe.kind", "dense", "is not a mixture-of-experts layout"),
    ("moe.d_shared", None, "do not match"),
    ("moe.d_model", 64, "the moe layout has 3 layers of width 64"),
    ("moe_arrays.routed/gate.shape", [3, 400, 3, 16], "array routed/gate has shape [3, 400, 3, 16]"),
    ("moe_arrays.routed/expert_id.logical_dtype", "bfloat16", "not a stored dtype pair"),
    ("moe_arrays.routed/down", {"shape": [3, 400, 2, 16], "chunks": [1, 128, 2, 16], "shards": [3, 128, 2, 16],
                                "numpy_dtype": "float32", "logical_dtype": "float32", "width": 16},
     "unknown mixture-of-experts array 'routed/down'"),
    ("moe_arrays.shared/weight", _DELETE, "without its array(s) shared/weight"),
    ("arrays.gate", {"shape": [3, 400, 16], "chunks": [1, 128, 16], "shards": [3, 128, 16],
                     "numpy_dtype": "float32", "logical_dtype": "float32", "width": 16},
     "lists site 'gate' among its arrays"),
]


@pytest.mark.parametrize("field, value, words", MOE_CASES)
def test_a_moe_manifest_that_fails_names_the_field(moe_manifest, field, value, words):
    with pytest.raises(ActsparseError, match=re.escape(words)):
        fmt.Manifest.from_dict(_set(moe_manifest, field, value), "run x")


def test_a_moe_store_holds_only_what_the_format_defines(moe_store, tmp_path):
    from actsparse.analyze.curves import compute_curves
    from actsparse.analyze.evaluate import EvalConfig, evaluate

    src, ids = moe_store
    store = Path(shutil.copytree(src, tmp_path / "S"))
    compute_curves(store, ids["qwen3moe"], targets=("intermediate",), grids={"top-p": [1.0, 0.9]})
    evaluate(EvalConfig(target="gate", grid=(0.9,), max_tokens=256, seq_len=64, batch_size=4), store,
             run=ids["qwen3moe"], n_boot=10, log=lambda m: None)
    assert {"expert array group", "expert array metadata", "expert array shard", "weights chunk",
            "result: expert_curves", "result: evaluation_experts", "evaluation value part"} <= kinds_in(store)


def test_a_store_of_generation_and_diffusion_runs_holds_only_what_the_format_defines(decoded_store, tmp_path):
    """Generation and diffusion runs, their per-step analyses and closed-loop evaluations (with a run and without)
    write only paths the format defines, Parquet files with documented columns; token parts have their kind's."""
    from actsparse.analyze.evaluate.decoded import DecodedEvalConfig, evaluate_decoded
    from actsparse.analyze.steps import StepConfig, analyze_steps
    from actsparse.pipeline.decoding import GenerationSpec

    src, ids = decoded_store
    store = Path(shutil.copytree(src, tmp_path / "S"))
    for run_id in ids.values():
        analyze_steps(store, run_id, StepConfig(rule="top-p"))
    cfg = DecodedEvalConfig(GenerationSpec(3), grid=(0.9,), max_tokens=48, seq_len=24, batch_size=2)
    evaluate_decoded(cfg, store, run=ids["generation"], n_boot=5, log=lambda m: None)
    m = json.loads((store / fmt.run_path(ids["generation"], fmt.MANIFEST)).read_text())
    evaluate_decoded(DecodedEvalConfig(GenerationSpec(3), model=m["config"]["model"], corpus=m["corpus"]["spec"],
                                       grid=(0.9,), max_tokens=48, seq_len=24), store, n_boot=5, log=lambda m: None)
    seen = kinds_in(store)
    for p in sorted(store.glob(f"{fmt.RUNS}/*/{fmt.TOKENS}/*.parquet")):  # token parts have their kind's columns
        kind = json.loads((p.parents[1] / fmt.MANIFEST).read_text())["config"]["decoding"]["kind"]
        assert pq.read_schema(p).names == [c for c, _ in fmt.token_columns(kind)]
    assert {"result: step_sparsity", "result: step_stability", "result: generation_evaluations"} <= seen
    assert (store / fmt.EVALUATIONS / "").is_dir()
