"""Closed-loop evaluation benchmark: sparsified forward time over dense forward time, per target.

Run with ``make bench-evaluate``. SmolLM2-135M on the wiki held-out split (2048 tokens, seq_len 256,
batch 8 by default), top-p at p = 0.9 in every layer. The timed forward is the one ``analyze.evaluate``
runs per batch (decoder, then the LM head on the predicted positions). Dense and sparse timings are
interleaved in one process, best of ``--repeats``, same batches and thread count. Wall time and the
process's CPU time are both reported: on a shared machine, ``--threads 1`` with the CPU-time ratio
measures the work itself (every op, the top-p sort included, then runs on the main thread). A second table
compares the top-p rule alone, ``actsparse.analyze.sparsifier.topp_mask_fast`` against ``analyze.rules.topp_mask``,
on the captured FFN input and intermediate of one layer (and checks they are bit-identical).
Target: sparse / dense <= 1.3 for every target.
"""

from __future__ import annotations

import argparse
import time

TARGETS = ("input", "gate", "up", "intermediate", "all-inputs")


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def best_of(fn, repeats: int) -> float:
    return min(timed(fn)[0] for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="wiki")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--value", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads [default: all cores]")
    a = ap.parse_args()

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    from actsparse.analyze.evaluate.config import SPLIT
    from actsparse.analyze.evaluate.lm import LMHead, make_batch
    from actsparse.analyze.rules import topp_mask
    from actsparse.analyze.sparsifier import Sparsifier, topp_mask_fast
    from actsparse.pipeline.corpora import open_corpus
    from actsparse.pipeline.models import load_model, resolve_model
    from actsparse.pipeline.recorder import SiteRecorder
    from actsparse.pipeline.sites import resolve_ffn
    from actsparse.pipeline.windows import iter_windows

    resolved = resolve_model(a.model)
    model = load_model(resolved)
    tok = AutoTokenizer.from_pretrained(resolved.path)
    arch = resolve_ffn(model)
    head = LMHead(model, a.model)
    windows = list(iter_windows(open_corpus(a.corpus).split(SPLIT), tok, a.seq_len, max_tokens=a.tokens))
    batches = [make_batch(windows[b:b + a.batch_size], tok.pad_token_id or 0, set(tok.all_special_ids))
               for b in range(0, len(windows), a.batch_size)]
    n_tokens = sum(len(w.token_ids) for w in windows)

    def forward() -> None:
        for b in batches:
            head.logits(head.hidden(b.ids, b.attn)[b.rows, b.cols])

    def sparse_forward(sp: Sparsifier) -> None:
        for b in batches:
            sp.begin_batch(b.valid)
            head.logits(head.hidden(b.ids, b.attn)[b.rows, b.cols])
            sp.end_batch()

    inf = (float("inf"), float("inf"))
    dense_t = {t: inf for t in TARGETS}  # per target: (best wall, best CPU) seconds
    sparse_t = dict(dense_t)

    def best(old: tuple, new: tuple) -> tuple:
        return min(old[0], new[0]), min(old[1], new[1])

    with torch.inference_mode():
        forward()  # warm-up, excluded
        for _ in range(a.repeats):
            for target in TARGETS:
                dense_t[target] = best(dense_t[target], timed(forward))
                with Sparsifier(arch, target, "top-p", a.value) as sp:
                    sparse_t[target] = best(sparse_t[target], timed(lambda: sparse_forward(sp)))

        # The rule alone on real activations of the middle layer.
        captured = {}
        layer = len(arch.layers) // 2
        with SiteRecorder(arch, ("input", "intermediate"), lambda s, i, t: captured.__setitem__((s, i), t.clone())):
            head.hidden(batches[0].ids, batches[0].attn)
        rule_rows = []
        for site in ("input", "intermediate"):
            x = captured[(site, layer)]
            same = torch.equal(topp_mask_fast(x, a.value), topp_mask(x, a.value))
            ref = best_of(lambda x=x: topp_mask(x, a.value), a.repeats)
            fast = best_of(lambda x=x: topp_mask_fast(x, a.value), a.repeats)
            rule_rows.append((site, tuple(x.shape), ref, fast, same))

    print(f"{a.model} x {a.corpus} held-out, {n_tokens} tokens, seq_len {a.seq_len}, batch {a.batch_size}, "
          f"top-p {a.value} in all {len(arch.layers)} layers, {torch.get_num_threads()} threads, best of {a.repeats}")
    print(f"{'target':<14}{'dense s':>9}{'sparse s':>10}{'ratio':>8}{'dense cpu s':>13}{'sparse cpu s':>14}{'cpu ratio':>11}")
    for t in TARGETS:
        (dw, dc), (sw, sc) = dense_t[t], sparse_t[t]
        print(f"{t:<14}{dw:9.2f}{sw:10.2f}{sw / dw:8.3f}{dc:13.2f}{sc:14.2f}{sc / dc:11.3f}")
    print("target: ratio <= 1.3")
    print(f"\ntop-p mask alone, layer {layer} (ms)")
    print(f"{'site':<14}{'shape':>16}{'rules.topp_mask':>17}{'topp_mask_fast':>16}{'speed-up':>10}  identical")
    for site, shape, ref, fast, same in rule_rows:
        print(f"{site:<14}{str(shape):>16}{ref * 1e3:17.1f}{fast * 1e3:16.1f}{ref / fast:10.1f}  {same}")


if __name__ == "__main__":
    main()
