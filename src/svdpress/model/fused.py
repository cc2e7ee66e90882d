"""Fused projections and how to split them into their logical parts (`--split-fused`).

Some families compute several projections of one input with one matrix: Phi-3's `qkv_proj` ([q | k | v] rows)
and `gate_up_proj` ([gate | up]), GPT-NeoX's `query_key_value` (per head [q k v], interleaved) and GPT-2's Conv1D
`c_attn` ([q | k | v]). By default such a layer is one target, factored as one matrix: W ≈ A·B with one rank for
the whole. Split, each part W_j (its rows of W) is its own target with its own spectrum, statistics and rank:
W_q ≈ A_q B_q, W_k ≈ A_k B_k, … The parts share nothing (no common B), so splitting pays r_j·n for each part's B
and gains that q, k and v (or gate and up) need not share one input subspace.

The declarations below say, per model type and block-relative path, which rows of the fused weight (out, in)
belong to which part; `split_fused` swaps each fused layer for a `SplitLinear` (lowrank.py) holding one
nn.Linear per part, exactly equal to the fused layer (its output order restored where the rows interleave).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import SvdpressError
from ..lowrank import SplitLinear, set_module
from .arch import _text_config, arch_map, is_conv1d, linear_shape

Rows = dict[str, list[int]]  # part name → row indices of the fused weight W (out, in), in the part's order


def _head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _phi3_qkv(cfg: Any) -> Rows:
    q = cfg.num_attention_heads * _head_dim(cfg)
    kv = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) * _head_dim(cfg)
    return {"q": list(range(q)), "k": list(range(q, q + kv)), "v": list(range(q + kv, q + 2 * kv))}


def _halves(names: tuple[str, str]) -> Callable[[Any], Rows]:
    def rows(cfg: Any) -> Rows:
        i = cfg.intermediate_size
        return {names[0]: list(range(i)), names[1]: list(range(i, 2 * i))}
    return rows


def _neox_qkv(cfg: Any) -> Rows:
    """Rows viewed as (heads, 3·d) and chunked: head h holds q at [3dh, 3dh+d), k after it, then v."""
    h, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    return {p: [3 * d * j + k * d + t for j in range(h) for t in range(d)] for k, p in enumerate("qkv")}


def _gpt2_qkv(cfg: Any) -> Rows:
    e = cfg.hidden_size
    return {p: list(range(k * e, (k + 1) * e)) for k, p in enumerate("qkv")}


# model_type → {block-relative path of a fused layer: config → rows of each part}
FUSED: dict[str, dict[str, Callable[[Any], Rows]]] = {
    "phi3": {"self_attn.qkv_proj": _phi3_qkv, "mlp.gate_up_proj": _halves(("gate", "up"))},
    "gpt_neox": {"attention.query_key_value": _neox_qkv},
    "gpt2": {"attn.c_attn": _gpt2_qkv},
}


def fused_layers(model: nn.Module) -> dict[str, Rows]:
    """{full name: rows of each part} for every fused target layer of `model` (empty for other families)."""
    arch = arch_map(model)
    decl = FUSED.get(arch.model_type, {})
    cfg = _text_config(model.config)
    return {t.name: decl[t.path](cfg) for t in arch.targets if t.path in decl}


@torch.no_grad()
def split_fused(model: nn.Module) -> list[str]:
    """Swap every fused target layer for a SplitLinear of its parts (weights copied; the output is unchanged).
    Returns the names of the layers split; a model of a family without fused layers is an error."""
    layers = fused_layers(model)
    if not layers:
        known = ", ".join(f"{t} ({', '.join(p)})" for t, p in FUSED.items())
        raise SvdpressError(f"--split-fused: {type(model).__name__} has no fused projections to split "
                            f"(families with fused layers: {known})")
    for name, rows in layers.items():
        old = model.get_submodule(name)
        shape = linear_shape(old)
        W = old.weight.t() if is_conv1d(old) else old.weight  # (out, in)
        flat = [r for part in rows.values() for r in part]
        if sorted(flat) != list(range(shape.m)):
            raise SvdpressError(f"--split-fused: the declared parts of {name} do not cover its {shape.m} outputs")
        interleaved = flat != list(range(shape.m))
        new = SplitLinear(shape.n, {p: len(r) for p, r in rows.items()}, shape.bias, interleaved,
                          W.device, W.dtype)
        for p, r in rows.items():
            idx = torch.tensor(r, device=W.device)
            getattr(new, p).weight.copy_(W.index_select(0, idx))
            if shape.bias:
                getattr(new, p).bias.copy_(old.bias.index_select(0, idx))
        if interleaved:  # fused output j is concatenated output inverse[j]
            inverse = torch.empty(shape.m, dtype=torch.int64)
            inverse[torch.tensor(flat)] = torch.arange(shape.m)
            new.order.copy_(inverse.to(W.device))
        set_module(model, name, new)
    return list(layers)
