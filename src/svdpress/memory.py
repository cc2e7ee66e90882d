"""Memory: budgets the user sets (`--max-memory cuda:0=20GiB,cpu=8GiB`) and the peaks each stage reached.

Peak CPU memory is the process's resident set (RSS) sampled by a background thread while a stage runs (the
kernel's high-water mark `ru_maxrss` cannot be reset between stages); peak GPU memory is CUDA's own
`max_memory_allocated`, reset at the start of every stage. Both are recorded per stage in the manifest.
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from .errors import SvdpressError

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
MiB = 2**20


def parse_size(text: str) -> int:
    """'1.5GiB', '800MB', '2e9' → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in UNITS:
        raise SvdpressError(f"cannot read memory size {text!r}; write e.g. 1.5GiB, 800MB or 2000000000")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def parse_max_memory(spec: Optional[str]) -> dict[str, int]:
    """'cuda:0=20GiB,cpu=8GiB' → {'cuda:0': bytes, 'cpu': bytes}; '' or None → {} (no limit set)."""
    out: dict[str, int] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise SvdpressError(f"--max-memory expects DEVICE=SIZE pairs, e.g. cuda:0=20GiB,cpu=8GiB; got {part!r}")
        dev, size = part.split("=", 1)
        dev = dev.strip().lower()
        if dev == "cuda":
            dev = "cuda:0"
        if not (dev == "cpu" or re.fullmatch(r"cuda:\d+", dev)):
            raise SvdpressError(f"--max-memory: unknown device {dev!r} (use cpu or cuda:N)")
        out[dev] = parse_size(size)
        if out[dev] <= 0:
            raise SvdpressError(f"--max-memory for {dev} must be positive")
    return out


def format_size(n: float) -> str:
    """Bytes in the largest binary unit that keeps a leading digit: 170 KiB, 1.50 GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{int(n)}B"


def rss() -> int:
    """Resident set size of this process, bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _page_size()
    except OSError:  # not Linux
        import psutil

        return psutil.Process().memory_info().rss


def proc_status(pid: int | str = "self") -> Optional[dict[str, int]]:
    """VmRSS, RssAnon (what the process allocated) and RssFile (mapped file pages) of a process, bytes; None when
    it is gone or this is not Linux (benches sample a child compression from outside with it)."""
    try:
        out = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
        return out
    except OSError:
        return None


_PAGE: list[int] = []


def _page_size() -> int:
    if not _PAGE:
        import os

        _PAGE.append(os.sysconf("SC_PAGE_SIZE"))
    return _PAGE[0]


def available_cpu() -> int:
    """Bytes of RAM available to this process now (MemAvailable)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Per-stage peaks: `with peaks("calibrate"): ...` records the highest RSS (and CUDA allocation) seen."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.stages: dict[str, dict[str, float]] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        peak = [rss()]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(self.interval):
                peak[0] = max(peak[0], rss())

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            stop.set()
            t.join()
            peak[0] = max(peak[0], rss())
            rec = self.stages.setdefault(stage, {"cpu_rss_peak_mb": 0.0})
            rec["cpu_rss_peak_mb"] = round(max(rec["cpu_rss_peak_mb"], peak[0] / MiB), 1)
            if cuda:
                gpu = torch.cuda.max_memory_allocated() / MiB
                rec["gpu_peak_mb"] = round(max(rec.get("gpu_peak_mb", 0.0), gpu), 1)

    def overall(self) -> dict[str, float]:
        out = {"cpu_rss_peak_mb": max((s["cpu_rss_peak_mb"] for s in self.stages.values()), default=0.0)}
        gpus = [s["gpu_peak_mb"] for s in self.stages.values() if "gpu_peak_mb" in s]
        if gpus:
            out["gpu_peak_mb"] = max(gpus)
        return out


@contextmanager
def no_peak() -> Iterator[None]:
    yield


_LIBC = None


def trim() -> None:
    """Give freed heap memory back to the operating system (glibc's malloc_trim; a no-op elsewhere).

    glibc serves allocations below its dynamic mmap threshold (up to 32 MiB) from heaps it keeps after they are
    freed; after a 2048×8192 SVD those retained pages stay in the resident set. Called after each layer's and
    each block's large temporaries are freed, it keeps RSS close to the memory actually in use, at the cost of
    a few milliseconds."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers as they are stored (meta tensors count their would-be size)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def wait_s(seconds: float) -> None:  # pragma: no cover - a tiny helper for benches
    time.sleep(seconds)
