"""Mixture-of-experts: every routed expert's matrices become layers of their own, and so targets.

In transformers 5 an MoE block keeps its experts as fused 3-D parameters in an `*Experts` module
(`gate_up_proj`: (E, 2f, d), `down_proj`: (E, d, f)) whose forward(hidden_states, top_k_index, top_k_weights)
runs every hit expert on the tokens routed to it. Discovery lists linear layers, so left as it is, the experts
would silently stay dense (the routers are their own module type and are never targets).

`split_experts` swaps each such module for a `lowrank.ExpertList`: the same forward, with expert e's two matrices
as nn.Linear layers `experts.e.gate_up_proj` (2f × d: gate and up factored as one matrix, like other fused
projections) and `experts.e.down_proj` (d × f) of the fused tensors. From then on every stage treats them as
ordinary target layers, by name, through the architecture map:

* statistics count only the tokens routed to the expert, because the layer's forward hook only ever sees those
  (the MoE-SVD papers: an expert's input distribution is its routed tokens, not the whole stream):
      C_gu[e] = Σ_{t → e} x_t x_tᵀ,   C_down[e] = Σ_{t → e} h_t h_tᵀ,  h_t = act(gate_e x_t) ⊙ (up_e x_t);
  the routing weights scale the expert's output, not its input, so they do not enter C (they do enter the
  output gradients of KFAC's G, as they should);
* every factorizer, allocator, PivGa, healing and the export see expert layers like any other;
* the export records the experts list (kind "experts") and each factored expert layer, and both loaders rebuild
  them (`lowrank.install_empty_layers`).

The fallback rule: an expert layer that saw fewer than `MIN_TOKENS` routed calibration tokens is factored by
plain SVD of its weight (whitening with a Gram of rank < 16, usually far below d, would only fit the few tokens
seen); the manifest's `experts` section lists those layers and every expert's token count.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from .lowrank import ExpertList, set_module

MIN_TOKENS = 16  # fewer routed calibration tokens than this: the expert layer is factored by plain SVD
FALLBACK = "svd"  # the factorizer used then


def is_experts(m: nn.Module) -> bool:
    """A fused experts module: 3-D gate_up_proj (E, 2f, d) and down_proj (E, d, f) parameters."""
    gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3
            and gu.shape[0] == down.shape[0] and gu.shape[2] == down.shape[1] and gu.shape[1] == 2 * down.shape[2])


def split_experts(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Replace every fused experts module by an ExpertList of per-expert layers. Returns how
    each new weight is read from the checkpoint: {experts.e.gate_up_proj.weight: (experts.gate_up_proj, e)},
    so that a model built on the meta device can still stream its experts from the original safetensors."""
    slices: dict[str, tuple[str, int]] = {}
    for name, m in [(n, m) for n, m in model.named_modules() if is_experts(m)]:
        set_module(model, name, ExpertList.from_fused(m))
        for e in range(m.gate_up_proj.shape[0]):
            for proj in ("gate_up_proj", "down_proj"):
                slices[f"{name}.{e}.{proj}.weight"] = (f"{name}.{proj}", e)
    return slices


def is_expert_layer(model: nn.Module, name: str) -> bool:
    """`name` is a layer of one routed expert (`….experts.3.down_proj`)."""
    parts = name.split(".")
    if len(parts) < 3:
        return False
    try:
        return isinstance(model.get_submodule(".".join(parts[:-2])), ExpertList)
    except AttributeError:
        return False


def record(tokens: Mapping[str, int], fell_back: list[str]) -> dict:
    """The manifest's `experts` section: the rule, the layers that fell back, routed tokens per expert layer."""
    return {"min_tokens": MIN_TOKENS, "fallback": f"plain SVD ({FALLBACK}) below min_tokens routed tokens",
            "fell_back": list(fell_back), "routed_tokens": dict(tokens)}
