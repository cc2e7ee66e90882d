"""Perplexity on non-overlapping windows (the WikiText protocol of GPTQ / SVD-LLM).

The held-out (second) half of a text is tokenized once and cut into windows of `seqlen` tokens (a shorter
tail window is kept when it has at least 2 tokens); ppl = exp(Σ NLL / #predicted tokens) over every window.

The model runs through the `Runner`, which owns placement: windows are embedded in batches of `batch_size`,
and a group of batches (≤ `GROUP_WINDOWS` windows, ≤ `GROUP_BYTES` of hidden states) goes through the decoder
block by block (`runner.forward`), so a streamed model reads each block once per group. After the final norm
the token NLL comes from the chunked-vocabulary head (`head.nll_sum`, float32 logits, never all at once).

Under torchrun the batches are shared among the ranks (contiguous shares; a rank may have none) and the NLL sums
and token counts are added over ranks in float64: the same windows are scored as in one process, and only the
grouping of the float64 additions differs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import distributed as dist
from ..data import evaluation_tokens
from ..model.head import nll_sum

if TYPE_CHECKING:
    from ..model import Runner

GROUP_WINDOWS = 64  # windows per runner.forward call (each streamed block is loaded once per group)
GROUP_BYTES = 1 << 30  # hidden states of a group (parked between blocks; its embeddings sit on the device at once)
HEAD_BYTES = 256 << 20  # final hidden states scored by one pass over the head (one read of a streamed head)


def model_max_length(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def windows(tokens: torch.Tensor, seqlen: int) -> list[torch.Tensor]:
    """Non-overlapping windows of `seqlen` tokens; a shorter tail is kept when it has at least 2 tokens."""
    ids = tokens.reshape(-1)
    return [ids[i:i + seqlen] for i in range(0, len(ids), seqlen) if len(ids[i:i + seqlen]) >= 2]


def batches(wins: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Consecutive windows `batch_size` at a time, split by length (only the tail window is shorter)."""
    out = []
    for i in range(0, len(wins), batch_size):
        by_len: dict[int, list[torch.Tensor]] = {}
        for w in wins[i:i + batch_size]:
            by_len.setdefault(len(w), []).append(w)
        out += [torch.stack(same) for same in by_len.values()]
    return out


def _hidden_size(runner: "Runner") -> int:
    cfg = getattr(runner.model, "config", None)
    d = getattr(cfg, "hidden_size", None)
    if d is None:
        d = runner.model.get_submodule(runner.arch.embed_path).weight.shape[-1]
    return int(d)


def groups(runner: "Runner", xs: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Batches gathered into groups run through the decoder together; a resident model runs batch by batch
    (every group costs no extra weight traffic there, so it keeps its activations small)."""
    if runner.offload == "none":
        yield from ([x] for x in xs)
        return
    item = torch.finfo(runner.dtype).bits // 8
    per_token = _hidden_size(runner) * item
    group: list[torch.Tensor] = []
    wins = toks = 0
    for x in xs:
        if group and (wins + x.shape[0] > GROUP_WINDOWS or (toks + x.numel()) * per_token > GROUP_BYTES):
            yield group
            group, wins, toks = [], 0, 0
        group.append(x)
        wins += x.shape[0]
        toks += x.numel()
    if group:
        yield group


class _Scorer:
    """Σ NLL of next tokens from the last block's outputs: final norm, then the head over vocabulary chunks.
    Final hidden states of consecutive batches are scored together, HEAD_BYTES at a time, so a streamed head is
    read once per pass, not once per batch; passes depend only on the batches, never on the placement, so every
    placement sums the same numbers in the same order."""

    def __init__(self, runner: "Runner") -> None:
        self.runner, self.head = runner, runner.head
        self.hs: list[torch.Tensor] = []
        self.ts: list[torch.Tensor] = []
        self.size = 0
        self.nll = 0.0
        self.count = 0

    def add(self, x: torch.Tensor, out: torch.Tensor) -> None:
        h = self.runner.final(out)[:, :-1]
        self.hs.append(h.reshape(-1, h.shape[-1]))
        self.ts.append(x[:, 1:].reshape(-1).to(h.device))
        self.count += self.ts[-1].numel()
        self.size += self.hs[-1].numel() * self.hs[-1].element_size()
        if self.size >= HEAD_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.hs:
            h, t = torch.cat(self.hs), torch.cat(self.ts)
            self.hs.clear()
            self.ts.clear()
            self.nll += float(nll_sum(self.head, h, t))
        self.size = 0


@torch.no_grad()
def perplexity(runner: "Runner", tokens: torch.Tensor, seqlen: int, batch_size: int = 1,
               progress: bool = True, desc: str = "ppl", record: Optional[dict] = None) -> float:
    """exp of the mean next-token NLL over non-overlapping windows of `seqlen` tokens (a shorter tail window
    is kept when it has at least 2 tokens), computed through `runner` without moving the model."""
    xs = batches(windows(tokens, seqlen), max(1, batch_size))
    if not xs:
        raise ValueError("perplexity needs at least 2 tokens")
    xs = dist.shard(xs, "perplexity batches", allow_empty=True)  # torchrun: each rank scores its share
    scorer = _Scorer(runner)
    with tqdm(total=sum(x.shape[0] for x in xs), desc=desc, disable=not progress or not dist.is_main(),
              leave=False, unit="win") as bar:
        for group in groups(runner, xs):
            outs = runner.forward(runner.embed(group))
            for x, out in zip(group, outs):
                scorer.add(x, out)
            del outs
            bar.update(sum(x.shape[0] for x in group))
    scorer.flush()
    nll, count = dist.sum_floats([scorer.nll, scorer.count], "perplexity sums")  # float64 over ranks
    if record is not None and dist.active():  # the work each rank did
        record["windows_per_rank"] = dist.gather_object(sum(x.shape[0] for x in xs), "perplexity shares")
    return math.exp(nll / count)


def text_perplexity(runner: "Runner", tokenizer, name: str, seqlen: int | None = None, limit: int | None = None,
                    batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity of the runner's model on the evaluation half of text `name`, with what was measured."""
    max_len = model_max_length(runner.model)
    seqlen = seqlen or 2048
    seqlen = min(seqlen, max_len) if max_len else seqlen
    tokens, part = evaluation_tokens(tokenizer, name, limit)
    shares: dict = {}
    ppl = perplexity(runner, tokens, seqlen, batch_size, progress, desc=f"ppl {name}", record=shares)
    return {"text": name, "ppl": ppl, "tokens": int(tokens.numel()), "seqlen": seqlen, "part": part.describe(),
            **shares}
