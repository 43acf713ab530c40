"""lm-eval runs on the real SmolLM2-135M with actsparse's sparsifier: equality with lm-eval's dense run at p = 1,
sparsity counted as a hand count on padded batches, few-shot passed through, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from actsparse.analyze.rules import rule_mask
from actsparse.analyze.tasks.build import CLOZE_GEN_TASK, CLOZE_TASK, NEXT_SENTENCE_TASK, TASK_NAMES
from actsparse.analyze.tasks.counting import COUNT_MODES
from actsparse.analyze.tasks.harness import evaluate_task
from actsparse.analyze.tasks.selection import select_tasks
from actsparse.core.errors import ActsparseError
from tests.helpers import write_task

pytestmark = [pytest.mark.real, pytest.mark.slow]


def _lls(result) -> np.ndarray:
    """Every (example, choice) log-likelihood of a loglikelihood or multiple-choice run, in order."""
    return np.array([choice[0] for r in result.responses for choice in json.loads(r)], dtype=np.float64)


@pytest.mark.parametrize("task, target, limit", [(CLOZE_TASK, "intermediate", 8), (NEXT_SENTENCE_TASK, "all-inputs", 5),
                                                 (CLOZE_GEN_TASK, "gate", 6)])
def test_p1_equals_lm_eval_dense_run(smollm2, shipped, task, target, limit):
    model, tok, _ = smollm2
    dense = evaluate_task(model, tok, task, shipped.task_manager, limit=limit, batch_size=4)
    sparse = evaluate_task(model, tok, task, shipped.task_manager, target=target, value=1.0, limit=limit,
                           batch_size=4)
    assert dense.counts is None and len(dense.doc_ids) == limit
    np.testing.assert_array_equal(sparse.doc_ids, dense.doc_ids)
    assert sparse.score == dense.score
    np.testing.assert_array_equal(sparse.scores, dense.scores)
    if task == CLOZE_GEN_TASK:
        assert sparse.responses == dense.responses  # the same generated text
        assert sparse.phase("generation").positions > 0
    else:
        np.testing.assert_array_equal(_lls(sparse), _lls(dense))  # bit-identical log-likelihoods
        assert sparse.phase("generation").positions == 0  # loglikelihood: prefill only
    assert sparse.model_sparsity() < 1e-5  # top-p at 1 keeps (nearly) everything


def test_lower_p_is_sparser_and_few_shot_is_passed_through(smollm2, shipped):
    model, tok, _ = smollm2
    runs = [evaluate_task(model, tok, CLOZE_TASK, shipped.task_manager, target="intermediate", value=v, limit=4,
                          batch_size=4, num_fewshot=k) for v, k in ((0.9, 0), (0.5, 0), (0.9, 2))]
    s = [r.model_sparsity() for r in runs[:2]]
    assert 0.3 < s[0] < s[1] < 0.95
    assert not np.array_equal(_lls(runs[0]), _lls(runs[1]))
    per_hook = runs[1].phase("prefill").sparsity(runs[1].widths)[0]
    assert per_hook.shape == (30,) and np.all((per_hook > 0.5) & (per_hook < 1))
    # two passages of the few-shot pool precede each context: many more tokens, other log-likelihoods
    assert (runs[0].n_shot, runs[2].n_shot) == (0, 2)
    assert runs[2].phase("prefill").positions > 2 * runs[0].phase("prefill").positions
    assert not np.array_equal(_lls(runs[0]), _lls(runs[2]))


class _Capture:
    """Hooks registered before the Sparsifier's (so they run first): every forward's input ids and attention mask,
    and the pre-sparsification down-projection input of every layer."""

    def __init__(self, model):
        from actsparse.pipeline.sites import resolve_ffn

        self.forwards: list[dict] = []
        self.handles = [model.register_forward_pre_hook(self._model_pre, with_kwargs=True)]
        for layer in resolve_ffn(model).layers:
            self.handles.append(layer.down.register_forward_pre_hook(self._down_pre))

    def _model_pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.forwards.append(dict(ids=ids.clone(), attn=kwargs.get("attention_mask"), h=[]))

    def _down_pre(self, module, args):
        self.forwards[-1]["h"].append(args[0].detach().clone())

    def remove(self):
        for h in self.handles:
            h.remove()


def _zeroed(h: torch.Tensor, p: float) -> torch.Tensor:
    """Entries top-p drops per token, int64 [batch, seq], from the reference rule ``analyze.rules.rule_mask``."""
    return h.shape[-1] - rule_mask("top-p", h, p).sum(dim=-1)


def _captured_run(model, tok, sel, task: str, p: float, mode: str):
    cap = _Capture(model)
    try:
        res = evaluate_task(model, tok, task, sel.task_manager, target="intermediate", value=p, batch_size=3, mode=mode)
    finally:
        cap.remove()
    return res, cap.forwards


@pytest.mark.parametrize("mode", COUNT_MODES)
def test_hand_count_on_a_right_padded_loglikelihood_batch(smollm2, tmp_path, mode):
    model, tok, _ = smollm2
    # the first context starts with BOS (SmolLM2's tokenizer adds none itself): counted only in authors mode
    docs = [dict(context=f"{tok.bos_token}The cat sat on the", target="mat"),
            dict(context="Paris is the capital and the largest city of", target="France"),
            dict(context="One two three four five six seven eight nine ten eleven twelve", target="thirteen")]
    write_task(tmp_path, "hand_ll", docs, "output_type: loglikelihood\ndoc_to_text: \"{{context}}\"\n"
               "doc_to_target: \"{{' ' + target}}\"\nmetric_list:\n  - metric: acc\n")
    sel = select_tasks(str(tmp_path / "hand_ll.yaml"), shipped=False)
    p = 0.6
    res, forwards = _captured_run(model, tok, sel, "hand_ll", p, mode)
    assert len(forwards) == 1  # the three requests form one right-padded batch
    ids = forwards[0]["ids"]
    # each row holds (context + continuation)[:-1] of one request, then lm-eval's padding (token id 0)
    inputs = [tok(d["context"] + " " + d["target"])["input_ids"][:-1] for d in docs]
    lengths = []
    for row in ids.tolist():
        match = [x for x in inputs if row[:len(x)] == x and not any(row[len(x):])]
        assert len(match) == 1
        lengths.append(len(match[0]))
    assert len(set(lengths)) == 3 and ids.shape[1] == max(lengths)
    pad = torch.arange(ids.shape[1])[None, :] >= torch.tensor(lengths)[:, None]
    assert bool((ids[pad] == 0).all()) and tok.pad_token_id != 0  # lm-eval pads with 0, SmolLM2's pad is 2
    bos = ids == tok.bos_token_id
    assert int(bos.sum()) == 1
    valid = (~pad & ~bos) if mode == "real" else (ids != tok.pad_token_id)  # authors: padding and BOS counted
    assert int(valid.sum()) == (sum(lengths) - 1 if mode == "real" else ids.numel())
    want = [int((_zeroed(h, p) * valid).sum()) for h in forwards[0]["h"]]
    got = res.phase("prefill")
    assert got.zeroed.tolist() == want and got.positions == int(valid.sum())
    assert res.model_sparsity("prefill") == pytest.approx(sum(want) / (int(valid.sum()) * 1536 * 30), rel=1e-12)


@pytest.mark.parametrize("mode", COUNT_MODES)
def test_hand_count_of_batched_generation(smollm2, tmp_path, mode):
    model, tok, _ = smollm2
    docs = [dict(context="Question: What is the capital of France?\nAnswer: The capital of France is"),
            dict(context="Once upon a time, in a small village by the sea, there lived an old fisherman who"),
            dict(context="1, 2, 3, 4, 5,")]
    write_task(tmp_path, "hand_gen", [dict(d, target="x") for d in docs],
               "output_type: generate_until\ndoc_to_text: \"{{context}}\"\ndoc_to_target: \"{{target}}\"\n"
               "generation_kwargs:\n  until: [\".\", \"\\n\"]\n  max_gen_toks: 12\n  do_sample: false\n"
               "metric_list:\n  - metric: exact_match\n")
    sel = select_tasks(str(tmp_path / "hand_gen.yaml"), shipped=False)
    p = 0.8
    res, forwards = _captured_run(model, tok, sel, "hand_gen", p, mode)
    prefill, steps = forwards[0], forwards[1:]
    special = torch.tensor(tok.all_special_ids)
    valid = prefill["attn"].bool()  # the left-padded contexts: real tokens by the attention mask
    assert bool((~valid).any())  # left padding present
    if mode == "real":
        valid &= ~torch.isin(prefill["ids"], special)
    want_prefill = [int((_zeroed(h, p) * valid).sum()) for h in prefill["h"]]
    # generation: forward k feeds generated token k - 1; a row counts up to and including its stop
    fed = torch.cat([f["ids"] for f in steps], dim=1)  # [3, K]
    stop_at = []
    for row in fed.tolist():
        n = next((s + 1 for s in range(len(row)) if "." in tok.decode(row[:s + 1]) or "\n" in tok.decode(row[:s + 1])
                  or row[s] == tok.eos_token_id), len(row) + 1)
        stop_at.append(n)
    assert min(stop_at) < len(steps)  # a row stopped while the others went on: its later tokens are excluded
    want_gen, positions = [0] * len(prefill["h"]), 0
    for k, f in enumerate(steps, start=1):
        v = torch.tensor([k <= n for n in stop_at])[:, None]
        if mode == "real":
            v &= ~torch.isin(f["ids"], special)
        positions += int(v.sum())
        for layer, h in enumerate(f["h"]):
            want_gen[layer] += int((_zeroed(h, p) * v).sum())
    assert res.phase("prefill").zeroed.tolist() == want_prefill
    assert res.phase("prefill").positions == int(valid.sum())
    assert res.phase("generation").zeroed.tolist() == want_gen
    assert res.phase("generation").positions == positions
    assert res.phase("total").zeroed.tolist() == [a + b for a, b in zip(want_prefill, want_gen)]


def test_missing_data_file_and_hub_task_without_data_are_reported(smollm2, tmp_path):
    model, tok, _ = smollm2
    path = write_task(tmp_path, "no_data", [dict(context="a", target="b")],
                      "output_type: loglikelihood\ndoc_to_text: \"{{context}}\"\ndoc_to_target: \"{{target}}\"\n")
    (tmp_path / "no_data.jsonl").unlink()
    sel = select_tasks(str(path), shipped=False)
    with pytest.raises(ActsparseError, match="^task no_data: "):
        evaluate_task(model, tok, "no_data", sel.task_manager, limit=2)
    sel = select_tasks("arc_easy")  # found in lm-eval's own task index; its data lives on the hub
    with pytest.raises(ActsparseError, match="task arc_easy: its dataset is not available offline"):
        evaluate_task(model, tok, "arc_easy", sel.task_manager, limit=2)


def test_bad_run_settings_are_refused(smollm2, shipped):
    model, tok, _ = smollm2
    with pytest.raises(ActsparseError, match="unknown count mode"):
        evaluate_task(model, tok, CLOZE_TASK, shipped.task_manager, target="gate", value=0.9, mode="padded", limit=2)
    with pytest.raises(ActsparseError, match="unknown target"):
        evaluate_task(model, tok, CLOZE_TASK, shipped.task_manager, target="ffn", value=0.9, limit=2)
    with pytest.raises(ActsparseError, match="metric 'f1' is not reported"):
        evaluate_task(model, tok, CLOZE_TASK, shipped.task_manager, metric="f1", limit=2)
    with pytest.raises(ActsparseError, match="'perplexity,none' is lower-is-better"):
        evaluate_task(model, tok, CLOZE_TASK, shipped.task_manager, metric="perplexity", limit=2)


def test_unknown_tasks_and_files_that_do_not_parse_are_refused(tmp_path):
    with pytest.raises(ActsparseError, match="unknown lm-eval task 'actsparse_wiki_clozee'; did you mean "
                                             "actsparse_wiki_cloze"):
        select_tasks("actsparse_wiki_clozee")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: broken\ndoc_to_text: [unclosed\n")
    with pytest.raises(ActsparseError, match=r"task file .*bad.yaml does not parse"):
        select_tasks(str(bad), shipped=False)
    with pytest.raises(ActsparseError, match="does not parse"):  # lm-eval itself would skip it silently
        select_tasks(CLOZE_TASK, include_paths=[tmp_path])
    nameless = tmp_path / "sub" / "nameless.yaml"
    nameless.parent.mkdir()
    nameless.write_text("dataset_path: json\n")
    with pytest.raises(ActsparseError, match="has no 'task:' name"):
        select_tasks(str(nameless), shipped=False)
    with pytest.raises(ActsparseError, match="does not exist"):
        select_tasks(str(tmp_path / "missing.yaml"), shipped=False)
    with pytest.raises(ActsparseError, match="--tasks is empty"):
        select_tasks(" , ")


def test_tags_expand_and_groups_are_refused(tmp_path):
    assert select_tasks("actsparse_wiki").names == sorted(TASK_NAMES)
    (tmp_path / "g.yaml").write_text(f"group: my_group\ntask:\n  - {CLOZE_TASK}\n")
    with pytest.raises(ActsparseError, match="'my_group' is an lm-eval group"):
        select_tasks("my_group", include_paths=[tmp_path])
