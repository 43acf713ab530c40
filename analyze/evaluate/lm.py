"""Model plumbing of the closed loop: padded batches with their predicted positions, the LM head applied to
cached hidden states, and per-token metrics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from actsparse.core.errors import ActsparseError
from actsparse.pipeline.windows import pad_batch


class LMHead:
    """The causal LM's output layer applied to final hidden states [n, d_model] -> float32 logits [n, vocab].

    ``model.base_model`` gives the final hidden states (final norm included); the output
    embedding plus Gemma's optional final logit soft-capping gives the logits. :meth:`check`
    compares the result with the model's own forward once, so a head with extra scaling is
    refused instead of silently mis-measured.
    """

    def __init__(self, model, spec: str):
        self.model, self.spec = model, spec
        self.linear = model.get_output_embeddings()
        if self.linear is None or getattr(model, "base_model", model) is model:
            raise ActsparseError(f"model {spec} has no language-model head; closed-loop evaluation needs a causal LM")
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.body = model.base_model

    def hidden(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Final hidden states [batch, seq, d_model] in the model dtype."""
        return self.body(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        z = self.linear(h)
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z.float()

    def check(self, ids: torch.Tensor, attn: torch.Tensor) -> None:
        """Raise ActsparseError unless our logits match ``model(...).logits`` on one window."""
        ref = self.model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()
        ours = self.logits(self.hidden(ids, attn))
        scale = float(ref.abs().max())
        if not torch.allclose(ours, ref, rtol=1e-3, atol=1e-3 * max(scale, 1.0)):
            raise ActsparseError(f"model {self.spec}: logits from the output embedding differ from the model's "
                                 f"forward (max |diff| {float((ours - ref).abs().max()):.3g}); "
                                 "its LM head is not supported")


@dataclass
class Batch:
    """One padded batch: ids/attn [B, S]; valid [B, S] counted input positions; pred rows/cols and targets."""

    windows: list
    ids: torch.Tensor
    attn: torch.Tensor
    valid: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor


def make_batch(windows: list, pad_id: int, special_ids: set[int], *, count_special: bool = False) -> Batch:
    """A right-padded batch of windows with its counted input positions (``valid``: real, non-special tokens;
    with ``count_special`` every real token, as the authors count, docs/paper-notes.md §1.4) and its predicted
    positions (position t predicts token t + 1; both in the window, the target not special)."""
    ids, attn = pad_batch(windows, pad_id)
    special = torch.ones(ids.shape, dtype=torch.bool)
    for i, w in enumerate(windows):
        n = len(w.token_ids)
        special[i, :n] = torch.from_numpy(w.special | np.isin(w.token_ids, list(special_ids)))
    valid = attn.bool() if count_special else attn.bool() & ~special
    pred = torch.zeros_like(valid)
    pred[:, :-1] = attn[:, 1:].bool() & ~special[:, 1:]
    rows, cols = pred.nonzero(as_tuple=True)
    return Batch(windows, ids, attn, valid, rows, cols, ids[rows, cols + 1])


def token_metrics(logits_s: torch.Tensor, logp_d: torch.Tensor, targets: torch.Tensor):
    """Per token: NLL, top-1 hit and KL(dense || sparse) from sparse logits and dense log-probs [n, vocab]."""
    logp_s = torch.log_softmax(logits_s, dim=-1)
    nll = -logp_s.gather(1, targets[:, None])[:, 0]
    hit = logits_s.argmax(dim=-1) == targets
    kl = (logp_d.exp() * (logp_d - logp_s)).sum(dim=-1)
    return nll, hit, kl
