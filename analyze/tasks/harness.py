"""One lm-evaluation-harness task run on a loaded HF model, dense or with actsparse's sparsifier in every FFN layer.

lm-eval does the evaluation (prompts, few-shot, batching, metrics); actsparse attaches
``actsparse.analyze.sparsifier.Sparsifier`` to the model lm-eval's ``HFLM`` wraps and counts the realized
sparsity as the authors do (``counting``).

How the counted positions of each forward are known (docs/pitfalls.md P22). lm-eval calls ``model(inps)`` for
loglikelihood batches without an attention mask, after right-padding each request's tokens with
``pad_and_concat``; :class:`SparseHFLM` records the unpadded lengths by wrapping that function in lm-eval's HF
module while its ``_loglikelihood_tokens`` runs, checks them against the batch it then receives, and brackets
each ``_model_call`` with ``Sparsifier.begin_batch``/``end_batch``. For ``generate`` it registers a forward
pre-hook (with kwargs: ``input_ids``, ``attention_mask``) and a forward hook on the model for the duration of
``_model_generate``, keeps the per-step counts of every batch row and, once ``generate`` returns, finds each
row's stopping step by replaying lm-eval's stop-string criteria and the EOS test on the returned tokens
(``counting.generation_lengths``). Batch sizes are integers: lm-eval's ``auto`` search probes the model with
dummy batches at the maximum length (docs/pitfalls.md P15).

The dense reference is lm-eval's own ``HFLM`` with nothing attached. Tested with lm-eval 0.4.13, transformers
5.24.0, datasets 5.2.0 (``selection.LM_EVAL_REQUIREMENT``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from actsparse.analyze.sparsifier import UNCALIBRATED_RULES, Sparsifier, check_closed_loop
from actsparse.analyze.tasks.counting import (
    PHASES,
    PhaseCounts,
    SparsityCounter,
    combined,
    count_mode,
    generation_lengths,
    loglikelihood_valid,
)
from actsparse.analyze.tasks.selection import LM_EVAL_REQUIREMENT, require_lm_eval
from actsparse.core.errors import ActsparseError


@dataclass
class TaskResult:
    """One lm-eval task run: dense (``value`` None) or sparsified at ``value``.

    ``doc_ids`` int64 [n] and ``scores`` float64 [n] are the per-example values of ``metric`` (lm-eval's
    ``log_samples``) sorted by doc id, ``responses`` the per-example filtered responses as JSON text in the
    same order (log-likelihoods, or generated text); ``score`` is lm-eval's aggregate of the metric; ``counts``
    the zeroed entries and counted positions per phase (None for the dense run) and ``widths`` int64 [n_hooks]
    the hook widths; ``seconds`` the wall time of ``simple_evaluate``.
    """

    task: str
    value: float | None
    metric: str
    score: float
    doc_ids: np.ndarray
    scores: np.ndarray
    responses: list[str]
    n_shot: int | None
    seconds: float
    counts: dict[str, PhaseCounts] | None = None
    widths: np.ndarray | None = None
    generated_tokens: int = 0

    def phase(self, phase: str) -> PhaseCounts | None:
        """The counts of ``prefill``, ``generation`` or ``total`` (None for the dense run)."""
        if self.counts is None:
            return None
        return combined(self.counts.values()) if phase == "total" else self.counts[phase]

    def model_sparsity(self, phase: str = "total") -> float:
        """Model-level sparsity of ``phase`` (NaN for the dense run or where nothing was counted)."""
        c = self.phase(phase)
        return math.nan if c is None or self.widths is None else c.sparsity(self.widths)[1]


def choose_metric(results: dict, requested: str | None) -> str:
    """The ``name,filter`` key of lm-eval's task results used as accuracy.

    ``requested`` may be ``name`` (filter ``none``) or ``name,filter``; None takes ``acc,none`` when present,
    else the first metric lm-eval reports (e.g. ``exact_match,<filter>`` of a generation task).

    Raises:
        ActsparseError: the requested metric is not among the task's results, or there is none.
    """
    keys = [k for k in results if "," in k and "_stderr," not in k]
    if requested is not None:
        key = requested if "," in requested else f"{requested},none"
        if key not in keys:
            raise ActsparseError(f"metric '{requested}' is not reported by this task (it reports {', '.join(keys)})")
        return key
    if "acc,none" in keys:
        return "acc,none"
    if not keys:
        raise ActsparseError("the task reports no metric")
    return keys[0]


def per_example(samples: list[dict], metric_key: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(doc ids int64 [n], metric values float64 [n], filtered responses as JSON) of one filter, by doc id.

    Raises:
        ActsparseError: the metric has no numeric per-example value (e.g. perplexity).
    """
    name, filt = metric_key.split(",", 1)
    rows = sorted((s for s in samples if s.get("filter", "none") == filt), key=lambda s: s["doc_id"])
    try:
        scores = np.array([float(s[name]) for s in rows], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise ActsparseError(f"metric '{metric_key}' has no numeric per-example value; choose e.g. acc") from None
    responses = [json.dumps(s.get("filtered_resps"), default=_plain) for s in rows]
    return np.array([s["doc_id"] for s in rows], dtype=np.int64), scores, responses


def _plain(x):
    """JSON for the numpy scalars lm-eval's responses hold."""
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def check_accuracy_like(key: str, aggregate: float, scores: np.ndarray, higher_is_better: dict) -> None:
    """Refuse a metric that critical sparsity cannot use: its aggregate must be the mean of the per-example values
    (the bootstrap over examples resamples that mean) and higher must be better.

    Raises:
        ActsparseError: a lower-is-better metric, or one whose aggregate is not the mean of its examples.
    """
    name = key.split(",", 1)[0]
    if higher_is_better.get(name) is False:
        raise ActsparseError(f"metric '{key}' is lower-is-better; critical sparsity needs an accuracy-like metric")
    if not len(scores) or not math.isclose(float(scores.mean()), aggregate, rel_tol=1e-9, abs_tol=1e-12):
        raise ActsparseError(f"metric '{key}' is not the mean of its per-example values; choose e.g. acc")


def _eos_ids(model, generation_kwargs: dict) -> list[int]:
    eos = generation_kwargs.get("eos_token_id", getattr(model.generation_config, "eos_token_id", None))
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


@contextlib.contextmanager
def _lm_eval_quietly():
    """lm-eval with its logger at ERROR (its notes on every run, e.g. on a model passed as an object, are not
    actsparse's output) and without the environment report ``simple_evaluate`` adds to its results: torch's
    ``collect_env`` runs ``pip list`` and other subprocesses, about 2.4 s per task run here, for metadata that
    actsparse does not keep."""
    import lm_eval.evaluator as ev

    logger = logging.getLogger("lm_eval")
    level, add_env_info = logger.level, ev.add_env_info
    logger.setLevel(logging.ERROR)
    ev.add_env_info = lambda results: None
    try:
        yield
    finally:
        logger.setLevel(level)
        ev.add_env_info = add_env_info


_SPARSE_HFLM = None


def sparse_hflm_class():
    """:class:`SparseHFLM`, defined on first use so that importing this module does not import lm-eval."""
    global _SPARSE_HFLM
    if _SPARSE_HFLM is not None:
        return _SPARSE_HFLM
    import lm_eval.models.huggingface as hf

    class SparseHFLM(hf.HFLM):
        """lm-eval's HFLM that counts the sparsity of an active :class:`Sparsifier` (module docstring).

        Args:
            pretrained: the loaded causal LM (the Sparsifier's hooks already registered on it).
            tokenizer: its tokenizer.
            sparsifier: an entered ``Sparsifier`` on ``pretrained``.
            count_mode: ``real`` | ``authors`` (``counting``).
            **kwargs: passed to ``HFLM`` (batch_size, max_length, add_bos_token, ...).
        """

        def __init__(self, pretrained, tokenizer, *, sparsifier: Sparsifier, count_mode: str = "real", **kwargs):
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
            if self.backend != "causal":
                raise ActsparseError("sparsified lm-eval runs support causal LMs only")
            self.sparsifier = sparsifier
            self.count_mode = count_mode
            self.counter = SparsityCounter(sparsifier.points)
            self.special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)
            self._pad_lengths: list[int] | None = None
            self.generated_tokens = 0

        # ---- loglikelihood: right-padded batches, one forward each
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            original = hf.pad_and_concat

            def recording(max_length, tensors, padding_side="right"):
                self._pad_lengths = [int(t.shape[-1]) for t in tensors]
                return original(max_length, tensors, padding_side)

            hf.pad_and_concat = recording
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            finally:
                hf.pad_and_concat = original

        def _model_call(self, inps, attn_mask=None, labels=None):
            lengths, self._pad_lengths = self._pad_lengths, None
            if lengths is None or len(lengths) != inps.shape[0] or max(lengths) != inps.shape[1]:
                raise ActsparseError(f"lm-eval's loglikelihood batching changed (batch {tuple(inps.shape)}, padded "
                                     f"lengths {lengths}); actsparse supports {LM_EVAL_REQUIREMENT}")
            valid = loglikelihood_valid(inps.cpu(), lengths, self.count_mode, self.tokenizer.pad_token_id,
                                        self.special_ids)
            self.sparsifier.begin_batch(valid.to(inps.device))
            logits = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            self.counter.add("prefill", self.sparsifier.end_batch().cpu(), int(valid.sum()))
            return logits

        # ---- generation: the prefill forward, then one forward per new token
        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            attn = generation_kwargs.get("attention_mask")
            prefill_valid = (torch.ones_like(context, dtype=torch.bool) if attn is None else attn.bool()).cpu()
            if self.count_mode == "real":
                prefill_valid &= ~torch.isin(context.cpu(), self.special_ids)
            steps: list[list] = []  # per generation forward: [counts int64 [n_hooks, B], valid bool [B]]
            state = dict(prefilled=False)

            def pre(module, args, kwargs):
                ids = kwargs.get("input_ids", args[0] if args else None)
                if not state["prefilled"]:
                    if ids is None or ids.shape != context.shape:
                        raise ActsparseError("generate's first forward is not the prefill of the whole context; "
                                             f"actsparse supports {LM_EVAL_REQUIREMENT} with transformers 5")
                    self.sparsifier.begin_batch(prefill_valid.to(ids.device))
                    return None
                if ids is None or ids.shape[1] != 1:
                    raise ActsparseError("generate's later forwards must take one token each (KV cache on)")
                valid = torch.ones(ids.shape, dtype=torch.bool)
                if self.count_mode == "real":
                    valid &= ~torch.isin(ids.cpu(), self.special_ids)
                self.sparsifier.begin_batch(valid.to(ids.device))
                steps.append([None, valid[:, 0]])
                return None

            def post(module, args, kwargs, output):
                counts = self.sparsifier.end_batch().cpu()
                if not state["prefilled"]:
                    self.counter.add("prefill", counts, int(prefill_valid.sum()))
                    state["prefilled"] = True
                else:
                    steps[-1][0] = counts
                return None

            handles = [self.model.register_forward_pre_hook(pre, with_kwargs=True),
                       self.model.register_forward_hook(post, with_kwargs=True)]
            try:
                out = super()._model_generate(context, max_length, stop, **generation_kwargs)
            finally:
                for h in handles:
                    h.remove()
            n_gen = generation_lengths(out.cpu(), context.shape[1], stop, self.tokenizer,
                                       _eos_ids(self.model, generation_kwargs), LM_EVAL_REQUIREMENT)
            self.generated_tokens += sum(n_gen)
            n_gen_t = torch.tensor(n_gen)
            for k, (counts, valid) in enumerate(steps, start=1):
                # the k-th generation forward feeds generated token k - 1: counted while k <= the row's length
                keep = valid & (k <= n_gen_t)
                self.counter.add("generation", counts * keep[None, :], int(keep.sum()))
            return out

    _SPARSE_HFLM = SparseHFLM
    return SparseHFLM


def evaluate_task(model, tokenizer, task: str, task_manager, *, target: str | None = None, rule: str = "top-p",
                  value: float | None = None, power: float = 1.0, mode: str = "real", limit: int | float | None = None,
                  num_fewshot: int | None = None, batch_size: int = 1, metric: str | None = None,
                  gen_kwargs: dict | None = None, lm_kwargs: dict | None = None, arch=None) -> TaskResult:
    """Run one lm-eval task on ``model``, dense (``value`` None) or with ``rule`` at ``value`` on ``target``.

    Args:
        model, tokenizer: a loaded HF causal LM (any device) and its tokenizer.
        task: a leaf task name known to ``task_manager`` (``selection.select_tasks``).
        target, rule, value, power: the sparsification (``actsparse.analyze.sparsifier``); ``value`` None = dense.
        mode: the count mode, ``real`` | ``authors`` (``counting``).
        limit, num_fewshot, gen_kwargs: passed to ``lm_eval.simple_evaluate``.
        batch_size: requests per forward (an integer: docs/pitfalls.md P15), passed to ``HFLM``.
        metric: accuracy metric (:func:`choose_metric`).
        lm_kwargs: further ``HFLM`` arguments (e.g. ``add_bos_token``, ``max_length``).
        arch: ``actsparse.pipeline.sites.resolve_ffn(model)`` when already known.

    Returns:
        :class:`TaskResult`. lm-eval's own stderr bootstrap is off (``bootstrap_iters=0``): intervals come from
        ``critical`` over the per-example values.

    Raises:
        ActsparseError: lm-eval missing, a bad target, rule, value or count mode, an unknown or unusable metric,
            an unsupported model, a task whose data is not available offline.
    """
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    count_mode(mode)
    kwargs = dict(batch_size=int(batch_size), device=str(next(model.parameters()).device), **(lm_kwargs or {}))
    with contextlib.ExitStack() as stack:
        stack.enter_context(_lm_eval_quietly())
        if value is None:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, **kwargs)
        else:
            if target is None:
                raise ActsparseError("a sparsified run needs a target")
            check_closed_loop(target, rule, (value,), power, UNCALIBRATED_RULES)
            if arch is None:
                from actsparse.pipeline.sites import resolve_ffn

                arch = resolve_ffn(model)
            sp = stack.enter_context(Sparsifier(arch, target, rule, value, power=power))
            lm = sparse_hflm_class()(model, tokenizer, sparsifier=sp, count_mode=mode, **kwargs)
        t0 = time.perf_counter()
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, limit=limit,
                                          num_fewshot=num_fewshot, gen_kwargs=gen_kwargs, log_samples=True,
                                          bootstrap_iters=0)
        except ConnectionError as e:  # datasets in offline mode: the task's data is on the hub, not cached
            raise ActsparseError(f"task {task}: its dataset is not available offline "
                                 f"({str(e).splitlines()[0]})") from None
        except FileNotFoundError as e:  # a local data file the task YAML names is missing
            raise ActsparseError(f"task {task}: {str(e).splitlines()[0]}") from None
        seconds = time.perf_counter() - t0
    block = out["results"][task]
    key = choose_metric(block, metric)
    doc_ids, scores, responses = per_example(out["samples"][task], key)
    check_accuracy_like(key, float(block[key]), scores, out.get("higher_is_better", {}).get(task, {}))
    counter = getattr(lm, "counter", None)
    return TaskResult(task=task, value=None if value is None else float(value), metric=key, score=float(block[key]),
                      doc_ids=doc_ids, scores=scores, responses=responses, n_shot=out.get("n-shot", {}).get(task),
                      seconds=seconds, counts=None if counter is None else {p: counter.phases[p] for p in PHASES},
                      widths=None if counter is None else counter.widths,
                      generated_tokens=getattr(lm, "generated_tokens", 0))
