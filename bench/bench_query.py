"""Query benchmark: every named query over a store whose token_stats table holds >= 10 million rows.

Run with ``make bench-query``. The rows are real ones replicated: the token_stats of one real run
(``--source STORE [--run ID]``; by default a fresh SmolLM2-135M x wiki run of 4,096 tokens, collected
into a temporary directory) are copied into several synthetic runs, each copy with its own token
indices and sequences and with its continuous statistics (l1, l2, max_abs, top1_share) perturbed by
~1% noise, so values, cardinalities and compression stay realistic. The store layout (manifests, catalogue, tokens and token_stats parts of
1,024 tokens) is the real one; activations are not written, as no query reads them.

Reported per query: result rows, cold time (first run in the session), warm time (median of 3 more
runs), the peak RSS of the process over those runs above the RSS before them and in total (sampled
every 5 ms), and DuckDB's own peak memory from ``duckdb_memory()`` sampled the same way.
Targets: <= 1 s per query and <= 2 GB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_S, TARGET_MB = 1.0, 2048
# Perturbed per copy. The sparsity and threshold fractions are multiples of 1/width in real data (few
# distinct values, which Parquet dictionary-encodes); they are replicated as they are.
CONTINUOUS = ("l1", "l2", "max_abs", "top1_share")


def source_tables(store: str, run_ref: str | None, log):
    """``(manifest, tokens table, {site: token_stats table})`` of one real run.

    Reads the run's token_stats where they exist; otherwise computes them from the dense arrays in
    memory (the source store is never written).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from actsparse.analyze.token_stats import missing_parts, shard_stats
    from actsparse.core import format as fmt
    from actsparse.pipeline.reader import StoreReader

    st = StoreReader(store)
    run = st.run(run_ref)
    tokens = run.tokens().to_arrow()
    run_dir = Path(st.root) / fmt.run_path(run.run_id)
    stats = {s: [] for s in run.sites}
    have = not missing_parts(run_dir, run.manifest)
    log(f"source: run {run.run_id} of {store} ({run.manifest.model.name} x {run.manifest.corpus.name}, "
        f"{run.n_tokens} tokens, sites {','.join(run.sites)}); token_stats "
        + ("read from the store" if have else "computed from the dense arrays"))
    for k in range(run.n_parts):
        start, stop = fmt.shard_tokens(k, run.chunk_tokens, run.n_tokens)
        for site in run.sites:
            if have:
                stats[site].append(pq.read_table(run_dir / fmt.stats_part(site, k)))
            else:
                rows = tokens.slice(start, stop - start)
                block = {site: run.array(site)[:, start:stop]}
                stats[site].append(shard_stats(run.manifest, k, block, {c: rows.column(c) for c in rows.column_names})[site])
    return run.manifest.to_dict(), tokens, {s: pa.concat_tables(t) for s, t in stats.items()}


def synthesize(root: Path, manifest: dict, tokens, stats: dict, target_rows: int, chunk: int, log) -> int:
    """Write a store under ``root`` with >= ``target_rows`` token_stats rows; returns the row count."""
    import pyarrow as pa

    from actsparse.core import format as fmt
    from actsparse.core.files import atomic_write_json, atomic_write_parquet
    from actsparse.pipeline.store_root import create_store, write_catalogue

    rng = np.random.default_rng(0)
    src_tokens = tokens.num_rows
    n_layers = int(manifest["model"]["ffn"]["n_layers"])
    rows_per_copy = src_tokens * n_layers * len(stats)
    n_runs = 4
    copies = -(-target_rows // (rows_per_copy * n_runs))
    n_tok = src_tokens * copies
    n_seq = int(tokens.column("sequence").to_numpy().max()) + 1
    schema = fmt.arrow_schema(fmt.TOKEN_STATS_COLUMNS)
    paths = create_store(root)
    total = 0
    # source rows of each site in (token, layer) order, so a shard of the synthetic run is a row slice
    by_token = {s: t.sort_by([("token_index", "ascending"), ("layer", "ascending")]) for s, t in stats.items()}
    for r in range(n_runs):
        rid = f"{0xbe00000000000000 + r:016x}"
        run_dir = paths.run_dir(rid)
        m = json.loads(json.dumps(manifest))
        m.update(run_id=rid, n_tokens=n_tok, n_sequences=n_seq * copies, chunk_tokens=chunk, status="complete")
        m["config"]["model"] = f"{manifest['config']['model']}#synthetic-{r}"
        for spec in m["arrays"].values():  # the layout a run of n_tok tokens in shards of `chunk` tokens has
            spec["shape"][1] = n_tok
            spec["chunks"][1] = spec["shards"][1] = min(chunk, n_tok)
        tok_idx = np.arange(n_tok)
        src = tok_idx % src_tokens
        copy = tok_idx // src_tokens
        seq = tokens.column("sequence").to_numpy()[src] + copy * n_seq
        for k in range(-(-n_tok // chunk)):
            lo, hi = k * chunk, min((k + 1) * chunk, n_tok)
            part = tokens.take(pa.array(src[lo:hi]))
            part = part.set_column(part.schema.get_field_index("token_index"), "token_index", pa.array(tok_idx[lo:hi]))
            part = part.set_column(part.schema.get_field_index("sequence"), "sequence", pa.array(seq[lo:hi]))
            atomic_write_parquet(run_dir / fmt.token_part(k), part)
            n = hi - lo
            for site, t in by_token.items():
                rows = np.concatenate([np.arange(i * n_layers, (i + 1) * n_layers) for i in src[lo:hi]])
                base = t.take(pa.array(rows))
                cols = {c: base.column(c) for c in schema.names}
                cols["run_id"] = pa.array([rid] * len(rows), pa.string())
                cols["token_index"] = pa.array(np.repeat(tok_idx[lo:hi], n_layers))
                cols["sequence"] = pa.array(np.repeat(seq[lo:hi], n_layers))
                for c in CONTINUOUS:
                    v = cols[c].to_numpy(zero_copy_only=False).astype(np.float32)
                    v = v * (1 + 0.01 * rng.standard_normal(v.shape, dtype=np.float32))
                    if c == "top1_share":
                        v = np.clip(v, 0, 1)
                    cols[c] = pa.array(v, pa.float32(), mask=np.isnan(v))
                table = pa.table(cols, schema=schema).sort_by([("layer", "ascending"), ("token_index", "ascending")])
                atomic_write_parquet(run_dir / fmt.stats_part(site, k), table, row_group_size=fmt.STATS_ROW_GROUP,
                                     use_dictionary=["run_id", "site"])
                total += table.num_rows
                assert table.num_rows == n * n_layers
        crit = pa.table(dict(run_id=[rid] * 4, target=["intermediate"] * 4, rule=["top-p"] * 4,
                             tolerance=[0.01, 0.02, 0.05, 0.1], metric=["rel_err"] * 4,
                             critical_sparsity_grid=[0.3, 0.4, 0.5, 0.6], critical_value_grid=[0.97, 0.95, 0.9, 0.85],
                             critical_sparsity_interp=[0.31, 0.42, 0.53, 0.61], analysis_id=["bench"] * 4,
                             label=["open-loop"] * 4))
        atomic_write_parquet(run_dir / fmt.ANALYSIS / fmt.result_file(fmt.CRITICAL, "bec0000000000000"), crit)
        atomic_write_json(run_dir / fmt.MANIFEST, m)
        log(f"  run {rid}: {n_tok} tokens, {-(-n_tok // chunk)} parts x {len(stats)} sites")
    write_catalogue(paths)
    return total


class Sampler:
    """Peak RSS of this process and peak DuckDB buffer-manager memory (bytes) while a block runs.

    DuckDB's figure comes from ``duckdb_memory()`` read on a second cursor of the store's database
    (a cursor shares the catalogue and the buffer manager), every 5 ms.
    """

    def __init__(self, cursor):
        import psutil

        self.proc, self.cursor = psutil.Process(), cursor
        self._stop = threading.Event()

    def _duckdb_bytes(self) -> int:
        return self.cursor.execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()").fetchone()[0] or 0

    def __enter__(self):
        self.base = self.peak_rss = self.proc.memory_info().rss
        self.peak_duck = self._duckdb_bytes()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
            self.peak_duck = max(self.peak_duck, self._duckdb_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", help="store holding the real run to replicate [default: collect SmolLM2 x wiki]")
    ap.add_argument("--run", help="run id or prefix in --source")
    ap.add_argument("--rows", type=int, default=10_000_000, help="token_stats rows to synthesize (at least)")
    ap.add_argument("--keep", help="write the synthetic store here and keep it [default: a temporary directory]")
    ap.add_argument("--threads", type=int, default=None, help="DuckDB threads [default: CPUs, at most 4]")
    ap.add_argument("--memory-limit", default="2GB")
    args = ap.parse_args()
    log = lambda m: print(m, flush=True)  # noqa: E731

    from actsparse.queries import Store, load

    tmp = Path(tempfile.mkdtemp(prefix="actsparse-bench-query-"))
    try:
        source = args.source
        if source is None:
            source = str(tmp / "source")
            log("collecting the source run: SmolLM2-135M x wiki, 4096 tokens (input, gate, intermediate) ...")
            # in a child process, so the model's memory does not count in the RSS measured below
            subprocess.run([str(Path(sys.executable).with_name("actsparse")), "collect", "--model", "smollm2-135m",
                            "--corpus", "wiki", "--max-tokens", "4096", "--store", source, "-q"], check=True)
        manifest, tokens, stats = source_tables(source, args.run, log)
        root = Path(args.keep) if args.keep else tmp / "bench-store"
        t0 = time.perf_counter()
        total = synthesize(root, manifest, tokens, stats, args.rows, 1024, log)
        size = sum(p.stat().st_size for p in root.glob("runs/*/token_stats/*/*.parquet"))
        log(f"synthetic store {root}: {total:,} token_stats rows, {size / 2**20:.0f} MiB of token_stats Parquet, "
            f"written in {time.perf_counter() - t0:.1f} s")

        t0 = time.perf_counter()
        st = Store(root, memory_limit=args.memory_limit, threads=args.threads)
        opened = time.perf_counter() - t0
        settings = st.sql("SELECT current_setting('threads') AS t, current_setting('memory_limit') AS m").row(0)
        log(f"Store opened in {opened:.2f} s; DuckDB threads={settings[0]}, memory_limit={settings[1]}")
        a, b = st.run_ids[0], st.run_ids[1]
        cursor = st._con.cursor()  # for duckdb_memory() while a query runs (the bench's only private access)
        cases = []
        for name, q in load().items():
            runs = [p.name for p in q.params if p.type == "RUN"]
            cases.append((name, dict(zip(runs, (a, b)))))
        adhoc = {
            "sql: site x layer means (full scan)": "SELECT site, layer, avg(sparsity_p90) AS s, avg(l1) AS l1 "
                                                  "FROM token_stats GROUP BY ALL",
            "sql: layers table (all runs)": "SELECT * FROM layers",
            "sql: p99 of max_abs per run (full scan)": "SELECT run_id, quantile_cont(max_abs, 0.99) FROM token_stats GROUP BY ALL",
        }
        results = []
        for label, params in cases + [(k, None) for k in adhoc]:
            def run_once(label=label, params=params):
                return st.sql(adhoc[label]) if params is None else st.query(label, **params)

            with Sampler(cursor) as mem:
                t0 = time.perf_counter()
                df = run_once()
                cold = time.perf_counter() - t0
                warm = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    run_once()
                    warm.append(time.perf_counter() - t0)
            results.append((label, df.height, cold, statistics.median(warm), (mem.peak_rss - mem.base) / 2**20,
                            mem.peak_rss / 2**20, mem.peak_duck / 2**20))
        cursor.close()
        st.close()

        print()
        print(f"{'query':44} {'rows':>6} {'cold s':>7} {'warm s':>7} {'+RSS MiB':>9} {'RSS MiB':>8} {'duckdb MiB':>10}")
        for label, rows, cold, warm, drss, rss, duck in results:
            flag = "" if max(cold, warm) <= TARGET_S and max(drss, duck) <= TARGET_MB else "  <-- over target"
            print(f"{label:44} {rows:6d} {cold:7.3f} {warm:7.3f} {drss:9.0f} {rss:8.0f} {duck:10.0f}{flag}")
        print(f"\ntargets: <= {TARGET_S:g} s per query, <= {TARGET_MB} MiB; token_stats rows: {total:,}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
