"""lm-eval task evaluation overhead: wall time of the sparsified run over lm-eval's plain run of the same task and
model (target <= 1.3).

Run with ``make bench-tasks``. SmolLM2-135M float32, one torch thread by default, batch size 8; sparsified = top-p
0.7 on the intermediate target in every layer (the cost of top-p does not depend on p), counted over real tokens.
Per task, plain (lm-eval's own ``HFLM``) and sparsified (``actsparse.analyze.tasks.harness.SparseHFLM`` with the
``Sparsifier``) runs alternate in one process, each timed around ``lm_eval.simple_evaluate`` (dataset cached,
model loaded, after one warm-up of each); the best round of each is compared, as ``timeit`` does, because other
work shares this machine. The process's CPU time is printed beside (less sensitive to that sharing). Tasks: the
shipped multiple-choice next-sentence task (loglikelihood batches) and the cloze task answered by generation
(the prefill, then one forward per generated token, each row's stop replayed).
"""

from __future__ import annotations

import argparse
import time

from rounds import listed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="actsparse_wiki_next_sentence,actsparse_wiki_cloze_gen")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--value", type=float, default=0.7)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from actsparse.analyze.tasks.harness import evaluate_task
    from actsparse.analyze.tasks.selection import select_tasks
    from actsparse.pipeline.models import load_model, load_tokenizer, resolve_model
    from actsparse.pipeline.sites import resolve_ffn

    resolved = resolve_model(a.model)
    tok, _ = load_tokenizer(resolved)
    model = load_model(resolved)
    arch = resolve_ffn(model)
    sel = select_tasks(a.tasks)
    kinds = {"plain": {}, "sparse": dict(target="intermediate", value=a.value, arch=arch)}
    print(f"{a.model} fp32, {torch.get_num_threads()} thread(s), batch {a.batch_size}, limit {a.limit}; sparsified: "
          f"intermediate top-p {a.value} in all {len(arch.layers)} layers; best of {a.rounds} interleaved rounds")
    for task in sel.names:
        def run(kind: str, limit: int = a.limit, task=task):
            c0 = time.process_time()
            r = evaluate_task(model, tok, task, sel.task_manager, limit=limit, batch_size=a.batch_size, **kinds[kind])
            return r, r.seconds, time.process_time() - c0

        for kind in kinds:
            run(kind, limit=2)  # warm-up: the dataset cache, first-call costs
        wall: dict[str, list[float]] = {k: [] for k in kinds}
        cpu: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(a.rounds):
            for kind in kinds:
                r, w, c = run(kind)
                wall[kind].append(w)
                cpu[kind].append(c)
                if kind == "sparse":
                    sparse = r
        total = sparse.phase("total")
        print(f"\n{task}: {len(sparse.doc_ids)} examples, sparsity {sparse.model_sparsity():.3f} over "
              f"{total.positions} counted tokens ({sparse.phase('generation').positions} generated)")
        for kind in kinds:
            print(f"  {kind:<7} wall best {min(wall[kind]):6.2f} s (rounds {listed(wall[kind])}); "
                  f"process CPU best {min(cpu[kind]):6.2f} s")
        print(f"  ratio sparsified/plain: wall {min(wall['sparse']) / min(wall['plain']):.3f}, "
              f"CPU {min(cpu['sparse']) / min(cpu['plain']):.3f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
