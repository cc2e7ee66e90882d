"""The model runner: the one owner of placement. Every stage runs the model through it.

It runs a causal LM as embed → block 0 → … → block L−1 → final norm → head on an execution device, under a
memory budget, as llm-compressor's sequential pipeline and GPTQModel do:

* `offload="none"`: the whole model sits on the device (moved there once, here).
* `offload="cpu"`:  weights wait in CPU RAM; each block is moved to the device while it runs.
* `offload="disk"`: weights stay in safetensors files (the checkpoint itself, or a temporary offload folder)
  and the model's tensors are on the meta device; each block is read from disk while it runs and dropped after.
* `offload="auto"`: none when the model fits the device budget, else cpu (GPU with enough RAM), else disk.

Activations between blocks wait on the CPU when the device is a GPU and the model does not sit on it. A backward
pass (gradient statistics, FermiGrad's ∂KL/∂μ) recomputes one block at a time from its saved input, as
activation checkpointing with offload does, so peak memory is one block's weights and activations plus the
statistics, whatever the depth (in every placement: the graph never spans more than one block).

Losses over the vocabulary go through `head.py` in chunks; the embedding is looked up in chunks from disk.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import SvdpressError
from ..memory import MiB, available_cpu, format_size
from .arch import ArchMap, arch_map
from .head import Head
from .weights import OffloadFolder, TensorSource

OFFLOADS = ("auto", "none", "cpu", "disk")
State = tuple[torch.Tensor, dict]  # (hidden states entering a block, the block's other arguments)
Override = Callable[[nn.Module], nn.Module]  # materialized original layer -> the module to use in its place


@dataclass
class Placement:
    device: str = "cpu"
    offload: str = "auto"
    max_memory: dict[str, int] = field(default_factory=dict)  # bytes per device: {"cpu": ..., "cuda:0": ...}
    dtype: torch.dtype = torch.float32  # execution dtype of the weights (statistics stay float32/float64)
    offload_dir: Optional[str] = None  # parent of the temporary offload folder

    def check(self) -> "Placement":
        if self.offload not in OFFLOADS:
            raise SvdpressError(f"unknown --offload {self.offload!r}; choose one of {', '.join(OFFLOADS)}")
        return self


class _Stop(Exception):
    pass


class BlockKwargs(dict):
    """Block 0's keyword arguments (what anything unpacking it with ** gets), and `per_block`: for each later
    block, the arguments that differ from block 0's. Models whose layers differ by type pass each layer its own
    mask and rotary tables (Gemma 2/3 sliding vs full attention, Qwen2/3 with sliding windows, Cohere 2)."""

    def __init__(self, base: Mapping = (), per_block: Optional[dict[int, dict]] = None) -> None:
        super().__init__(base)
        self.per_block = per_block if per_block is not None else {}


def _on_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer `name` by `value` (frozen), keeping the Parameter/buffer kind."""
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[leaf] = value


class Runner:
    """See the module docstring. Use as a context manager (or call `close()`): temporary folders are removed
    and the model's requires_grad flags restored on exit, Ctrl-C included."""

    def __init__(self, model: nn.Module, placement: Optional[Placement] = None, source: Optional[TensorSource] = None,
                 arch: Optional[ArchMap] = None, targets: Sequence[str] = (), ignore: Sequence[str] = ()) -> None:
        from ..moe import split_experts

        self.model = model
        self.placement = (placement or Placement()).check()
        slices = split_experts(model)  # MoE: every routed expert's matrices become layers (targets) of their own
        if slices and source is not None:
            source.add_slices(slices)
        self.device = torch.device(self.placement.device)
        self.dtype = self.placement.dtype
        self.arch = arch or arch_map(model, targets, ignore)
        self.blocks = self.arch.blocks(model)
        self.source = source
        self._folder: Optional[OffloadFolder] = None
        self._head: Optional[torch.Tensor] = None  # the LM head matrix, when streamed but small enough to keep
        self._flags = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
        self._aliases = self._tied_names()
        self.offload = self._decide()
        self._place()

    # ---- placement ----------------------------------------------------------------------------------------

    def _tied_names(self) -> dict[str, list[str]]:
        """name -> every name of the same tensor (tied embeddings and LM head)."""
        groups: dict[int, list[str]] = {}
        for n, p in self.model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(n)
        return {n: names for names in groups.values() for n in names}

    def lazy(self) -> bool:
        return any(_on_meta(p) for p in self.model.parameters())

    def block_bytes(self) -> int:
        item = torch.finfo(self.dtype).bits // 8
        return max(sum(p.numel() for p in b.parameters()) * item for b in self.blocks)

    def model_bytes(self) -> int:
        item = torch.finfo(self.dtype).bits // 8
        return sum(p.numel() for p in self.model.parameters()) * item

    def budget(self) -> int:
        """Bytes the execution device may hold (the --max-memory entry, else what it has)."""
        mm = self.placement.max_memory
        if self.device.type == "cuda":
            idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
            return mm.get(f"cuda:{idx}", int(torch.cuda.get_device_properties(idx).total_memory * 0.9))
        return mm.get("cpu", int(available_cpu() * 0.8))

    def batch_size(self, seqlen: int, want: int) -> int:
        """Sequences per pass through a block: `want`, or fewer when streaming, so that one pass's activations
        (≈ the inputs and outputs of the block's linear layers, Σ(m + n) values a token) take at most 1/16 of
        the budget. The statistics are sums over tokens, so the batch changes nothing but rounding."""
        if self.offload == "none":
            return want
        item = torch.finfo(self.dtype).bits // 8
        per_token = max(sum(t.shape.m + t.shape.n for t in self.arch.in_block(i)) for i in range(len(self.blocks)))
        fits = (self.budget() // 16) // max(per_token * item * seqlen, 1)
        return int(max(1, min(want, fits)))

    def _decide(self) -> str:
        want = self.placement.offload
        if want == "auto":
            fits = self.model_bytes() * 1.2 < self.budget()
            if fits:
                want = "none"
            elif self.device.type == "cuda" and self.model_bytes() < self.placement.max_memory.get(
                    "cpu", available_cpu() * 0.8):
                want = "cpu"
            else:
                want = "disk"
        if want == "cpu" and self.lazy():
            want = "disk"  # weights that were never loaded stay on disk rather than filling RAM
        if want != "none":
            need = int(self.block_bytes() * 1.5)
            if self.budget() < need:
                dev = "cpu" if self.device.type == "cpu" else str(self.device)
                raise SvdpressError(f"--max-memory {dev}={format_size(self.budget())} is too small: one decoder "
                                    f"block needs {format_size(self.block_bytes())} of weights; the smallest "
                                    f"budget that works is about {format_size(need)}")
        return want

    def _place(self) -> None:
        if self.offload == "none":
            if self.lazy():
                self._materialize_all()
            self.model.to(self.device)
            return
        if self.offload == "disk" and not self.lazy():
            self._to_folder()
        others = self._other_names()
        if self.offload == "disk":
            for name in others:
                self._load(name, self.device)
        else:  # cpu: blocks stay in RAM, the rest goes to the device
            for name in others:
                t = self._tensor(name)
                _set_tensor(self.model, name, t.to(self.device))
        for name, b in self.model.named_buffers():  # non-persistent buffers (rotary tables): small, on the device
            if not _on_meta(b) and not name.startswith(self.arch.blocks_path + "."):
                _set_tensor(self.model, name, b.to(self.device))

    def _other_names(self) -> list[str]:
        """Tensors outside the blocks, except the embedding and head matrices (looked up in chunks)."""
        skip = {f"{self.arch.embed_path}.weight", f"{self.arch.head_path}.weight"}
        skip |= {a for s in list(skip) for a in self._aliases.get(s, [])}
        out = []
        for name in self.model.state_dict(keep_vars=True):
            if name.startswith(self.arch.blocks_path + ".") or name in skip:
                continue
            out.append(name)
        return out

    def _tensor(self, name: str) -> torch.Tensor:
        mod_name, _, leaf = name.rpartition(".")
        mod = self.model.get_submodule(mod_name) if mod_name else self.model
        return mod._parameters[leaf] if leaf in mod._parameters else mod._buffers[leaf]

    def _read(self, name: str) -> torch.Tensor:
        """A tensor from the source, by its name or a tied alias."""
        for alias in [name] + self._aliases.get(name, []):
            if self.source is not None and alias in self.source:
                return self.source.get(alias)
        raise SvdpressError(f"tensor {name} is not in the checkpoint's safetensors; streaming needs the "
                            f"checkpoint's tensor names to match the model's: use --offload none or cpu")

    def _load(self, name: str, device) -> None:
        t = self._tensor(name)
        value = self._read(name)
        dtype = self.dtype if t.dtype.is_floating_point else t.dtype
        _set_tensor(self.model, name, value.to(device=device, dtype=dtype))

    def _materialize_all(self) -> None:
        for name in self.model.state_dict(keep_vars=True):
            if _on_meta(self._tensor(name)):
                self._load(name, "cpu")
        for n, names in self._aliases.items():  # re-tie: each alias was loaded as its own tensor
            if len(names) > 1 and n == names[0]:
                for other in names[1:]:
                    mod_name, _, leaf = other.rpartition(".")
                    setattr(self.model.get_submodule(mod_name), leaf, self._tensor(n))

    def _to_folder(self) -> None:
        """An in-memory model asked to stream from disk: its weights go to a temporary offload folder, block
        by block, and its tensors to the meta device."""
        self._folder = OffloadFolder(self.placement.offload_dir)
        self.source = self.source or TensorSource()
        sd = self.model.state_dict(keep_vars=True)
        parts: dict[str, list[str]] = {}
        seen: set[int] = set()
        prefix = self.arch.blocks_path + "."
        for name, t in sd.items():
            if id(t) in seen:
                continue
            seen.add(id(t))
            part = name[len(prefix):].split(".")[0] if name.startswith(prefix) else "rest"
            parts.setdefault(part, []).append(name)
        for part, names in parts.items():
            f = self._folder.write({n: sd[n].data for n in names})
            self.source.add_file(f, names)
            for n in names:
                t = sd[n]
                _set_tensor(self.model, n, torch.empty(t.shape, dtype=t.dtype, device="meta"))
        for n, names in self._aliases.items():  # tied tensors stay one (meta) tensor; reads go through aliases
            if len(names) > 1 and n == names[0]:
                for other in names[1:]:
                    mod_name, _, leaf = other.rpartition(".")
                    setattr(self.model.get_submodule(mod_name), leaf, self._tensor(n))

    # ---- blocks -------------------------------------------------------------------------------------------

    @contextmanager
    def block(self, i: int, overrides: Optional[Mapping[str, Override]] = None) -> Iterator[nn.Module]:
        """Block i with its weights on the device (and `overrides` swapped in) for the duration."""
        from ..lowrank import set_module

        blk = self.blocks[i]
        prefix = self.arch.block_prefix(i) + "."
        loaded: list[str] = []
        if self.offload == "disk":
            for name, t in blk.state_dict(prefix=prefix, keep_vars=True).items():
                if _on_meta(t):
                    self._load(name, self.device)
                    loaded.append(name)
        elif self.offload == "cpu" and self.device.type != "cpu":
            blk.to(self.device)
        swapped = {}
        try:
            for name, make in (overrides or {}).items():
                if name.startswith(prefix):
                    swapped[name] = self.model.get_submodule(name)
                    set_module(self.model, name, make(swapped[name]))
            yield blk
        finally:
            for name, old in swapped.items():
                set_module(self.model, name, old)
            if self.offload == "disk":
                for name in loaded:
                    t = self._tensor(name)
                    _set_tensor(self.model, name, torch.empty(t.shape, dtype=t.dtype, device="meta"))
            elif self.offload == "cpu" and self.device.type != "cpu":
                blk.to("cpu")

    def run(self, blk: nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
        per = getattr(kw, "per_block", None)
        if per:
            i = next((j for j, b in enumerate(self.blocks) if b is blk), None)
            kw = {**kw, **per.get(i, {})}
        out = blk(h.to(self.device), **kw)
        return out[0] if isinstance(out, tuple) else out

    def park(self, t: torch.Tensor) -> torch.Tensor:
        """Where activations wait between blocks: the CPU unless the whole model sits on the device."""
        return t if self.offload == "none" else t.to("cpu")

    def tensor_value(self, name: str) -> torch.Tensor:
        """Any state-dict tensor's value, on the CPU, in the model's dtype (read from disk when streaming)."""
        t = self._tensor(name)
        return self._read(name).to(t.dtype) if _on_meta(t) else t.detach().cpu()

    def tensor_chunks(self, name: str, chunk_bytes: int = 64 * MiB) -> Iterator[torch.Tensor]:
        """A state-dict tensor's value in slices along its first dimension (CPU, the model's dtype), read from
        disk slice by slice when streaming: an exported 128k×4096 embedding never needs to be in memory whole."""
        t = self._tensor(name)
        n = t.shape[0] if t.dim() else 1
        row = max(t.numel() // max(n, 1), 1) * t.element_size()
        step = max(1, chunk_bytes // row)
        for a in range(0, n, step):
            b = min(a + step, n)
            if _on_meta(t) and t.dim() >= 1:
                yield self._rows(name, a, b).to(t.dtype)
            else:
                yield (self.tensor_value(name) if t.dim() == 0 else t.detach()[a:b]).cpu()

    def weight(self, name: str) -> torch.Tensor:
        """The weight W (out, in) of layer `name` (read from disk when streaming), for factorization: a Conv1D's
        stored (in, out) weight is handed over transposed, so every factorizer sees y = W x."""
        from .arch import is_conv1d

        t = self._tensor(f"{name}.weight")
        w = self._read(f"{name}.weight").to(t.dtype) if _on_meta(t) else t.detach()
        return w.t().contiguous() if is_conv1d(self.model.get_submodule(name)) else w

    def rebuild_block(self, i: int, build: Callable[[nn.Module], None],
                      write: Optional[Callable[[dict], object]] = None) -> None:
        """Replace layers of block i: the block is materialized, `build(block)` swaps modules in place, and the
        new block's tensors go to `write(state_dict)` (the export's shard writer, which returns the file). When
        streaming, that file becomes where the block is read from, and the block goes back to the meta device."""
        blk = self.blocks[i]
        prefix = self.arch.block_prefix(i) + "."
        if self.offload == "disk":
            if write is None:
                raise SvdpressError("a streamed model's rebuilt blocks need somewhere to be written")
            for name, t in blk.state_dict(prefix=prefix, keep_vars=True).items():
                if _on_meta(t):
                    self._load(name, self.device)
        elif self.offload == "cpu" and self.device.type != "cpu":
            blk.to(self.device)
        build(blk)
        blk.requires_grad_(False)
        sd = blk.state_dict(prefix=prefix, keep_vars=True)
        file = write({n: t.detach() for n, t in sd.items()}) if write is not None else None
        if self.offload == "disk":
            self.source.add_file(file, list(sd))
            for name, t in sd.items():
                _set_tensor(self.model, name, torch.empty(t.shape, dtype=t.dtype, device="meta"))
        elif self.offload == "cpu" and self.device.type != "cpu":
            blk.to("cpu")

    # ---- embeddings and head ----------------------------------------------------------------------------

    def embed_matrix_name(self) -> str:
        return f"{self.arch.embed_path}.weight"

    @torch.no_grad()
    def embed(self, batches: Sequence[torch.Tensor]) -> list[State]:
        """(hidden, kwargs) entering block 0 for each batch of token ids: the embedding lookup (in vocabulary
        chunks from disk when streaming), then the model's own forward through the blocks, which builds the
        rotary tables, the causal masks and anything else the blocks take. Every block's forward is replaced
        meanwhile by a recorder that keeps its arguments and passes its input through (no weights are needed);
        the last one stops the forward. The kwargs are a BlockKwargs: block 0's, and what differs per block."""
        emb = self.model.get_submodule(self.arch.embed_path)
        self.check_waiting(sum(b.numel() for b in batches))
        if _on_meta(emb.weight):  # one chunked pass over the vocabulary for every batch (kept on the CPU)
            flat = self._lookup(emb, torch.cat([b.reshape(-1) for b in batches]))
            hidden = list(flat.split([b.numel() for b in batches]))
            hidden = [h.view(*b.shape, -1) for h, b in zip(hidden, batches)]
        else:
            hidden = batches  # looked up one batch at a time below
        states: list[State] = []
        calls: list[tuple[torch.Tensor, dict]] = []
        last = len(self.blocks) - 1

        def recorder(i: int):
            def forward(*args, **kwargs):
                h = args[0] if args else kwargs.pop("hidden_states")
                kwargs = {k: v for k, v in kwargs.items()
                          if k not in ("hidden_states", "past_key_value", "past_key_values")}
                calls.append((h, kwargs))
                if i == last:
                    raise _Stop
                return h
            return forward

        for i, blk in enumerate(self.blocks):
            blk.forward = recorder(i)
        try:
            for h in hidden:
                calls.clear()
                if h is not None and not h.is_floating_point():
                    h = emb(h.to(emb.weight.device))
                try:
                    self.model(inputs_embeds=h.to(self.device), use_cache=False)
                except _Stop:
                    pass
                h0, kw0 = calls[0]
                per = {i: {k: v for k, v in kwi.items() if k not in kw0 or v is not kw0[k]}
                       for i, (_, kwi) in enumerate(calls[1:], start=1)}
                states.append((self.park(h0), BlockKwargs(kw0, {i: d for i, d in per.items() if d})))
        finally:
            calls.clear()
            for blk in self.blocks:
                blk.__dict__.pop("forward", None)
        return states

    def check_waiting(self, tokens: int) -> None:
        """Refuse, before any block runs, a pass whose activations cannot wait between blocks: every batch's
        hidden states (tokens × d values) wait on the device when the model is resident there, else in RAM. They
        may take half of what that memory has left (the other half: a block's output being made, its statistics),
        so a calibration set too large ends in one message instead of the kernel's out-of-memory kill."""
        item = torch.finfo(self.dtype).bits // 8
        width = self.model.get_submodule(self.arch.embed_path).weight.shape[-1]
        d = max(width, int(getattr(self.model.config, "hidden_size", 0) or 0))
        need = tokens * d * item
        resident = self.model_bytes() if self.offload == "none" else 0  # weights sharing that memory
        if self.offload == "none":
            where = "cpu" if self.device.type == "cpu" else str(self.device)
            room = self.budget()
            if self.device.type == "cuda" or "cpu" in self.placement.max_memory:
                room -= resident  # (free RAM, the default CPU budget, already excludes the loaded model)
        else:
            where, room = "cpu", self.placement.max_memory.get("cpu", int(available_cpu() * 0.8))
        if need > room // 2:
            raise SvdpressError(
                f"the activations of {tokens:,} tokens ({tokens:,} × {d} × {item} B = {format_size(need)}) wait "
                f"between blocks in {where} memory, which has {format_size(max(room, 0))} for them (half is the "
                f"most they may take): use fewer or shorter samples (--calib-samples, --calib-seqlen), or more "
                f"memory (--max-memory {where}=..., at least {format_size(2 * need + resident)})")

    def _lookup(self, emb: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of `ids` read from disk one vocabulary chunk at a time (on the CPU)."""
        name = self.embed_matrix_name()
        V, d = emb.weight.shape
        out = torch.zeros(*ids.shape, d, dtype=self.dtype)
        flat = ids.reshape(-1)
        step = max(1024, (64 * MiB) // max(d * 4, 1))
        for a in range(0, V, step):
            inside = (flat >= a) & (flat < a + step)
            if inside.any():
                rows = self._rows(name, a, min(a + step, V)).to(self.dtype)
                out.view(-1, d)[inside] = rows[flat[inside] - a]
        scale = getattr(emb, "embed_scale", None)
        if scale is not None:
            out = out * (scale.to(out.dtype) if torch.is_tensor(scale) else scale)
        return out

    def _rows(self, name: str, a: int, b: int) -> torch.Tensor:
        for alias in [name] + self._aliases.get(name, []):
            if self.source is not None and alias in self.source:
                return self.source.rows(alias, a, b)
        raise SvdpressError(f"tensor {name} is not in the checkpoint's safetensors")

    def final(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm (identity for a model without one), then the projection after it where the model has
        one (OPT-350m's project_out)."""
        h = h.to(self.device)
        if self.arch.norm_path is not None:
            h = self.model.get_submodule(self.arch.norm_path)(h)
        if getattr(self.arch, "out_proj_path", None) is not None:
            h = self.model.get_submodule(self.arch.out_proj_path)(h)
        return h

    @property
    def head(self) -> Head:
        head = self.model.get_submodule(self.arch.head_path)
        if hasattr(head, "A") and hasattr(head, "B"):  # a factored head (--lm-head): W_c = A_c·B, chunk by chunk
            A, B = head.A.weight, head.B.weight
            rows = lambda a, b: (A[a:b] @ B).to(self.device)  # noqa: E731
            bias = head.A.bias.to(self.device) if head.A.bias is not None else None
            scale = getattr(self.arch, "logit_scale", 1.0)
            if scale != 1.0:
                factored = rows
                rows = lambda a, b: factored(a, b) * scale  # noqa: E731
                bias = bias * scale if bias is not None else None
            return Head(rows, head.out_features, bias, self.arch.softcap, width=head.in_features)
        w = head.weight
        bias = getattr(head, "bias", None)
        if bias is not None:
            bias = (self._read(f"{self.arch.head_path}.bias") if _on_meta(bias) else bias).to(self.device)
        if _on_meta(w):
            name = f"{self.arch.head_path}.weight"
            if w.numel() * w.element_size() * 4 <= self.budget():  # small enough to keep: read it once
                if self._head is None:
                    self._head = self._read(name).to(device=self.device, dtype=w.dtype)
                cached = self._head
                rows = lambda a, b: cached[a:b]  # noqa: E731
            else:  # larger than a quarter of the budget: read the rows of each chunk when needed
                rows = lambda a, b: self._rows(name, a, b).to(self.device)  # noqa: E731
        else:
            rows = lambda a, b: w[a:b].to(self.device)  # noqa: E731
        scale = getattr(self.arch, "logit_scale", 1.0)
        if scale != 1.0:  # s·(h Wᵀ + b) = h (s·W)ᵀ + s·b (Cohere, Granite): head.py's chunks and backward stay exact
            unscaled = rows
            rows = lambda a, b: unscaled(a, b) * scale  # noqa: E731
            bias = bias * scale if bias is not None else None
        return Head(rows, w.shape[0], bias, self.arch.softcap, width=w.shape[1])

    # ---- whole passes -------------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, states: list[State], start: int = 0, stop: Optional[int] = None,
                overrides: Optional[Mapping[str, Override]] = None, save_inputs: bool = False):
        """Run every batch through blocks start..stop−1, block by block. Returns the outputs, and with
        `save_inputs` also every block's inputs (a `BlockInputs`, inputs[b][j]; the caller closes it)."""
        stop = len(self.blocks) if stop is None else stop
        hs = [s[0] for s in states]
        inputs = self._block_inputs(hs, stop - start) if save_inputs else None
        try:
            for i in range(start, stop):
                if inputs is not None:
                    inputs.append(hs)
                with self.block(i, overrides) as blk:
                    hs = [self.park(self.run(blk, h, kw)) for h, (_, kw) in zip(hs, states)]
        except BaseException:
            if inputs is not None:
                inputs.close()
            raise
        return (hs, inputs) if save_inputs else hs

    def _block_inputs(self, hs: list[torch.Tensor], n_blocks: int) -> "BlockInputs":
        """Where saved block inputs wait: on disk when streaming from disk, or when all of them (n_blocks × the
        batches) would take more than an eighth of the budget; in memory otherwise."""
        total = n_blocks * sum(h.numel() * h.element_size() for h in hs)
        return BlockInputs(self.offload == "disk" or total > self.budget() // 8, self.placement.offload_dir)

    def backward(self, states: list[State], loss_fn: Callable[[int, torch.Tensor], torch.Tensor],
                 overrides: Optional[Mapping[str, Override]] = None,
                 hook: Optional[Callable[[int, nn.Module, int], list]] = None,
                 on_block_done: Optional[Callable[[int], None]] = None,
                 passes: Optional[Callable[[int], int]] = None) -> float:
        """Σ_j loss_fn(j, h_j) over the batches, back-propagated through every block: leaves that require
        grad (e.g. FermiGrad's μ inside `overrides`) accumulate .grad, and `hook(i, block, p)` may register hooks
        that see each block's forward and backward (handles returned are removed after the block). h_j is the
        last block's output on the device. Blocks run one at a time, recomputed from their saved inputs, in
        every placement: the autograd graph never spans more than one block, so memory does not grow with depth
        (a whole-model graph of a 4096-token batch is gigabytes even for a 270M model), and the results are the
        same whether the model is streamed or not.

        With `passes(i) = P > 1`, block i's backward runs P times (p = 0..P−1), `hook` registering each pass's
        hooks (e.g. the gradient statistics of a few layers at a time, when all of them at once would not fit).
        Only the last pass carries the gradient on and into leaves; the earlier ones only feed the hooks."""
        with torch.no_grad():
            hs, saved = self.forward(states, overrides=overrides, save_inputs=True)
        try:
            grads, total = [], 0.0
            for j, h in enumerate(hs):
                x = h.to(self.device).detach().requires_grad_(True)
                loss = loss_fn(j, x)
                loss.backward()
                total += float(loss.detach())
                grads.append(self.park(x.grad))
            del hs
            for i in reversed(range(len(self.blocks))):
                P = passes(i) if passes else 1
                xs = saved[i]
                with self.block(i, overrides) as blk:
                    for p in range(P):
                        last = p == P - 1
                        handles = hook(i, blk, p) if hook else []
                        try:
                            for j, (_, kw) in enumerate(states):
                                x = xs[j].to(self.device).detach().requires_grad_(True)
                                out = self.run(blk, x, kw)
                                torch.autograd.backward(out, grads[j].to(self.device), inputs=None if last else [x])
                                if last:
                                    grads[j] = self.park(x.grad)
                                    xs[j] = None
                                del x, out
                        finally:
                            for hd in handles:
                                hd.remove()
                del xs
                saved.drop(i)
                if on_block_done:
                    on_block_done(i)
            return total
        finally:
            saved.close()

    @contextmanager
    def streamed(self) -> Iterator[nn.Module]:
        """The model itself, callable as usual (`model(input_ids)`, lm-eval, generate): blocks are brought to
        the device by forward hooks one at a time; the embedding and head sit on the device meanwhile."""
        if self.offload == "none":
            yield self.model
            return
        big = [self.embed_matrix_name(), f"{self.arch.head_path}.weight"]
        placed = []
        handles = []
        open_blocks: list[list] = []
        try:
            for name in dict.fromkeys(big):
                t = self._tensor(name)
                if _on_meta(t):
                    self._load(name, self.device)
                else:
                    _set_tensor(self.model, name, t.to(self.device))
                placed.append((name, t))
            for n, names in self._aliases.items():  # keep tied tensors tied while placed
                if len(names) > 1 and n == names[0] and n in big:
                    for other in names[1:]:
                        mod_name, _, leaf = other.rpartition(".")
                        setattr(self.model.get_submodule(mod_name), leaf, self._tensor(n))
            for i, blk in enumerate(self.blocks):
                ctx: list = []
                open_blocks.append(ctx)

                def pre(_m, _a, i=i, ctx=ctx):
                    ctx.append(self.block(i))
                    ctx[-1].__enter__()

                def post(_m, _a, _o, ctx=ctx):
                    ctx.pop().__exit__(None, None, None)

                handles += [blk.register_forward_pre_hook(pre), blk.register_forward_hook(post)]
            yield self.model
        finally:
            for h in handles:
                h.remove()
            for ctx in open_blocks:  # a block whose forward raised never reached its post-hook
                while ctx:
                    ctx.pop().__exit__(None, None, None)
            for name, t in placed:
                _set_tensor(self.model, name, t)

    # ---- identity, cleanup --------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """SHA-256 of every tensor (name, dtype, shape, bytes), the same whether resident or streamed."""
        h = hashlib.sha256()
        for name, t in self.model.state_dict(keep_vars=True).items():
            v = self._read(name).to(t.dtype) if _on_meta(t) else t.detach()
            v = v.contiguous().cpu()
            h.update(name.encode())
            h.update(f"{v.dtype}{tuple(v.shape)}".encode())
            h.update(memoryview(v.reshape(-1).view(torch.uint8).numpy()))
        return h.hexdigest()

    def describe(self) -> dict:
        return {"device": str(self.device), "offload": self.offload, "dtype": str(self.dtype).replace("torch.", ""),
                "budget_mb": round(self.budget() / MiB), "block_mb": round(self.block_bytes() / MiB),
                "model_mb": round(self.model_bytes() / MiB), "architecture": self.arch.model_type,
                "declared": self.arch.declared}

    def close(self) -> None:
        self._head = None
        if self._folder is not None:
            self._folder.close()
            self._folder = None
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._flags.get(n, False) and not _on_meta(p))

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BlockInputs:
    """Every block's input activations of a pass, inputs[i][j] (block i, batch j), saved for a later
    recomputation (backward, or a probe that restarts from block i). All of them together are L·N·d values
    (268 MB for Llama-3.2-1B at 8×256 tokens, 137 GB for an 8B model at 256×2048), so when streaming they
    wait on disk, one safetensors file per block, and only one block's are read back at a time."""

    def __init__(self, on_disk: bool, parent: Optional[str] = None) -> None:
        from ..store import TensorStore

        self._store = TensorStore(on_disk, parent)
        self._n = 0

    @property
    def on_disk(self) -> bool:
        return self._store.folder is not None

    def append(self, hs: Sequence[torch.Tensor]) -> None:
        self._store[str(self._n)] = {str(j): h for j, h in enumerate(hs)}
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        d = self._store[str(i)]
        return [d[str(j)] for j in range(len(d))]

    def drop(self, i: int) -> None:
        del self._store[str(i)]

    def close(self) -> None:
        self._store.close()
