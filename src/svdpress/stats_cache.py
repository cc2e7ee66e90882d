"""On-disk cache of calibration statistics (`--stats-cache DIR`), so that trying several methods and ratios on
one model runs calibration once.

An entry is a directory `DIR/<kind>-<digest>` holding torch files and a `manifest.json` with the full key and a
SHA-256 of every file. The key is what the statistics depend on:
  model     a SHA-256 of every parameter and buffer (names, dtypes, shapes, bytes): any edit of the weights,
            whatever their source, gives a new key
  data      a SHA-256 of the calibration token ids (covers text, tokenizer, samples, seqlen and seed at once)
  settings  the kind of statistics, the loss normalization and this file format's version
An entry is used only if its manifest matches the key and every file matches its checksum; otherwise (stale,
truncated, corrupt, unreadable) it is rebuilt from scratch. Entries are written to a temporary directory and
renamed into place, so an interrupted run never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Iterator, Mapping, MutableMapping, Optional

import torch

from .calibrate import BlockStats, InputStats, gradient_stats, iter_block_stats

FORMAT = 1
MANIFEST = "manifest.json"


def _sha256_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().contiguous().cpu()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def model_fingerprint(model_or_runner) -> str:
    """SHA-256 over every parameter and buffer of the model, with their names, dtypes and shapes (the same
    whether the weights are in memory or streamed from disk: the runner reads them either way)."""
    from .calibrate import using_runner

    with using_runner(model_or_runner) as runner:
        return runner.fingerprint()


def data_fingerprint(samples: torch.Tensor) -> str:
    h = hashlib.sha256()
    _sha256_tensor(h, samples.long())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class Entry:
    """One cached set of statistics: validated on read, written atomically."""

    def __init__(self, root: Path, key: dict) -> None:
        self.key = key
        self.path = root / f"{key['kind']}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"

    def valid_files(self, quiet: bool = False) -> Optional[list[Path]]:
        """The entry's files if its manifest matches the key and every checksum holds; None (with a warning
        when something was there, unless `quiet`) otherwise."""
        if quiet:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return self.valid_files()
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
            if manifest.get("key") != self.key:
                raise ValueError("key mismatch (stale entry)")
            files = [self.path / name for name in manifest["files"]]
            for f, digest in zip(files, manifest["files"].values()):
                if _file_sha256(f) != digest:
                    raise ValueError(f"checksum mismatch in {f.name}")
            return files
        except FileNotFoundError:
            if self.path.exists():
                warnings.warn(f"stats cache {self.path} is incomplete; rebuilding it")
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            warnings.warn(f"stats cache {self.path} is unusable ({e}); rebuilding it")
            return None

    def writer(self) -> "_Writer":
        return _Writer(self)


class _Writer:
    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.tmp = entry.path.with_name(f".{entry.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        self.tmp.mkdir(parents=True)
        self.files: dict[str, str] = {}

    def add(self, name: str, obj) -> None:
        torch.save(obj, self.tmp / name)
        self.files[name] = _file_sha256(self.tmp / name)

    def commit(self) -> None:
        """Publish the entry under a lock on the cache directory. When another process published a valid entry
        for the same key meanwhile, that one is kept (it holds the same statistics) and ours is dropped."""
        from .export import dir_lock

        (self.tmp / MANIFEST).write_text(json.dumps({"key": self.entry.key, "files": self.files}, indent=1))
        path = self.entry.path
        with dir_lock(path.parent):
            if path.exists():
                if self.entry.valid_files(quiet=True) is not None:
                    return  # abort() removes our copy
                trash = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(path, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.tmp, path)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _pack_block(bs: BlockStats) -> dict:
    """Shared InputStats are stored once; `names` maps each layer to its group's index."""
    groups = [bs.inputs[g[0]] for g in bs.groups]
    return {"block": bs.block, "groups": bs.groups,
            "stats": [{"xtx": s.xtx, "abs_sum": s.abs_sum, "tokens": s.tokens} for s in groups]}


def _unpack_block(d: dict) -> BlockStats:
    inputs = {}
    for names, s in zip(d["groups"], d["stats"]):
        shared = InputStats(s["xtx"], s["abs_sum"], int(s["tokens"]))
        inputs.update({n: shared for n in names})
    return BlockStats(int(d["block"]), inputs, [list(g) for g in d["groups"]])


class StatsCache:
    """The cache directory, bound to one model and one set of calibration samples."""

    def __init__(self, root: str | os.PathLike, model, samples: torch.Tensor) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.base = {"format": FORMAT, "model": model_fingerprint(model), "data": data_fingerprint(samples),
                     "samples": list(samples.shape)}

    def entry(self, kind: str, **settings) -> Entry:
        return Entry(self.root, {**self.base, "kind": kind, **settings})


def block_stats(cache: Optional[StatsCache], runner, samples: torch.Tensor, batch_size: int,
                progress: bool = True) -> Iterator[BlockStats]:
    """iter_block_stats, served from / saved to the cache when there is one (block by block either way)."""
    if cache is None:
        yield from iter_block_stats(runner, samples, batch_size=batch_size, progress=progress)
        return
    entry = cache.entry("inputs")
    files = entry.valid_files()
    if files is not None:
        for f in files:
            yield _unpack_block(_load(f))
        return
    w = entry.writer()
    try:
        for bs in iter_block_stats(runner, samples, batch_size=batch_size, progress=progress):
            w.add(f"block_{bs.block:04d}.pt", _pack_block(bs))
            yield bs
        w.commit()
    finally:
        w.abort()  # no-op after commit (the directory was renamed)


def grad_stats(cache: Optional[StatsCache], runner, samples: torch.Tensor, batch_size: int, progress: bool = True,
               store: Optional[MutableMapping] = None, fisher: bool = True,
               out_grad: str = "token") -> Mapping[str, dict]:
    """gradient_stats, served from / saved to the cache when there is one. Layers' statistics go to `store`
    (a dict, or a disk-backed TensorStore) one block at a time, and to the cache one file per layer.

    The estimator of G is part of the key (`out_grad`, calibrate.OUT_GRAD_KINDS); the token-wise one keeps the
    key it always had, so existing entries stay valid."""
    from .calibrate import check_out_grad

    keys = check_out_grad(out_grad)
    store = {} if store is None else store
    if cache is None:
        gradient_stats(runner, samples, batch_size=batch_size, progress=progress, fisher=fisher,
                       keep=store.__setitem__, out_grad=out_grad)
        return store
    estimator = {} if out_grad == "token" else {"out_grad": f"per-{out_grad}" if out_grad != "both" else "both"}
    entry = cache.entry("gradients", loss="sum-nll", fisher="per-sequence" if fisher else "none", layout="per-layer",
                        **estimator)
    superset = cache.entry("gradients", loss="sum-nll", fisher="per-sequence", layout="per-layer", **estimator)
    for candidate in ([entry] if fisher else [entry, superset]):  # an entry with the Fisher serves kfac too
        files = candidate.valid_files(quiet=candidate is not entry)
        if files is not None:
            for f in files:
                stats = _load(f)
                wanted = [*keys, "weight_fisher"] if fisher else keys
                store[f.name[len("grad_"):-len(".pt")]] = {k: stats[k] for k in wanted}
            return store
    w = entry.writer()
    try:
        def keep(name: str, stats: dict) -> None:
            w.add(f"grad_{name}.pt", stats)
            store[name] = stats

        gradient_stats(runner, samples, batch_size=batch_size, progress=progress, fisher=fisher, keep=keep,
                       out_grad=out_grad)
        w.commit()
    finally:
        w.abort()
    return store
