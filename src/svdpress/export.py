"""Save and load compressed models: safetensors + config with every layer's rank + `svdpress.json` manifest.

The output is written to a temporary sibling directory and renamed into place at the end, so an interrupted
run never leaves a half-written model behind. The remote-code files make the directory loadable by plain
transformers (`trust_remote_code=True`).

`ShardWriter` is the compression pipeline's export: each decoder block is written as its own safetensors shard
the moment it is factored (the model is never gathered whole), then the remaining tensors (embeddings, norms,
head), the index, config, tokenizer and manifest. `save()` writes an in-memory model in one go (used by
`svdpress pivga`).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .errors import SvdpressError
from .lowrank import LAYER_KINDS, MODULE_KINDS
from .model.weights import ST_DTYPES
from .models import MANIFEST


REMOTE_FILES = ("lowrank.py", "modeling_svdpress.py")
FORMAT_VERSION = 1


def factored_layers(model: nn.Module) -> dict[str, dict]:
    """{name: {kind, rank}} for every factored layer in the model: what the config must record to rebuild it."""
    from .lowrank import SplitLinear

    kinds = {cls: kind for kind, cls in LAYER_KINDS.items()}
    out: dict[str, dict] = {}
    modules = {cls: kind for kind, cls in MODULE_KINDS.items()}  # whole modules (MoE experts) describe themselves
    for name, m in model.named_modules():  # parents first: a split fused layer is installed before its parts
        if isinstance(m, SplitLinear):
            # a list of [name, rows]: the parts' order is the output order (a JSON object's keys may get sorted)
            out[name] = {"kind": "split", "parts": [[n, int(getattr(m, n).out_features)] for n in m.names],
                         "interleaved": m.order is not None}
        elif type(m) in kinds:
            out[name] = {"kind": kinds[type(m)], "rank": int(m.rank)}
        elif type(m) in modules:
            out[name] = m.spec()
    return out


def json_default(o):
    if isinstance(o, (torch.Tensor,)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        from dataclasses import asdict
        return asdict(o)
    return str(o)


def as_read_back(obj: Any) -> Any:
    """obj as it reads back from a JSON file (tuples become lists, keys strings): what a stored setting is compared
    with, so a resumed run recognises its own settings."""
    return json.loads(json.dumps(obj, sort_keys=True, default=json_default))


def read_json(path: str | os.PathLike, what: str = "readable JSON") -> Any:
    """The JSON document at path; a missing, unreadable or malformed file is one SvdpressError saying what the
    file should have been (`what`), never a traceback."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise SvdpressError(f"no file {p}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SvdpressError(f"{p} is not {what}: {e}") from None


def write_json(path: Path, obj: Any, indent: int = 2) -> None:
    """Strict JSON (no NaN/Infinity, which are not JSON), written atomically (temp file, then rename)."""
    try:
        text = json.dumps(obj, indent=indent, default=json_default, allow_nan=False) + "\n"
    except ValueError as e:
        raise SvdpressError(f"refusing to write {path}: {e} (a non-finite figure is an error, not a result)") from None
    path = Path(path)
    if path.exists() and path.is_dir():
        raise SvdpressError(f"cannot write {path}: it is a directory, not a file")
    try:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        raise SvdpressError(f"cannot write {path}: {e.strerror or e}") from None


def save(model: nn.Module, tokenizer, out: str | os.PathLike, manifest: Mapping[str, Any],
         overwrite: bool = False, extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write model + tokenizer + manifest to `out` atomically (temp dir, then rename)."""
    out = Path(out)
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.config.svdpress = {"format": FORMAT_VERSION, "layers": factored_layers(model)}
        model.config.auto_map = {"AutoModelForCausalLM": "modeling_svdpress.SvdpressForCausalLM"}
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            del model.config.auto_map  # only the saved copy points at the remote code
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_common(tmp, manifest, extra_files)
        publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class ShardWriter:
    """Write a model directory shard by shard into a temporary sibling of `out`; `finish` renames it into place.
    Without `out` (nothing to save) the shards go to a temporary folder that `abort` removes."""

    def __init__(self, out: Optional[str | os.PathLike], overwrite: bool = False) -> None:
        self.out = Path(out) if out is not None else None
        self.overwrite = overwrite
        if self.out is not None:
            check_out(self.out, overwrite)
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        else:
            self.tmp = Path(tempfile.mkdtemp(prefix="svdpress-blocks-"))
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.count = 0

    def add(self, tensors: Mapping[str, torch.Tensor]) -> Path:
        """One shard; returns its path (the runner reads a streamed block back from it)."""
        self.count += 1
        name = f"model-{self.count:05d}.safetensors"
        data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(data, str(self.tmp / name), metadata={"format": "pt"})
        for k, v in data.items():
            self.weight_map[k] = name
            self.total += v.numel() * v.element_size()
        return self.tmp / name

    def add_chunked(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                    chunks: Iterable[torch.Tensor]) -> Path:
        """One shard holding one tensor, written as its slices arrive. The safetensors layout is a little-endian
        u64 header length, a JSON header padded to 8 bytes, then the raw bytes (what `save_file` writes for one
        tensor); only one slice is ever in memory."""
        self.count += 1
        path = self.tmp / f"model-{self.count:05d}.safetensors"
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header = {"__metadata__": {"format": "pt"},
                  name: {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}}
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        written = 0
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for c in chunks:
                c = c.detach().to("cpu", dtype).contiguous()
                f.write(c.view(torch.uint8).numpy().data if c.numel() else b"")
                written += c.numel() * c.element_size()
        if written != nbytes:
            raise SvdpressError(f"export of {name}: wrote {written} bytes, expected {nbytes}")
        self.weight_map[name] = path.name
        self.total += nbytes
        return path

    def finish(self, runner, tokenizer, manifest: Mapping[str, Any],
               extra_files: Mapping[str, bytes] | None = None) -> Path:
        """The tensors outside the blocks (one shard each for the large ones), index, config, tokenizer, remote
        code and manifest; then the atomic rename."""
        model = runner.model
        prefix = runner.arch.blocks_path + "."
        small: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, t in model.state_dict(keep_vars=True).items():
            if name.startswith(prefix) or id(t) in seen:
                continue
            seen.add(id(t))  # tied tensors are saved once, under their first name (transformers re-ties them)
            if t.numel() * t.element_size() > 64 * 2**20:  # written slice by slice (embeddings, LM head)
                self.add_chunked(name, tuple(t.shape), t.dtype, runner.tensor_chunks(name))
            else:
                small[name] = runner.tensor_value(name)
        if small:
            self.add(small)
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _write_config(model, self.tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp)
        _write_common(self.tmp, manifest, extra_files)
        publish(self.tmp, self.out, self.overwrite)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextmanager
def dir_lock(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on a directory itself (flock on its descriptor): no lock file is left."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` into place, under a lock on the parent directory: two runs writing the same
    --out never interleave, and the second one fails cleanly instead of replacing the first's output."""
    with dir_lock(out.parent):
        if out.exists():
            if not out.is_dir() or (any(out.iterdir()) and not overwrite):
                raise SvdpressError(f"output directory {out} appeared while this run was working (another run?); "
                                    "nothing was replaced: pass --overwrite to replace it")
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)


def check_out(out: Path, overwrite: bool) -> None:
    """An output directory we may write: not a file, not a non-empty directory unless --overwrite."""
    if out.exists() and not out.is_dir():
        raise SvdpressError(f"--out {out} exists and is not a directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SvdpressError(f"cannot write --out {out}: {parent} is a file")
            break
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SvdpressError(f"output directory {out} exists and is not empty; pass --overwrite to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise SvdpressError(f"cannot write --out {out}: {probe} is not writable")


def _write_config(model: nn.Module, folder: Path) -> None:
    model.config.svdpress = {"format": FORMAT_VERSION, "layers": factored_layers(model)}
    model.config.auto_map = {"AutoModelForCausalLM": "modeling_svdpress.SvdpressForCausalLM"}
    try:
        model.config.save_pretrained(folder)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(folder)
    finally:
        del model.config.auto_map  # only the saved copy points at the remote code


def _write_common(folder: Path, manifest: Mapping[str, Any], extra_files: Mapping[str, bytes] | None) -> None:
    here = Path(__file__).parent
    for f in REMOTE_FILES:
        shutil.copy(here / f, folder / f)
    for name, data in (extra_files or {}).items():
        (folder / name).write_bytes(data)
    write_json(folder / MANIFEST, manifest)


def read_manifest(path: str | os.PathLike) -> dict:
    p = Path(path) / MANIFEST
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise SvdpressError(f"{path} is not an svdpress output directory (no {MANIFEST})") from None
    except json.JSONDecodeError as e:
        raise SvdpressError(f"{p} is corrupt: {e}") from None
