"""Fuzzing: hostile stores and archives against every command that reads them (hypothesis).

A small real store (two runs of the tiny Llama, with per-token statistics and a cached curves result) and its
archive are copied for each case and damaged: files flipped, truncated, deleted, duplicated, replaced by
directories, symbolic links and FIFOs; fields of manifests, checksum lists, shard records and the store marker
rewritten with out-of-range, wrong-typed and inconsistent values; foreign entries added; archives compressed,
truncated, given oversized, unlisted, link, device, absolute and many members, or an index that disagrees.
Then ``runs``, ``verify``, ``sql``, ``query``, ``curves``, ``pack``, ``unpack``, ``merge`` and ``report`` run
against the damage, each in a subprocess under a time bound, and every call must

* end within the bound, with exit status 0, 1 or 2;
* print no traceback, at most one ``error:`` line (exactly one when it exits 2), and nothing else on stderr
  but ``note:`` and ``warning:`` lines;
* write nothing outside its destination (the store for ``curves``' results; the archive, the destination store
  or the report directory otherwise; nothing at all for the rest), and leave no spill or staging behind;
* never leave a run marked complete whose data does not read back (every complete run of a destination store
  verifies and reads).

``make test`` runs a few cases of each kind (``ACTSPARSE_FUZZ_EXAMPLES``, default 4); ``make fuzz`` runs many
and writes a summary (``ACTSPARSE_FUZZ_REPORT``) that BENCHMARKS.md ("Reliability") records.
"""

from __future__ import annotations

import atexit
import collections
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actsparse.core import format as fmt
from actsparse.pipeline.store_root import write_catalogue
from tests.helpers import ROOT

EXAMPLES = int(os.environ.get("ACTSPARSE_FUZZ_EXAMPLES", "4"))
CALL_TIMEOUT = float(os.environ.get("ACTSPARSE_FUZZ_TIMEOUT", "180"))
REPORT = os.environ.get("ACTSPARSE_FUZZ_REPORT")
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not REPORT, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
EXE = str(Path(sys.executable).with_name("actsparse"))

# What the calls did, for the summary of `make fuzz`.
STATS: dict = collections.defaultdict(collections.Counter)


def _summary() -> None:
    if REPORT and STATS:
        data = {k: dict(v) for k, v in STATS.items()}
        Path(REPORT).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


atexit.register(_summary)


@dataclass(frozen=True)
class Pristine:
    """The undamaged material every case starts from."""

    store: Path
    run_ids: tuple[str, ...]
    archive: Path
    files: tuple[str, ...]  # store-relative files
    json_files: tuple[str, ...]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_llama, text_corpus) -> Pristine:
    from actsparse import CollectConfig, collect, share
    from actsparse.analyze.curves import compute_curves
    from actsparse.analyze.token_stats import TOKEN_STATS

    base = tmp_path_factory.mktemp("fuzz")
    store = base / "S"
    ids = []
    for n in (200, 150):
        cfg = CollectConfig(model=str(tiny_llama), corpus=str(text_corpus), max_tokens=n, seq_len=64, batch_size=2,
                            chunk_tokens=128)
        ids.append(collect(cfg, store, statistics=TOKEN_STATS, progress=None, log=lambda m: None).run_id)
    compute_curves(str(store), ids[0], targets=("intermediate",), grids={"top-p": (1.0, 0.9, 0.5)})
    archive = base / "a.tar"
    share.pack(str(store), archive, log=lambda m: None)
    files = tuple(sorted(p.relative_to(store).as_posix() for p in store.rglob("*")
                         if p.is_file() and not p.name.startswith(".")))
    return Pristine(store, tuple(ids), archive, files, tuple(f for f in files if f.endswith(".json")))


# ------------------------------------------------------------------ damage


HOSTILE_VALUES = st.one_of(
    st.sampled_from([10**400, -(10**400), 2**63, 2**64, -1, 0, 1, 1e308, -0.5, 1.5, "", "x", "../../etc/passwd",
                     "0123456789abcdef", "complete", "incomplete", [], [1, 2, 3], [[]], {}, {"a": 1}, None, True,
                     "0" * 5000, [10**30, 1, 1], {"shape": [1, 1, 1]}]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=30),
)


def _json_paths(doc, prefix=()) -> list[tuple]:
    """Every key path of a JSON document down to depth 4 (where a hostile value can go)."""
    out = []
    if isinstance(doc, dict) and len(prefix) < 4:
        for k, v in list(doc.items())[:40]:
            out.append((*prefix, k))
            out += _json_paths(v, (*prefix, k))
    return out


@st.composite
def store_damage(draw, p: Pristine) -> list[tuple]:
    """1-3 damages of a store: (kind, store-relative path, parameters)."""
    kinds = ["flip", "truncate", "delete", "duplicate", "dir", "symlink", "fifo", "json", "json", "foreign"]
    out = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(kinds))
        if kind == "json":
            rel = draw(st.sampled_from(p.json_files))
            doc = json.loads((p.store / rel).read_text())
            paths = _json_paths(doc) or [("format",)]
            out.append((kind, rel, (draw(st.sampled_from(paths)), draw(HOSTILE_VALUES))))
        elif kind == "foreign":
            where = draw(st.sampled_from(["", "runs", "models", "evaluations", f"runs/{p.run_ids[0]}",
                                          f"runs/{p.run_ids[0]}/analysis", f"runs/{p.run_ids[1]}/tokens"]))
            out.append((kind, where, draw(st.sampled_from(["file", "dir", "symlink", "fifo", "id-file"]))))
        else:
            rel = draw(st.sampled_from(p.files))
            out.append((kind, rel, (draw(st.floats(0, 1)), draw(st.integers(1, 255)),
                                    draw(st.sampled_from(["store", "outside", "dangling", "dir-outside"])))))
    return out


def _damage(store: Path, outside: Path, damages: list[tuple]) -> None:
    for kind, rel, params in damages:
        path = store / rel
        if kind == "foreign":
            d = store / rel
            d.mkdir(parents=True, exist_ok=True)
            name = {"id-file": "0123456789abcdef"}.get(params, f"foreign-{params}")
            target = d / name
            if os.path.lexists(target):
                continue
            if params in ("file", "id-file"):
                target.write_bytes(b"not mine")
            elif params == "dir":
                target.mkdir()
                (target / "x").write_text("x")
            elif params == "symlink":
                os.symlink(outside, target)
            else:
                os.mkfifo(target)
            continue
        if not path.is_file() or path.is_symlink():
            continue  # an earlier damage of this case removed or replaced it
        if kind == "json":
            keys, value = params
            doc = json.loads(path.read_text())
            node = doc
            for k in keys[:-1]:
                node = node.get(k) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node[keys[-1]] = value
            path.write_text(json.dumps(doc))
            continue
        where, byte, link = params
        data = path.read_bytes()
        if kind == "flip" and data:
            i = min(int(where * len(data)), len(data) - 1)
            path.write_bytes(data[:i] + bytes([data[i] ^ byte]) + data[i + 1:])
        elif kind == "truncate":
            path.write_bytes(data[:int(where * len(data))])
        elif kind == "delete":
            path.unlink()
        elif kind == "duplicate":
            twin = path.with_name(path.name.replace("000000", "000042").replace("000001", "000043")
                                  if "0000" in path.name else path.name + "-copy")
            if not os.path.lexists(twin):
                twin.write_bytes(data)
        elif kind == "dir":
            path.unlink()
            path.mkdir()
            (path / "inner").write_bytes(data[:64])
        elif kind == "symlink":
            path.unlink()
            target = {"store": store / "actsparse-store.json", "outside": outside / "secret",
                      "dangling": outside / "nothing-here", "dir-outside": outside}[link]
            os.symlink(target, path)
        elif kind == "fifo":
            path.unlink()
            os.mkfifo(path)


@st.composite
def archive_damage(draw, p: Pristine) -> list[tuple]:
    kinds = ["gzip", "truncate", "flip", "oversized", "unlisted", "link", "device", "absolute", "dotdot", "many",
             "index-size", "index-drop", "index-sha", "index-garbage", "duplicate"]
    return [(draw(st.sampled_from(kinds)), draw(st.floats(0, 1)), draw(st.integers(1, 255)))
            for _ in range(draw(st.integers(1, 2)))]


def _rewrite_archive(src: Path, dst: Path, damages: list[tuple], run_id: str) -> None:
    with tarfile.open(src) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    raw_post = []
    for kind, where, byte in damages:
        index_at = next(i for i, (m, _) in enumerate(members) if m.name == "archive.json")
        try:
            index = json.loads(members[index_at][1])
        except ValueError:  # garbage from an earlier damage of the case: the victims come from the members
            index = {"members": {m.name: {"size": len(d)} for m, d in members if d is not None and m is not
                                 members[index_at][0]}}
        names = sorted(index["members"])
        victim = names[min(int(where * len(names)), len(names) - 1)]

        def info(name: str, type_=tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
            i = tarfile.TarInfo(name)
            i.type, i.linkname = type_, link
            return i

        if kind == "oversized":
            members = [(m, d + b"\0" * (4 << 20) if m.name == victim else d) for m, d in members]
        elif kind == "unlisted":
            members.append((info(f"runs/{run_id}/tokens/part-000077.parquet"), b"PAR1"))
        elif kind == "link":
            members.append((info(f"runs/{run_id}/evil", tarfile.SYMTYPE, "/etc/passwd"), None))
        elif kind == "device":
            members.append((info(f"runs/{run_id}/evil", tarfile.CHRTYPE), None))
        elif kind == "absolute":
            members.append((info("/tmp/actsparse-fuzz-evil"), b"x"))
        elif kind == "dotdot":
            members.append((info("runs/../../actsparse-fuzz-evil"), b"x"))
        elif kind == "many":
            members += [(info(f"runs/{run_id}/tokens/x-{i}"), b"") for i in range(3000)]
        elif kind == "duplicate":
            members.append(next((m, d) for m, d in members if m.name == victim))
        elif kind.startswith("index-"):
            if kind == "index-size":
                index["members"][victim]["size"] = int(index["members"][victim]["size"] * (1 + where * 100)) + 1
            elif kind == "index-drop":
                index["members"].pop(victim)
            elif kind == "index-sha":
                index["members"][victim]["sha256"] = hashlib.sha256(bytes([byte])).hexdigest()
            raw = b"{not json" if kind == "index-garbage" else json.dumps(index).encode()
            members[index_at] = (members[index_at][0], raw)
        else:
            raw_post.append((kind, where, byte))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m, data in members:
            m = tarfile.TarInfo(m.name) if data is not None else m
            if data is not None:
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    for kind, where, byte in raw_post:
        if kind == "gzip":
            raw = gzip.compress(raw)
        elif kind == "truncate":
            raw = raw[:int(where * len(raw))]
        elif kind == "flip" and raw:
            i = min(int(where * len(raw)), len(raw) - 1)
            raw = raw[:i] + bytes([raw[i] ^ byte]) + raw[i + 1:]
    dst.write_bytes(raw)


# ------------------------------------------------------------------ calls and their invariants


def _tree(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """``{relative path: what it is}`` under root (content hashes of files), leaving out ``skip``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in [*filenames, *dirnames]:
            p = here / name
            if p in skip:
                continue
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = f"link:{os.readlink(p)}"
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = "special"
    return out


def _call(ws: Path, name: str, args: list[str], allowed: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    """Run one command against the damaged material and check every invariant of the module docstring."""
    tmp, mpl = ws / "tmp", ws / "mpl"  # matplotlib's font cache is built on the first report
    tmp.mkdir(exist_ok=True)
    before = _tree(ws, (tmp, mpl, *allowed))
    t0 = time.time()
    try:
        r = subprocess.run([EXE, *args], capture_output=True, text=True, timeout=CALL_TIMEOUT, cwd=ROOT,
                           env={**os.environ, "TMPDIR": str(tmp), "COLUMNS": "200", "MPLCONFIGDIR": str(mpl)})
    except subprocess.TimeoutExpired:
        STATS["timeouts"][name] += 1
        pytest.fail(f"{name} ran past {CALL_TIMEOUT} s: {args}")
    STATS["calls"][name] += 1
    STATS["exit"][f"{name} {r.returncode}"] += 1
    STATS["seconds"]["total"] += round(time.time() - t0)
    lines = r.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert r.returncode in (0, 1, 2), (name, args, r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, (name, args, r.stderr[-3000:])
    assert all(ln.startswith(("error:", "note:", "warning:")) or re.fullmatch(r"\d+ rows -> .*", ln)  # sql --out
               for ln in lines), (name, args, r.stderr[-2000:])
    assert len(errors) == (1 if r.returncode == 2 else 0), (name, args, r.stderr)
    after = _tree(ws, (tmp, mpl, *allowed))
    assert after == before, (name, args, {k for k in set(after) | set(before) if after.get(k) != before.get(k)})
    assert list(tmp.iterdir()) == [], (name, args, list(tmp.iterdir()))  # spill and temporary files removed
    if errors:
        STATS["messages"][f"{name}: {errors[0][7:70]}"] += 1
    return r


def _reads_back(store: Path) -> None:
    """Every run a command left marked complete in a destination store verifies and reads."""
    from actsparse import share
    from actsparse.pipeline.reader import StoreReader

    if not (store / "actsparse-store.json").is_file():
        return
    assert not [p for p in store.iterdir() if p.name.startswith((".unpack-", ".incoming-"))], list(store.iterdir())
    st = StoreReader(str(store))
    report = share.verify(str(store))
    assert report.ok, [str(p) for p in report.problems]
    for run in st.runs():
        tokens = run.tokens()
        assert tokens.height == run.n_tokens
        for site in run.sites:
            assert run.read(site, run.n_layers - 1).shape[0] == run.n_tokens


def _results(s: Path, p: Pristine) -> tuple[Path, ...]:
    """Where an analysis writes in a store: each run's ``analysis/``, its ``checksums.json`` and their locks."""
    return tuple(s / "runs" / r / d for r in p.run_ids for d in ("analysis", "checksums.json", ".lock",
                                                                  ".checksums.lock"))


def _store_commands(p: Pristine) -> dict:
    a, b = p.run_ids
    return {
        "runs": lambda s, o: (["runs", str(s), "--format", "json"], ()),
        "verify": lambda s, o: (["verify", str(s)], ()),
        "sql": lambda s, o: (["sql", str(s), "SELECT r.run_id, count(*) AS n FROM token_stats t JOIN runs r "
                                             "USING (run_id) GROUP BY ALL", "--format", "csv"], ()),
        "sql-tokens": lambda s, o: (["sql", str(s), "SELECT count(*) AS n, max(token_index) AS m FROM tokens",
                                     "--out", str(o / "r.parquet"), "--format", "parquet"], (o / "r.parquet",)),
        "query": lambda s, o: (["query", "layer_profile", str(s), "-p", f"run={a}", "-p", "site=gate"], ()),
        "curves": lambda s, o: (["curves", str(s), "--run", a, "--target", "intermediate", "--grid", "1,0.9,0.5",
                                 "--rule", "top-p", "-q", "--format", "csv"], _results(s, p)),
        "pack": lambda s, o: (["pack", str(s), str(o / "p.tar")], (o / "p.tar",)),
        "merge": lambda s, o: (["merge", str(s), str(o / "M")], (o / "M",)),
        "report": lambda s, o: (["report", str(s), "--out", str(o / "R"), "--run", b, "-q"], (o / "R", *_results(s, p))),
    }


@pytest.mark.slow
def test_damaged_stores_meet_every_command_gracefully(pristine):
    commands = _store_commands(pristine)

    @FUZZ
    @given(damage=store_damage(pristine), chosen=st.lists(st.sampled_from(sorted(commands)), min_size=1, max_size=3,
                                                          unique=True))
    def case(damage, chosen):
        STATS["cases"]["store"] += 1
        for kind, _, _ in damage:
            STATS["damage"][kind] += 1
        with tempfile.TemporaryDirectory(prefix="actsparse-fuzz-") as d:
            ws = Path(d)
            store, out, outside = ws / "S", ws / "out", ws / "outside"
            shutil.copytree(pristine.store, store, symlinks=True)
            out.mkdir()
            outside.mkdir()
            (outside / "secret").write_text("outside the store")
            _damage(store, outside, damage)
            for name in chosen:
                args, allowed = commands[name](store, out)
                r = _call(ws, name, args, allowed)
                if name == "pack" and r.returncode == 0:
                    r = _call(ws, "unpack", ["unpack", str(out / "p.tar"), str(out / "U")], (out / "U",))
                    if r.returncode == 0:
                        _reads_back(out / "U")
                if name == "merge" and r.returncode == 0:
                    _reads_back(out / "M")

    case()


@pytest.mark.slow
def test_hostile_archives_are_refused_or_restored_whole(pristine):
    @FUZZ
    @given(damage=archive_damage(pristine), into_existing=st.booleans())
    def case(damage, into_existing):
        STATS["cases"]["archive"] += 1
        for kind, _, _ in damage:
            STATS["damage"][f"archive {kind}"] += 1
        with tempfile.TemporaryDirectory(prefix="actsparse-fuzz-") as d:
            ws = Path(d)
            bad = ws / "bad.tar"
            _rewrite_archive(pristine.archive, bad, damage, pristine.run_ids[1])
            dest = ws / "D"
            if into_existing:
                shutil.copytree(pristine.store, dest)
                shutil.rmtree(dest / "runs" / pristine.run_ids[1])
                write_catalogue(fmt.StorePaths(dest))  # a store that lacks the run, not a damaged one
            before = _tree(dest) if into_existing else {}
            r = _call(ws, "unpack", ["unpack", str(bad), str(dest)], (dest,))
            if r.returncode != 0:  # refused: the store is as it was, or not there when made for the archive
                assert _tree(dest) == before if into_existing else not dest.exists()
            _reads_back(dest)
            assert not Path("/tmp/actsparse-fuzz-evil").exists() and not (ws.parent / "actsparse-fuzz-evil").exists()

    case()
