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


@dataclass
class Head:
    """The LM head as rows of W (vocab, hidden), fetched chunk by chunk on the execution device."""

    rows: Callable[[int, int], torch.Tensor]  # (start, stop) -> W[start:stop] on the device
    vocab: int
    bias: Optional[torch.Tensor] = None
    softcap: Optional[float] = None
    elements: int = ELEMENTS

    def chunk(self, tokens: int) -> int:
        return max(256, min(self.vocab, self.elements // max(tokens, 1)))

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


@torch.no_grad()
def lse_at(head: Head, h: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log Σ_v exp(s_tv / τ) per token."""
    lse = torch.full((h.shape[0],), float("-inf"), device=h.device)
    for a, b in head.spans(h.shape[0]):
        lse = torch.logaddexp(lse, torch.logsumexp(head.logits(h, a, b) / temperature, -1))
    return lse


@torch.no_grad()
def kl_and_nll(head: Head, h: torch.Tensor, h_ref: torch.Tensor, lse_ref: torch.Tensor, temperature: float,
               targets: torch.Tensor) -> tuple[float, float]:
    """(Σ_t KL(p_ref,t ‖ q_t) at temperature τ, Σ_t −log q_t(target) at τ = 1) in one pass over the vocabulary.

    With a = s_ref/τ, b = s/τ: KL_t = Σ_v p_v (a_v − b_v) − lse(a) + lse(b), p = exp(a − lse(a)) (lse_ref)."""
    T = h.shape[0]
    cross = torch.zeros(T, device=h.device, dtype=torch.float64)
    lse_b = torch.full((T,), float("-inf"), device=h.device)
    lse_1 = torch.full((T,), float("-inf"), device=h.device)
    got = torch.zeros(T, device=h.device)
    for a0, b0 in head.spans(T):
        z = head.logits(h, a0, b0)
        za = head.logits(h_ref, a0, b0) / temperature
        zb = z / temperature
        p = torch.exp(za - lse_ref[:, None])
        cross += (p * (za - zb)).sum(-1).double()
        lse_b = torch.logaddexp(lse_b, torch.logsumexp(zb, -1))
        lse_1 = torch.logaddexp(lse_1, torch.logsumexp(z, -1))
        inside = (targets >= a0) & (targets < b0)
        if inside.any():
            got = torch.where(inside, z.gather(-1, (targets - a0).clamp(0, b0 - a0 - 1)[:, None])[:, 0], got)
    kl = cross - lse_ref.double() + lse_b.double()
    return float(kl.sum()), float((lse_1 - got).double().sum())
