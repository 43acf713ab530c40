"""Task evaluations in a store: resume per (grid value, task) after a kill, results with a run and without, the SQL
views and the named query, the report, and one-line errors on the command line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from actsparse.analyze.tasks import TaskEvalConfig, evaluate_tasks
from actsparse.analyze.tasks.build import CLOZE_TASK
from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.queries import Store
from tests.helpers import ROOT, run_cli, write_task

VALUES = (1.0, 0.5)
QA = [dict(context=f"Question {i}: what comes after {w}?", choices=["one", "two", "three", "four"], label=i % 4)
      for i, w in enumerate(["one", "two", "three", "zero", "one", "two", "three", "zero"])]
MC_BODY = ("output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_target: label\n"
           "doc_to_choice: choices\nmetric_list:\n  - metric: acc\n")


def quiet(_msg: str) -> None:
    pass


def _parts(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.glob("*.parquet")}


@pytest.mark.real
@pytest.mark.slow
def test_resume_after_a_kill(tmp_path):
    store = tmp_path / "S"
    exe = Path(sys.executable).with_name("actsparse")
    cmd = [str(exe), "evaluate", "--tasks", CLOZE_TASK, "--model", "smollm2-135m", "--grid", ",".join(map(str, VALUES)),
           "--limit", "4", "--batch-size", "2", "--store", str(store), "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while not list(store.glob("evaluations/tasks-*/value-*.parquet")):  # kill once the first grid value is done
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    [parts] = [p for p in store.glob("evaluations/tasks-*") if p.is_dir()]
    before = _parts(parts)
    assert set(before) == {fmt.task_part(CLOZE_TASK, v) for v in (None, VALUES[0])}
    assert not list(store.glob("evaluations/*.parquet"))  # the tables are written at the end only

    cfg = TaskEvalConfig(model="smollm2-135m", grid=VALUES, limit=4, batch_size=2)  # the CLI's other defaults
    res = evaluate_tasks(cfg, CLOZE_TASK, store, n_boot=50, log=quiet)
    assert parts.name == fmt.task_parts(res.eval_id)  # the same identity as the killed CLI run
    assert len(res.reused) == len(before) and len(res.reused) + len(res.computed) == 1 + len(VALUES)
    after = _parts(parts)
    assert {k: after[k] for k in before} == before  # finished runs were not redone
    s = res.summary.sort("value", descending=True)
    assert s["value"].to_list() == list(VALUES) and s["n_examples"].to_list() == [4] * 2
    assert s["sparsity"][0] < 1e-5 and s["sparsity"][1] > 0.8  # top-p 1 keeps nearly all, 0.5 drops most
    assert s["sparsity_prefill"].to_list() == s["sparsity"].to_list()  # loglikelihood: prefill only
    assert res.examples.height == 4 * len(VALUES) and res.critical["task"].to_list() == [CLOZE_TASK]

    again = evaluate_tasks(cfg, CLOZE_TASK, store, n_boot=50, log=quiet)
    assert again.computed == [] and len(again.reused) == 1 + len(VALUES)
    assert again.summary.equals(res.summary) and again.critical.equals(res.critical)
    with Store(store) as st:
        crit = st.query("task_critical_sparsity")
        assert crit["task"].to_list() == [CLOZE_TASK] and crit["run_id"].to_list() == [None]
        np.testing.assert_array_equal(crit["critical_sparsity_interp"], res.critical["critical_sparsity_interp"])
        assert crit["critical_value_grid"][0] in VALUES  # p = 1 keeps dense accuracy: the crossing is defined
        n = st.sql("SELECT count(*) AS n FROM task_examples WHERE score = dense_score")["n"][0]
        assert n == res.examples.filter(res.examples["score"] == res.examples["dense_score"]).height


@pytest.fixture(scope="module")
def with_run(two_model_store, tiny_llama, tmp_path_factory):
    """A copy of the two-model store with a task evaluation of the tiny Llama attached to its run (a task
    YAML of eight multiple-choice questions), two targets: ``(store, run id, task yaml, evaluations)``."""
    src, a, _ = two_model_store
    root = tmp_path_factory.mktemp("tasks-run")
    store = Path(shutil.copytree(src, root / "S"))
    yaml = write_task(root / "tasks", "tiny_qa", QA, MC_BODY)
    evs = [evaluate_tasks(TaskEvalConfig(target=t, grid=(1.0, 0.8, 0.5), batch_size=4), str(yaml), store, run=a,
                          n_boot=50, log=quiet) for t in ("intermediate", "input")]
    return store, a, yaml, evs


@pytest.mark.slow
def test_results_with_a_run_land_in_its_analysis_and_are_checksummed(with_run, tiny_llama):
    store, a, _, evs = with_run
    base = store / fmt.result_base(a)
    listed = json.loads((store / fmt.run_path(a, fmt.CHECKSUMS)).read_text())["files"]
    for ev in evs:
        assert ev.base == base.resolve() and ev.config["identity"]["weights_sha256"]
        for kind in (fmt.TASK_EVALUATION, fmt.TASK_EXAMPLES, fmt.TASK_CRITICAL):
            path = base / fmt.result_file(kind, ev.eval_id)
            assert path.is_file() and f"{fmt.ANALYSIS}/{path.name}" in listed
        for value in (None, 1.0, 0.8, 0.5):
            assert f"{fmt.ANALYSIS}/{fmt.task_parts(ev.eval_id)}/{fmt.task_part('tiny_qa', value)}" in listed
        assert ev.summary["run_id"].to_list() == [a] * 3
        # p = 1 keeps every entry that is not exactly zero: the same accuracy as lm-eval's dense run
        row = ev.summary.filter(ev.summary["value"] == 1.0).row(0, named=True)
        assert row["acc_ratio"] == 1.0 and row["acc"] == row["dense_acc"] and row["sparsity"] < 0.05
    # every file is one the store format defines, every table has its documented columns only
    for p in sorted(store.rglob("*")):
        rel = p.relative_to(store).as_posix()
        if p.is_dir() or p.name in fmt.LOCKS:
            continue
        described = fmt.describe_path(rel)
        assert described is not None, rel
        if rel.endswith(".parquet") and "tasks" in rel:
            assert pq.read_schema(p).names == [c for c, _ in described[1]], rel
    from actsparse.share.verify import verify

    report = verify(str(store))
    assert report.ok, report.problems


def test_views_and_named_query_see_both_targets(with_run):
    store, a, _, evs = with_run
    with Store(store) as st:
        rows = st.sql("SELECT target, count(*) AS n FROM task_evaluations GROUP BY target ORDER BY target")
        assert rows.to_dicts() == [dict(target="input", n=3), dict(target="intermediate", n=3)]
        crit = st.query("task_critical_sparsity", target="input")
        assert crit["eval_id"].to_list() == [evs[1].eval_id] and crit["model"][0] == evs[1].config["settings"]["model"]
        assert st.query("task_critical_sparsity", task="average").height == 0  # one task: no average


@pytest.mark.slow
def test_the_report_shows_task_accuracy_and_critical_sparsity(with_run, tmp_path):
    from actsparse.analyze.report import build_report

    store, a, _, _ = with_run
    index = build_report(store, tmp_path / "report", runs=[a], log=quiet)
    html = index.read_text()
    for stem in (f"fig-task-accuracy-{a}", f"fig-task-critical-{a}"):
        assert (tmp_path / "report" / f"{stem}.png").stat().st_size > 0 and f'src="{stem}.png"' in html
    assert "Downstream tasks (lm-eval)" in html and "tiny_qa" in html


def test_a_model_that_is_not_the_runs_is_refused(with_run, two_model_store):
    store, a, yaml, _ = with_run
    _, _, b = two_model_store
    gpt2 = json.loads((store / fmt.run_path(b, fmt.MANIFEST)).read_text())["config"]["model"]
    with pytest.raises(ActsparseError, match=f"does not match run {a}"):
        evaluate_tasks(TaskEvalConfig(model=gpt2, grid=(0.5,)), str(yaml), store, run=a, log=quiet)


@pytest.mark.parametrize("changes, words", [
    (dict(grid=()), "the grid is empty"), (dict(rule="threshold"), "needs a per-layer calibrated tau"),
    (dict(count_mode="padded"), "unknown count mode 'padded'"), (dict(batch_size=0), "--batch-size must be a positive"),
    (dict(limit=2.5), "--limit must be a positive integer or a fraction"), (dict(num_fewshot=-1), "--num-fewshot"),
    (dict(compute_dtype="int8"), "unknown compute dtype"),
])
def test_bad_settings_are_refused_before_anything_is_loaded(changes, words):
    with pytest.raises(ActsparseError, match=words):
        evaluate_tasks(TaskEvalConfig(model="no-such-model", **changes), CLOZE_TASK, log=quiet)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["yaml", "count-mode", "corpus"])
def test_bad_input_is_a_one_line_cli_error(case, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: broken\ndoc_to_text: [unclosed\n")
    args, words = {
        "yaml": (["--tasks", str(bad)], f"task file {bad} does not parse"),
        "count-mode": (["--tasks", CLOZE_TASK, "--count-mode", "padded"], "unknown count mode 'padded'"),
        "corpus": (["--tasks", CLOZE_TASK, "--corpus", "wiki"], "--tasks brings its own data"),
    }[case]
    r = run_cli("evaluate", "--model", "smollm2-135m", *args)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and words in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_missing_lm_eval_is_one_line_naming_the_extra(tmp_path):
    # sys.modules[name] = None makes `import lm_eval` raise ImportError, as where it is not installed
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "from actsparse.cli.app import main\n"
            f"sys.argv = ['actsparse', 'evaluate', '--tasks', '{CLOZE_TASK}', '--model', 'smollm2-135m']\n"
            "main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: actsparse evaluate --tasks needs lm-evaluation-harness, the 'tasks' extra: "
                               "pip install 'actsparse[tasks]'"), r.stderr
