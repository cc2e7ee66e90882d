"""Scale: peak memory and time per stage of `svdpress compress` on real-shaped models, streamed from disk.

    PYTHONPATH=src python bench/scale.py                                    # deep-narrow + tiny-wide, 3 methods
    PYTHONPATH=src python bench/scale.py --models llama-3.2-1b --methods svd-llm+uniform
    PYTHONPATH=src python bench/scale.py --report --extrapolate --markdown  # tables from the saved JSON only
    PYTHONPATH=src python bench/scale.py --nproc 2 --models deep-narrow     # 1 vs 2 processes (torchrun)

1. Random-weight models of real shapes (no download): the tensors' names and shapes come from the model built on
   the meta device (`accelerate.init_empty_weights` + `from_config`), each tensor is drawn from its own seeded
   generator (std 0.02, norms 1) and written a few blocks per safetensors shard, with the index, config.json and
   the embedded default model's tokenizer (ids < 49152, valid for every vocabulary here). The model is never
   instantiated in RAM. Built models are cached under --models-dir and reused.
2. Each (model, method) runs `python -m svdpress compress --offload disk --max-memory cpu=1.5GiB ...` in a
   subprocess under `/usr/bin/time -v` (whole-process max RSS, an independent check of the manifest), while this
   script polls the process's /proc status (VmRSS, RssAnon, RssFile) every 0.25 s. The subprocess is the CLI
   itself, run through `runpy` after two additions that change nothing it computes: the per-stage peak sampler
   (svdpress.memory.PeakMemory) also records the anonymous and the file-backed parts of the RSS, and the final
   timings/memory are copied to a side file (the manifest is written *inside* the export stage, so it lacks the
   export stage's own figures). Results merge into --out (default bench/results/scale.json) per (model, method).
3. A memory model (`predict`): one formula per stage in the model's shapes, derived from what the code allocates
   (see MEMORY_MODEL below and the README's "Scale" section). RSS = anonymous memory (what svdpress allocates) +
   file-backed pages (the checkpoint's safetensors are memory-mapped; every page read stays resident in the
   process while its file handle is cached, which TensorSource does for the whole run). The script prints
   predicted vs measured per stage, and with --extrapolate the prediction for Llama-3-8B/70B/3.1-405B.

Timings on a shared machine are noisy (other processes compete for the same cores): treat them as indicative.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from svdpress.cli import (bench_main, kept_ratio, method_pair, positive_int, positive_number,  # noqa: E402
                          results_file, terminate_as_interrupt)
from svdpress.errors import SvdpressError  # noqa: E402
from svdpress.export import read_json, write_json  # noqa: E402
from svdpress.memory import proc_status  # noqa: E402
from svdpress.table import table  # noqa: E402

MiB = 2 ** 20
GiB = 2 ** 30
STAGES = ("load", "data", "calibrate_gradients", "calibrate", "factorize", "allocate", "build", "export")
TARGET_RSS = 2 * GiB  # the target for the 1B model at --max-memory cpu=1.5GiB

# ---------------------------------------------------------------------------------------------------------------
# Models

LLAMA = dict(rope_theta=500000.0, hidden_act="silu", rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Spec:
    """A Llama-architecture model's shapes. `disk` is the dtype its safetensors are written in."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    disk: str = "float32"
    max_pos: int = 8192
    built: bool = True  # False: published shapes only (extrapolation), never written

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, m = out, n = in) of one block's target layers, in forward order."""
        d, f, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        return [("q_proj", q, d), ("k_proj", kv, d), ("v_proj", kv, d), ("o_proj", d, q),
                ("gate_proj", f, d), ("up_proj", f, d), ("down_proj", d, f)]

    def input_groups(self) -> list[tuple[tuple[str, ...], int]]:
        """Layers reading the same input (one X·Xᵀ each) and that input's width n."""
        d, f, q = self.hidden, self.intermediate, self.q_dim
        return [(("q_proj", "k_proj", "v_proj"), d), (("o_proj",), q), (("gate_proj", "up_proj"), d),
                (("down_proj",), f)]

    @property
    def block_linear_params(self) -> int:
        return sum(m * n for _, m, n in self.linears())

    @property
    def block_params(self) -> int:
        return self.block_linear_params + 2 * self.hidden  # + two RMSNorm weights

    @property
    def params(self) -> int:
        emb = self.vocab * self.hidden
        return self.layers * self.block_params + emb * (1 if self.tied else 2) + self.hidden

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
                           tie_word_embeddings=self.tied, max_position_embeddings=self.max_pos, **LLAMA)


MODELS: dict[str, Spec] = {
    # validation sizes (CPU)
    "deep-narrow": Spec(256, 688, 48, 4, 2, 49152, tied=False),
    "tiny-wide": Spec(1024, 4096, 8, 16, 4, 128256, tied=True),
    # Llama-3.2-1B's shapes (1.24B parameters, 4.9 GB in float32)
    "llama-3.2-1b": Spec(2048, 8192, 16, 32, 8, 128256, tied=True, max_pos=131072),
    # the same widths with 2 blocks: the per-block peak of llama-3.2-1b in minutes (a development proxy)
    "llama-3.2-1b-2l": Spec(2048, 8192, 2, 32, 8, 128256, tied=True, max_pos=131072),
    # Llama-3-8B's shapes (GPU machines; bfloat16 on disk)
    "llama-3-8b": Spec(4096, 14336, 32, 32, 8, 128256, tied=False, disk="bfloat16"),
}
PUBLISHED: dict[str, Spec] = {  # extrapolation only (published configs)
    "Llama-3-8B": Spec(4096, 14336, 32, 32, 8, 128256, tied=False, disk="bfloat16", built=False),
    "Llama-3-70B": Spec(8192, 28672, 80, 64, 8, 128256, tied=False, disk="bfloat16", built=False),
    "Llama-3.1-405B": Spec(16384, 53248, 126, 128, 8, 128256, tied=False, disk="bfloat16", built=False),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MARKER = "scale_model.json"


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _value(name: str, shape: tuple[int, ...], dtype, seed: int):
    """A tensor as a real init would draw it: norms 1, biases 0, everything else N(0, 0.02²); own generator."""
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2 ** 62)
    t = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=g)
    return t if dtype == torch.float32 else t.to(dtype)


def _tokenizer():
    """The embedded default model's tokenizer (SmolLM2's, converted from its .gguf once and cached)."""
    try:
        from svdpress.models import _default_gguf, _gguf_tokenizer

        return _gguf_tokenizer(_default_gguf())  # the tokenizer load_model("default") returns, without the model
    except ImportError:  # pragma: no cover - a svdpress without those helpers
        from svdpress.models import load_model

        return load_model("default")[1]


def build_model(name: str, models_dir: Path, seed: int = 0, shard_bytes: int = 2 * GiB) -> Path:
    """Write model `name` (safetensors shards + index + config + tokenizer) unless a matching copy exists."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    spec = MODELS[name]
    path = models_dir / name
    want = {"name": name, "spec": spec.__dict__, "seed": seed, "format": 1}
    marker = path / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("key") == want:
                return path
        except (OSError, ValueError):
            pass
    t0 = time.perf_counter()
    cfg = spec.config()
    cfg.dtype = spec.disk
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    sd = model.state_dict()
    names = [k for k in sd if not (spec.tied and k == "lm_head.weight")]  # the tied head is the embedding
    shapes = {k: tuple(sd[k].shape) for k in names}
    del model, sd
    dtype = _torch_dtype(spec.disk)
    item = DTYPE_BYTES[spec.disk]
    # plan: the large tensors outside the blocks one shard each, the small ones together, blocks grouped
    prefix = "model.layers."
    blocks: dict[int, list[str]] = {}
    rest: list[str] = []
    for k in names:
        if k.startswith(prefix):
            blocks.setdefault(int(k[len(prefix):].split(".")[0]), []).append(k)
        else:
            rest.append(k)
    size = lambda ks: sum(math.prod(shapes[k]) * item for k in ks)  # noqa: E731
    plan: list[list[str]] = []
    cur: list[str] = []
    for i in sorted(blocks):
        if cur and size(cur) + size(blocks[i]) > shard_bytes:
            plan.append(cur)
            cur = []
        cur += blocks[i]
    if cur:
        plan.append(cur)
    big = [k for k in rest if size([k]) > 64 * MiB]
    plan += [[k] for k in big] + ([[k for k in rest if k not in big]] if len(big) < len(rest) else [])
    tmp = models_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    for s, keys in enumerate(plan):
        fname = f"model-{s + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {k: _value(k, shapes[k], dtype, seed) for k in keys}
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        for k in keys:
            weight_map[k] = fname
            total += tensors[k].numel() * tensors[k].element_size()
        del tensors
        print(f"  {name}: shard {s + 1}/{len(plan)} written", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    cfg.save_pretrained(tmp)
    _tokenizer().save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"key": want, "params": spec.params, "bytes": total,
                                          "build_s": round(time.perf_counter() - t0, 1)}, indent=1) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    print(f"  {name}: {spec.params / 1e9:.3f}B parameters, {total / GiB:.2f} GiB on disk "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Running one compression

# Runs the CLI unchanged after two additions (see the module docstring): per-stage anonymous / file-backed RSS
# peaks, and the final timings + memory copied to $SCALE_SIDE_FILE.
CHILD = r"""
import json, os, runpy, sys, threading
from contextlib import contextmanager
import svdpress.memory as M
import svdpress.pipeline as P

def _status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    return out

_orig_call = M.PeakMemory.__call__

@contextmanager
def _call(self, stage):
    peak = {"RssAnon": 0, "RssFile": 0}
    stop = threading.Event()
    def sample():
        while True:
            s = _status()
            for k in peak:
                peak[k] = max(peak[k], s.get(k, 0))
            if stop.wait(self.interval):
                break
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        with _orig_call(self, stage):
            yield
    finally:
        stop.set()
        t.join()
        s = _status()
        rec = self.stages.setdefault(stage, {"cpu_rss_peak_mb": 0.0})
        for key, k in (("cpu_anon_peak_mb", "RssAnon"), ("cpu_file_peak_mb", "RssFile")):
            rec[key] = round(max(rec.get(key, 0.0), max(peak[k], s.get(k, 0)) / 2**20), 1)
        rec["cpu_anon_end_mb"] = round(s.get("RssAnon", 0) / 2**20, 1)
        rec["cpu_file_end_mb"] = round(s.get("RssFile", 0) / 2**20, 1)

M.PeakMemory.__call__ = _call
_orig_record = P._record_time

def _record(report, stages, t0):
    _orig_record(report, stages, t0)
    side = os.environ.get("SCALE_SIDE_FILE")
    if side:
        with open(side, "w") as f:
            json.dump({"timings_s": report["timings_s"], "memory": report["memory"],
                       "placement": report.get("placement"), "params": report.get("params"),
                       "ratio": report.get("ratio")}, f, indent=1)

P._record_time = _record
sys.argv = ["svdpress"] + sys.argv[1:]
runpy.run_module("svdpress", run_name="__main__", alter_sys=True)
"""





@contextmanager
def child_group(cmd: list[str], **popen):
    """A measured run as its own process group, killed whole (with /usr/bin/time's child and torchrun's workers)
    when the bench stops it for --timeout, or is itself interrupted or terminated: an ended bench leaves no run
    behind holding gigabytes (was: `timeout … scale.py` left the compress processes running)."""
    proc = subprocess.Popen(cmd, start_new_session=True, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for(proc: subprocess.Popen, timeout: Optional[float]) -> int:
    """proc's return code; past `timeout` seconds its whole group is killed (rc -9)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


class Poller:
    """Samples the RSS (total, anonymous, file-backed) of a process tree every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid, self.interval = pid, interval
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.timeline: list[tuple[float, float, float, float]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.perf_counter()

    def _pids(self) -> list[int]:
        try:
            import psutil

            p = psutil.Process(self.pid)
            return [p.pid] + [c.pid for c in p.children(recursive=True)]
        except Exception:
            return [self.pid]

    def _run(self) -> None:
        last = -1.0
        while not self._stop.wait(self.interval):
            tot = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
            for pid in self._pids():
                s = proc_status(pid)
                for k in tot:
                    tot[k] += (s or {}).get(k, 0)
            for k in tot:
                self.peak[k] = max(self.peak[k], tot[k])
            t = time.perf_counter() - self.t0
            if t - last >= 1.0:
                self.timeline.append((round(t, 1), round(tot["VmRSS"] / MiB), round(tot["RssAnon"] / MiB),
                                      round(tot["RssFile"] / MiB)))
                last = t

    def __enter__(self) -> "Poller":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def _parse_time_v(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        out["maxrss_mb"] = round(int(m.group(1)) / 1024, 1)
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if m:
        secs = 0.0
        for part in m.group(1).split(":"):
            secs = secs * 60 + float(part)
        out["wall_s"] = round(secs, 1)
    for key, pat in (("user_s", r"User time \(seconds\): ([\d.]+)"), ("sys_s", r"System time \(seconds\): ([\d.]+)"),
                     ("cpu_percent", r"Percent of CPU this job got: (\d+)%"),
                     ("major_faults", r"Major \(requiring I/O\) page faults: (\d+)")):
        m = re.search(pat, text)
        if m:
            out[key] = float(m.group(1))
    return out


METHOD_OPTS = {  # small settings for the allocators that run the model (CPU-sized)
    "fermigrad": ["steps=2", "samples=4", "seqlen=128", "batch_size=2"],
    "lems": ["probe_samples=2", "probe_seqlen=128"],
}


def run_one(model: str, model_dir: Path, method: str, a: argparse.Namespace, work: Path, logs: Path) -> dict:
    fac, alloc = method.split("+")
    tag = f"{model}__{method}" + (f"__mmap{a.malloc_mmap_threshold}" if a.malloc_mmap_threshold else "")
    out = work / tag
    side = work / f"{tag}.side.json"
    for p in (out, side):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    cmd = [sys.executable, "-c", CHILD, "compress", "--model", str(model_dir), "--offload", a.offload,
           "--device", a.device, "--dtype", a.dtype, "--calib", a.calib, "--calib-samples", str(a.calib_samples),
           "--calib-seqlen", str(a.calib_seqlen), "--factorize", fac, "--allocate", alloc, "--ratio", str(a.ratio),
           "--out", str(out), "--no-progress"]
    if a.max_memory:
        cmd += ["--max-memory", a.max_memory]
    if a.offload_dir:
        cmd += ["--offload-dir", a.offload_dir]
    for o in (a.opts.get(alloc) if alloc in a.opts else METHOD_OPTS.get(alloc, [])):
        cmd += ["--opt", o]
    timev = work / f"{tag}.time.txt"
    use_time = Path("/usr/bin/time").exists()
    full = (["/usr/bin/time", "-v", "-o", str(timev)] if use_time else []) + cmd
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               SCALE_SIDE_FILE=str(side))
    if a.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.malloc_mmap_threshold)
    log = logs / f"{tag}.log"
    print(f"[{time.strftime('%H:%M:%S')}] {model} {method}: running (log {log})", flush=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    src_state = git_state()  # src/ changes under active development: which code each run measured
    t0 = time.perf_counter()
    with open(log, "w") as lf:
        lf.write(" ".join(full[:3] + ["<child>"] + full[full.index("compress"):]) + "\n\n")
        lf.flush()
        with child_group(full, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=ROOT) as proc, \
                Poller(proc.pid) as poll:
            rc = wait_for(proc, a.timeout)
    wall = time.perf_counter() - t0
    rec: dict[str, Any] = {
        "model": model, "method": method, "variant": _variant(a), "rc": rc, "wall_s": round(wall, 1),
        "started": started, "src": src_state,
        "cmd": "python -m svdpress " + " ".join(cmd[cmd.index("compress"):]),
        "settings": {"offload": a.offload, "max_memory": a.max_memory, "device": a.device, "dtype": a.dtype,
                     "calib_samples": a.calib_samples, "calib_seqlen": a.calib_seqlen, "ratio": a.ratio},
        "poll": {"rss_peak_mb": round(poll.peak["VmRSS"] / MiB, 1), "anon_peak_mb": round(poll.peak["RssAnon"] / MiB, 1),
                 "file_peak_mb": round(poll.peak["RssFile"] / MiB, 1), "timeline": _thin(poll.timeline, 400)},
    }
    if use_time and timev.exists():
        rec["time_v"] = _parse_time_v(timev.read_text())
    manifest = out / "svdpress.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        rec["manifest"] = {k: m.get(k) for k in ("timings_s", "memory", "placement", "params", "ratio")}
    if side.is_file():
        rec["final"] = json.loads(side.read_text())  # timings/memory after export (the manifest's lack export)
    if rc != 0:
        rec["log_tail"] = log.read_text()[-3000:]
    if out.is_dir():
        rec["output_mb"] = round(sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / MiB, 1)
        if not a.keep_outputs:
            shutil.rmtree(out)
    status = "ok" if rc == 0 else f"FAILED rc={rc}"
    print(f"[{time.strftime('%H:%M:%S')}] {model} {method}: {status} in {wall:.0f} s, max RSS "
          f"{rec.get('time_v', {}).get('maxrss_mb', rec['poll']['rss_peak_mb'])} MB", flush=True)
    return rec


# ---------------------------------------------------------------------------------------------------------------
# Scaling over processes (--nproc): the same compression under torchrun with 1, 2, ... N processes

def proc_counts(n: int) -> list[int]:
    """1, then powers of two up to N, then N (1/2/4 on a 4-GPU machine, 1/2 here)."""
    out, k = [1], 2
    while k < n:
        out.append(k)
        k *= 2
    return sorted(set(out + [n]))


def run_nproc(model: str, model_dir: Path, method: str, nproc: int, a: argparse.Namespace, work: Path,
              logs: Path) -> dict:
    """One compression under `torchrun --standalone --nproc-per-node nproc -m svdpress compress ...`: the
    process's wall time, rank 0's per-stage seconds (rank 0 also builds and writes), every rank's seconds up to
    allocation (the manifest's `distributed.ranks`) and the ranks chosen (to check they match 1 process)."""
    fac, alloc = method.split("+")
    tag = f"{model}__{method}__np{nproc}"
    out = work / tag
    if out.is_dir():
        shutil.rmtree(out)
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "svdpress", "compress", "--model", str(model_dir), "--offload", a.offload, "--device", a.device,
           "--dtype", a.dtype, "--calib", a.calib, "--calib-samples", str(a.calib_samples), "--calib-seqlen",
           str(a.calib_seqlen), "--calib-batch-size", str(a.calib_batch_size), "--factorize", fac, "--allocate",
           alloc, "--ratio", str(a.ratio), "--out", str(out), "--no-progress"]
    if a.max_memory:
        cmd += ["--max-memory", a.max_memory]
    if a.offload_dir:
        cmd += ["--offload-dir", a.offload_dir]
    for o in (a.opts.get(alloc) if alloc in a.opts else METHOD_OPTS.get(alloc, [])):
        cmd += ["--opt", o]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    log = logs / f"{tag}.log"
    print(f"[{time.strftime('%H:%M:%S')}] {model} {method} x{nproc}: running (log {log})", flush=True)
    src_state = git_state()  # which code the run measured
    t0 = time.perf_counter()
    with open(log, "w") as lf:
        with child_group(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=ROOT) as proc:
            rc = wait_for(proc, a.timeout)
    wall = time.perf_counter() - t0
    rec: dict[str, Any] = {"model": model, "method": method, "nproc": nproc, "rc": rc, "wall_s": round(wall, 1),
                           "threads_per_process": int(threads), "src": src_state,
                           "cmd": " ".join(["torchrun"] + cmd[cmd.index("--standalone"):])}
    manifest = out / "svdpress.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        rec["timings_s"] = m["timings_s"]
        rec["ranks_timings_s"] = [r["timings_s"] for r in m.get("distributed", {}).get("ranks", [])]
        rec["backend"] = m.get("distributed", {}).get("backend")
        rec["ranks"] = {n: v["rank"] for n, v in m["layers"].items()}
    if rc != 0:
        rec["log_tail"] = log.read_text()[-3000:]
    if out.is_dir() and not a.keep_outputs:
        shutil.rmtree(out)
    print(f"[{time.strftime('%H:%M:%S')}] {model} {method} x{nproc}: {'ok' if rc == 0 else f'FAILED rc={rc}'} in "
          f"{wall:.0f} s", flush=True)
    return rec


def nproc_table(runs: list[dict], markdown: bool) -> str:
    """Seconds per stage (rank 0's) for each process count, the speedup over 1 process, and whether the ranks
    match 1 process's."""
    stages = list(STAGES) + ["share_spectra", "total"]
    rows = []
    for (model, method) in dict.fromkeys((r["model"], r["method"]) for r in runs):
        group = sorted((r for r in runs if (r["model"], r["method"]) == (model, method)), key=lambda r: r["nproc"])
        base = next((r for r in group if r["nproc"] == 1), None)
        for stage in stages + ["process wall"]:
            cells = []
            for r in group:
                v = r["wall_s"] if stage == "process wall" else r.get("timings_s", {}).get(stage)
                cells.append("-" if v is None else f"{v:.1f}")
            b = (base or {}).get("wall_s") if stage == "process wall" else (base or {}).get("timings_s", {}).get(stage)
            last = group[-1]
            v = last["wall_s"] if stage == "process wall" else last.get("timings_s", {}).get(stage)
            speed = f"{b / v:.2f}" if b and v else "-"
            if all(c == "-" for c in cells):
                continue
            rows.append([model, method, stage, *cells, speed])
        same = all(r.get("ranks") == (base or {}).get("ranks") for r in group)
        rows.append([model, method, "same ranks as 1 process", *["" for _ in group[:-1]], "yes" if same else "NO", ""])
    counts = sorted({r["nproc"] for r in runs})
    head = ["model", "method", "stage"] + [f"{k} proc s" for k in counts] + [f"speedup x{counts[-1]}"]
    return table([r[:len(head)] + [""] * (len(head) - len(r)) for r in rows], head, markdown)


def git_state() -> dict:
    """HEAD and whether src/ differs from it (read-only git commands)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception:
            return ""
    diff = git("diff", "HEAD", "--", "src")
    return {"head": git("rev-parse", "--short", "HEAD"), "src_dirty": bool(diff),
            "src_diff_sha1": __import__("hashlib").sha1(diff.encode()).hexdigest()[:12] if diff else None}


def _variant(a: argparse.Namespace) -> str:
    """"default", or the glibc setting the run was made with (fixed mmap threshold: no heap retention)."""
    return f"MALLOC_MMAP_THRESHOLD_={a.malloc_mmap_threshold}" if a.malloc_mmap_threshold else "default"


def _thin(seq: list, n: int) -> list:
    if len(seq) <= n:
        return list(seq)
    step = len(seq) / n
    return [seq[int(i * step)] for i in range(n)] + [seq[-1]]


# ---------------------------------------------------------------------------------------------------------------
# Memory model

MEMORY_MODEL = """\
The code of src/svdpress as of this bench (CPU, --offload disk). Anonymous memory above the process's baseline A0
(its RSS when `data` ends), bytes. Shapes: d hidden, f intermediate, V vocab, L blocks; a layer is (m out, n in),
k = min(m, n); b = execution dtype bytes; N = samples·seqlen calibration tokens; B = tokens per pass, with
sequences per pass = min(8, budget/16 ÷ (seqlen·Σ_blk(m+n)·b)) (Runner.batch_size); R = 1024 (Gram rows per matmul);
C = Σ over the block's input groups of 8n² (q/k/v, o, gate/up, down: 8(3d² + f²) for Llama); P = params of a block.
  weights     w = b·P (one block, read from the checkpoint)
  calibrate   w + N·d·b (parked states) + C (the block's X·Xᵀ) + B·Σ_blk(m+n)·b (one pass) + 12·R·n_max (Gram rows)
  factorize   layers widest input first; at each layer: the X·Xᵀ (or their factors) still held + [kfac: 8m², G read
              back and factored in place] + 8mn (W float64, then W·L in place) + [8mn, gesdd's copy, only below
              32 MiB: a larger M is factored over its own memory] + 8(mk + kn) (U, Vh) + 60k² (gesdd's workspace,
              measured at 8192×2048) + 8·max(mk, kn) (the un-whitened factor)
  gradients   w + N·d·b (one block's saved input, read back from disk: BlockInputs) + N·d·4 (∂L/∂h)
              + 2·B·Σ_blk(m+n)·4 (one block's autograd)
              + the largest pass's G (layers grouped under budget/4; a layer wider than that alone: 8m²)
              + 12·R·m_max, or the loss over the vocabulary 3·T·c·4 (c = head chunk rows, T tokens of a pass)
  fermigrad   w + 4·Σ_blk(m+n)·k (one block's masks: U, V in float32) + 4·T·c·4 (head chunk) + the teacher's
              top-k cache (samples·seqlen·64·12)
  build       w + b·Σ_blk(m+n)·r (the block's factors) + 12·(m+n)·r at its largest layer
  export      64 MB (one slice of the embedding/head, streamed) + matplotlib (ranks.png)
File-backed pages (RssFile) are at most one block's checkpoint tensors, b_d·P, or one 64 MB head slice: every file
is opened per read and closed again.
Not modelled: glibc's heap retention (svdpress trims the heap after each layer; the rest shows in the error).
"""


def _sequences(sp: Spec, s: dict) -> int:
    """Runner.batch_size: sequences per pass under the budget."""
    per_token = sum(m + n for _, m, n in sp.linears()) * DTYPE_BYTES[s["dtype"]]
    fits = int(s.get("budget", 1.5 * GiB) // 16 // max(per_token * s["seqlen"], 1))
    return max(1, min(8, s["samples"], fits))


def _stage_terms(sp: Spec, method: str, s: dict, base: dict) -> dict[str, dict[str, float]]:
    """Predicted {stage: {"anon": bytes above A0, "file": bytes file-backed above F0}} for one run (MEMORY_MODEL)."""
    fac, alloc = method.split("+")
    d, V = sp.hidden, sp.vocab
    b, bd = DTYPE_BYTES[s["dtype"]], DTYPE_BYTES[sp.disk]
    budget = s.get("budget", 1.5 * GiB)
    N = s["samples"] * s["seqlen"]
    B = _sequences(sp, s) * s["seqlen"]
    R = 1024
    lin = sp.linears()
    act = sum(m + n for _, m, n in lin)
    w = b * sp.block_params
    groups = sp.input_groups()
    C = sum(8 * n * n for _, n in groups)
    nmax = max(n for _, n in groups)
    blk_file = sp.block_params * bd

    def chunk(T: int) -> int:  # model/head.py: Head.chunk
        return max(256, min(V, (1 << 25) // max(T, 1), (1 << 24) // d))

    out: dict[str, dict[str, float]] = {k: {"anon": 0.0, "file": 0.0} for k in ("load", "data")}
    if fac in ("kfac", "gfwsvd", "fwsvd"):
        passes = [0.0]
        for _, m, n in sorted(lin, key=lambda t: t[1]):  # calibrate._passes
            g = 8 * m * m + (8 * m * n if fac == "fwsvd" else 0)
            if passes[-1] and passes[-1] + g > budget // 4:
                passes.append(0.0)
            passes[-1] += g
        T = B - B // s["seqlen"]
        mmax = max(m for _, m, _ in lin)
        out["calibrate_gradients"] = {
            "anon": w + N * d * b + N * d * 4 + 2 * B * act * 4 + max(passes) + max(12 * R * mmax, 3 * T * chunk(T) * 4),
            "file": blk_file}
    out["calibrate"] = {"anon": w + N * d * b + C + B * act * b + 12 * R * nmax, "file": blk_file}

    group_of = {nm: gi for gi, (names, _) in enumerate(groups) for nm, *_ in lin if nm in names}
    left = {gi: len(names) for gi, (names, _) in enumerate(groups)}
    held, peak = C, 0.0
    for name, m, n in sorted(lin, key=lambda t: -t[2]):  # pipeline.factorize_model: widest input first
        k = min(m, n)
        g = 8 * m * m if fac in ("kfac", "gfwsvd") else 0
        copy = 8 * m * n if 8 * m * n < 32 * MiB else 0  # factorize.thin_svd: in place from 32 MiB
        peak = max(peak, N * d * b + held + g + 8 * m * n + copy + 8 * (m * k + k * n) + 60 * k * k
                   + 8 * max(m, n) * k)
        left[group_of[name]] -= 1
        if not left[group_of[name]]:
            held -= 8 * n * n
    out["factorize"] = {"anon": peak, "file": max(m * n for _, m, n in lin) * bd}

    if alloc == "fermigrad":
        T = 256  # batch_size 2 × seqlen 128 (METHOD_OPTS)
        masks = 4 * sum((m + n) * min(m, n) for _, m, n in lin)
        out["allocate"] = {"anon": w + masks + 4 * T * chunk(T) * 4 + 4 * 128 * 64 * 12,
                           "file": max(blk_file, chunk(T) * d * bd)}
    else:
        out["allocate"] = {"anon": 0.0, "file": 0.0}
    r = {nm: max(1, int(s["ratio"] * m * n / (m + n))) for nm, m, n in lin}  # uniform's ranks
    out["build"] = {"anon": w + sum((m + n) * r[nm] * b for nm, m, n in lin)
                    + max((m + n) * r[nm] * 12 for nm, m, n in lin), "file": blk_file}
    out["export"] = {"anon": 64 * MiB + base.get("matplotlib", 0.0), "file": 64 * MiB}
    return out


def predict(sp: Spec, method: str, settings: dict, base: dict) -> dict[str, dict[str, float]]:
    """Per stage MB: anon (A0 + terms), file (F0 + terms), rss = anon + file."""
    from svdpress.memory import parse_max_memory

    budget = parse_max_memory(settings.get("max_memory") or "cpu=1.5GiB").get("cpu", int(1.5 * GiB))
    s = {"dtype": settings.get("dtype", "float32"), "ratio": settings.get("ratio", 0.8),
         "samples": settings.get("calib_samples", 8), "seqlen": settings.get("calib_seqlen", 256), "budget": budget}
    terms = _stage_terms(sp, method, s, base)
    a0, f0 = base.get("anon_mb", 0.0), base.get("file_mb", 0.0)
    out = {}
    for stage, t in terms.items():
        anon = a0 + t["anon"] / MiB
        file = f0 + t["file"] / MiB
        out[stage] = {"anon_mb": round(anon, 1), "file_mb": round(file, 1), "rss_mb": round(anon + file, 1)}
    return out


def _base_of(run: dict, mpl_mb: float) -> dict:
    """A0: the run's own anonymous (and file-backed) RSS when `data` ends (before any heavy stage; its peak
    includes the tokenization's transient, which is gone by then)."""
    st = (run.get("final") or run.get("manifest") or {}).get("memory", {}).get("stages", {})
    data = st.get("data") or st.get("load") or {}
    anon = data.get("cpu_anon_end_mb", data.get("cpu_anon_peak_mb", data.get("cpu_rss_peak_mb", 0.0)))
    return {"anon_mb": anon, "file_mb": data.get("cpu_file_end_mb", data.get("cpu_file_peak_mb", 0.0)),
            "matplotlib": mpl_mb * MiB}


def measure_matplotlib() -> float:
    """MB that importing matplotlib and rendering a small figure add to a process (export's ranks.png)."""
    code = ("import json\n"
            "def anon():\n"
            "    for l in open('/proc/self/status'):\n"
            "        if l.startswith('RssAnon'): return int(l.split()[1]) / 1024\n"
            "import torch; a = anon()\n"
            "import io, matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt\n"
            "fig, ax = plt.subplots(figsize=(10, 4)); ax.bar(range(112), range(112)); b = io.BytesIO()\n"
            "fig.savefig(b, format='png', dpi=120); print(json.dumps(anon() - a))\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return float(r.stdout.strip().splitlines()[-1])
    except Exception:
        return 0.0


# ---------------------------------------------------------------------------------------------------------------
# Tables


def _stage_fig(run: dict, stage: str, key: str) -> Optional[float]:
    st = (run.get("final") or run.get("manifest") or {}).get("memory", {}).get("stages", {})
    return st.get(stage, {}).get(key)


def _secs(run: dict, stage: str) -> Optional[float]:
    return (run.get("final") or run.get("manifest") or {}).get("timings_s", {}).get(stage)


def _size(models: dict, name: str) -> tuple[Optional[float], Optional[float]]:
    m = models.get(name, {})
    return m.get("params"), m.get("disk_mb")


def _code(r: dict) -> str:
    """The src/ a run measured: its HEAD (+ if src/ had uncommitted changes), or "old" (before 3dcb3e1)."""
    src = r.get("src")
    if not src:
        return "old"
    return src.get("head", "?") + ("+" if src.get("src_dirty") else "")


def _vshort(r: dict) -> str:
    v = r.get("variant", "default")
    return "glibc default" if v == "default" else "mmap thr " + v.split("=")[-1]


def measured_tables(res: dict, markdown: bool) -> str:
    runs = res.get("runs", [])
    models = res.get("models", {})
    rows = []
    for r in runs:
        params, disk = _size(models, r["model"])
        peak = max((v for v in (_stage_fig(r, s, "cpu_rss_peak_mb") for s in STAGES) if v is not None), default=None)
        tv = r.get("time_v", {}).get("maxrss_mb")
        worst = max(STAGES, key=lambda s: _stage_fig(r, s, "cpu_rss_peak_mb") or 0)
        ok = "-" if tv is None else ("yes" if tv < TARGET_RSS / MiB else "NO")
        rows.append([r["model"], f"{params / 1e9:.3f}B" if params else "-", round(disk) if disk else None,
                     r["method"], _vshort(r), "ok" if r["rc"] == 0 else f"rc={r['rc']}",
                     _secs(r, "total") or r.get("wall_s"), peak, worst, r["poll"]["anon_peak_mb"],
                     r["poll"]["file_peak_mb"], tv, ok])
    head = ["model", "params", "disk MB", "method", "malloc", "run", "total s", "peak RSS MB (manifest)", "at stage",
            "anon peak MB", "file-backed peak MB", "maxrss MB (/usr/bin/time)", "< 2 GiB"]
    out = [table(rows, head, markdown)]
    rows = []
    for r in runs:
        rows.append([r["model"], r["method"], _vshort(r)] + [_secs(r, s) for s in STAGES + ("total",)])
    out.append(table(rows, ["model", "method", "malloc"] + [f"{s} s" for s in STAGES + ("total",)], markdown))
    rows = []
    for r in runs:
        cells = []
        for s in STAGES:
            rss, an, fi = (_stage_fig(r, s, k) for k in ("cpu_rss_peak_mb", "cpu_anon_peak_mb", "cpu_file_peak_mb"))
            cells.append("-" if rss is None else f"{rss:.0f} ({an:.0f}+{fi:.0f})" if an is not None else f"{rss:.0f}")
        rows.append([r["model"], r["method"], _vshort(r)] + cells)
    out.append(table(rows, ["model", "method", "malloc"] + [f"{s} RSS (anon+file) MB" for s in STAGES], markdown))
    return "\n\n".join(out)


def model_tables(res: dict, markdown: bool) -> str:
    rows = []
    mpl = res.get("matplotlib_mb", 0.0)
    errs: dict[str, list[float]] = {}
    for r in res.get("runs", []):
        if r["rc"] != 0 or r["model"] not in MODELS or r["settings"].get("device", "cpu").startswith("cuda"):
            continue  # the formulas are the CPU placement's (on CUDA the statistics live on the GPU)
        sp = MODELS[r["model"]]
        pred = predict(sp, r["method"], r["settings"], _base_of(r, mpl))
        for s in STAGES[2:]:
            an = _stage_fig(r, s, "cpu_anon_peak_mb")
            fi = _stage_fig(r, s, "cpu_file_peak_mb")
            rss = _stage_fig(r, s, "cpu_rss_peak_mb")
            if rss is None or s not in pred:
                continue
            p = pred[s]
            e_an = None if an is None else round(100 * (p["anon_mb"] - an) / an, 1)
            if e_an is not None:
                errs.setdefault(_vshort(r), []).append(abs(e_an))
            rows.append([r["model"], r["method"], _vshort(r), s, p["anon_mb"], an, e_an, p["file_mb"], fi,
                         p["rss_mb"], rss, round(100 * (p["rss_mb"] - rss) / rss, 1)])
    head = ["model", "method", "malloc", "stage", "anon pred MB", "anon meas MB", "anon err %", "file pred MB (upper)",
            "file meas MB", "RSS pred MB", "RSS meas MB", "RSS err %"]
    txt = table(rows, head, markdown)
    for v, e in errs.items():
        e.sort()
        txt += (f"\n\n{v}: anonymous memory, |error| over {len(e)} stage peaks: median {e[len(e) // 2]:.1f}%, "
                f"max {e[-1]:.1f}%")
    return txt


def compact_tables(res: dict, markdown: bool) -> str:
    """The README's two tables: one line per run (seconds per stage, peaks), and the memory model's errors."""
    rows, val = [], []
    mpl = res.get("matplotlib_mb", 0.0)
    short = {"calibrate_gradients": "grad", "calibrate": "calib", "factorize": "fact", "allocate": "alloc",
             "build": "build", "export": "export"}
    for r in res.get("runs", []):
        params, disk = _size(res.get("models", {}), r["model"])
        secs = " / ".join("-" if _secs(r, s) is None else f"{_secs(r, s):.0f}" for s in short)
        worst = max(STAGES, key=lambda s: _stage_fig(r, s, "cpu_rss_peak_mb") or 0)
        tv = r.get("time_v", {}).get("maxrss_mb")
        rows.append([r["model"], f"{params / 1e9:.2f}B, {disk / 1024:.1f} GiB" if params else "-", r["method"],
                     _vshort(r), _code(r), "ok" if r["rc"] == 0 else f"rc={r['rc']}",
                     _secs(r, "total") or r.get("wall_s"),
                     secs, f"{_stage_fig(r, worst, 'cpu_rss_peak_mb'):.0f} ({short.get(worst, worst)})",
                     r["poll"]["anon_peak_mb"], r["poll"]["file_peak_mb"], tv,
                     "-" if tv is None else ("yes" if tv < TARGET_RSS / MiB else "**no**")])
        if r["rc"] != 0 or r["model"] not in MODELS or r["settings"].get("device", "cpu").startswith("cuda"):
            continue
        pred = predict(MODELS[r["model"]], r["method"], r["settings"], _base_of(r, mpl))
        stages = [s for s in short if _stage_fig(r, s, "cpu_anon_peak_mb") is not None]
        errs = sorted(abs(pred[s]["anon_mb"] - _stage_fig(r, s, "cpu_anon_peak_mb"))
                      / _stage_fig(r, s, "cpu_anon_peak_mb") * 100 for s in stages)
        top = max(stages, key=lambda s: _stage_fig(r, s, "cpu_anon_peak_mb"))
        fmeas = max(_stage_fig(r, s, "cpu_file_peak_mb") or 0 for s in stages)
        fpred = max(pred[s]["file_mb"] for s in stages)
        val.append([r["model"], r["method"], _vshort(r), _code(r), short[top], pred[top]["anon_mb"],
                    _stage_fig(r, top, "cpu_anon_peak_mb"),
                    f"{100 * (pred[top]['anon_mb'] / _stage_fig(r, top, 'cpu_anon_peak_mb') - 1):+.0f}%",
                    f"{errs[len(errs) // 2]:.0f}% / {errs[-1]:.0f}%", fpred, fmeas])
    head = ["model", "size", "method", "malloc", "src", "run", "total s",
            "s per stage: " + " / ".join(short.values()), "peak RSS MB (stage)", "anon peak MB",
            "file-backed peak MB", "maxrss MB (time -v)", "< 2 GiB"]
    vhead = ["model", "method", "malloc", "src", "largest stage", "anon pred MB", "anon meas MB", "error",
             "|error| median / max over stages", "file-backed pred MB (max)", "file-backed meas MB (max)"]
    return table(rows, head, markdown) + "\n\n" + table(val, vhead, markdown)


def extrapolation_table(res: dict, markdown: bool, dtype: str, methods: list[str], calib: Optional[str] = None,
                        budget: Optional[str] = None) -> str:
    """Predicted peaks for published shapes at the runs' settings (CPU, --offload disk)."""
    runs = [r for r in res.get("runs", []) if r["rc"] == 0]
    mpl = res.get("matplotlib_mb", 0.0)
    ref = max(runs, key=lambda r: MODELS[r["model"]].params if r["model"] in MODELS else 0, default=None)
    base = _base_of(ref, mpl) if ref else {"anon_mb": 600.0, "file_mb": 0.0, "matplotlib": mpl * MiB}
    settings = dict(ref["settings"]) if ref else {"calib_samples": 8, "calib_seqlen": 256, "ratio": 0.8}
    settings["dtype"] = dtype
    if calib:
        settings["calib_samples"], settings["calib_seqlen"] = (int(x) for x in calib.lower().split("x"))
    if budget:
        settings["max_memory"] = budget
    rows = []
    for name, sp in PUBLISHED.items():
        for method in methods:
            pred = predict(sp, method, settings, base)
            stages = [s for s in STAGES[2:] if s in pred]
            worst = max(stages, key=lambda s: pred[s]["anon_mb"])
            gib = lambda mb: round(mb / 1024, 1)  # noqa: E731
            rows.append([name, f"{sp.params / 1e9:.1f}B", f"{sp.params * DTYPE_BYTES[sp.disk] / 1e9:.0f}", method]
                        + [gib(pred[s]["anon_mb"]) if s in pred else None for s in STAGES[2:]]
                        + [f"{gib(pred[worst]['anon_mb'])} ({worst})",
                           gib(max(p["rss_mb"] for p in pred.values()))])
    head = (["model", "params", "GB on disk", "method"] + [f"{s} GiB" for s in STAGES[2:]]
            + ["anon peak GiB (stage)", "RSS peak GiB"])
    note = (f"(predicted anonymous memory per stage at --offload disk, --dtype {dtype}, "
            f"--max-memory {settings.get('max_memory')}, "
            f"{settings.get('calib_samples')}×{settings.get('calib_seqlen')} calibration tokens, ratio "
            f"{settings.get('ratio')}; baseline A0 = {base['anon_mb']:.0f} MB from {ref['model'] if ref else 'a guess'})")
    return table(rows, head, markdown) + "\n" + note


# ---------------------------------------------------------------------------------------------------------------


def load_results(path: Path) -> dict:
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    return {"runs": [], "models": {}}


def main(argv: Optional[list[str]] = None) -> int:
    terminate_as_interrupt()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="deep-narrow,tiny-wide", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--methods", default="svd-llm+uniform,kfac+uniform,svd-llm+fermigrad",
                   help="comma list of FACTORIZE+ALLOCATE (kfac+lems too, on a GPU)")
    p.add_argument("--models-dir", type=Path, default=Path("/tmp/svdpress-scale"))
    p.add_argument("--out", type=results_file, default=ROOT / "bench" / "results" / "scale.json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--offload", default="disk")
    p.add_argument("--max-memory", default=None, help="default cpu=1.5GiB on CPU, cuda:0=24GiB on CUDA")
    p.add_argument("--offload-dir", default=None)
    p.add_argument("--calib", default="wiki")
    p.add_argument("--calib-samples", type=positive_int, default=8)
    p.add_argument("--calib-seqlen", type=positive_int, default=256)
    p.add_argument("--ratio", type=kept_ratio, default=0.8)
    p.add_argument("--opt", action="append", default=[], metavar="ALLOC:KEY=VALUE",
                   help="replace an allocator's small settings, e.g. fermigrad:steps=4 (repeatable)")
    p.add_argument("--timeout", type=positive_number, default=None, help="seconds per run")
    p.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="run with MALLOC_MMAP_THRESHOLD_=BYTES (glibc then returns every freed block above it to the "
                        "OS: RSS follows live memory, which validates the memory model; default: glibc as is)")
    p.add_argument("--keep-outputs", action="store_true", help="keep the compressed models (under --models-dir)")
    p.add_argument("--build-only", action="store_true", help="write the models, run nothing")
    p.add_argument("--report", action="store_true", help="no runs: print the tables of --out")
    p.add_argument("--extrapolate", action="store_true", help="predict Llama-3-8B/70B/3.1-405B")
    p.add_argument("--extrapolate-dtype", default="bfloat16")
    p.add_argument("--extrapolate-calib", default=None, metavar="SAMPLESxSEQLEN",
                   help="calibration of the extrapolation (default: the runs'), e.g. 256x2048")
    p.add_argument("--extrapolate-budget", default=None, metavar="MAX_MEMORY",
                   help="--max-memory of the extrapolation (default: the runs'), e.g. cpu=64GiB")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--compact", action="store_true", help="one line per run (the README's tables)")
    p.add_argument("--fresh", action="store_true", help="start --out afresh instead of merging")
    p.add_argument("--merge", type=Path, nargs="*", default=[], metavar="JSON",
                   help="add the runs of these result files (same format) to --out")
    p.add_argument("--nproc", type=positive_int, default=None, metavar="N",
                   help="scaling over processes instead of memory: each (model, method) under torchrun with 1, 2, "
                        "4, ... N processes (gloo on CPU, nccl on GPUs); wall seconds per stage -> --nproc-out")
    p.add_argument("--calib-batch-size", type=positive_int, default=None,
                   help="--nproc: calibration batch (default calib-samples / N, so that every process has one)")
    p.add_argument("--nproc-out", type=results_file, default=ROOT / "bench" / "results" / "scale_nproc.json")
    p.add_argument("--nproc-work", type=Path, default=Path("/tmp/svdpress-nproc"),
                   help="where the --nproc runs write their outputs (removed after each run)")
    a = p.parse_args(argv)

    cuda = a.device.startswith("cuda")
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    a.max_memory = a.max_memory or ("cuda:0=24GiB" if cuda else "cpu=1.5GiB")
    a.opts = {}
    for o in a.opt:
        alloc, _, kv = o.partition(":")
        a.opts.setdefault(alloc, []).append(kv)
    if a.nproc is not None:
        return main_nproc(a, p)
    res = {"runs": [], "models": {}} if a.fresh else load_results(a.out)
    for other in a.merge:  # runs made with another --out (e.g. in parallel) join this file
        o = load_results(other)
        res["models"].update(o.get("models", {}))
        for key in ("machine", "matplotlib_mb"):
            if key in o and key not in res:
                res[key] = o[key]
        for r in o.get("runs", []):
            k = (r["model"], r["method"], r.get("variant", "default"))
            res["runs"] = [x for x in res["runs"] if (x["model"], x["method"], x.get("variant", "default")) != k]
            res["runs"].append(r)
    if a.merge:
        _save(a.out, res)

    if not a.report:
        models, methods = runs_asked(a, p)
        a.models_dir.mkdir(parents=True, exist_ok=True)
        results_dir = a.out.parent
        logs = results_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        work = a.models_dir / "out"
        work.mkdir(parents=True, exist_ok=True)
        res["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "mem_total_gib": round(_meminfo("MemTotal") / GiB, 1),
                          "note": "shared machine: other processes ran at the same time; timings are noisy"}
        if "matplotlib_mb" not in res:
            res["matplotlib_mb"] = round(measure_matplotlib(), 1)
        for m in models:
            print(f"model {m}", flush=True)
            path = build_model(m, a.models_dir)
            info = json.loads((path / MARKER).read_text())
            res["models"][m] = {"params": MODELS[m].params, "disk_mb": round(info["bytes"] / MiB, 1),
                                "disk_dtype": MODELS[m].disk, "spec": MODELS[m].__dict__,
                                "block_mb_disk": round(MODELS[m].block_params * DTYPE_BYTES[MODELS[m].disk] / MiB, 1)}
            _save(a.out, res)
            if a.build_only:
                continue
            for method in methods:
                rec = run_one(m, path, method, a, work, logs)
                rec["predicted"] = predict(MODELS[m], method, rec["settings"], _base_of(rec, res["matplotlib_mb"]))
                key = (m, method, rec["variant"])
                res["runs"] = [r for r in res["runs"] if (r["model"], r["method"], r.get("variant")) != key] + [rec]
                _save(a.out, res)
    print()
    if a.compact:
        print(compact_tables(res, a.markdown))
    else:
        print(measured_tables(res, a.markdown))
        print()
        print(model_tables(res, a.markdown))
    if a.extrapolate:
        seen = [r["method"] for r in res.get("runs", [])]
        order = a.methods.split(",") + ["kfac+lems"]
        methods = sorted(set(seen) or set(order), key=lambda m: order.index(m) if m in order else len(order))
        print()
        print(extrapolation_table(res, a.markdown, a.extrapolate_dtype, methods, a.extrapolate_calib,
                                  a.extrapolate_budget))
    res["memory_model"] = MEMORY_MODEL
    if not a.report:
        _save(a.out, res)
    return 0


def runs_asked(a: argparse.Namespace, p: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """--models and --methods, every name checked before a model is built."""
    models = [m for m in a.models.split(",") if m]
    methods = [m for m in a.methods.split(",") if m]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m}; choose from {', '.join(MODELS)}")
    for m in methods:
        try:
            method_pair(m)
        except argparse.ArgumentTypeError as e:
            p.error(f"--methods: {e}")
    return models, methods


def main_nproc(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    # every process needs a batch of its own: the same batches for every process count (so the sums are the same)
    a.calib_batch_size = a.calib_batch_size or max(1, a.calib_samples // a.nproc)
    try:
        res = {"runs": []} if (a.fresh or not a.nproc_out.is_file()) else \
            read_json(a.nproc_out, "this bench's --nproc JSON (pass another --nproc-out or --fresh)")
    except SvdpressError as e:
        raise SystemExit(f"error: {e}") from None
    if not a.report:
        models, methods = runs_asked(a, p)
        a.models_dir.mkdir(parents=True, exist_ok=True)
        a.nproc_work.mkdir(parents=True, exist_ok=True)
        logs = a.nproc_out.parent / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        res["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "note": "shared machine: other processes ran at the same time; timings are noisy"}
        for m in models:
            path = build_model(m, a.models_dir)
            for method in methods:
                for k in proc_counts(a.nproc):
                    rec = run_nproc(m, path, method, k, a, a.nproc_work, logs)
                    key = (m, method, k)
                    res["runs"] = [r for r in res["runs"] if (r["model"], r["method"], r["nproc"]) != key] + [rec]
                    _save(a.nproc_out, res)
    print()
    print(nproc_table(res["runs"], a.markdown))
    return 0


def _meminfo(key: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _save(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, res, indent=1)


def run_bench(main) -> None:
    """The entry of a bench that runs measured children: Ctrl-C or SIGTERM stops the running child (its process
    group), runs already finished are in the JSON, and the user gets one line rather than a traceback."""
    try:
        bench_main(main)
    except KeyboardInterrupt as e:
        sys.exit(f"interrupted ({e or 'Ctrl-C'}): the run in progress was stopped; finished runs are in the JSON")


if __name__ == "__main__":
    run_bench(main)
