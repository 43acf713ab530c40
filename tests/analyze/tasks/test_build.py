"""The shipped task data: reproducible from the held-out wiki split, the documented rules, lm-eval loading offline."""

from __future__ import annotations

import json
import re

import pytest

from actsparse.analyze.tasks import build
from actsparse.core.errors import ActsparseError


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (build.SHIPPED_DATA / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def heldout():
    from actsparse.pipeline.corpora import open_corpus

    return {d.doc_id: d for d in open_corpus("wiki").split("heldout")}


@pytest.mark.slow
def test_rebuild_is_byte_identical_to_shipped_data(tmp_path):
    manifest = build.build(tmp_path)
    for name in (*build.DATA_FILES, build.MANIFEST):
        assert (tmp_path / name).read_bytes() == (build.SHIPPED_DATA / name).read_bytes(), name
    assert manifest == build.check_data(build.SHIPPED_DATA)
    assert manifest["counts"]["cloze.jsonl"] >= 200 and manifest["counts"]["next_sentence.jsonl"] >= 400


def test_another_seed_draws_other_examples(heldout):
    docs = list(heldout.values())
    a = build.cloze_examples(docs, build.BuildConfig(seed=1))[1]
    b = build.cloze_examples(docs, build.BuildConfig(seed=2))[1]
    assert a != b and len(a) == len(b)  # one passage per qualifying paragraph, whatever the seed


def test_cloze_examples_follow_the_rules(heldout):
    cfg = build.BuildConfig()
    test, fewshot = _rows("cloze.jsonl"), _rows("cloze_fewshot.jsonl")
    assert len(fewshot) == cfg.n_fewshot
    seen = set()
    for ex in fewshot + test:
        key = (ex["doc_id"], ex["paragraph"])
        assert key not in seen  # one passage per paragraph: few-shot pool and test set are disjoint
        seen.add(key)
        target, context = ex["target"], ex["context"]
        assert re.fullmatch(r"[A-Za-z]{3,}", target) and target.lower() not in build.STOPWORDS
        assert cfg.min_context_words <= len(context.split()) <= cfg.max_context_words
        assert re.search(rf"\b{target}\b", context, flags=re.IGNORECASE)  # LAMBADA-like: recoverable from context
        paragraph = build.split_paragraphs(heldout[ex["doc_id"]].text)[ex["paragraph"]]
        # the passage is text of its paragraph, ending a sentence with the target word
        m = re.search(re.escape(f"{context} {target}") + r"[.!?]", paragraph)
        assert m is not None and (m.end() == len(paragraph) or paragraph[m.end()] == " ")


def test_next_sentence_examples_follow_the_rules(heldout):
    cfg = build.BuildConfig()
    for ex in _rows("next_sentence.jsonl")[:200]:
        choices, label = ex["choices"], ex["label"]
        assert len(choices) == cfg.n_distractors + 1 and len(set(choices)) == len(choices)
        paragraph = build.split_paragraphs(heldout[ex["doc_id"]].text)[ex["paragraph"]]
        assert f"{ex['context']} {choices[label]}" in paragraph  # the true continuation follows the context
        n = len(choices[label].split())
        for i, c in enumerate(choices):
            if i != label:
                assert c not in heldout[ex["doc_id"]].text  # distractors come from other documents
                assert abs(len(c.split()) - n) <= cfg.length_tolerance * n


def test_changed_data_is_refused(tmp_path):
    for name in (*build.DATA_FILES, build.MANIFEST):
        (tmp_path / name).write_bytes((build.SHIPPED_DATA / name).read_bytes())
    with (tmp_path / "cloze.jsonl").open("a") as f:
        f.write('{"context": "x", "target": "y"}\n')
    with pytest.raises(ActsparseError, match="does not match its manifest"):
        build.write_task_yamls(tmp_path, tmp_path / "yaml")
    (tmp_path / build.MANIFEST).unlink()
    with pytest.raises(ActsparseError, match="cannot read manifest.json"):
        build.check_data(tmp_path)


def test_bad_build_settings_are_refused(tmp_path):
    with pytest.raises(ActsparseError, match="n_examples must be positive"):
        build.build(tmp_path, cfg=build.BuildConfig(n_examples=0))
    with pytest.raises(ActsparseError, match="length_tolerance must be >= 0"):
        build.build(tmp_path, cfg=build.BuildConfig(length_tolerance=-0.1))
    with pytest.raises(ActsparseError, match="unknown corpus"):
        build.build(tmp_path, corpus="no-such-corpus")


def test_lm_eval_loads_the_shipped_tasks_offline(tmp_path, monkeypatch):
    from actsparse.analyze.tasks.selection import require_lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(build.shipped_task_dir(tmp_path)), include_defaults=False)
    loaded = tm.load(list(build.TASK_NAMES))["tasks"]
    counts = build.check_data(build.SHIPPED_DATA)["counts"]
    assert len(list(loaded[build.CLOZE_TASK].test_docs())) == counts["cloze.jsonl"]
    assert len(list(loaded[build.NEXT_SENTENCE_TASK].fewshot_docs())) == counts["next_sentence_fewshot.jsonl"]
    assert loaded[build.CLOZE_GEN_TASK].OUTPUT_TYPE == "generate_until"
