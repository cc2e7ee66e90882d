"""Perplexity on non-overlapping windows (the WikiText protocol of GPTQ / SVD-LLM).

The held-out (second) half of a text is tokenized once and cut into windows of `seqlen` tokens; ppl =
exp(Σ NLL / #predicted tokens) over every window. The token NLL is computed from float32 log-softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.nn as nn
from tqdm.auto import tqdm

from ..data import evaluation_tokens


def model_max_length(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int, batch_size: int = 1,
               progress: bool = True, desc: str = "ppl") -> float:
    """exp of the mean next-token NLL over non-overlapping windows of `seqlen` tokens (a shorter tail window
    is kept when it has at least 2 tokens)."""
    device = next(model.parameters()).device
    ids = tokens.reshape(-1)
    windows = [ids[i:i + seqlen] for i in range(0, len(ids), seqlen) if len(ids[i:i + seqlen]) >= 2]
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        group = windows[i:i + batch_size]
        for same in _by_length(group):
            x = torch.stack(same).to(device)
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                         reduction="sum"))
            count += x[:, 1:].numel()
    return math.exp(nll / count)


def _by_length(windows: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[int, list[torch.Tensor]] = {}
    for w in windows:
        groups.setdefault(len(w), []).append(w)
    return list(groups.values())


def text_perplexity(model: nn.Module, tokenizer, name: str, seqlen: int | None = None, limit: int | None = None,
                    batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity of `model` on the evaluation half of text `name`, with what was measured."""
    max_len = model_max_length(model)
    seqlen = seqlen or 2048
    seqlen = min(seqlen, max_len) if max_len else seqlen
    tokens, part = evaluation_tokens(tokenizer, name, limit)
    ppl = perplexity(model, tokens, seqlen, batch_size, progress, desc=f"ppl {name}")
    return {"text": name, "ppl": ppl, "tokens": int(tokens.numel()), "seqlen": seqlen, "part": part.describe()}
