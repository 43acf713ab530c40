"""The HTML report (``analyze.report``, ``actsparse report``) and the ``make demo`` driver, on tiny models.

Every figure must exist as a non-empty PNG and SVG, be referenced by ``index.html`` and load in a real
browser. The browser check drives headless Chromium (Debian package ``chromium``) through the DevTools
protocol over ``--remote-debugging-pipe`` (file descriptors 3 and 4, NUL-separated JSON; stdlib only,
no Playwright or websockets). It loads the page from ``file://`` and fails on any uncaught exception,
``console.error``, browser log entry of level error, failed resource load, request that leaves the
local disk, or image (every ``<img>`` and every linked SVG) whose ``naturalWidth`` is 0.
Chromium is installed by a session fixture where it is missing (``apt-get``, root only: skipped
otherwise; a failed install fails the tests).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from actsparse import CollectConfig, collect
from actsparse.analyze.evaluate import EvalConfig, evaluate
from actsparse.analyze.report import build_report
from actsparse.core import format as fmt
from actsparse.core.vocab import SITES
from tests.helpers import run_cli

CHROMIUM = "/usr/bin/chromium"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a headless-capable Chromium, installed with apt-get where it is missing."""
    if Path(CHROMIUM).exists():
        return CHROMIUM
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed and installing it needs root (apt-get install -y chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run("apt-get update && apt-get install -y chromium", shell=True, capture_output=True, text=True,
                       env=env, timeout=1800)
    if r.returncode != 0 or not Path(CHROMIUM).exists():
        pytest.fail(f"installing chromium failed (rc {r.returncode}); the report's browser check needs it: "
                    f"{(r.stderr or r.stdout).strip()[-500:]}")
    return CHROMIUM


class DevTools:
    """A minimal Chrome DevTools protocol client over ``--remote-debugging-pipe``."""

    def __init__(self, exe: str, profile: Path):
        to_browser = os.pipe()
        from_browser = os.pipe()
        # Moved above fd 10 so that placing them on 3 and 4 in the child cannot clobber one another.
        self._child_fds = [fcntl.fcntl(to_browser[0], fcntl.F_DUPFD, 10),
                           fcntl.fcntl(from_browser[1], fcntl.F_DUPFD, 10)]
        os.close(to_browser[0])
        os.close(from_browser[1])
        self._w, self._r = to_browser[1], from_browser[0]
        r_fd, w_fd = self._child_fds

        def fds_3_and_4():
            os.dup2(r_fd, 3)
            os.dup2(w_fd, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds_3_and_4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in self._child_fds:
            os.close(fd)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _recv(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("no answer from chromium over the DevTools pipe")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium closed the DevTools pipe (exit status {self.proc.poll()})")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60.0) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._recv(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for m in self.events[seen:]:
                if m.get("method") == method:
                    return m
            seen = len(self.events)
            self.events.append(self._recv(deadline))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


# Resolves to [[url, naturalWidth], ...] for every <img> and every linked SVG (loaded as an image).
_IMAGES_JS = """
(async () => {
  const load = (url) => new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve([url, img.naturalWidth]);
    img.onerror = () => resolve([url, 0]);
    img.src = url;
  });
  const shown = Array.from(document.images).map((i) => [i.src, i.complete ? i.naturalWidth : 0]);
  const svgs = await Promise.all(Array.from(document.querySelectorAll('a[href$=".svg"]')).map((a) => load(a.href)));
  return shown.concat(svgs);
})()
"""


def check_in_browser(exe: str, page: Path, profile: Path) -> list[list]:
    """Load ``page`` in headless Chromium; assert no errors; return ``[[url, naturalWidth], ...]``."""
    cdp = DevTools(exe, profile)
    try:
        target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            cdp.send(f"{domain}.enable", session=session)
        cdp.send("Page.navigate", {"url": page.as_uri()}, session=session)
        cdp.wait_event("Page.loadEventFired")
        images = cdp.send("Runtime.evaluate", {"expression": _IMAGES_JS, "awaitPromise": True, "returnByValue": True},
                          session=session)["result"]["value"]
    finally:
        cdp.close()
    problems = []
    for m in cdp.events:
        method, params = m.get("method"), m.get("params", {})
        if method == "Runtime.exceptionThrown":
            problems.append(f"uncaught: {params['exceptionDetails'].get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            problems.append(f"console.{params['type']}: {[a.get('value') for a in params.get('args', [])]}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            problems.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        elif method == "Network.loadingFailed":
            problems.append(f"failed load: {params.get('errorText')}")
        elif method == "Network.requestWillBeSent" and not params["request"]["url"].startswith(("file:", "data:",
                                                                                               "about:")):
            problems.append(f"network request: {params['request']['url']}")
    assert not problems, problems
    broken = [url for url, width in images if not width]
    assert not broken, f"images that did not load: {broken}"
    return images


def expected_stems(run_ids: list[str], closed: bool) -> set[str]:
    # size scaling is drawn whenever a run records its parameter count, as every collection now does
    stems = {"fig-critical-sparsity", "fig-error-vs-sparsity", "fig-size-scaling"}
    for rid in run_ids:
        stems |= {f"fig-{kind}-{rid}" for kind in ("sparsity-vs-topp", "heatmap", "magnitudes", "position")}
    return stems | ({"fig-closed-loop-accuracy"} if closed else set())


def check_files(index: Path, stems: set[str]) -> str:
    """Every figure exists as a valid non-empty PNG and SVG referenced by the page; returns the HTML."""
    page = index.read_text(encoding="utf-8")
    found = {p.stem for p in index.parent.glob("fig-*.png")}
    assert found == stems
    for stem in stems:
        png, svg = index.parent / f"{stem}.png", index.parent / f"{stem}.svg"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000, png
        assert ET.parse(svg).getroot().tag.endswith("svg") and svg.stat().st_size > 1000, svg
        assert f'src="{stem}.png"' in page and f'href="{stem}.svg"' in page, stem
    assert "<script" not in page and "http://" not in page and "https://" not in page
    return page


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, tiny_llama, text_corpus):
    """A store with one run of the tiny Llama: 300 tokens, all six sites, three shards."""
    store = tmp_path_factory.mktemp("report-store")
    cfg = CollectConfig(model=str(tiny_llama), corpus=str(text_corpus), sites=SITES, max_tokens=300, seq_len=64,
                        batch_size=4, chunk_tokens=128)
    res = collect(cfg, store, progress=False, log=quiet)
    return store, res.run_id


@pytest.mark.slow
def test_cli_report_open_loop_only(tiny_store, tmp_path, chromium):
    store, run_id = tiny_store
    out = tmp_path / "report"
    r = run_cli("report", str(store), "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    index = out / "index.html"
    assert r.stdout.strip().splitlines()[-1] == f"report: {index.resolve()}"
    page = check_files(index, expected_stems([run_id], closed=False))
    assert "No closed-loop evaluation is stored" in page and "open-loop" in page
    assert "per-token statistics of" in page  # the position profile read token_stats
    m = json.loads((store / "runs" / run_id / "manifest.json").read_text())
    assert m["model"]["weights_sha256"] in page and m["corpus"]["sha256"] in page
    images = check_in_browser(chromium, index, tmp_path / "profile")
    assert len(images) == 2 * len(expected_stems([run_id], closed=False))


@pytest.mark.slow
def test_report_two_runs_with_closed_loop(tiny_store, tiny_llama, text_corpus, tmp_path, chromium):
    store, run_id = tiny_store
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    # A second run of the same model (labels must tell them apart), and no token statistics for the
    # first one: its position profile falls back to the stored arrays.
    second = collect(CollectConfig(model=str(tiny_llama), corpus=str(text_corpus), sites=("input", "intermediate"),
                                   max_tokens=200, seq_len=32, batch_size=4, chunk_tokens=128),
                     copy, progress=False, log=quiet).run_id
    shutil.rmtree(copy / "runs" / run_id / "token_stats")
    evaluate(EvalConfig(target="intermediate", grid=(1.0, 0.9, 0.7), max_tokens=512, seq_len=64, batch_size=4),
             copy, run=run_id, n_boot=20, log=quiet)
    index = build_report(copy, tmp_path / "report", log=quiet)
    page = check_files(index, expected_stems([run_id, second], closed=True))
    assert "closed-loop" in page and "not evaluated" in page  # intermediate evaluated, the other targets not
    assert re.search(r"\d+\.\d % \[\d+\.\d %, \d+\.\d %\]", page)  # closed-loop critical sparsity with its CI
    for rid in (run_id, second):  # same model and corpus: labels carry the run id
        assert f"{tiny_llama.name} / {text_corpus.name} ({rid[:8]})" in page
    assert "a sample of" in page  # position profile computed from the arrays
    check_in_browser(chromium, index, tmp_path / "profile")


@pytest.mark.slow
def test_report_errors_are_one_line(tiny_store, tmp_path):
    store, _ = tiny_store
    out = str(tmp_path / "o")
    for args, message in ((["report", str(tmp_path / "nothing"), "--out", out], "not an actsparse store"),
                          (["report", str(store), "--out", out, "--run", "ffff"], "unknown run"),
                          (["report", str(store), "--out", str(store / "report")], "is inside the store"),
                          (["report", str(store), "--out", "/"], "is a non-empty directory that holds no actsparse "
                                                                 "report"),
                          (["report", str(store), "--out", str(store / fmt.MANIFEST)], "is inside the store")):
        r = run_cli(*args)
        assert r.returncode == 2, r.stderr
        assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_report_never_overwrites_files_it_did_not_write(tiny_store, tmp_path):
    """`report --out DIR` overwrote the user's files in a non-empty directory (and wrote into `/` if asked)."""
    store, _ = tiny_store
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.html").write_text("my own page")
    r = run_cli("report", str(store), "--out", str(mine))
    assert r.returncode == 2 and r.stderr.startswith(f"error: --out {mine} is a non-empty directory that holds no "
                                                     "actsparse report"), r.stderr
    assert [p.name for p in mine.iterdir()] == ["index.html"] and (mine / "index.html").read_text() == "my own page"
    (tmp_path / "file").write_text("x")
    r = run_cli("report", str(store), "--out", str(tmp_path / "file"))
    assert r.returncode == 2 and "is a file" in r.stderr and (tmp_path / "file").read_text() == "x"


@pytest.mark.slow
def test_demo_command_reuses_finished_work(tiny_llama, text_corpus, tmp_path):
    """``actsparse demo`` (what ``make demo`` runs) end to end on a tiny model; the second run computes nothing."""
    args = ["demo", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "r"), "--models", str(tiny_llama),
            "--corpus", str(text_corpus), "--tokens", "256", "--eval-tokens", "256", "--seq-len", "64",
            "--eval-seq-len", "64"]
    env = {"COLUMNS": "200"}
    first = run_cli(*args, env=env, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    index = (tmp_path / "r" / "index.html").resolve()
    assert f"report: {index}" in first.stdout
    second = run_cli(*args, env=env, timeout=900)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "already complete" in second.stdout and "evaluations: all reused" in second.stdout, second.stdout
    assert f"report: {index}" in second.stdout
    bad = run_cli("demo", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "r2"), "--models",
                  str(tmp_path / "no-such-model"), env=env, timeout=300)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.startswith("error: unknown model") and len(bad.stderr.strip().splitlines()) == 1


def test_browser_check_catches_broken_pages(tmp_path, chromium):
    """The browser check is not vacuous: a missing image and a console error both fail it."""
    missing = tmp_path / "missing.html"
    missing.write_text('<!DOCTYPE html><html><body><img src="nothing.png"></body></html>')
    with pytest.raises(AssertionError, match="nothing.png"):
        check_in_browser(chromium, missing, tmp_path / "p1")
    noisy = tmp_path / "noisy.html"
    noisy.write_text("<!DOCTYPE html><html><body><script>console.error('boom')</script></body></html>")
    with pytest.raises(AssertionError, match="boom"):
        check_in_browser(chromium, noisy, tmp_path / "p2")


@pytest.mark.slow
def test_report_of_generation_and_diffusion_runs(decoded_store, tmp_path, chromium):
    """Prefill against generation for the generation run; sparsity and Jaccard against the step for every run of
    either kind (the per-step analyses computed and cached by the report)."""
    src, ids = decoded_store
    store = shutil.copytree(src, tmp_path / "S")
    index = build_report(store, tmp_path / "report", log=quiet)
    run_ids = list(ids.values())
    stems = expected_stems(run_ids, closed=False) | {f"fig-steps-{rid}" for rid in run_ids}
    page = check_files(index, stems | {f"fig-phases-{ids['generation']}"})
    assert "Generation and diffusion" in page and "prefill" in page and "top-p-flat 0.9" in page
    assert len(list(store.glob("runs/*/analysis/step_stability-*.parquet"))) == 3  # cached beside the runs
    check_in_browser(chromium, index, tmp_path / "profile")
