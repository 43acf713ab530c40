"""Per-token statistics (``actsparse.analyze.token_stats``): equal to the rules on awkward blocks and to the
dense arrays, recorded in the checksums, rebuilt by ``actsparse index``; checked on the real SmolLM2 run too."""

from __future__ import annotations

import io
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from actsparse import share
from actsparse.analyze.rules import sparsity, topp_mask
from actsparse.analyze.token_stats import token_stats
from actsparse.core import format as fmt
from actsparse.core.checksums import parse_checksums
from actsparse.core.format import STAT_COLUMNS, THRESHOLDS, TOPP_VALUES
from actsparse.pipeline.reader import StoreReader
from actsparse.queries import Store
from tests.helpers import run_cli, tmpfs

SITES = ("input", "gate", "intermediate")


@pytest.fixture
def store(two_model_store):
    return two_model_store


# ---------------------------------------------------------------------------------------------
# per-token statistics


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_token_stats_equal_the_rules_on_awkward_blocks(dtype):
    """Ties, zero rows, a single-entry max, an inf and a NaN row, in every stored dtype."""
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(40, 96, generator=g) * 3).round() / 4  # coarse values: many ties
    a[3] = 0.0
    a[4, 7] = 50.0
    a[5] = torch.randn(96, generator=g) * 1e-3
    a = a.to(dtype)
    a[6, 0] = math.inf
    a[7, 5] = math.nan
    s = token_stats(a)
    assert set(s) == set(STAT_COLUMNS) and all(v.dtype == np.float32 and v.shape == (40,) for v in s.values())
    ok = torch.ones(40, dtype=torch.bool)
    ok[7] = False
    assert all(np.isnan(s[c][7]) for c in STAT_COLUMNS)
    f = a.float()[ok]
    for p in TOPP_VALUES:
        np.testing.assert_array_equal(s[f"sparsity_p{round(p * 100)}"][ok.numpy()], sparsity(topp_mask(a[ok], p)).float().numpy())
    for t in THRESHOLDS:
        col = f"frac_below_1e_{round(-math.log10(t))}"
        np.testing.assert_array_equal(s[col][ok.numpy()], (f.abs() < t).double().mean(1).float().numpy())
    finite = ok.clone()
    finite[6] = False
    ff = a.float()[finite]
    np.testing.assert_allclose(s["l1"][finite.numpy()], ff.abs().double().sum(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(s["l2"][finite.numpy()], ff.double().norm(dim=1).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(s["max_abs"][finite.numpy()], ff.abs().amax(1).numpy())
    assert np.isnan(s["top1_share"][3]) and s["sparsity_p90"][3] == 0.0 and s["frac_below_1e_3"][3] == 1.0
    assert s["l1"][6] == math.inf


def test_token_stats_match_dense_arrays(store):
    """Rows of the token_stats table equal values computed here from Run.read, for a few tokens."""
    path, a, b = store
    reader = StoreReader(str(path))
    with Store(path) as st:
        for rid in (a, b):
            run = reader.run(rid)
            counts = st.sql("SELECT site, count(*) AS n FROM token_stats WHERE run_id = $r GROUP BY site", r=rid)
            assert dict(counts.iter_rows()) == {s: run.n_tokens * run.n_layers for s in SITES}
            for site, layer in (("intermediate", run.n_layers - 1), ("input", 0), ("gate", 1)):
                dense = run.read(site, layer)
                picks = [0, 1, 129, run.n_tokens - 1]
                rows = st.sql("SELECT * FROM token_stats WHERE run_id = $r AND site = $s AND layer = $l "
                              "AND token_index IN (0, 1, 129, $last) ORDER BY token_index",
                              r=rid, s=site, l=layer, last=run.n_tokens - 1)
                assert rows["token_index"].to_list() == picks
                x = dense[picks]
                np.testing.assert_allclose(rows["l1"].to_numpy(), x.abs().sum(1).numpy(), rtol=1e-5)
                np.testing.assert_allclose(rows["l2"].to_numpy(), x.norm(dim=1).numpy(), rtol=1e-5)
                np.testing.assert_array_equal(rows["max_abs"].to_numpy(), x.abs().amax(1).numpy())
                for p in (0.5, 0.9, 0.99):
                    np.testing.assert_array_equal(rows[f"sparsity_p{round(p * 100)}"].to_numpy(),
                                                  sparsity(topp_mask(x, p)).float().numpy())
                tok = run.tokens()[picks]
                assert rows["position"].to_list() == tok["position"].to_list()
                assert rows["special"].to_list() == tok["special"].to_list()


@pytest.mark.slow
def test_collection_records_stats_in_checksums_and_index_rebuilds_them(store, tmp_path):
    path, a, b = store
    listed = parse_checksums((path / "runs" / a / fmt.CHECKSUMS).read_bytes(), "x")
    parts = sorted(p.relative_to(path / "runs" / a).as_posix() for p in (path / "runs" / a).glob("token_stats/*/*.parquet"))
    assert len(parts) == 5 * len(SITES) and set(parts) <= set(listed)
    assert share.verify(path).ok

    copy = Path(shutil.copytree(path, tmp_path / "C"))
    before = {p: p.read_bytes() for p in copy.glob("runs/*/token_stats/*/*.parquet")}
    removed = [copy / "runs" / a / parts[0], copy / "runs" / b / "token_stats" / "site=gate" / "part-000002.parquet"]
    for p in removed:
        p.unlink()
    shutil.rmtree(copy / "runs" / b / "token_stats" / "site=input")
    r = run_cli("index", str(copy))
    assert r.returncode == 0, r.stderr
    assert "indexed 2 run(s), 5 part(s) written" in r.stdout
    import pyarrow.parquet as pq

    for p, data in before.items():
        assert pq.read_table(p).equals(pq.read_table(io.BytesIO(data))), p
    assert share.verify(copy).ok  # the rebuilt parts were recorded in checksums.json
    again = run_cli("index", str(copy), "--run", a[:6])
    assert again.returncode == 0 and "0 token_stats part(s) written (all present)" in again.stdout


def test_index_refuses_read_only_and_remote_stores(store, tmp_path, serve):  # noqa: F811
    path, a, _ = store
    pytest.importorskip("aiohttp", reason="fsspec's HTTP filesystem needs aiohttp (pip install 'actsparse[http]')")
    r = run_cli("index", serve(path.parent) + f"/{path.name}/")
    assert r.returncode != 0 and "not a local directory" in r.stderr
    with tmpfs(tmp_path / "ro", size="64m") as ro:
        shutil.copytree(path, ro / "S")
        shutil.rmtree(ro / "S" / "runs" / a / "token_stats")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        r = run_cli("index", str(ro / "S"))
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "read-only" in r.stderr


# ---------------------------------------------------------------------------------------------
# real model


@pytest.mark.real
def test_real_smollm2_token_stats(smollm2_store):
    store, res = smollm2_store
    run = StoreReader(str(store)).run(res.run_id)
    with Store(store) as st:
        assert st.sql("SELECT count(*) AS n FROM token_stats").item() == 6 * run.n_layers * run.n_tokens
        for site, layer in (("intermediate", 0), ("input", 15), ("output", 29)):
            rows = st.sql("SELECT * FROM token_stats WHERE site = $s AND layer = $l AND token_index IN (0, 5, 600, 1023) "
                          "ORDER BY token_index", s=site, l=layer)
            x = run.read(site, layer)[[0, 5, 600, 1023]]
            np.testing.assert_allclose(rows["l1"].to_numpy(), x.abs().sum(1).numpy(), rtol=1e-5)
            np.testing.assert_array_equal(rows["max_abs"].to_numpy(), x.abs().amax(1).numpy())
            for p in TOPP_VALUES:
                np.testing.assert_array_equal(rows[f"sparsity_p{round(p * 100)}"].to_numpy(),
                                              sparsity(topp_mask(x, p)).float().numpy())
        special = st.query("special_tokens", run=res.run_id, site="input")
        assert special["n_special"].min() > 0 and special["max_abs_ratio"].max() > 1  # BOS has massive activations
