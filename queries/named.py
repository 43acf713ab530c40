"""Named queries: one ``<name>.sql`` file each, run by ``actsparse query NAME`` and ``Store.query``.

Every file starts with a header of ``--`` comment lines, then one SELECT over the views of
:mod:`actsparse.queries.engine`::

    -- purpose: what the query answers (continuation lines start with "--   ")
    -- param run RUN: run id or unique prefix               (no default: required)
    -- param site VARCHAR = 'intermediate': FFN site         (a default makes it optional)
    -- param n INTEGER [1, 1000] = 10: rows of each kind     (a range: values outside it are refused)
    -- columns: col_a, col_b, ...

Values are bound as DuckDB named parameters (``$run``, ``$site``), never pasted into the SQL text.
Types: RUN (a run id or unique prefix, resolved against the store), SITE, TARGET, RULE and STEP_RULE
(text checked against ``actsparse.core.vocab``, so that a misspelt name is an error rather than an empty
result), VARCHAR, INTEGER, DOUBLE, BOOLEAN; defaults are SQL literals (``'text'``, numbers,
``true``/``false``, ``NULL``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from actsparse.core import vocab
from actsparse.core.errors import ActsparseError

# text types of a closed vocabulary (STEP_RULE: the rules of per-step analyses, the flattened top-p among them)
NAMES = {"SITE": vocab.SITES, "TARGET": vocab.TARGETS, "RULE": vocab.RULES, "STEP_RULE": vocab.STEP_RULES}
TYPES = ("RUN", *NAMES, "VARCHAR", "INTEGER", "DOUBLE", "BOOLEAN")
_PARAM = re.compile(r"^(?P<name>[a-z_][a-z0-9_]*)\s+(?P<type>[A-Z_]+)\s*"
                    r"(?:\[\s*(?P<lo>[-+0-9.e]+)\s*,\s*(?P<hi>[-+0-9.e]+)\s*\]\s*)?"
                    r"(?:=\s*(?P<default>.+?))?\s*:\s*(?P<doc>.*)$")
_USED = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_NO_DEFAULT = object()


@dataclass(frozen=True)
class Param:
    """One declared parameter: name, type, default (``_NO_DEFAULT`` when required), description, and for
    numbers the range ``[lo, hi]`` a value must lie in (None: unbounded), so that a value that makes no sense
    is an error rather than an empty table."""

    name: str
    type: str
    default: Any
    doc: str
    lo: float | None = None
    hi: float | None = None

    @property
    def required(self) -> bool:
        return self.default is _NO_DEFAULT

    def describe(self) -> str:
        """``name TYPE`` or ``name TYPE = default``, as ``actsparse query list`` shows it."""
        typ = self.type if self.lo is None else f"{self.type} [{self.lo:g}, {self.hi:g}]"
        if self.required:
            return f"{self.name} {typ}"
        if self.default is None:
            shown = "NULL"
        elif isinstance(self.default, bool):
            shown = str(self.default).lower()
        elif isinstance(self.default, str):
            shown = "'" + self.default.replace("'", "''") + "'"
        else:
            shown = str(self.default)
        return f"{self.name} {typ} = {shown}"

    def convert(self, value: Any) -> Any:
        """A value given as text (CLI) or Python, converted to the declared type.

        Raises:
            ActsparseError: the value does not fit the type, or lies outside the declared range.
        """
        if value is None:
            return None
        try:
            if self.type == "INTEGER":
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                return self._in_range(int(value))
            if self.type == "DOUBLE":
                if isinstance(value, bool):
                    raise ValueError
                return self._in_range(float(value))
            if self.type == "BOOLEAN":
                if isinstance(value, bool):
                    return value
                text = str(value).strip().lower()
                if text in ("true", "1", "yes"):
                    return True
                if text in ("false", "0", "no"):
                    return False
                raise ValueError
        except ValueError:
            raise ActsparseError(f"parameter {self.name} must be {self.type}, got {value!r}") from None
        if self.type in NAMES and str(value) not in NAMES[self.type]:
            raise ActsparseError(f"parameter {self.name}: unknown {self.type.lower()} {str(value)!r} "
                                 f"(choose {', '.join(NAMES[self.type])})")
        return str(value)


    def _in_range(self, v: float) -> float:
        if v != v or (self.lo is not None and not self.lo <= v <= self.hi):  # NaN is never in range
            raise ActsparseError(f"parameter {self.name} must be in [{self.lo:g}, {self.hi:g}], got {v!r}"
                                 if self.lo is not None else f"parameter {self.name} must be a number, got {v!r}")
        return v


@dataclass(frozen=True)
class NamedQuery:
    """A parsed ``queries/<name>.sql``."""

    name: str
    purpose: str
    params: tuple[Param, ...]
    columns: str
    sql: str = field(repr=False)

    def bind(self, given: dict[str, Any], *, resolve_run: Callable[[str], str],
             only_run: str | None = None) -> dict[str, Any]:
        """The ``{name: value}`` to execute with: given values converted, defaults filled in.

        ``only_run``: the store's run id when it holds exactly one complete run; a query with a single
        RUN parameter then takes it when the parameter is not given (as ``actsparse curves`` does).

        Raises:
            ActsparseError: an unknown or a missing required parameter (both list the parameters), or a
                value of the wrong type.
        """
        names = {p.name for p in self.params}
        unknown = sorted(set(given) - names)
        if unknown:
            raise ActsparseError(f"query {self.name} has no parameter {', '.join(unknown)}; "
                                 f"parameters: {self.signature()}")
        runs = [p.name for p in self.params if p.type == "RUN"]
        if only_run is not None and len(runs) == 1 and given.get(runs[0]) is None:
            given = {**given, runs[0]: only_run}
        missing = [p.name for p in self.params if p.required and given.get(p.name) is None]
        if missing:
            raise ActsparseError(f"query {self.name} needs parameter {', '.join(missing)} "
                                 f"(--param {missing[0]}=...); parameters: {self.signature()}")
        values = {}
        for p in self.params:
            v = p.convert(given[p.name]) if p.name in given else p.default
            values[p.name] = resolve_run(v) if p.type == "RUN" and v is not None else v
        return values

    def signature(self) -> str:
        return ", ".join(p.describe() for p in self.params) or "none"


def _default(text: str, typ: str, where: str) -> Any:
    t = text.strip()
    if t.upper() == "NULL":
        return None
    if len(t) >= 2 and t[0] == t[-1] == "'":
        return t[1:-1].replace("''", "'")
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    try:
        return int(t) if typ == "INTEGER" else float(t)
    except ValueError:
        raise ActsparseError(f"{where}: default {text!r} is not a SQL literal") from None


def parse(name: str, text: str) -> NamedQuery:
    """Parse one query file's text (header comments, then the SQL).

    Raises:
        ActsparseError: no purpose, a malformed parameter line, an unknown type, or a mismatch between
            declared and used ``$parameters``.
    """
    where = f"queries/{name}.sql"
    fields: dict[str, list[str]] = {"purpose": [], "columns": []}
    params: list[list[str]] = []
    last = None
    lines = text.splitlines()
    body_start = len(lines)
    for i, line in enumerate(lines):
        if not line.startswith("--"):
            body_start = i
            break
        content = line[2:].strip()
        key = next((k for k in fields if content.startswith(k + ":")), None)
        if key is not None:
            last = fields[key]
            last.append(content[len(key) + 1:].strip())
        elif content.startswith("param "):
            params.append([content[len("param "):]])
            last = params[-1]
        elif line[2:].startswith("   ") and content and last is not None:
            last.append(content)  # a continuation line
        else:
            last = None
    sql = "\n".join(lines[body_start:]).strip().rstrip(";")
    if not fields["purpose"] or not sql:
        raise ActsparseError(f"{where}: needs a '-- purpose:' header and a SQL body")
    declared = []
    for chunks in params:
        m = _PARAM.match(" ".join(chunks))
        if not m or m.group("type") not in TYPES:
            raise ActsparseError(f"{where}: bad parameter line {' '.join(chunks)!r} (expected 'param NAME TYPE "
                                 f"[[LO, HI]] [= DEFAULT]: description', TYPE in {', '.join(TYPES)})")
        default = _NO_DEFAULT if m.group("default") is None else _default(m.group("default"), m.group("type"), where)
        bounds = (None, None)
        if m.group("lo") is not None:
            if m.group("type") not in ("INTEGER", "DOUBLE"):
                raise ActsparseError(f"{where}: parameter {m.group('name')}: a range needs INTEGER or DOUBLE")
            try:
                bounds = (float(m.group("lo")), float(m.group("hi")))
            except ValueError:
                raise ActsparseError(f"{where}: parameter {m.group('name')}: bad range") from None
        declared.append(Param(m.group("name"), m.group("type"), default, m.group("doc").strip(), *bounds))
        if bounds[0] is not None and default not in (_NO_DEFAULT, None):
            declared[-1].convert(default)  # a default outside the range is the file's error
        if m.group("type") in NAMES and default not in (_NO_DEFAULT, None):
            declared[-1].convert(default)  # a default outside the vocabulary is the file's error
    code = re.sub(r"--[^\n]*", "", re.sub(r"'(?:[^']|'')*'", "''", sql))  # strings and comments hold no parameters
    used = set(_USED.findall(code))
    names = {p.name for p in declared}
    if used != names:
        raise ActsparseError(f"{where}: parameters used {sorted(used)} differ from those declared {sorted(names)}")
    return NamedQuery(name, " ".join(fields["purpose"]), tuple(declared), " ".join(fields["columns"]), sql)


@lru_cache(maxsize=1)
def load() -> dict[str, NamedQuery]:
    """Every named query shipped in this package, by name."""
    out = {}
    for entry in sorted(resources.files("actsparse.queries").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sql"):
            name = entry.name[:-4]
            out[name] = parse(name, entry.read_text(encoding="utf-8"))
    return out


def get(name: str) -> NamedQuery:
    """The named query ``name`` (``-`` and ``_`` are interchangeable).

    Raises:
        ActsparseError: no such query; the message lists the available ones.
    """
    queries = load()
    key = str(name).replace("-", "_")
    if key not in queries:
        raise ActsparseError(f"unknown query '{name}'; available: {', '.join(queries)}")
    return queries[key]
