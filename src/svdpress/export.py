"""Save and load compressed models: safetensors + config with every layer's rank + `svdpress.json` manifest.

The output is written to a temporary sibling directory and renamed into place at the end, so an interrupted
run never leaves a half-written model behind. The remote-code files make the directory loadable by plain
transformers (`trust_remote_code=True`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from .errors import SvdpressError
from .lowrank import LAYER_KINDS
from .models import MANIFEST

REMOTE_FILES = ("lowrank.py", "modeling_svdpress.py")
FORMAT_VERSION = 1


def factored_layers(model: nn.Module) -> dict[str, dict]:
    """{name: {kind, rank}} for every factored layer in the model: what the config must record to rebuild it."""
    kinds = {cls: kind for kind, cls in LAYER_KINDS.items()}
    return {name: {"kind": kinds[type(m)], "rank": int(m.rank)}
            for name, m in model.named_modules() if type(m) in kinds}


def json_default(o):
    if isinstance(o, (torch.Tensor,)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        from dataclasses import asdict
        return asdict(o)
    return str(o)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=json_default) + "\n")


def save(model: nn.Module, tokenizer, out: str | os.PathLike, manifest: Mapping[str, Any],
         overwrite: bool = False, extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write model + tokenizer + manifest to `out` atomically (temp dir, then rename)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SvdpressError(f"output directory {out} exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.config.svdpress = {"format": FORMAT_VERSION, "layers": factored_layers(model)}
        model.config.auto_map = {"AutoModelForCausalLM": "modeling_svdpress.SvdpressForCausalLM"}
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        here = Path(__file__).parent
        for f in REMOTE_FILES:
            shutil.copy(here / f, tmp / f)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        write_json(tmp / MANIFEST, manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if hasattr(model.config, "auto_map"):  # only the saved copy points at the remote code
            del model.config.auto_map
    return out


def read_manifest(path: str | os.PathLike) -> dict:
    p = Path(path) / MANIFEST
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise SvdpressError(f"{path} is not an svdpress output directory (no {MANIFEST})") from None
    except json.JSONDecodeError as e:
        raise SvdpressError(f"{p} is corrupt: {e}") from None
