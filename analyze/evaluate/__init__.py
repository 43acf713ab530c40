"""Closed-loop evaluation: re-run a model with sparsified FFNs and measure critical sparsity.

The package: ``config`` (what an evaluation is), ``lm`` (batches, the LM head, per-token metrics),
``bootstrap`` (summary tables with intervals), ``storage`` (its files in a store), ``evaluation`` (the
dense and sparsified passes, resumable per grid value), ``proxy`` (open- against closed-loop).

Where ``actsparse.analyze.curves`` simulates a rule one layer at a time on stored dense activations
(open-loop), this module applies the rule in every FFN layer at once inside a real forward pass
(``actsparse.analyze.sparsifier.Sparsifier``), so each layer sees the already-sparsified output of the layers
before it, as in the paper (docs/paper-notes.md §1.1, §8 "closed-loop").

Protocol. The corpus's held-out split (``open_corpus(C).split("heldout")``) is cut into windows
exactly as collection cuts its split (``actsparse.pipeline.windows.iter_windows``: BOS first, no padding
stored; batches are right-padded and attention-masked). Every batch runs once dense and once per
grid value sparsified; the dense run is the reference. Metrics, per predicted position (position t
predicts token t + 1 of its window; targets that are special tokens and padding are skipped):

* next-token NLL, perplexity exp(mean NLL), top-1 accuracy (argmax of the logits), all for the
  sparse and the dense model;
* KL(dense || sparse) of the next-token distributions, per token, then averaged;
* realized sparsity: zeroed entries / width per token and hook, summed over the input positions
  that are neither padding nor special tokens (as ``actsparse.analyze.curves`` with its default
  ``include_special=False``), aggregated per hook as sum sparse / sum total and at model level
  dimension-weighted over all hooks (docs/paper-notes.md §1.4).

Critical sparsity (docs/paper-notes.md §1.5): the largest realized model-level sparsity at which the
sparse/dense ratio of top-1 accuracy stays >= 0.99, at the best grid point and interpolated
linearly between the last grid point meeting it and the first failing it (points ordered by
realized sparsity). The same from ``exp(-dNLL)``, dNLL = mean NLL sparse - mean NLL dense, as a
smoother criterion on few tokens. Confidence intervals: percentile bootstrap over windows (whole
windows are resampled: tokens of one window are correlated), ``N_BOOT`` resamples, fixed seed,
for the accuracy ratio, dNLL, the sparsity and both critical sparsities.

Storage. An evaluation is identified by ``eval_id``, a content hash of the model weights' sha256,
the corpus sha256, the split, target, rule, power, seq_len, max_tokens, batch_size, compute dtype
and versions; the grid is not part of it, so a later call with more grid values reuses the
finished ones. Its files live in one base directory B of a store:

* with a run (``run=ID``): ``B = STORE/runs/<ID>/analysis`` (the model and corpus must be the
  run's; results are listed in the run's checksums, packed and merged with it, and the
  ``evaluations`` SQL view reads them);
* without a run: ``B = STORE/evaluations`` (a store-level directory for models or corpora that
  were never collected; same file names, not part of any run, so not packed);
* without a store nothing is written and nothing resumes.

Files (the summary name matches the view's ``evaluate-*.parquet`` glob; the others do not)::

    B/evaluate-<eval_id>.parquet           one row per grid value: run_id, target, rule, value,
                                           sparsity, nll, ppl, top1_acc, kl, n_tokens, eval_id,
                                           dense_*, acc_ratio(_lo/_hi), dnll(_lo/_hi), ...
    B/evaluate_layers-<eval_id>.parquet    sparsity per (value, layer, hook); layer -1 = model level;
                                           n_positions = input positions counted
    B/evaluate_critical-<eval_id>.parquet  critical sparsity per criterion with bootstrap interval
    B/evaluate-<eval_id>/config.json       identity, readable config and hook list
    B/evaluate-<eval_id>/value-<v>.parquet per-window sums of grid value v, written atomically when
                                           v finishes; a killed evaluation resumes after the last one

The three summary files are rebuilt from every ``value-*.parquet`` present after each call.
"""

from actsparse.analyze.evaluate.bootstrap import summarize
from actsparse.analyze.evaluate.config import DEFAULT_GRID, EvalConfig, Evaluation, eval_identity
from actsparse.analyze.evaluate.evaluation import evaluate
from actsparse.analyze.evaluate.proxy import proxy_check, spearman
from actsparse.analyze.evaluate.storage import stored_evaluations

__all__ = ["DEFAULT_GRID", "EvalConfig", "Evaluation", "eval_identity", "evaluate", "proxy_check", "spearman",
           "stored_evaluations", "summarize"]
