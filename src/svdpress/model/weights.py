"""Where a streamed model's weights live: safetensors files read tensor by tensor (`safe_open`), never whole.

A `TensorSource` maps state-dict names to the safetensors file holding them: a checkpoint's shards (through
its `model.safetensors.index.json`), an offload folder written from an in-memory model, or the shards of a
compressed model as the export writes them. Later files override earlier ones, so the compressed blocks
replace the dense ones in place. Every file's header is checked when it is added: a truncated or unreadable
shard is a clear error naming the file, before any work is done.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import SvdpressError

INDEX = "model.safetensors.index.json"


def check_safetensors(path: Path) -> list[str]:
    """The tensor names of a safetensors file whose header and data are complete; a clear error otherwise."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header of {n} bytes does not fit in the file ({size} bytes)")
            meta = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise SvdpressError(f"cannot read weights file {path}: {e} (truncated or corrupt; re-download it)") from None
    end = max((int(v["data_offsets"][1]) for k, v in meta.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise SvdpressError(f"weights file {path} is truncated: {size} bytes, its header describes {8 + n + end}")
    return [k for k in meta if k != "__metadata__"]


class TensorSource:
    """Tensors by name from safetensors files (see module docstring)."""

    def __init__(self) -> None:
        self.where: dict[str, Path] = {}

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Optional["TensorSource"]:
        """The checkpoint's safetensors in `path` (index or single file); None when it has none."""
        path = Path(path)
        src = cls()
        index = path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise SvdpressError(f"cannot read {index}: {e}") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            return None
        for f in files:
            if not (path / f).is_file():
                raise SvdpressError(f"weights file {path / f} named in {INDEX} is missing")
            src.add_file(path / f)
        return src

    def add_file(self, file: Path, names: Optional[Iterable[str]] = None) -> None:
        file = Path(file)
        for name in (names if names is not None else check_safetensors(file)):
            self.where[name] = file

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        """One tensor. The file is opened for this read only: safetensors memory-maps it, and a mapping kept
        open leaves every page read through it resident in this process (a streamed 4.8 GB model showed 3.7 GB
        of file-backed RSS), so it is closed again at once."""
        if name not in self.where:
            raise SvdpressError(f"tensor {name} is not in the checkpoint")
        try:
            with safe_open(str(self.where[name]), framework="pt", device="cpu") as f:
                return f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error type for damaged data
            raise SvdpressError(f"cannot read {name} from {self.where.get(name)}: {e}") from None

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of a 2-D tensor, read without loading the rest."""
        try:
            with safe_open(str(self.where[name]), framework="pt", device="cpu") as f:
                return f.get_slice(name)[start:stop]
        except Exception as e:
            raise SvdpressError(f"cannot read {name}[{start}:{stop}] from {self.where.get(name)}: {e}") from None


class OffloadFolder:
    """A temporary folder of safetensors files for weights moved out of memory (`--offload disk` on a model
    that was loaded whole, e.g. a .gguf). Removed by `close()` (the runner's context exit, Ctrl-C included)."""

    def __init__(self, parent: Optional[str] = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="svdpress-offload-", dir=parent))
        self.count = 0

    def write(self, tensors: Mapping[str, torch.Tensor]) -> Path:
        self.count += 1
        f = self.path / f"part-{self.count:05d}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(f))
        return f

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
