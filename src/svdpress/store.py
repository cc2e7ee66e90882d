"""Per-layer results kept in memory or, for models larger than memory, in a temporary folder on disk.

`SpectrumStore` holds every layer's `LayerSpectrum`. On disk only S (and the note) stay in memory: allocators
read S freely, while U and V (together about the size of the layer's weights) are read from a safetensors file
each time they are asked for, so no stage ever holds every layer's factors at once.
`TensorStore` does the same for the gradient statistics (kfac's G, fwsvd's Fisher): one file per layer.
Both folders are removed by `close()`.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import MutableMapping
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors.torch import save_file

from .factorize import LayerSpectrum
from .model.weights import read_tensors


def _file(folder: Path, name: str) -> Path:
    return folder / f"{name}.safetensors"


class StoredSpectrum(LayerSpectrum):
    """A spectrum whose U and V are read from disk on access (S and the note stay in memory)."""

    def __init__(self, path: Path, S: torch.Tensor, note: str) -> None:  # noqa: D107 (no dataclass __init__)
        self.path, self.S, self.note = path, S, note

    @property
    def U(self) -> torch.Tensor:  # type: ignore[override]
        return read_tensors(self.path, ["U"])["U"]

    @property
    def V(self) -> torch.Tensor:  # type: ignore[override]
        return read_tensors(self.path, ["V"])["V"]


class _Store(MutableMapping):
    """A name-keyed store whose items live in memory or in a temporary folder (removed by `close()`)."""

    def __init__(self, on_disk: bool, parent: Optional[str], prefix: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent)) if on_disk else None
        self._items: dict[str, object] = {}
        # removed at close(), or when the store is garbage-collected or the interpreter exits, whichever is first
        self._remove = weakref.finalize(self, shutil.rmtree, self.folder, True) if on_disk else None

    def close(self) -> None:
        if self._remove is not None:
            self._remove()
        self.folder = None

    def __delitem__(self, name: str) -> None:
        item = self._items.pop(name)
        if isinstance(item, Path):
            item.unlink(missing_ok=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class SpectrumStore(_Store):
    """name → LayerSpectrum, in memory or with U, V on disk (see module docstring)."""

    def __init__(self, on_disk: bool = False, parent: Optional[str] = None) -> None:
        super().__init__(on_disk, parent, "svdpress-spectra-")

    def __setitem__(self, name: str, spec: LayerSpectrum) -> None:
        if self.folder is None:
            self._items[name] = spec
            return
        path = _file(self.folder, name)
        save_file({"U": spec.U.contiguous().cpu(), "V": spec.V.contiguous().cpu()}, str(path))
        self._items[name] = StoredSpectrum(path, spec.S.cpu(), spec.note)

    def __getitem__(self, name: str) -> LayerSpectrum:
        return self._items[name]


class TensorStore(_Store):
    """name → {key: tensor}, in memory or one safetensors file per name on disk."""

    def __init__(self, on_disk: bool = False, parent: Optional[str] = None) -> None:
        super().__init__(on_disk, parent, "svdpress-stats-")

    def __setitem__(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.folder is None:
            self._items[name] = tensors
            return
        path = _file(self.folder, name)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path))
        self._items[name] = path

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        item = self._items[name]
        return read_tensors(item) if isinstance(item, Path) else item
