"""What the command line prints: listings in every format, complete when piped, parseable as CSV and JSON."""

from __future__ import annotations

import csv
import io
import json

import pytest

from tests.helpers import run_cli


@pytest.mark.slow
@pytest.mark.parametrize("args", [("models", "list"), ("corpora", "list"), ("query", "list")])
def test_listings_piped_are_complete_in_every_format(args):
    table = run_cli(*args, env={"COLUMNS": "40"})
    assert table.returncode == 0, table.stderr
    rows = json.loads(run_cli(*args, "--format", "json").stdout)
    parsed = list(csv.DictReader(io.StringIO(run_cli(*args, "--format", "csv").stdout)))
    assert len(rows) == len(parsed) >= 2
    key = "name" if args[0] != "models" else "alias"
    for row, rec in zip(rows, parsed):
        assert str(row[key]) == rec[key]
        assert row[key] in table.stdout  # never cut to the terminal width ("smollm…")
    if args[0] == "models":
        assert {r["alias"] for r in rows} == {"smollm2-135m", "gemma3-270m"}
        assert "HuggingFaceTB/SmolLM2-135M-Instruct" in table.stdout


def test_runs_in_every_format(two_model_store):
    path, a, b = two_model_store
    rows = json.loads(run_cli("runs", str(path), "--format", "json").stdout)
    assert [r["run_id"] for r in rows] == sorted([a, b]) and all(r["status"] == "complete" for r in rows)
    assert {r["tokens"] for r in rows} == {600, 300} and set(rows[0]["sites"]) == {"input", "gate", "intermediate"}
    lines = run_cli("runs", str(path), "--format", "csv").stdout.splitlines()
    assert lines[0].startswith("run_id,status,model,corpus") and len(lines) == 3
    table = run_cli("runs", str(path), env={"COLUMNS": "60"}).stdout
    assert a in table and b in table and "gate,input,intermediate" in table


def test_an_unknown_format_is_one_line():
    r = run_cli("models", "list", "--format", "xml")
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown --format 'xml' (choose table, csv, json)"
