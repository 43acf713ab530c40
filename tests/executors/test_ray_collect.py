"""Collection through Ray against the local executor, on a real local Ray instance (no mocks).

Every store written through Ray is compared file by file with the one the local executor (``run_jobs``, job
after job) writes for the same jobs file (``tests.helpers.store_diff``: arrays, tables, checksums; manifests
apart from times and timings)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from actsparse.analyze.token_stats import TOKEN_STATS
from actsparse.executors.jobs import summary_rows
from actsparse.executors.ray_collect import run_batch, split_shards
from actsparse.executors.ray_session import RayOptions
from actsparse.pipeline.jobs import load_jobs, run_jobs
from tests.executors.crash import CrashOnce
from tests.helpers import build_tiny, run_cli, store_diff

SMALL = dict(max_tokens=1000, seq_len=48, batch_size=3, chunk_tokens=128)  # 8 shards; batches straddle shards
OPTS = RayOptions(workers=2, deadline_s=300)


def jobs_file(path: Path, jobs: list[dict], defaults: dict = SMALL) -> Path:
    def val(v):
        if isinstance(v, list):
            return f"[{', '.join(val(x) for x in v)}]"
        return f'"{v}"' if isinstance(v, (str, Path)) else str(v)

    lines = ["[defaults]", *(f"{k} = {val(v)}" for k, v in defaults.items())]
    for job in jobs:
        lines += ["[[jobs]]", *(f"{k} = {val(v)}" for k, v in job.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def local(jobs: Path, store: Path) -> None:
    assert run_jobs(jobs, store=store, statistics=TOKEN_STATS, log=lambda m: None) == []


def on_ray(jobs: Path, store: Path, **kw):
    return run_batch(load_jobs(jobs)[1], store, OPTS, **({"statistics": TOKEN_STATS, "log": lambda m: None} | kw))


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny-gemma3"), "gemma3", seed=1)


def test_split_shards_covers_every_shard_once():
    for n_shards in range(0, 12):
        shards = list(range(3, 3 + n_shards))
        for n in range(1, 6):
            pieces = split_shards(shards, n)
            assert [k for p in pieces for k in p] == shards
            assert len(pieces) == min(n, n_shards) and all(pieces)
            if pieces:
                assert max(map(len, pieces)) - min(map(len, pieces)) <= 1


@pytest.mark.slow
def test_the_ray_store_is_byte_identical_to_the_local_one(ray_local, tiny_llama, tiny_gemma, text_corpus, tmp_path):
    """Three runs of two models on two workers, then one run split across both workers: the bytes of the local
    executor's store; the work ran in at least two worker processes, none of them the driver."""
    many = jobs_file(tmp_path / "many.toml", [
        dict(model=[str(tiny_llama), str(tiny_gemma)], corpus=str(text_corpus)),
        dict(model=str(tiny_llama), corpus=str(text_corpus), max_tokens=700, sites=["input", "up", "act"]),
    ])
    one = jobs_file(tmp_path / "one.toml", [dict(model=str(tiny_gemma), corpus=str(text_corpus), batch_size=5)])
    for jobs in (many, one):
        local(jobs, tmp_path / "local")
    logs: list[str] = []
    reports = on_ray(many, tmp_path / "ray", log=logs.append)
    assert [r.status for r in reports] == ["done"] * 3, [r.reason for r in reports]
    (split,) = on_ray(one, tmp_path / "ray")
    assert split.status == "done", split.reason
    assert store_diff(tmp_path / "local", tmp_path / "ray") == []

    pids = {int(w.split(":")[1]) for r in [*reports, split] for w in r.workers}
    print(f"driver pid {os.getpid()}, worker pids {sorted(pids)}")
    assert len(pids) >= 2 and os.getpid() not in pids
    # the one run: two pieces of whole shards, by two workers, every shard written once
    assert len(split.workers) == 2 and sorted(k for _, shards in split.pieces for k in shards) == list(range(8))
    manifest = __import__("json").loads((tmp_path / "ray" / "runs" / split.run_id / "manifest.json").read_text())
    assert sorted(manifest["stats"]["workers"]) == sorted(split.workers)
    assert any(m.startswith("2 Ray worker(s) ready:") for m in logs)
    rows = summary_rows([*reports, split])
    assert [(r["status"], r["tokens"]) for r in rows] == [("done", 1000), ("done", 1000), ("done", 700), ("done", 1000)]

    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*") if p.is_file()}
    again = on_ray(many, tmp_path / "ray")
    assert [(r.status, r.reason) for r in again] == [("skipped", "already complete")] * 3
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_worker_dying_on_its_first_attempt_is_retried_with_the_same_bytes(ray_local, tiny_llama, text_corpus,
                                                                          tmp_path):
    jobs = jobs_file(tmp_path / "jobs.toml", [dict(model=str(tiny_llama), corpus=str(text_corpus))])
    local(jobs, tmp_path / "local")
    marker = tmp_path / "crashed"
    (report,) = on_ray(jobs, tmp_path / "ray", statistics=CrashOnce(str(marker), shard=5))
    assert report.status == "done", report.reason
    crashed = int(marker.read_text())
    assert f"{os.uname().nodename}:{crashed}" not in report.workers  # finished by the restarted process
    # the piece of shards 4-7 died inside shard 5 and was retried: shards written before the crash were kept
    pieces = sorted(report.pieces, key=lambda p: p[1][0] if p[1] else 99)
    assert pieces[0][1] == [0, 1, 2, 3] and {5, 6, 7} <= set(pieces[1][1]) <= {4, 5, 6, 7}
    diff = store_diff(tmp_path / "local", tmp_path / "ray")
    assert diff == [], "\n".join(d[:300] for d in diff)


@pytest.mark.slow
def test_cli_batch_with_failing_jobs_goes_on_and_exits_non_zero(tiny_llama, text_corpus, tmp_path):
    """The command line on its own local Ray instance: the good job is done, each failure is one line (from a
    worker and from the driver), the summary lists every job, the exit status is 1."""
    gpt2 = build_tiny(tmp_path / "gpt2", "gpt2", seed=2)
    jobs = jobs_file(tmp_path / "jobs.toml", [
        dict(model=str(tiny_llama), corpus=str(text_corpus)),
        dict(model=str(gpt2), corpus=str(text_corpus), sites=["up"]),  # fails in a worker: GPT-2 has no up
        dict(model=str(tmp_path / "no-such-model"), corpus=str(text_corpus)),  # fails on the driver
    ])
    r = run_cli("collect", "--config", str(jobs), "--store", str(tmp_path / "S"), "--executor", "ray",
                "--workers", "2", env={"RAY_TMPDIR": "/tmp"}, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert "1 done, 0 skipped, 2 failed of 3 job(s):" in r.stdout
    lines = r.stdout.splitlines()
    assert any(line.startswith("  [2] gpt2 × docs.jsonl: site(s) up do not exist in GPT2LMHeadModel") for line in lines)
    assert any(line.startswith("  [3] no-such-model × docs.jsonl: unknown model") for line in lines), r.stdout
    assert "run_id" in r.stdout and "| done " in r.stdout  # the summary table (Markdown when piped)
    (manifest,) = (tmp_path / "S" / "runs").glob("*/manifest.json")  # the GPT-2 run failed before its manifest
    assert '"status": "complete"' in manifest.read_text()


def test_ray_options_are_refused_with_the_local_executor(tmp_path):
    r = run_cli("collect", "--config", str(tmp_path / "jobs.toml"), "--workers", "2")
    assert r.returncode == 2 and r.stderr.strip() == "error: --workers only apply to --executor ray"
    r = run_cli("collect", "--config", str(tmp_path / "jobs.toml"), "--executor", "spark")
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown --executor 'spark' (choose local or ray)"
    r = run_cli("collect", "--config", str(tmp_path / "jobs.toml"), "--executor", "ray", "--device", "cuda")
    assert r.returncode == 2 and "--device cuda on Ray needs --gpus-per-worker > 0" in r.stderr


@pytest.mark.slow
def test_a_node_local_store_is_refused_before_any_work(ray_local, tmp_path):
    """A worker that does not see the driver's store (its node has its own disk at that path) is named."""
    from actsparse.executors.ray_session import check_shared_store, probe_seen, store_probe

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with store_probe(tmp_path / "a") as (probe, token):
        assert probe_seen(probe, token) and Path(probe).name.startswith(".visible-")
        assert not probe_seen(str(tmp_path / "b" / Path(probe).name), token)  # the same path on another disk
    assert not Path(probe).exists()

    @ray_local.remote(num_cpus=0)
    class Blind:  # a worker on a node whose filesystem does not hold the store
        def sees(self, probe, token):
            return False

    worker = Blind.remote()
    with pytest.raises(Exception, match=r"store .* is not visible from Ray worker\(s\) node-b:7: --executor ray "
                                        r"needs a store on a filesystem every node mounts"):
        check_shared_store(ray_local, tmp_path / "a", {worker: "node-b:7"}, 60)
    ray_local.kill(worker)
    shutil.rmtree(tmp_path / "a")
