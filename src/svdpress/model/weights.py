"""Where a streamed model's weights live: safetensors files read tensor by tensor (`read_tensors`), never whole.

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
from safetensors.torch import save_file

from ..errors import SvdpressError

INDEX = "model.safetensors.index.json"


ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}  # safetensors' dtype names
_TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}


def _header(path: Path) -> tuple[int, dict]:
    """(offset of the data, header) of a safetensors file whose header and data are complete; else a clear error."""
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
    meta.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in meta.values()), default=0)
    if 8 + n + end > size:
        raise SvdpressError(f"weights file {path} is truncated: {size} bytes, its header describes {8 + n + end}")
    return 8 + n, meta


def check_safetensors(path: Path) -> list[str]:
    """The tensor names of a safetensors file whose header and data are complete; a clear error otherwise."""
    return list(_header(path)[1])


def read_tensors(path: Path, names: Optional[Iterable[str]] = None,
                 rows: Optional[tuple[int, int]] = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (all, or `names`; with `rows=(a, b)` only rows a:b of each), read with
    plain reads into new tensors. safetensors' own loader memory-maps the file: while it copies a tensor out,
    the pages read count in this process's resident set as well as the copy, a transient doubling (512 MB for
    one 8192² float64 statistic). Read this way, the file's pages stay in the kernel's page cache instead."""
    path = Path(path)
    base, meta = _header(path)
    out = {}
    try:
        with open(path, "rb", buffering=0) as f:
            for name in (meta if names is None else names):
                info = meta[name]
                dtype, shape = _TORCH_DTYPES.get(info["dtype"]), list(info["shape"])
                if dtype is None:
                    raise ValueError(f"dtype {info['dtype']} is not supported")
                a, b = (int(x) for x in info["data_offsets"])
                if rows is not None:
                    row = (b - a) // max(shape[0], 1)
                    r0, r1 = max(0, rows[0]), min(shape[0], rows[1])
                    shape[0] = max(r1 - r0, 0)
                    a, b = a + r0 * row, a + r0 * row + shape[0] * row
                t = torch.empty(shape, dtype=dtype)
                view = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
                f.seek(base + a)
                got = 0
                while got < b - a:
                    k = f.readinto(view[got:])
                    if not k:
                        raise ValueError(f"{name}: file ended after {got} of {b - a} bytes")
                    got += k
                out[name] = t
    except KeyError as e:
        raise SvdpressError(f"weights file {path} has no tensor {e}") from None
    except (OSError, ValueError) as e:
        raise SvdpressError(f"cannot read weights file {path}: {e}") from None
    return out


class TensorSource:
    """Tensors by name from safetensors files (see module docstring)."""

    def __init__(self) -> None:
        self.where: dict[str, Path] = {}
        self.slices: dict[str, tuple[str, int]] = {}  # name → (stored tensor, index along its first dimension)

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

    def add_slices(self, slices: dict[str, tuple[str, int]]) -> None:
        """Tensors stored as one entry of a larger one (an MoE expert's matrix in the fused 3-D experts tensor)."""
        self.slices.update(slices)

    def __contains__(self, name: str) -> bool:
        return name in self.where or (name in self.slices and self.slices[name][0] in self.where)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read without a memory map (see `read_tensors`)."""
        if name not in self.where and name in self.slices:
            whole, i = self.slices[name]
            return self.rows(whole, i, i + 1)[0]
        if name not in self.where:
            raise SvdpressError(f"tensor {name} is not in the checkpoint")
        return read_tensors(self.where[name], [name])[name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of a tensor, read without loading the rest."""
        if name not in self.where and name in self.slices:
            return self.get(name)[start:stop]
        if name not in self.where:
            raise SvdpressError(f"tensor {name} is not in the checkpoint")
        return read_tensors(self.where[name], [name], rows=(start, stop))[name]


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
