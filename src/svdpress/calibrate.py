"""Sequential, block-by-block calibration: the only place that runs calibration forwards.

As in GPTQ, the model runs up to the first decoder block once; then each block in turn is moved to the device,
fed the previous block's outputs, and its target layers' inputs are summarized by forward hooks. Only one
block's activations live in memory at a time, so a model larger than the device is handled block by block.

Layers that read the same input tensor (q/k/v; gate/up) share one `InputStats`: the hooks see the very same
tensor object and accumulate it once. Accumulation is a float32 matmul per batch summed into float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .models import find_blocks, find_targets


@dataclass
class InputStats:
    """Second moments of one layer input over calibration tokens: C = Σ_t x_t x_tᵀ (and Σ_t |x_t| for ASVD)."""

    xtx: torch.Tensor  # (n, n) float64
    abs_sum: torch.Tensor  # (n,) float64
    tokens: int = 0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)  # whiteners shared by a group

    @classmethod
    def zeros(cls, n: int, device) -> "InputStats":
        return cls(torch.zeros(n, n, dtype=torch.float64, device=device),
                   torch.zeros(n, dtype=torch.float64, device=device))

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.xtx += (x.T @ x).double()  # float32 block, float64 sum
        self.abs_sum += x.abs().sum(0).double()
        self.tokens += x.shape[0]

    def cpu(self) -> "InputStats":
        return InputStats(self.xtx.cpu(), self.abs_sum.cpu(), self.tokens)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


@dataclass
class BlockStats:
    block: int
    inputs: dict[str, InputStats]  # layer name -> stats; layers that share an input share the object
    groups: list[list[str]]  # names of layers reading the same input


class _Stop(Exception):
    pass


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _move_outside_blocks(model: nn.Module, prefix: str, device) -> None:
    """Move everything but the decoder blocks (embeddings, rotary, norms) to `device`."""
    for name, child in model.named_modules():
        if name and (name == prefix or name.startswith(prefix + ".")):
            continue
        for pname, p in list(child.named_parameters(recurse=False)) + list(child.named_buffers(recurse=False)):
            p.data = p.data.to(device)


@torch.no_grad()
def block_inputs(model: nn.Module, samples: torch.Tensor, batch_size: int, device) -> list[tuple]:
    """Run the model up to block 0 and capture (hidden_states, kwargs) for each batch of samples."""
    prefix, blocks = find_blocks(model)
    captured: list[tuple] = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_value", "past_key_values")}
        captured.append((hidden, kwargs))
        raise _Stop

    _move_outside_blocks(model, prefix, device)
    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, len(samples), batch_size):
            try:
                model(input_ids=samples[i:i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        _move_outside_blocks(model, prefix, "cpu" if device != "cpu" else device)
    return captured


def iter_block_stats(model: nn.Module, samples: torch.Tensor, batch_size: int = 8, device="cpu",
                     progress: bool = True, offload: Optional[str] = None) -> Iterator[BlockStats]:
    """Yield each block's input statistics, in order, running the dense model block by block.

    `offload`: where block activations wait between blocks ("cpu" keeps GPU memory to one block's worth).
    """
    prefix, blocks = find_blocks(model)
    targets = find_targets(model)
    by_block: dict[int, list] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t)
    home = next(model.parameters()).device
    states = block_inputs(model, samples, batch_size, device)
    park = offload or device
    states = [(_to(h, park), kw) for h, kw in states]

    for i in tqdm(range(len(blocks)), desc="calibrate", unit="block", disable=not progress):
        block = blocks[i].to(device)
        stats: dict[str, InputStats] = {}
        seen: list[tuple[torch.Tensor, InputStats]] = []  # input tensors of this batch (held: no address reuse)

        def hook(name: str, n: int):
            def fn(_m, args, _out):
                x = args[0]
                for t, s in seen:
                    if t is x:  # same tensor as a sibling layer: share its statistics
                        stats.setdefault(name, s)
                        return
                s = stats.setdefault(name, InputStats.zeros(n, x.device))
                s.add(x)
                seen.append((x, s))
            return fn

        handles = [model.get_submodule(t.name).register_forward_hook(hook(t.name, t.shape.n))
                   for t in by_block.get(i, [])]
        with torch.no_grad():
            for j, (h, kw) in enumerate(states):
                seen.clear()
                out = block(_to(h, device), **_to(kw, device))
                out = out[0] if isinstance(out, tuple) else out
                states[j] = (_to(out, park), kw)
        seen.clear()
        for hd in handles:
            hd.remove()
        blocks[i].to(home)
        yield _finish(i, stats)


def _finish(block: int, stats: dict[str, InputStats]) -> BlockStats:
    moved: dict[int, InputStats] = {}
    groups: dict[int, list[str]] = {}
    out = {}
    for name, s in stats.items():
        key = id(s)
        if key not in moved:
            moved[key] = s.cpu()
        out[name] = moved[key]
        groups.setdefault(key, []).append(name)
    return BlockStats(block, out, list(groups.values()))
