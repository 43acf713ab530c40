"""The shipped lm-evaluation-harness tasks: built reproducibly from real held-out text (no benchmark data can be
downloaded here).

None of ARC, HellaSwag, PIQA or LAMBADA can be downloaded on machines without the hub, so actsparse ships
stand-ins built from text it already has. :func:`build` writes them from the documents of a corpus split
(default: the held-out split of the built-in ``wiki`` corpus, i.e.
``actsparse.pipeline.corpora.open_corpus("wiki").split("heldout")``, which collection never reads). The output is
a pure function of the documents and :class:`BuildConfig` (seeded ``random.Random``, sorted inputs,
``json.dumps(sort_keys=True)``), so rebuilding gives byte-identical files.

Tasks (lm-eval names; YAMLs by :func:`write_task_yamls`):

* ``actsparse_wiki_cloze`` (loglikelihood, metric ``acc``): predict a passage's final word, in the style
  of LAMBADA (``lm_eval/tasks/lambada``: context = passage minus its last word, target = " " + last word,
  acc = the target is the greedy continuation). Passage choice, per paragraph (one line of the document):
  the paragraph is cut into sentences (:func:`split_sentences`); every sentence j >= 1 whose last
  whitespace-separated token is a word of ``min_target_chars``+ ASCII letters followed by one of ``.!?``,
  not a function word (:data:`STOPWORDS`) and, with ``target_in_context``, present as a whole word
  (case-insensitive) in the passage before it (LAMBADA's targets are mostly recoverable only from the
  wider context) is a candidate end; the passage is the shortest run of sentences ending at j with at
  least ``min_context_words`` context words, and candidates longer than ``max_context_words`` are
  dropped. One candidate per paragraph is drawn, so passages never overlap; the final punctuation is
  dropped (LAMBADA passages end with the target word).
* ``actsparse_wiki_cloze_gen`` (generate_until, metric ``exact_match``): the same examples answered by
  greedy generation (``max_gen_toks`` 5, stop at newline, period, comma), the first word of the
  generation compared with the target. It exercises lm-eval's generation path.
* ``actsparse_wiki_next_sentence`` (multiple_choice, metrics ``acc`` and ``acc_norm``): the true next
  sentence of a passage among ``n_distractors`` sentences drawn from other documents, in the style of
  SWAG/HellaSwag. Per paragraph one split point j >= 1 is drawn among those whose continuation (sentence
  j) has ``min_sentence_words``..``max_sentence_words`` words; the context is the shortest run of
  sentences ending at j - 1 with ``min_context_words`` words (at most ``max_context_words``).
  Distractors are drawn without replacement from the sentences of the other documents of the split
  (same length limits) whose word count is within ``length_tolerance`` (relative) of the true one,
  so length alone does not give the answer away; the choices are shuffled.

Each task has a ``test`` split and a disjoint few-shot pool (``train``, ``n_fewshot`` examples from
other paragraphs: ``fewshot_split: train``), so ``--num-fewshot`` works. Paragraphs are shuffled with
the seed and assigned to the few-shot pool first, then to the test set, up to ``n_examples``.

Files written by :func:`build` into ``out``: ``cloze.jsonl``, ``cloze_fewshot.jsonl``,
``next_sentence.jsonl``, ``next_sentence_fewshot.jsonl`` (one JSON object per line) and
``manifest.json`` (config, corpus spec and sha256, example counts, sha256 of every file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from actsparse.core.errors import ActsparseError
from actsparse.core.files import atomic_write_text

BUILD_VERSION = 1
CLOZE_TASK = "actsparse_wiki_cloze"
CLOZE_GEN_TASK = "actsparse_wiki_cloze_gen"
NEXT_SENTENCE_TASK = "actsparse_wiki_next_sentence"
TASK_NAMES = (CLOZE_TASK, CLOZE_GEN_TASK, NEXT_SENTENCE_TASK)
DATA_FILES = ("cloze.jsonl", "cloze_fewshot.jsonl", "next_sentence.jsonl", "next_sentence_fewshot.jsonl")
MANIFEST = "manifest.json"
REBUILD = "python -m actsparse.analyze.tasks.build"
# The data shipped with actsparse as package data (rebuilt byte for byte by `python -m actsparse.analyze.tasks.build`).
SHIPPED_DATA = Path(__file__).resolve().parent / "data"

# Function words never used as cloze targets (a closed list, so the output does not depend on a library).
_STOPWORD_TEXT = """
a about above after again against all also am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have having
he her here hers herself him himself his how i if in into is it its itself just may me might more most must
my myself no nor not now of off on once only or other our ours ourselves out over own same she should so
some such than that the their theirs them themselves then there these they this those through to too under
until up upon very was we were what when where which while who whom why will with would you your yours
yourself yourselves one two three many much often however thus therefore although though since
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())

# A sentence ends at . ! or ? followed by whitespace and an upper-case letter, digit or opening quote/bracket.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")
_TARGET = re.compile(r"([A-Za-z]+)[.!?]")


@dataclass(frozen=True)
class BuildConfig:
    """How the tasks are drawn from the documents (module docstring for the rules).

    Attributes:
        seed: seed of every random choice.
        n_examples: test examples per task at most (fewer when the split has fewer paragraphs).
        n_fewshot: few-shot pool size per task.
        min_context_words, max_context_words: context length limits, in whitespace-separated words.
        min_target_chars: cloze targets have at least this many letters.
        target_in_context: cloze targets must occur in the passage before them.
        n_distractors: wrong choices per next-sentence example.
        min_sentence_words, max_sentence_words: limits for continuations and distractors.
        length_tolerance: distractor word counts are within this fraction of the true continuation's.
    """

    seed: int = 20260101
    n_examples: int = 500
    n_fewshot: int = 16
    min_context_words: int = 40
    max_context_words: int = 160
    min_target_chars: int = 3
    target_in_context: bool = True
    n_distractors: int = 3
    min_sentence_words: int = 6
    max_sentence_words: int = 40
    length_tolerance: float = 0.25

    def validate(self) -> None:
        """Raise ActsparseError for settings that cannot give a task."""
        for name in ("n_examples", "min_context_words", "max_context_words", "min_target_chars",
                     "n_distractors", "min_sentence_words", "max_sentence_words"):
            if getattr(self, name) < 1:
                raise ActsparseError(f"task build setting {name} must be positive (got {getattr(self, name)})")
        if self.n_fewshot < 0:
            raise ActsparseError(f"task build setting n_fewshot must be >= 0 (got {self.n_fewshot})")
        if self.max_context_words < self.min_context_words or self.max_sentence_words < self.min_sentence_words:
            raise ActsparseError("task build: a maximum length is below its minimum")
        if not self.length_tolerance >= 0:
            raise ActsparseError(f"task build setting length_tolerance must be >= 0 (got {self.length_tolerance})")


# ---------------------------------------------------------------- text units


def split_paragraphs(text: str) -> list[str]:
    """Non-empty lines of a document, whitespace-normalised (the wiki corpus has one paragraph per line)."""
    return [" ".join(line.split()) for line in text.split("\n") if line.strip()]


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one paragraph: cut after ``.!?`` + whitespace + a capital, digit, quote or bracket.

    A heuristic (abbreviations such as "U.S. Army" are cut too); the same cuts every time.
    """
    return [s for s in _SENTENCE_END.split(paragraph) if s]


def _words(s: str) -> int:
    return len(s.split())


def _shortest_run(sentences: Sequence[str], end: int, min_words: int) -> tuple[int, int] | None:
    """(start, words) of the shortest run sentences[start:end] with >= min_words words; None if none."""
    words = 0
    for start in range(end - 1, -1, -1):
        words += _words(sentences[start])
        if words >= min_words:
            return start, words
    return None


# ---------------------------------------------------------------- examples


def _cloze_candidates(sentences: Sequence[str], cfg: BuildConfig) -> list[dict]:
    """Every passage of one paragraph that qualifies as a cloze example (module docstring)."""
    out = []
    for j in range(1, len(sentences)):
        tokens = sentences[j].split()
        m = _TARGET.fullmatch(tokens[-1]) if tokens else None
        if m is None or len(m.group(1)) < cfg.min_target_chars or m.group(1).lower() in STOPWORDS:
            continue
        target = m.group(1)
        last = " ".join(tokens[:-1])
        run = _shortest_run(sentences, j, max(cfg.min_context_words - len(tokens) + 1, 1))
        if run is None:
            continue
        context = " ".join([*sentences[run[0]:j], last]).strip()
        if not cfg.min_context_words <= _words(context) <= cfg.max_context_words:
            continue
        if cfg.target_in_context and not re.search(rf"\b{re.escape(target)}\b", context, flags=re.IGNORECASE):
            continue
        out.append(dict(context=context, target=target))
    return out


def _next_candidates(sentences: Sequence[str], cfg: BuildConfig) -> list[dict]:
    """Every (context, continuation) split of one paragraph that qualifies (module docstring)."""
    out = []
    for j in range(1, len(sentences)):
        if not cfg.min_sentence_words <= _words(sentences[j]) <= cfg.max_sentence_words:
            continue
        run = _shortest_run(sentences, j, cfg.min_context_words)
        if run is None or run[1] > cfg.max_context_words:
            continue
        out.append(dict(context=" ".join(sentences[run[0]:j]), continuation=sentences[j]))
    return out


def _paragraph_units(documents) -> list[tuple[int, str, int, list[str]]]:
    """(doc_id, key, paragraph index, sentences) of every paragraph, in corpus order."""
    return [(d.doc_id, d.key, p, split_sentences(text))
            for d in documents for p, text in enumerate(split_paragraphs(d.text))]


def _draw(units, pick, cfg: BuildConfig, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Shuffle paragraphs, take one candidate of each (via ``pick``): few-shot pool first, then test."""
    order = list(range(len(units)))
    rng.shuffle(order)
    fewshot, test = [], []
    for u in order:
        doc_id, key, para, sentences = units[u]
        candidates = pick(sentences, cfg)
        if not candidates:
            continue
        ex = dict(candidates[rng.randrange(len(candidates))], doc_key=key, doc_id=doc_id, paragraph=para)
        if len(fewshot) < cfg.n_fewshot:
            fewshot.append(ex)
        elif len(test) < cfg.n_examples:
            test.append(ex)
        else:
            break
    return fewshot, test


def cloze_examples(documents, cfg: BuildConfig = BuildConfig()) -> tuple[list[dict], list[dict]]:
    """``(few-shot pool, test examples)`` of the last-word cloze task; each a dict with context, target,
    doc_key, doc_id, paragraph (and id: position in its list)."""
    fewshot, test = _draw(_paragraph_units(documents), _cloze_candidates, cfg, random.Random(f"cloze:{cfg.seed}"))
    return _numbered(fewshot), _numbered(test)


def next_sentence_examples(documents, cfg: BuildConfig = BuildConfig()) -> tuple[list[dict], list[dict]]:
    """``(few-shot pool, test examples)`` of the next-sentence task; each a dict with context, choices
    (``n_distractors + 1`` strings), label (index of the true continuation), doc_key, doc_id, paragraph, id.

    Raises:
        ActsparseError: fewer than two documents, or too few distractors of a matching length.
    """
    units = _paragraph_units(documents)
    by_length: dict[int, set[tuple[int, str]]] = {}  # word count -> {(doc_id, sentence)}
    for doc_id, _, _, sentences in units:
        for s in sentences:
            if cfg.min_sentence_words <= _words(s) <= cfg.max_sentence_words:
                by_length.setdefault(_words(s), set()).add((doc_id, s))
    if len({d for group in by_length.values() for d, _ in group}) < 2:
        raise ActsparseError("the next-sentence task needs at least two documents (distractors come from other "
                             "documents)")
    rng = random.Random(f"next:{cfg.seed}")
    fewshot, test = _draw(units, _next_candidates, cfg, rng)
    for ex in (*fewshot, *test):
        n = _words(ex["continuation"])
        lengths = range(math.ceil(n * (1 - cfg.length_tolerance)), math.floor(n * (1 + cfg.length_tolerance)) + 1)
        near = sorted({s for k in lengths for d, s in by_length.get(k, ()) if d != ex["doc_id"]}
                      - {ex["continuation"]})
        if len(near) < cfg.n_distractors:
            raise ActsparseError(f"only {len(near)} distractor sentences of about {n} words for {ex['doc_key']!r} "
                                 f"paragraph {ex['paragraph']}; raise length_tolerance or use a larger corpus")
        choices = [ex.pop("continuation"), *rng.sample(near, cfg.n_distractors)]
        order = list(range(len(choices)))
        rng.shuffle(order)
        ex["choices"] = [choices[i] for i in order]
        ex["label"] = order.index(0)
    return _numbered(fewshot), _numbered(test)


def _numbered(examples: list[dict]) -> list[dict]:
    return [dict(ex, id=i) for i, ex in enumerate(examples)]


# ---------------------------------------------------------------- files


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: str | Path, corpus: str = "wiki", split: str = "heldout", cfg: BuildConfig = BuildConfig()) -> dict:
    """Write the task data of ``corpus``'s ``split`` into directory ``out`` (created); returns the manifest.

    Files and rules: module docstring. The same corpus content and ``cfg`` give byte-identical files.

    Raises:
        ActsparseError: bad settings, an unknown corpus or split, a split that yields no example.
    """
    from actsparse.pipeline.corpora import open_corpus

    cfg.validate()
    c = open_corpus(corpus)
    documents = c.split(split)
    cloze_few, cloze = cloze_examples(documents, cfg)
    next_few, nxt = next_sentence_examples(documents, cfg)
    if not cloze or not nxt:
        raise ActsparseError(f"corpus {corpus!r} split {split!r} gives {len(cloze)} cloze and {len(nxt)} "
                             "next-sentence test examples; it needs longer paragraphs")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in zip(DATA_FILES, (cloze, cloze_few, nxt, next_few)):
        atomic_write_text(out / name, _jsonl(rows))
    manifest = dict(version=BUILD_VERSION, corpus=c.spec, corpus_sha256=c.sha256, split=split,
                    config=dataclasses.asdict(cfg),
                    counts={name: n for name, n in zip(DATA_FILES, map(len, (cloze, cloze_few, nxt, next_few)))},
                    sha256={name: _sha256(out / name) for name in DATA_FILES})
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def check_data(data_dir: str | Path) -> dict:
    """The manifest of a task data directory, after checking every file against its sha256.

    Raises:
        ActsparseError: a missing or unreadable manifest, a missing file, or a file whose content changed.
    """
    data_dir = Path(data_dir)
    try:
        manifest = json.loads((data_dir / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ActsparseError(f"task data {data_dir}: cannot read {MANIFEST} ({e}); rebuild it with "
                             f"{REBUILD}") from None
    for name, digest in manifest["sha256"].items():
        path = data_dir / name
        if not path.is_file():
            raise ActsparseError(f"task data {data_dir}: {name} is missing; rebuild it with {REBUILD}")
        if _sha256(path) != digest:
            raise ActsparseError(f"task data {data_dir}: {name} does not match its manifest sha256; rebuild it with "
                                 f"{REBUILD}")
    return manifest


def task_yamls(data_dir: str | Path) -> dict[str, str]:
    """lm-eval task YAML text per file name, reading the data of ``data_dir`` (absolute paths).

    Every task uses lm-eval's ``json`` dataset builder (``dataset_path: json``, ``data_files`` with a
    ``test`` and a ``train`` file), which works with ``HF_DATASETS_OFFLINE=1``: nothing is fetched.
    """
    d = Path(data_dir).resolve()

    def files(stem: str) -> str:
        # JSON-quoted paths are valid YAML scalars whatever characters the path holds.
        return (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {json.dumps(str(d / f'{stem}.jsonl'))}\n"
                f"    train: {json.dumps(str(d / f'{stem}_fewshot.jsonl'))}\n"
                f"test_split: test\nfewshot_split: train\n")

    version = f"metadata:\n  version: {BUILD_VERSION}.0\n"
    tag = "tag:\n  - actsparse_wiki\n"
    return {
        f"{CLOZE_TASK}.yaml": (
            f"{tag}task: {CLOZE_TASK}\n{files('cloze')}output_type: loglikelihood\n"
            "doc_to_text: \"{{context}}\"\ndoc_to_target: \"{{' ' + target}}\"\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n" + version),
        f"{CLOZE_GEN_TASK}.yaml": (
            f"{tag}task: {CLOZE_GEN_TASK}\n{files('cloze')}output_type: generate_until\n"
            "doc_to_text: \"{{context}}\"\ndoc_to_target: \"{{target}}\"\n"
            "generation_kwargs:\n  until: [\"\\n\", \".\", \",\"]\n  max_gen_toks: 5\n  do_sample: false\n"
            "filter_list:\n  - name: first_word\n    filter:\n"
            "      - function: regex\n        regex_pattern: \"([A-Za-z]+)\"\n      - function: take_first\n"
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
            "    ignore_case: false\n    ignore_punctuation: true\n" + version),
        f"{NEXT_SENTENCE_TASK}.yaml": (
            f"{tag}task: {NEXT_SENTENCE_TASK}\n{files('next_sentence')}output_type: multiple_choice\n"
            "doc_to_text: \"{{context}}\"\ndoc_to_target: label\ndoc_to_choice: choices\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n" + version),
    }


def write_task_yamls(data_dir: str | Path, yaml_dir: str | Path) -> Path:
    """Check ``data_dir`` (:func:`check_data`) and write its task YAMLs into ``yaml_dir``; returns yaml_dir.

    ``yaml_dir`` is what lm-eval's ``TaskManager(include_path=...)`` takes.
    """
    check_data(data_dir)
    yaml_dir = Path(yaml_dir)
    yaml_dir.mkdir(parents=True, exist_ok=True)
    for name, text in task_yamls(data_dir).items():
        if not (yaml_dir / name).is_file() or (yaml_dir / name).read_text() != text:
            atomic_write_text(yaml_dir / name, text)
    return yaml_dir


def shipped_task_dir(cache: str | Path | None = None) -> Path:
    """The include directory of the shipped tasks: YAMLs pointing at the installed data, under the cache.

    The YAMLs hold absolute paths, so they are written at run time (``cache`` default:
    ``$ACTSPARSE_CACHE/lm-eval-tasks``, ``~/.cache/actsparse`` when unset) in a directory keyed by
    the data location and manifest, never next to the installed package.
    """
    from actsparse.pipeline.models import cache_dir

    manifest = check_data(SHIPPED_DATA)
    key = hashlib.sha256(f"{SHIPPED_DATA}\0{json.dumps(manifest, sort_keys=True)}".encode()).hexdigest()[:16]
    root = Path(cache) if cache is not None else cache_dir() / "lm-eval-tasks"
    return write_task_yamls(SHIPPED_DATA, root / key)


if __name__ == "__main__":
    print(json.dumps(build(SHIPPED_DATA)["counts"]))
