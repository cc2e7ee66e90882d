"""Inference speed and memory of dense vs low-rank (SVD) vs PivGa models: prefill and greedy decoding.

    PYTHONPATH=src python bench/speed.py --ratios 0.8,0.6 --repeats 5 --device auto --dtype bfloat16
    PYTHONPATH=src python bench/speed.py --models out/smol80,out/smol80-pivga      # saved compressed models
    PYTHONPATH=src python bench/speed.py --shape llama-3-8b --ratios 0.6 --device cuda --dtype bf16 \
        --decode-batches 1,16 --compile                                          # a real shape, no download

`--shape NAME` builds a random-weight model from a published config (SHAPES: SmolLM2-135M, Llama-3.2-1B,
Llama-3-8B, Qwen3-8B, Mistral-7B) directly on the device in the measured dtype, with Gaussian factors of the
allocated ranks (`--factorize random`): speed and memory do not depend on the values, so no download and no
calibration are needed.

Spectra are computed once (one calibration), and every ratio is built from a fresh copy of the dense weights;
the PivGa variant of a ratio is the same factors gauge-fixed (`apply_pivga`), so the pair differs only in the
layer type. All variants stay resident and are measured interleaved (repeat → variant), so slow drifts of a
shared machine hit every variant alike; each figure is the median over --repeats runs after one warmup.

Prefill: forward over batch × seqlen random tokens with `logits_to_keep=1` (what serving does: only the last
position's logits), tokens/s = batch·seqlen / time. Decode: a 32-token prompt, then --new-tokens greedy steps
with the KV cache (a static cache by default, as compiled serving uses; `--cache dynamic` for transformers'
default), at each --decode-batches size, tokens/s = batch · new tokens / time of the steps. `--compile` compiles
every variant (`svdpress.compiled.compile_model`; `--compile-mode reduce-overhead` for CUDA graphs), falling
back with one line where the compiler is unavailable; the JSON records what ran. Memory: weights (parameters + buffers, tied
tensors once) and peak = weights + the run's working memory (GPU: max_memory_allocated above the resident
baseline; CPU: peak RSS sampled by psutil during the run above the RSS before it — allocator reuse can hide
some of it, so CPU peaks are approximate).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from svdpress.cli import (bench_main, count_list, count_or_zero, positive_int,  # noqa: E402
                          ratio_list, results_file, shape_list)
from svdpress.config import resolve_device, torch_dtype  # noqa: E402
from svdpress.errors import SvdpressError  # noqa: E402
from svdpress.export import write_json  # noqa: E402
from svdpress.table import table  # noqa: E402

DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# published configs (the model cards' config.json), for random-weight models of real shapes
SHAPES: dict[str, tuple[str, dict]] = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True)),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                   max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True)),
    "llama-3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                 max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)),
    "qwen3-8b": ("qwen3", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                               max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=False)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                   max_position_embeddings=32768, rope_theta=1000000.0, sliding_window=None,
                                   tie_word_embeddings=False)),
}


def shape_model(name: str, device: str, dtype: torch.dtype) -> nn.Module:
    """A random-weight model of a published shape, built directly on `device` in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kw = SHAPES[name]
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Working memory of one run above the resident baseline (GPU allocator stats, or sampled CPU RSS)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self):
        sync(self.device)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                import psutil
            except ImportError:
                self.proc = None
                return self
            self.proc, self.base, self.stop = psutil.Process(), psutil.Process().memory_info().rss, False
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        sync(self.device)
        if self.device.startswith("cuda"):
            self.peak = torch.cuda.max_memory_allocated() - self.base
        elif self.proc is not None:
            self.stop = True
            self.thread.join()
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
        return False


def weight_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def prefill(model: nn.Module, ids: torch.Tensor) -> None:
    model(input_ids=ids, use_cache=False, logits_to_keep=1)


def decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: str, static: bool = True) -> float:
    """Greedy decoding with the KV cache; returns the seconds of the `new_tokens` steps (prompt excluded)."""
    past = None
    if static:
        from transformers import StaticCache

        past = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens)
    out = model(input_ids=prompt, past_key_values=past, use_cache=True, logits_to_keep=1)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync(device)
    t = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync(device)
    return time.perf_counter() - t


def measure(variants: dict[str, nn.Module], name: str, run: Callable[[nn.Module], float], tokens: int,
            repeats: int, device: str) -> dict[str, dict]:
    """tokens/s (median of `repeats`, interleaved across variants) and peak memory of one workload."""
    times: dict[str, list[float]] = {v: [] for v in variants}
    peaks: dict[str, int] = {v: 0 for v in variants}
    with torch.inference_mode():
        for v, m in variants.items():  # warmup: kernels, allocator, caches
            run(m)
        for i in range(repeats):
            for v, m in variants.items():
                with PeakMemory(device) as pm:
                    times[v].append(run(m))
                peaks[v] = max(peaks[v], pm.peak)
            print(f"  {name}: repeat {i + 1}/{repeats}", file=sys.stderr, flush=True)
    return {v: {"tokens_per_s": tokens / statistics.median(ts), "seconds": ts,
                "peak_mb": (peaks[v] + weight_bytes(variants[v])) / 2**20} for v, ts in times.items()}


def timed(fn: Callable[[], None], device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


class RandomSpectrum:
    """`--factorize random`: speed does not depend on the factor values, so a random-weight model of a large
    shape (e.g. Llama-3.2-1B on a CPU, where 112 SVDs of 8192×2048 would take half an hour) gets Gaussian
    factors of the ranks asked for, generated per layer from its own seed, and descending singular values for
    the allocator. Only the speed and memory columns mean anything for such variants."""

    def __init__(self, m: int, n: int, seed: int) -> None:
        self.m, self.n, self.seed, self.note = m, n, seed, ""
        self.S = torch.linspace(1.0, 1e-3, min(m, n), dtype=torch.float64)

    @property
    def full_rank(self) -> int:
        return self.S.numel()

    def tail_energy(self, r: int) -> float:
        return float((self.S[r:] ** 2).sum())

    def factors(self, r: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        A = torch.randn(self.m, r, generator=g) / self.m ** 0.5
        B = torch.randn(r, self.n, generator=g) / self.n ** 0.5
        return A.to(dtype), B.to(dtype)


def build_variants(a: argparse.Namespace, device: str) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """dense + {svd, pivga} at every ratio, from one calibration; or dense + the given saved models."""
    from svdpress.allocate import AllocationProblem, allocate
    from svdpress.export import read_manifest
    from svdpress.model import Placement, Runner
    from svdpress.models import find_targets, load_model
    from svdpress.params import count_params, dense_count
    from svdpress.pipeline import Timer, build, factorize_model
    from svdpress.pivga import apply_pivga

    if a.shape:
        dense = shape_model(a.shape, device, a.build_dtype)
    else:
        dense, tok, _ = load_model(a.model, torch.float32, "cpu")
    variants, info = {"dense": dense}, {"dense": {"linear_ratio": 1.0}}
    if a.models:
        for d in a.models:
            man = read_manifest(d)
            m, _, _ = load_model(d, torch.float32, "cpu")
            key = f"{'pivga' if man.get('pivga') else man.get('factorize', 'svd')}@{man['ratio']['target']}"
            variants[key], info[key] = m, {"linear_ratio": man["params"]["linear_ratio"], "dir": d}
        return variants, info
    from svdpress.data import calibration_samples

    shapes = {t.name: t.shape for t in find_targets(dense)}
    if a.factorize == "random":
        samples, spectra = None, {n: RandomSpectrum(s.m, s.n, i) for i, (n, s) in enumerate(shapes.items())}
    else:
        samples, _ = calibration_samples(tok, a.calib, a.calib_samples, a.calib_seqlen, 0)
        t = time.perf_counter()
        with Runner(dense, Placement(device=device, offload="none")) as r:
            spectra = factorize_model(r, samples, a.factorize, Timer(), progress=not a.no_progress)
        print(f"spectra in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    for ratio in a.ratios:
        m = copy.deepcopy(dense)
        with Runner(m, Placement(device=device, offload="none")) as r:
            alloc = allocate(AllocationProblem(shapes, spectra, ratio, 1, {}, r, samples, 0, False), a.allocate)
            build(r, spectra, alloc.ranks, progress=False)
        variants[f"svd@{ratio}"] = m
        info[f"svd@{ratio}"] = {"linear_ratio": count_params(shapes, alloc.ranks) / dense_count(shapes)}
        if a.pivga:
            p = copy.deepcopy(m)
            rep = apply_pivga(p, progress=False)
            variants[f"pivga@{ratio}"] = p
            info[f"pivga@{ratio}"] = {"linear_ratio": count_params(shapes, alloc.ranks, True) / dense_count(shapes),
                                      "absorbed": len(rep["absorbed"]), "layers": len(rep["per_layer"])}
    return variants, info


def check_lossless(variants: dict[str, nn.Module], info: dict[str, dict], length: int = 64) -> None:
    """float32 logits of each PivGa model vs its SVD twin on random tokens: relative difference (≈ rounding)."""
    ids = torch.randint(0, variants["dense"].config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for v, m in variants.items():
            twin = variants.get(v.replace("pivga@", "svd@")) if v.startswith("pivga@") else None
            if twin is not None:
                x = ids.to(next(m.parameters()).device)
                ref, got = twin(input_ids=x).logits.float(), m(input_ids=x).logits.float()
                info[v]["logits_rel_diff_vs_svd"] = float((got - ref).norm() / ref.norm())
                print(f"{v}: logits relative difference vs svd {info[v]['logits_rel_diff_vs_svd']:.2e}",
                      file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="a random-weight model of this published shape instead of --model (implies --factorize random)")
    p.add_argument("--models", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="saved compressed model directories to measure instead of building variants")
    p.add_argument("--ratios", type=ratio_list, default="0.8,0.6")
    p.add_argument("--factorize", default="svd-llm",
                   help="a factorizer, or `random`: Gaussian factors, for speed on large random-weight shapes")
    p.add_argument("--allocate", default="uniform")
    p.add_argument("--no-pivga", dest="pivga", action="store_false")
    p.add_argument("--calib", default="wiki")
    p.add_argument("--calib-samples", type=positive_int, default=8,
                   help="speed does not depend on the factor values; few samples keep the one calibration short")
    p.add_argument("--calib-seqlen", type=positive_int, default=512)
    p.add_argument("--prefill", type=shape_list, default=[(1, 512), (8, 512), (1, 4096)],
                   help="BATCHxSEQLEN,... (empty string: skip)")
    p.add_argument("--new-tokens", type=count_or_zero, default=128, help="greedy decoding steps (0: skip)")
    p.add_argument("--decode-batches", type=count_list, default=[1],
                   help="decode batch sizes, e.g. 1,16")
    p.add_argument("--cache", choices=("static", "dynamic"), default="static", help="KV cache for decoding")
    p.add_argument("--compile", action="store_true", help="torch.compile every variant (falls back with a warning)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--prompt-len", type=positive_int, default=32)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="float32 | float16/fp16 | bfloat16/bf16 (default: bf16 on GPU)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=results_file, default="bench/results/speed.json")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.shape:
        a.factorize = "random"  # no real weights to calibrate on: Gaussian factors of the allocated ranks
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:  # the methods, device and dtype before any model is built
        from svdpress.allocate import check_options
        from svdpress.factorize import FACTORIZERS

        if a.factorize != "random" and not a.shape:
            FACTORIZERS[a.factorize]
        check_options(a.allocate, {})
        device = resolve_device(a.device)
        dtype_name = DTYPE_ALIASES.get(a.dtype, a.dtype) or ("bfloat16" if device.startswith("cuda") else "float32")
        dtype = torch_dtype(dtype_name)
    except SvdpressError as e:
        raise SystemExit(f"error: {e}") from None
    a.build_dtype = dtype  # --shape models are built on the device in the measured dtype (an 8B in fp32 is 32 GB)
    torch.manual_seed(0)
    variants, info = build_variants(a, device)
    check_lossless(variants, info)
    for m in variants.values():
        m.to(device=device, dtype=dtype).eval()
    compiled = {}
    if a.compile:
        from svdpress.compiled import compile_model

        for v, m in variants.items():
            variants[v], why = compile_model(m, a.compile_mode)
            compiled[v] = "compiled" if why is None else f"uncompiled: {why}"
    vocab = variants["dense"].config.vocab_size
    g = torch.Generator().manual_seed(0)
    results: dict[str, dict] = {v: {"weights_mb": weight_bytes(m) / 2**20, **info[v]} for v, m in variants.items()}
    for b, L in a.prefill:
        ids = torch.randint(0, vocab, (b, L), generator=g).to(device)
        key = f"prefill_{b}x{L}"
        r = measure(variants, key, lambda m: timed(lambda: prefill(m, ids), device), b * L, a.repeats, device)
        for v in variants:
            results[v][key] = r[v]
    for b in (a.decode_batches if a.new_tokens else []):
        prompt = torch.randint(0, vocab, (b, a.prompt_len), generator=g).to(device)
        key = f"decode_{b}x{a.new_tokens}"
        r = measure(variants, key, lambda m: decode(m, prompt, a.new_tokens, device, a.cache == "static"),
                    b * a.new_tokens, a.repeats, device)
        for v in variants:
            results[v][key] = r[v]
    doc = {"device": device, "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
           "dtype": dtype_name, "threads": torch.get_num_threads(), "repeats": a.repeats,
           "model": a.shape or a.model, "factorize": a.factorize, "allocate": a.allocate, "cache": a.cache,
           "compile": compiled or None, "results": results}
    add_ratios(doc)
    print(render(doc))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(a.json), doc)
    print(f"\nwrote {a.json}")
    return 0


def workloads(doc: dict) -> list[str]:
    return [k for k, v in doc["results"]["dense"].items() if isinstance(v, dict)]


def add_ratios(doc: dict) -> None:
    """Per workload: tokens/s relative to dense, and PivGa relative to the SVD model of the same ratio."""
    res = doc["results"]
    for w in workloads(doc):
        base = res["dense"][w]["tokens_per_s"]
        for v, r in res.items():
            r[w]["vs_dense"] = r[w]["tokens_per_s"] / base
            twin = v.replace("pivga@", "svd@") if v.startswith("pivga@") else None
            if twin in res:
                r[w]["vs_svd"] = r[w]["tokens_per_s"] / res[twin][w]["tokens_per_s"]


def render(doc: dict) -> str:
    rows = []
    for v, r in doc["results"].items():
        row = [v, f"{r['linear_ratio']:.3f}", f"{r['weights_mb']:.1f}"]
        for w in workloads(doc):
            x = r[w]
            rel = f"{x['vs_dense']:.2f}x" + (f", {x['vs_svd']:.2f}x svd" if "vs_svd" in x else "")
            row += [f"{x['tokens_per_s']:.0f} ({rel})", f"{x['peak_mb']:.1f}"]
        rows.append(row)
    head = ["model", "linear ratio", "weights MB"]
    for w in workloads(doc):
        head += [f"{w} tok/s (vs dense, vs svd)", "peak MB"]
    title = f"device {doc['device']} {doc['gpu'] or ''} dtype {doc['dtype']} threads {doc['threads']}, " \
            f"median of {doc['repeats']}"
    return title + "\n" + table(rows, head)


if __name__ == "__main__":
    bench_main(main)
