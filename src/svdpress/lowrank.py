"""Low-rank linear layers and the function that swaps them into a model.

This file imports nothing but torch: it is copied verbatim next to every exported model, so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` can rebuild the layers without svdpress.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn


class LowRankLinear(nn.Module):
    """y = A (B x) + b with A: (m, r), B: (r, n). Two matmuls; the dense W = A·B is never formed.

    A and B are nn.Linear so that PEFT/LoRA and optimizers see ordinary linear layers.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.B = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)  # B: (r, n)
        self.A = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)  # A: (m, r)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     dtype: Optional[torch.dtype] = None) -> "LowRankLinear":
        dtype = dtype or (bias.dtype if bias is not None else A.dtype)
        layer = cls(B.shape[1], A.shape[0], A.shape[1], bias is not None, device=A.device, dtype=dtype)
        with torch.no_grad():
            layer.A.weight.copy_(A)
            layer.B.weight.copy_(B)
            if bias is not None:
                layer.A.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(self.B(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def install_empty_layers(model: nn.Module, layers: Mapping[str, Mapping]) -> None:
    """Swap in empty factored layers described by a saved spec {name: {"kind", "rank", ...}} before loading
    weights. Used by the svdpress loader and by the remote code, so both read the same format."""
    for name, spec in layers.items():
        old = get_module(model, name)
        dtype, device = old.weight.dtype, old.weight.device
        bias = old.bias is not None
        kind = spec.get("kind", "lowrank")
        if kind not in LAYER_KINDS:
            raise ValueError(f"unknown factored layer kind {kind!r} for {name}")
        new = LAYER_KINDS[kind](old.in_features, old.out_features, int(spec["rank"]), bias=bias,
                                device=device, dtype=dtype)
        set_module(model, name, new)


LAYER_KINDS: dict[str, type] = {"lowrank": LowRankLinear}
