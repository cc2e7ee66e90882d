"""Several processes (torchrun): the one module that knows about ranks.

    torchrun --nproc-per-node N -m svdpress compress ...        # N processes on one machine
    torchrun --nnodes 2 --node-rank K --rdzv-endpoint HOST:PORT --nproc-per-node N -m svdpress compress ...

Every process loads the model (or streams it) and runs the same pipeline; the stages divide the work with the
helpers below and never look at ranks themselves:

* data-parallel sums (calibration's X·Xᵀ, |x| sums and token counts; kfac/fwsvd's G and Fisher; FermiGrad's
  ∂KL/∂μ): each rank runs its `shard` of the batches, then `all_reduce_sum` adds the partial sums. Batches are
  sharded whole, so each rank computes exactly the float32 products one process would, and only the order of
  the float64 additions differs (results equal up to rounding).
* layer-parallel work (factorization, sensitivity probes, candidate allocations): `assign` divides items among
  ranks balanced by a cost (longest-processing-time first), each rank does its share, and `broadcast_tensors` /
  `map_items` give every rank the results.
* only the main rank (`is_main`) writes the output.

Without torch.distributed initialized (plain `python -m svdpress`, or torchrun with one process), every helper
is a no-op that returns its input: the single-process path is exactly what it was.

Failure: collectives run with a timeout (`--dist-timeout`, default 30 min), so a rank that stops answering
makes the others fail instead of hang. A rank that fails writes its message into the process group's key-value
store before it leaves; a rank whose collective then breaks (or that torchrun terminates) reads it back and
exits with that one message, `rank R of W failed: ...`, instead of a backend traceback.
"""

from __future__ import annotations

import datetime as _dt
import heapq
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import SvdpressError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800.0
_ERROR_KEY = "svdpress/error"


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None  # None: one process, nothing distributed

    @property
    def active(self) -> bool:
        return self.size > 1

    def describe(self) -> dict:
        return {"world_size": self.size, "backend": self.backend}


def world() -> World:
    """This process's place: from the initialized process group, else one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 dist.get_backend())


def active() -> bool:
    return world().active


def is_main() -> bool:
    return world().rank == 0


def from_env() -> Optional[int]:
    """WORLD_SIZE as torchrun sets it, when more than one process is asked for (else None)."""
    try:
        n = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise SvdpressError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None
    return n if n > 1 else None


def local_device(device: str) -> str:
    """A CUDA device without an index means this process's own GPU (cuda:LOCAL_RANK) under torchrun."""
    w = world()
    if w.active and device == "cuda":
        return f"cuda:{w.local_rank}"
    if w.active and w.backend == "nccl" and torch.device(device).index not in (None, w.local_rank):
        raise SvdpressError(f"--device {device} under torchrun: pass --device cuda (or auto) and each process takes "
                            f"its own GPU, cuda:LOCAL_RANK")
    return device


# ---- the session: init from torchrun's environment, one clear error on failure -------------------------------


@contextmanager
def session(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[World]:
    """Join torchrun's process group for the duration (nccl for a CUDA device, gloo otherwise), from the
    environment it sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Outside torchrun, or when a
    group is already initialized (a caller's own), this does nothing.

    An exception in this rank is published to the other ranks before it propagates; an exception caused by
    another rank (a broken collective, a timeout, torchrun's SIGTERM arriving as KeyboardInterrupt) becomes one
    SvdpressError naming the rank that failed and its message."""
    n = from_env()
    if n is None or (dist.is_available() and dist.is_initialized()):
        yield world()
        return
    if timeout_s <= 0:
        raise SvdpressError(f"--dist-timeout must be positive, got {timeout_s}")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=_dt.timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 (rendezvous failures come in many types)
        raise SvdpressError(f"cannot join the torchrun process group ({backend}, WORLD_SIZE={n}): "
                            f"{_first_line(e)}") from None
    w = world()
    try:
        yield w
    except BaseException as e:
        if _caused_by_peer(e):
            peer = _peer_error(wait_s=5.0)
            if peer is not None:
                raise SvdpressError(f"rank {w.rank} of {w.size} stopped: {peer}") from None
            if isinstance(e, CollectiveError):
                raise SvdpressError(f"rank {w.rank} of {w.size}: {e}") from None
            raise  # a Ctrl-C of this rank's own
        _publish(f"rank {w.rank} of {w.size} failed: {_first_line(e) or type(e).__name__}")
        if isinstance(e, SvdpressError):
            raise SvdpressError(f"rank {w.rank} of {w.size}: {e}") from None
        raise  # a bug: its traceback
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 (a broken group may not close cleanly; the process exits anyway)
            pass


class CollectiveError(SvdpressError):
    """A collective failed or timed out: another rank died, hung or left."""


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else ""


def _caused_by_peer(e: BaseException) -> bool:
    return isinstance(e, (CollectiveError, KeyboardInterrupt))


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001
        return None


def _publish(message: str) -> None:
    """Leave this rank's error where the others look for it (the first one written wins)."""
    store = _store()
    if store is None:
        return
    try:
        if not store.check([_ERROR_KEY]):
            store.set(_ERROR_KEY, message)
    except Exception:  # noqa: BLE001 (the store may be gone with rank 0)
        pass


def _peer_error(wait_s: float) -> Optional[str]:
    store = _store()
    if store is None:
        return None
    try:
        store.wait([_ERROR_KEY], _dt.timedelta(seconds=wait_s))
        return store.get(_ERROR_KEY).decode()
    except Exception:  # noqa: BLE001 (no message, or the store is gone)
        return None


def _collective(what: str, fn: Callable[[], T]) -> T:
    """Run a collective; a failure (a peer gone, the timeout) is a CollectiveError naming what was running."""
    try:
        return fn()
    except (RuntimeError, dist.DistError) as e:
        raise CollectiveError(f"{what}: another rank failed or stopped answering ({_first_line(e)})") from None


# ---- sums ---------------------------------------------------------------------------------------------------


def _comm_device(t: torch.Tensor) -> torch.device:
    """nccl moves CUDA tensors only; gloo takes CPU tensors (and CUDA ones, through the CPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if t.device.type != "cuda" else t.device


def all_reduce_sum(tensors: Sequence[torch.Tensor], what: str = "all-reduce") -> None:
    """In place: every tensor becomes its sum over ranks (float64 stays float64). One collective per tensor,
    so the peak extra memory is one tensor's copy when the backend needs a move (nccl with CPU tensors)."""
    if not active():
        return
    for t in tensors:
        dev = _comm_device(t)
        buf = t if t.device == dev else t.to(dev)
        _collective(what, lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM))
        if buf is not t:
            t.copy_(buf)


def sum_floats(values: Sequence[float], what: str = "all-reduce") -> list[float]:
    """Python numbers summed over ranks (float64)."""
    if not active():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    all_reduce_sum([t], what)
    return t.tolist()


def min_int(value: int, what: str = "agree") -> int:
    """The smallest of the ranks' values: settings derived from each machine's free memory (batch sizes, the
    passes of a backward) must be the same on every rank, or their collectives would not line up."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dev = _comm_device(t)
    t = t.to(dev)
    _collective(what, lambda: dist.all_reduce(t, op=dist.ReduceOp.MIN))
    return int(t.item())


# ---- sharding -----------------------------------------------------------------------------------------------


def shard(items: Sequence[T], what: str = "items", allow_empty: bool = False) -> list[T]:
    """This rank's contiguous share of `items` (a list, or a tensor's rows; sizes differ by at most one). For
    calibration every rank must get at least one: an empty share would have nothing to add to the sums and
    nothing to learn the model's layer groups from. Evaluation (`allow_empty`) only adds sums, so a rank may
    have nothing to score."""
    w = world()
    if not w.active:
        return items if isinstance(items, torch.Tensor) else list(items)
    if len(items) < w.size and not allow_empty:
        raise SvdpressError(f"{len(items)} {what} cannot be shared by {w.size} processes: give at least "
                            f"{w.size} (or run fewer processes)")
    base, extra = divmod(len(items), w.size)
    start = w.rank * base + min(w.rank, extra)
    part = items[start:start + base + (1 if w.rank < extra else 0)]
    return part if isinstance(part, torch.Tensor) else list(part)


def assign(costs: Mapping[str, float], size: Optional[int] = None) -> dict[str, int]:
    """{item: rank}: longest-processing-time first (the costliest item to the least loaded rank), deterministic
    (ties broken by order). Every rank computes the same assignment from the same costs, no communication."""
    size = world().size if size is None else size
    heap = [(0.0, r) for r in range(size)]
    out: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: -costs[n]):  # sorted() is stable: equal costs keep their order
        load, r = heapq.heappop(heap)
        out[name] = r
        heapq.heappush(heap, (load + costs[name], r))
    return {name: out[name] for name in costs}


def svd_cost(m: int, n: int) -> float:
    """The cost of factoring an m×n layer: m·n·min(m, n) (one SVD, the whitening's Cholesky is n³ at most)."""
    return float(m) * n * min(m, n)


def map_items(items: Sequence[T], fn: Callable[[T], Any], costs: Optional[Sequence[float]] = None,
              what: str = "gather") -> list[Any]:
    """[fn(x) for x in items], each item computed by one rank (balanced by `costs`, default equal) and the
    results gathered on every rank, in order. The results must be picklable plain data."""
    w = world()
    if not w.active:
        return [fn(x) for x in items]
    keys = [str(i) for i in range(len(items))]
    owner = assign(dict(zip(keys, costs if costs is not None else [1.0] * len(items))))
    mine = {i: fn(x) for i, x in enumerate(items) if owner[str(i)] == w.rank}
    parts = gather_object(mine, what)
    merged = {i: v for part in parts for i, v in part.items()}
    return [merged[i] for i in range(len(items))]


def gather_object(obj: Any, what: str = "gather") -> list[Any]:
    """Every rank's `obj` (plain data), in rank order, on every rank."""
    w = world()
    if not w.active:
        return [obj]
    out: list[Any] = [None] * w.size
    _collective(what, lambda: dist.all_gather_object(out, obj))
    return out


def broadcast_object(obj: Any, src: int = 0, what: str = "broadcast") -> Any:
    if not active():
        return obj
    box = [obj]
    _collective(what, lambda: dist.broadcast_object_list(box, src=src))
    return box[0]


def broadcast_tensors(tensors: Optional[Sequence[torch.Tensor]], src: int, what: str = "broadcast",
                      extra: Any = None) -> tuple[list[torch.Tensor], Any]:
    """Rank `src`'s tensors (and the plain-data `extra`) on every rank, on the CPU: shapes, dtypes and `extra`
    go first as one object, then the tensors' bytes packed in one buffer (one collective for the data, which
    matters when a model has hundreds of small layers)."""
    if not active():
        return list(tensors or []), extra
    w = world()
    mine = w.rank == src
    meta = [(tuple(t.shape), t.dtype) for t in tensors] if mine else None
    meta, extra = broadcast_object((meta, extra) if mine else None, src, what)
    sizes = [torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size() for shape, dtype in meta]
    if mine:
        flat = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])
    else:
        flat = torch.empty(sum(sizes), dtype=torch.uint8)
    dev = _comm_device(flat)
    buf = flat.to(dev)
    _collective(what, lambda: dist.broadcast(buf, src=src))
    if mine:
        return list(tensors), extra
    parts = buf.cpu().split(sizes)
    return [p.clone().view(dtype).reshape(shape) for p, (shape, dtype) in zip(parts, meta)], extra  # aligned


def describe(rank_timings: Sequence[dict]) -> dict:
    """The manifest's record of a distributed run."""
    w = world()
    return {**w.describe(), "ranks": list(rank_timings)}


def rank_record(seconds: Mapping[str, float]) -> dict:
    return {"rank": world().rank, "host": socket.gethostname(),
            "timings_s": {k: round(v, 2) for k, v in seconds.items()}}
