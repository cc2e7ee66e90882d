"""Losses over the vocabulary, computed in chunks: the logits of all tokens are never held at once.

A batch of 8×512 tokens over a 262k vocabulary is 4 GB of float32 logits, and its gradient as much again.
Every loss svdpress needs is a function of two small things per token: the log-normalizer
lse_t = log Σ_v exp(s_tv) and the logits at a few indices s_t,idx (the next token, or a teacher's top-k).
`gather_lse` streams over vocabulary chunks W_c (rows of the LM head) to get them, with an exact backward:

    ∂L/∂h_t = Σ_c (∂L/∂lse_t · softmax(s_t)_c + scatter_c(∂L/∂s_t,idx)) · ∂s_tc/∂h_t

recomputing each chunk's logits (two passes over the head, memory O(tokens × chunk)). Logits are float32.
Final-logit soft-capping (Gemma 2/3), s = cap·tanh(z/cap), is applied per chunk, with its derivative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

ELEMENTS = 1 << 25  # logits per chunk (128 MB of float32): tokens × vocabulary columns
ROW_ELEMENTS = 1 << 24  # head weights per chunk (64 MB of float32): vocabulary rows × hidden size


@dataclass
class Head:
    """The LM head as rows of W (vocab, hidden), fetched chunk by chunk on the execution device."""

    rows: Callable[[int, int], torch.Tensor]  # (start, stop) -> W[start:stop] on the device
    vocab: int
    bias: Optional[torch.Tensor] = None
    softcap: Optional[float] = None
    elements: int = ELEMENTS
    width: int = 0  # hidden size (0: unknown, the rows are not bounded)
    row_elements: int = ROW_ELEMENTS

    def chunk(self, tokens: int) -> int:
        """Vocabulary rows per chunk: bounded by the logits (tokens × rows) and by the head's own rows (rows ×
        width), which a streamed head reads from disk chunk by chunk (a whole 128k×2048 head is 1 GB)."""
        rows = self.row_elements // self.width if self.width else self.vocab
        return max(256, min(self.vocab, self.elements // max(tokens, 1), rows))

    def logits(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """z = h W_cᵀ (+ b), soft-capped; float32. h: (T, d)."""
        z = h.float() @ self.rows(start, stop).float().T
        if self.bias is not None:
            z = z + self.bias[start:stop].float()
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def spans(self, tokens: int):
        c = self.chunk(tokens)
        return [(s, min(s + c, self.vocab)) for s in range(0, self.vocab, c)]

    def full(self, h: torch.Tensor) -> torch.Tensor:
        """All logits (for callers that need them, e.g. lm-eval through the model's own forward)."""
        return torch.cat([self.logits(h, a, b) for a, b in self.spans(h.shape[0])], -1)


def _lse_gather(head: Head, h: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    T = h.shape[0]
    lse = torch.full((T,), float("-inf"), device=h.device)
    got = torch.zeros(idx.shape, device=h.device)
    for a, b in head.spans(T):
        z = head.logits(h, a, b)
        lse = torch.logaddexp(lse, torch.logsumexp(z, -1))
        inside = (idx >= a) & (idx < b)
        if inside.any():
            got = torch.where(inside, z.gather(-1, (idx - a).clamp(0, b - a - 1)), got)
    return lse, got


class _GatherLse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, idx, head):
        lse, got = _lse_gather(head, h.detach(), idx)
        ctx.save_for_backward(h, idx, lse)
        ctx.head = head
        return lse, got

    @staticmethod
    def backward(ctx, d_lse, d_got):
        h, idx, lse = ctx.saved_tensors
        head: Head = ctx.head
        dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        hd = h.detach()
        for a, b in head.spans(h.shape[0]):
            z = head.logits(hd, a, b)
            dz = torch.exp(z - lse[:, None]) * d_lse[:, None]  # ∂lse/∂s = softmax
            inside = (idx >= a) & (idx < b)
            if inside.any():
                dz.scatter_add_(-1, (idx - a).clamp(0, b - a - 1), torch.where(inside, d_got, 0.0))
            if head.softcap:
                dz = dz * (1 - (z / head.softcap) ** 2)  # d(cap·tanh(u/cap))/du
            dh += dz @ head.rows(a, b).float()
        return dh.to(h.dtype), None, None


def gather_lse(head: Head, h: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse (T,), s at idx (T, k)) for hidden states h (T, d) after the final norm; differentiable in h."""
    return _GatherLse.apply(h, idx, head)


def nll_sum(head: Head, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ_t −log p(target_t) = Σ_t (lse_t − s_t,target); h (T, d), targets (T,)."""
    lse, got = gather_lse(head, h, targets[:, None])
    return (lse - got[:, 0]).sum()


@torch.no_grad()
def topk_logprobs(head: Head, h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely next tokens per position and their log-probabilities (teacher caches)."""
    T = h.shape[0]
    k = min(k, head.vocab)
    lse = torch.full((T,), float("-inf"), device=h.device)
    best_v = torch.full((T, k), float("-inf"), device=h.device)
    best_i = torch.zeros((T, k), dtype=torch.long, device=h.device)
    for a, b in head.spans(T):
        z = head.logits(h, a, b)
        lse = torch.logaddexp(lse, torch.logsumexp(z, -1))
        v, i = z.topk(min(k, b - a), -1)
        cand_v, cand_i = torch.cat([best_v, v], -1), torch.cat([best_i, i + a], -1)
        best_v, pos = cand_v.topk(k, -1)
        best_i = cand_i.gather(-1, pos)
    return best_i, best_v - lse[:, None]
