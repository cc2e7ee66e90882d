"""Large vocabularies: peak memory and time per stage of `svdpress compress` on a Gemma-3-270M-shaped model.

    python bench/vocab.py                                   # build (cached), 3 runs, LEMS probe profile, table, JSON
    python bench/vocab.py --methods kfac+uniform            # one run (merged into the JSON)
    python bench/vocab.py --probe-profile-only              # only where a LEMS probe's time goes
    python bench/vocab.py --report                          # the table from the saved JSON
    python bench/vocab.py --arch llama                      # the same shapes as a Llama config

The model has Gemma-3-270M's shapes (hidden 640, intermediate 2048, 18 layers, 4 heads, 1 KV head, head_dim 256,
262,144-token vocabulary, tied embeddings: 268M parameters, 1.07 GB in float32), built offline from
`AutoConfig.for_model("gemma3_text", ...)` (sliding/full attention layers, q/k norms, scaled embeddings) with random
weights (transformers' own initialization, seed 0), saved as float32 safetensors with the embedded default model's
tokenizer (SmolLM2's, ids < 49,152: valid ids here). It is built in a subprocess and cached under --models-dir.

Each method runs `python -m svdpress compress --model DIR ... --device cpu --json FILE` in the default placement
(--offload auto, which keeps this model resident) under `/usr/bin/time -v` (an independent whole-process max RSS),
while this script samples the process's /proc status every 0.25 s (VmRSS, RssAnon = what svdpress allocates,
RssFile = mapped file pages, e.g. the checkpoint's safetensors) and kills it if it passes --kill-above (the machine
is shared). Per stage, the seconds and peak RSS come from the report (`timings_s`, `memory.stages`; the --json copy
is written after the export stage, so it includes that stage). Pass = every stage's peak and /usr/bin/time's maxrss
below 3 × the fp32 weights.

Methods (default calibration: wiki, 32 × 512 tokens, batches of 8; ratio 0.8):
  kfac+uniform        --factorize kfac --allocate uniform
  svd-llm+fermigrad   --factorize svd-llm --allocate fermigrad --opt steps=8 (FermiGrad's other defaults:
                      16 windows × 128 tokens, 4 per step, teacher top-64)
  kfac+lems           --factorize kfac --allocate lems (default probe: 4 × 256 tokens, one probe per layer)

The LEMS probe profile (a separate subprocess) loads the model as compress does, builds the same Probe (4 × 256
tokens of the same calibration samples) and times a few probes split into blocks / final norm / vocabulary pass,
extrapolates to the 126 probes of the model, and times variants of the vocabulary pass at the probe's shape
(chunk sizes; a lean pass computing only what LEMS uses, in a reused buffer), checked against the current one.

Timings on a shared 2-core machine are noisy (other processes compete for the cores; the load average is
recorded): treat them as indicative. Results: bench/results/vocab.json (git-ignored); --save-reference copies it to
bench/reference/vocab_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from svdpress.cli import (kept_ratio, positive_int, positive_number, results_file,  # noqa: E402
                          terminate_as_interrupt)
from svdpress.errors import SvdpressError  # noqa: E402
from svdpress.export import read_json  # noqa: E402
from svdpress.memory import proc_status  # noqa: E402
from svdpress.table import table  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from scale import _save, child_group, run_bench  # noqa: E402  (bench/scale.py: runs and saves measured children)

MiB = 2 ** 20
GiB = 2 ** 30
STAGES = ("load", "data", "calibrate_gradients", "calibrate", "factorize", "allocate", "build", "export")
MARKER = "vocab_model.json"
SHAPES = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
              num_attention_heads=4, num_key_value_heads=1, head_dim=256, tie_word_embeddings=True,
              max_position_embeddings=32768)
METHODS: dict[str, list[str]] = {
    "kfac+uniform": ["--factorize", "kfac", "--allocate", "uniform"],
    "svd-llm+fermigrad": ["--factorize", "svd-llm", "--allocate", "fermigrad", "--opt", "steps=8"],
    "kfac+lems": ["--factorize", "kfac", "--allocate", "lems"],
}
RESULTS = ROOT / "bench" / "results" / "vocab.json"
REFERENCE = ROOT / "bench" / "reference" / "vocab_cpu.json"


# ---------------------------------------------------------------------------------------------------------------
# The model


def model_config(arch: str):
    if arch == "gemma3":  # Gemma-3-270M's published config, random weights
        from transformers import AutoConfig

        return AutoConfig.for_model("gemma3_text", query_pre_attn_scalar=256, sliding_window=512,
                                    rope_theta=1000000.0, **SHAPES)
    from transformers import LlamaConfig

    return LlamaConfig(rope_theta=1000000.0, hidden_act="silu", rms_norm_eps=1e-6, **SHAPES)


def _tokenizer():
    """The embedded default model's tokenizer (what load_model("default") returns), without the model."""
    try:
        from svdpress.models import _default_gguf, _gguf_tokenizer

        return _gguf_tokenizer(_default_gguf())
    except ImportError:  # pragma: no cover - a svdpress without those helpers
        from svdpress.models import load_model

        return load_model("default")[1]


def build_model(arch: str, path: Path, seed: int = 0) -> dict:
    """Write the model (float32 safetensors + config + tokenizer) unless a matching copy exists; its marker."""
    want = {"arch": arch, "shapes": SHAPES, "seed": seed, "format": 1}
    marker = path / MARKER
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
            if info.get("key") == want:
                return info
        except (OSError, ValueError):
            pass
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    cfg = model_config(arch)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    tok = _tokenizer()
    assert len(tok) <= cfg.vocab_size, "tokenizer ids must be valid for the model"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="2GB")
    tok.save_pretrained(tmp)
    disk = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
    info = {"key": want, "model_type": cfg.model_type, "architecture": type(model).__name__, "params": params,
            "fp32_bytes": params * 4, "safetensors_bytes": disk, "tokenizer_size": len(tok),
            "build_s": round(time.perf_counter() - t0, 1)}
    (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return info


# ---------------------------------------------------------------------------------------------------------------
# One compression, measured from outside





def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _parse_time_v(text: str) -> dict[str, Any]:
    import re

    out: dict[str, Any] = {}
    mb = lambda s: round(int(s) / 1024, 1)  # noqa: E731  (kbytes -> MiB)
    for key, pat, conv in (("maxrss_mb", r"Maximum resident set size \(kbytes\): (\d+)", mb),
                           ("user_s", r"User time \(seconds\): ([\d.]+)", float),
                           ("sys_s", r"System time \(seconds\): ([\d.]+)", float),
                           ("cpu_percent", r"Percent of CPU this job got: (\d+)%", int),
                           ("exit_status", r"Exit status: (\d+)", int)):
        m = re.search(pat, text)
        if m:
            out[key] = conv(m.group(1))
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if m:
        secs = 0.0
        for part in m.group(1).split(":"):
            secs = secs * 60 + float(part)
        out["wall_s"] = round(secs, 1)
    return out


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


def _meminfo(key: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_key(method: str, a: argparse.Namespace) -> str:
    """The result's name: the method, plus any non-default setting of this bench."""
    return method + (f" --offload {a.offload}" if a.offload else "") + \
        (f" --calib-samples {a.calib_samples}" if a.calib_samples else "")


def code_version() -> dict:
    """The svdpress code a run used (src/ changes while benches run): HEAD, whether src/ differs from it, and a
    hash of every src/ file as it is on disk at the run's start."""
    import hashlib

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    h = hashlib.sha256()
    for f in sorted((ROOT / "src").rglob("*.py")):
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return {"head": git("rev-parse", "--short", "HEAD"), "src_changes": git("status", "--porcelain", "--", "src"),
            "src_sha256": h.hexdigest()[:16]}


def run_one(method: str, model_dir: Path, work: Path, logs: Path, a: argparse.Namespace) -> dict:
    key = run_key(method, a).replace(" --", "__").replace(" ", "-")
    out, report_file = work / "out" / key, work / f"{key}.report.json"
    time_file, log_file = work / f"{key}.time.txt", logs / f"vocab_{key}.log"
    for p in (report_file, time_file):
        p.unlink(missing_ok=True)
    extra = list(METHODS[method])
    if a.calib_samples:
        extra += ["--calib-samples", str(a.calib_samples)]
    if a.offload:
        extra += ["--offload", a.offload]
    cmd = [sys.executable, "-m", "svdpress", "compress", "--model", str(model_dir), *extra, "--ratio", str(a.ratio),
           "--device", "cpu", "--out", str(out), "--overwrite", "--json", str(report_file), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    rec: dict[str, Any] = {"method": method, "command": " ".join(["python", *cmd[1:]]), "code": code_version(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "load_before": _loadavg(), "mem_available_before_mb": round(_meminfo("MemAvailable") / MiB)}
    print(f"[{time.strftime('%H:%M:%S')}] {method}: {rec['command']}", flush=True)
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    killed = None
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        with child_group(["/usr/bin/time", "-v", "-o", str(time_file), *cmd], stdout=log,
                         stderr=subprocess.STDOUT, env=env, cwd=ROOT) as proc:
            child = None
            while proc.poll() is None:
                child = child or next(iter(_children(proc.pid)), None)
                s = proc_status(child) if child else None
                if s:
                    for k in peak:
                        peak[k] = max(peak[k], s.get(k, 0))
                    if s.get("VmRSS", 0) > a.kill_above * GiB and killed is None:
                        killed = round(s["VmRSS"] / MiB)
                        print(f"  RSS {killed} MB > --kill-above {a.kill_above} GiB: stopping it", flush=True)
                        os.kill(child, signal.SIGKILL)
                time.sleep(0.25)
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    rec["returncode"] = proc.returncode
    rec["killed_at_rss_mb"] = killed
    rec["poll"] = {f"{k}_peak_mb": round(v / MiB, 1) for k, v in peak.items()}
    rec["time_v"] = _parse_time_v(time_file.read_text()) if time_file.is_file() else {}
    rec["load_after"] = _loadavg()
    if report_file.is_file():
        r = json.loads(report_file.read_text())
        rec["timings_s"] = r.get("timings_s")
        rec["memory"] = r.get("memory")
        rec["placement"] = r.get("placement")
        rec["ratio"] = r.get("ratio", {}).get("achieved")
        rec["calibration"] = r.get("calibration")
        info = r.get("allocation") or {}
        rec["allocation"] = {k: info[k] for k in ("measure_s", "search_s", "solve_s", "probes", "status",
                                                 "train_time_s", "steps", "tokens_per_step", "final_kl",
                                                 "kl_fermigrad", "kl_uniform", "time_s") if k in info}
    else:
        rec["error_tail"] = log_file.read_text()[-3000:] if log_file.is_file() else ""
    shutil.rmtree(out, ignore_errors=True)  # 1 GB per run; the report has what we need
    return rec


def verdict(rec: dict, bound_mb: float) -> dict:
    stages = (rec.get("memory") or {}).get("stages") or {}
    stage_peak = max((s["cpu_rss_peak_mb"] for s in stages.values()), default=None)
    maxrss = rec.get("time_v", {}).get("maxrss_mb")
    figures = [x for x in (stage_peak, maxrss) if x is not None]
    ok = bool(figures) and rec.get("returncode") == 0 and not rec.get("killed_at_rss_mb") and max(figures) < bound_mb
    return {"stage_peak_mb": stage_peak, "maxrss_mb": maxrss, "bound_mb": round(bound_mb, 1), "pass": ok}


# ---------------------------------------------------------------------------------------------------------------
# Where a LEMS probe's time goes (run in its own process)


def probe_profile(model_dir: Path, a: argparse.Namespace) -> dict:
    import dataclasses
    import statistics
    import types

    import torch

    from svdpress.allocate import sensitivity as S
    from svdpress.allocate.common import rank_at
    from svdpress.allocate.lems import LemsConfig
    from svdpress.data import calibration_samples
    from svdpress.factorize import spectrum_from_svd
    from svdpress.model import Placement, Runner
    from svdpress.model.head import ELEMENTS
    from svdpress.models import load_model

    res: dict[str, Any] = {"threads": torch.get_num_threads(), "load_before": _loadavg(), "code": code_version(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    model, tok, src = load_model(str(model_dir), torch.float32, "cpu", lazy=True)
    runner = Runner(model, Placement(device="cpu"), src.tensors)  # what compress() does (offload auto)
    res["offload"] = runner.offload
    samples, _ = calibration_samples(tok, "wiki", 32, 512, 0)
    lc = LemsConfig()
    cfg = S.probe_config(lc)
    res["probe"] = dataclasses.asdict(cfg)
    shapes = runner.arch.shapes()
    L = len(runner.blocks)
    chosen = [n for n in shapes if runner.arch.block_of(n) in (0, L // 2, L - 1)
              and n.rsplit(".", 1)[-1] in ("q_proj", "down_proj")]
    spectra = {n: spectrum_from_svd(runner.weight(n).double()) for n in chosen}  # plain SVD: enough to truncate
    problem = types.SimpleNamespace(runner=runner, samples=samples, spectra=spectra)

    spent: dict[str, float] = {}

    def timed(fn, key):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - t
        return wrapper

    untimed_vocab_pass = S.vocab_pass
    S.vocab_pass = timed(S.vocab_pass, "vocab_pass")
    S.normalizer = timed(S.normalizer, "normalizer")
    runner.forward = timed(runner.forward, "blocks")
    runner.final = timed(runner.final, "final")
    t = time.perf_counter()
    probe = S.Probe(problem, cfg)
    res["setup"] = {"total_s": round(time.perf_counter() - t, 2), **{k: round(v, 2) for k, v in spent.items()}}
    starts = [runner.arch.block_of(n) for n in shapes]

    def probes(threads: int) -> dict:
        torch.set_num_threads(threads)
        rows = []
        for name in chosen:
            spent.clear()
            t = time.perf_counter()
            probe.loss({name: rank_at(shapes[name], lc.probe_fraction)})
            total = time.perf_counter() - t
            start = runner.arch.block_of(name)
            rows.append({"layer": name, "start_block": start, "blocks_run": L - start, "total_s": round(total, 2),
                         "blocks_s": round(spent.get("blocks", 0), 2),
                         "vocab_pass_s": round(spent.get("vocab_pass", 0), 2),
                         "final_s": round(spent.get("final", 0), 3), "other_s": round(total - sum(spent.values()), 2)})
            print(f"  {threads} thread(s), probe {name}: {rows[-1]}", flush=True)
        per_block = statistics.median(r["blocks_s"] / r["blocks_run"] for r in rows)
        vocab = statistics.median(r["vocab_pass_s"] for r in rows)
        rest = statistics.median(r["final_s"] + r["other_s"] for r in rows)
        est_blocks = sum((L - s) * per_block for s in starts)
        ext = {"probes": len(starts), "per_block_s": round(per_block, 3), "vocab_pass_s": round(vocab, 2),
               "blocks_total_s": round(est_blocks, 1), "vocab_total_s": round(vocab * len(starts), 1),
               "other_total_s": round(rest * len(starts), 1),
               "measure_s_without_setup": round(est_blocks + (vocab + rest) * len(starts), 1)}
        print(f"  {threads} thread(s), extrapolated: {ext}", flush=True)
        return {"threads": threads, "rows": rows, "extrapolated": ext, "load": _loadavg()}

    # the vocabulary pass at the probe's shape, current and variants
    head = probe.head
    h = probe.ref[0][0].to(runner.device)
    shift = probe.ref[0][1].float()
    targets = probe.targets[0]
    tau = cfg.temperature
    T, W = h.shape[0], head.rows
    base_vp = untimed_vocab_pass
    ref_lse, _, _ = base_vp(head, h, tau, targets, shift)

    def lean(elements: int):
        """lse of s/τ − shift only (what LEMS's KL needs), amax/exp_ in one reused buffer."""
        c = max(256, min(head.vocab, elements // T))
        buf = torch.empty(T, c)
        lse = torch.full((T,), float("-inf"))
        for a0 in range(0, head.vocab, c):
            b0 = min(a0 + c, head.vocab)
            z = torch.mm(h, W(a0, b0).T, out=buf[:, :b0 - a0]) if b0 - a0 == c else h @ W(a0, b0).T
            z.div_(tau).sub_(shift[:, None])
            m = z.amax(-1)
            s = z.sub_(m[:, None]).exp_().sum(-1)
            lse = torch.logaddexp(lse, s.log_() + m)
        return lse

    def matmul_only(elements: int):
        c = max(256, min(head.vocab, elements // T))
        buf = torch.empty(T, c)
        for a0 in range(0, head.vocab, c):
            b0 = min(a0 + c, head.vocab)
            if b0 - a0 == c:
                torch.mm(h, W(a0, b0).T, out=buf)
            else:
                h @ W(a0, b0).T

    variants = []

    def clock(label, fn, threads, check=False, repeat=2):
        torch.set_num_threads(threads)
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        row = {"variant": label, "threads": threads, "seconds": [round(x, 2) for x in times],
               "best_s": round(min(times), 2)}
        if check:
            row["max_abs_diff_vs_current"] = float((out - ref_lse).abs().max())
        variants.append(row)
        print(f"  vocab pass {label}, {threads} thread(s): {row}", flush=True)

    default_threads = res["threads"]
    res["probe_runs"] = [probes(default_threads)]
    for threads in dict.fromkeys((default_threads, 1)):
        for e in (ELEMENTS, 1 << 22, 1 << 20):
            h_ = dataclasses.replace(head, elements=e)
            clock(f"current vocab_pass, {e} logits/chunk", lambda: base_vp(h_, h, tau, targets, shift)[0], threads,
                  check=True)
            clock(f"lean lse only, reused buffer, {e} logits/chunk", lambda: lean(e), threads, check=True)
            clock(f"matmuls only, reused buffer, {e} logits/chunk", lambda: matmul_only(e), threads)
    if default_threads != 1:
        res["probe_runs"].append(probes(1))
    torch.set_num_threads(default_threads)
    res["vocab_pass_variants"] = {"tokens": T, "hidden": h.shape[1], "vocab": head.vocab, "rows": variants}
    res["load_after"] = _loadavg()
    runner.close()
    runner.close()
    return res


# ---------------------------------------------------------------------------------------------------------------
# Tables


def tables(res: dict) -> str:
    info = res.get("model", {})
    bound = res.get("bound_mb")
    lines = [f"model: {info.get('architecture')} ({info.get('model_type')}), {info.get('params', 0) / 1e6:.1f}M "
             f"parameters, fp32 weights {info.get('fp32_bytes', 0) / MiB:.0f} MB; bound 3 x fp32 = {bound} MB",
             f"machine: {res.get('machine', {}).get('cpus')} CPUs, shared (timings are noisy)", ""]
    runs = res.get("runs", {})
    methods = [m for m in METHODS if m in runs] + [m for m in runs if m not in METHODS]
    rows = []
    for stage in STAGES + ("total",):
        row = [stage]
        for m in methods:
            r = runs[m]
            secs = (r.get("timings_s") or {}).get(stage)
            mem = ((r.get("memory") or {}).get("stages") or {}).get(stage, {}).get("cpu_rss_peak_mb")
            row.append("" if secs is None else f"{secs:.1f} s" + ("" if mem is None else f" / {mem:.0f} MB"))
        rows.append(row)
    for label, fn in (("whole process maxrss (/usr/bin/time)", lambda r: f"{r['verdict']['maxrss_mb']} MB"),
                      ("polled peak VmRSS / RssAnon / RssFile",
                       lambda r: f"{r['poll']['VmRSS_peak_mb']:.0f} / {r['poll']['RssAnon_peak_mb']:.0f} / "
                                 f"{r['poll']['RssFile_peak_mb']:.0f} MB"),
                      ("wall (s), load avg before -> after",
                       lambda r: f"{r['wall_s']} s, {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}"),
                      ("placement", lambda r: (r.get("placement") or {}).get("offload", "?")),
                      (f"below 3 x fp32 = {bound} MB", lambda r: ("PASS" if r["verdict"]["pass"] else "FAIL") +
                       (f" (killed at {r['killed_at_rss_mb']} MB)" if r.get("killed_at_rss_mb") else ""))):
        rows.append([label] + [fn(runs[m]) for m in methods])
    lines.append(table(rows, ["stage: seconds / peak RSS"] + methods))
    prof = res.get("probe_profile")
    if prof:
        lines += ["", f"LEMS probe profile ({prof['probe']['samples']} x {prof['probe']['seqlen']} tokens, "
                      f"{prof['threads']} threads, offload {prof['offload']}): setup {prof['setup']}"]
        for run in prof["probe_runs"]:
            lines.append(f"{run['threads']} thread(s), load {run['load']}")
            lines.append(table([[p["layer"], p["blocks_run"], p["total_s"], p["blocks_s"], p["vocab_pass_s"],
                                 p["final_s"], p["other_s"]] for p in run["rows"]],
                               ["layer", "blocks run", "total s", "blocks s", "vocab pass s", "final s", "other s"]))
            lines.append(f"extrapolated to all probes: {run['extrapolated']}")
        v = prof["vocab_pass_variants"]
        lines.append(table([[r["variant"], r["threads"], r["best_s"], r["seconds"],
                             r.get("max_abs_diff_vs_current", "")] for r in v["rows"]],
                           [f"vocabulary pass, {v['tokens']} tokens x {v['vocab']}", "threads", "best s", "runs s",
                            "max |diff| (lse)"]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    terminate_as_interrupt()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("gemma3", "llama"), default="gemma3")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ratio", type=kept_ratio, default=0.8)
    p.add_argument("--calib-samples", type=positive_int, default=None,
                   help="override the default 32 (recorded in the run's name)")
    p.add_argument("--offload", choices=("none", "cpu", "disk"), default=None,
                   help="a placement other than the default (auto); recorded in the run's name")
    p.add_argument("--models-dir", type=Path, default=Path("/tmp/svdpress-vocab"))
    p.add_argument("--out", type=results_file, default=RESULTS)
    p.add_argument("--kill-above", type=positive_number, default=14.0, help="GiB of RSS at which a run is stopped")
    p.add_argument("--no-probe-profile", action="store_true")
    p.add_argument("--probe-profile-only", action="store_true")
    p.add_argument("--report", action="store_true", help="print the table from --out and exit")
    p.add_argument("--save-reference", action="store_true", help=f"copy the JSON to {REFERENCE.relative_to(ROOT)}")
    p.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile-child", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:  # before the model is built and profiled
        if m not in METHODS:
            p.error(f"unknown method {m}; choose from {', '.join(METHODS)}")
    model_dir = a.models_dir / f"{a.arch}-270m-shape"

    if a.build_only:  # subprocess: the model is built and saved, then this process exits with its memory
        print(json.dumps(build_model(a.arch, model_dir)))
        return 0
    if a.profile_child is not None:
        _save(a.profile_child, probe_profile(model_dir, a))
        return 0
    try:
        res = read_json(a.out, "this bench's JSON (pass another --out)") if a.out.is_file() else {}
    except SvdpressError as e:
        raise SystemExit(f"error: {e}") from None
    if a.report:
        print(tables(res))
        return 0

    a.models_dir.mkdir(parents=True, exist_ok=True)
    built = subprocess.run([sys.executable, __file__, "--build-only", "--arch", a.arch,
                            "--models-dir", str(a.models_dir)], capture_output=True, text=True)
    if built.returncode != 0:
        print(built.stdout, built.stderr, file=sys.stderr)
        return 1
    info = json.loads(built.stdout.strip().splitlines()[-1])
    if res.get("model", {}).get("key") != info["key"]:
        res = {}  # another model: start over
    import torch

    bound_mb = round(3 * info["fp32_bytes"] / MiB, 1)
    res.update(model=info, bound_mb=bound_mb, model_dir=str(model_dir),
               machine={"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                        "mem_total_mb": round(_meminfo("MemTotal") / MiB)})
    res.setdefault("runs", {})
    work, logs = a.models_dir / "work", ROOT / "bench" / "results" / "logs"
    work.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    print(f"model {model_dir}: {info['params'] / 1e6:.1f}M params, fp32 {info['fp32_bytes'] / MiB:.0f} MB, "
          f"bound {bound_mb} MB", flush=True)

    if not a.probe_profile_only:
        for m in methods:
            rec = run_one(m, model_dir, work, logs, a)
            rec["calib_samples_override"] = a.calib_samples
            rec["offload_override"] = a.offload
            rec["verdict"] = verdict(rec, bound_mb)
            res["runs"][run_key(m, a)] = rec
            _save(a.out, res)
            print(f"  {run_key(m, a)}: rc {rec['returncode']}, {rec['wall_s']} s, "
                  f"maxrss {rec['verdict']['maxrss_mb']} MB, stage peak {rec['verdict']['stage_peak_mb']} MB -> "
                  f"{'PASS' if rec['verdict']['pass'] else 'FAIL'}", flush=True)
    if not a.no_probe_profile:
        side = work / "probe_profile.json"
        side.unlink(missing_ok=True)
        print(f"[{time.strftime('%H:%M:%S')}] LEMS probe profile", flush=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, __file__, "--arch", a.arch, "--models-dir", str(a.models_dir),
                        "--profile-child", str(side)], env=env)
        if side.is_file():
            res["probe_profile"] = json.loads(side.read_text())
            _save(a.out, res)
    print()
    print(tables(res))
    if a.save_reference:
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(a.out, REFERENCE)
        print(f"\ncopied to {REFERENCE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    run_bench(main)
