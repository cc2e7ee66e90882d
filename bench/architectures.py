"""Every declared family (MoE included): time and peak memory of `compress` on its tiny config, and the round-trip status.

    python bench/architectures.py                               # every family, svd-llm + uniform at 0.6
    python bench/architectures.py --method kfac+lems --families phi3,gpt2
    python bench/architectures.py --split-fused                 # fused projections factored part by part
    python bench/architectures.py --compare-fused               # fused vs split: KL to the dense model

Each family's tiny random model is the one of tests/test_architectures.py (built from its config class, no hub:
hidden 32, 2 blocks, the test tokenizer's ~300-token vocabulary). It is compressed in this process with a small
calibration (4 × 32 tokens of the test corpus), exported, and loaded back with `svdpress.load` and with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Round trip "ok" means both loaded models give
the in-memory compressed model's logits to ≤ 1e-5 relative (fp32) and the manifest's model count equals the loaded
model's tensors; otherwise the first failure is recorded.

Seconds are the manifest's `timings_s.total` (load → export); peak memory is the manifest's overall CPU RSS peak of
this process (Python, torch and transformers included, so on models this small it is mostly the interpreter:
compare families by it, not with other benches). Results: a table, and bench/results/architectures.json
(git-ignored).

--compare-fused: for the families with fused projections (phi3, gpt_neox, gpt2) at hidden 64 / intermediate 128,
each fused layer factored as one matrix vs split into its parts (--split-fused), same method and ratio, calibrated
on 16 × 128 tokens of the test corpus; scored by the mean per-token KL(dense ‖ compressed) on 8 × 128 tokens of
another text of the same generator, and by the parameters kept. Written to bench/results/architectures_fused.json.
Random tiny models are a weak proxy for trained ones (GPT-2's initialization, std 0.02, barely moves the logits).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import svdpress  # noqa: E402
from svdpress.cli import bench_main, kept_ratio, method_pair, results_file  # noqa: E402
from svdpress.config import CompressConfig  # noqa: E402
from svdpress.export import write_json  # noqa: E402
from svdpress.table import table  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    from test_architectures import FAMILIES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma list of model types")
    p.add_argument("--method", type=method_pair, default="svd-llm+uniform", help="FACTORIZE+ALLOCATE")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="allocation method setting")
    p.add_argument("--ratio", type=kept_ratio, default=0.6)
    p.add_argument("--pivga", action="store_true")
    p.add_argument("--split-fused", action="store_true")
    p.add_argument("--lm-head", action="store_true", help="also factor untied LM heads")
    p.add_argument("--compare-fused", action="store_true", help="fused vs split fused projections (see above)")
    p.add_argument("--out", type=results_file, default=str(ROOT / "bench" / "results" / "architectures.json"))
    return p.parse_args(argv)


def round_trip(model_type: str, a: argparse.Namespace, tokenizer, text_file: str, work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from svdpress.cli import parse_opts
    from test_architectures import CALIB, build, direct_count, logits, rel

    fac, alloc = a.method.split("+")
    row = {"family": model_type, "method": a.method, "ratio": a.ratio, "pivga": a.pivga,
           "split_fused": a.split_fused}
    vocab = len(tokenizer)
    ids = torch.randint(3, vocab - 1, (2, 16), generator=torch.Generator().manual_seed(2))
    try:
        model = build(model_type, vocab)
        row["params"] = direct_count(model)
        out = work / model_type
        cfg = CompressConfig(factorize=fac, allocate=alloc, ratio=a.ratio, calib=text_file, pivga=a.pivga,
                             split_fused=a.split_fused, lm_head=a.lm_head, options=parse_opts(a.opt), out=str(out), progress=False,
                             **CALIB)
        compressed, report = svdpress.compress(model, cfg, tokenizer=tokenizer)
        row.update(seconds=report["timings_s"]["total"], peak_mb=report["memory"]["peak"].get("cpu_rss_peak_mb"),
                   linear_ratio=report["params"]["linear_ratio"], model_ratio=report["params"]["model_ratio"],
                   layers=len(report["layers"]))
        ref = logits(compressed, ids)
        loaded, _ = svdpress.load(str(out))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
        errs = {name: rel(logits(m.eval(), ids), ref) for name, m in (("svdpress", loaded), ("transformers", hf))}
        row["max_rel_err"] = max(errs.values())
        counts_ok = all(report["params"]["model_compressed"] == direct_count(m) for m in (loaded, hf))
        bad = [n for n, e in errs.items() if not e <= 1e-5]
        row["round_trip"] = ("ok" if not bad and counts_ok else
                             f"FAIL: logits differ via {', '.join(bad)}" if bad else "FAIL: parameter count")
    except Exception as e:  # a bench records the failure and goes on to the next family
        row["round_trip"] = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        row["traceback"] = traceback.format_exc(limit=3)
    return row


def compare_fused(a: argparse.Namespace, tokenizer, text_file: str) -> int:
    import test_architectures as T
    from conftest import make_text

    from svdpress.cli import parse_opts

    T.BASE.update(hidden_size=64, intermediate_size=128, head_dim=16)
    T.CONFIGS["gpt2"].update(n_embd=64, n_inner=128)
    ids = tokenizer(make_text(seed=5), return_tensors="pt").input_ids[:, :1024].view(8, 128)
    fac, alloc = a.method.split("+")

    def kl(model, dense) -> float:
        with torch.no_grad():
            p = torch.log_softmax(dense(input_ids=ids).logits.double(), -1)
            q = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    rows = []
    for t in ("phi3", "gpt_neox", "gpt2"):
        row = {"family": t, "method": a.method, "ratio": a.ratio}
        for split in (False, True):
            dense = T.build(t, len(tokenizer))
            cfg = CompressConfig(factorize=fac, allocate=alloc, ratio=a.ratio, calib=text_file, split_fused=split,
                                 options=parse_opts(a.opt), progress=False, calib_samples=16, calib_seqlen=128)
            c, r = svdpress.compress(T.build(t, len(tokenizer)), cfg, tokenizer=tokenizer)
            key = "split" if split else "fused"
            row[f"{key}_kept"], row[f"{key}_kl"] = r["params"]["linear_kept"], kl(c, dense)
        rows.append(row)
        print(f"{t}: fused KL {row['fused_kl']:.4f}, split KL {row['split_kl']:.4f}", file=sys.stderr, flush=True)
    print(table([[r["family"], r["fused_kept"], r["fused_kl"], r["split_kept"], r["split_kl"]] for r in rows],
                ["family", "fused kept", "fused KL", "split kept", "split KL"]))
    out = Path(a.out).with_name("architectures_fused.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"bench": "architectures --compare-fused", "settings": vars(a) | {"out": str(out)},
                     "results": rows})
    print(f"\nwritten {out}")
    return 0


def main(argv=None) -> int:
    from conftest import make_text, make_tokenizer

    a = parse_args(argv)
    if a.compare_fused:
        with tempfile.TemporaryDirectory(prefix="svdpress-arch-") as tmp:
            text_file = Path(tmp) / "corpus.txt"
            text_file.write_text(make_text())
            return compare_fused(a, make_tokenizer(text_file.read_text()), str(text_file))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="svdpress-arch-") as tmp:
        work = Path(tmp)
        text_file = work / "corpus.txt"
        text_file.write_text(make_text())
        tokenizer = make_tokenizer(text_file.read_text())
        rows = []
        for t in [x.strip() for x in a.families.split(",") if x.strip()]:
            t0 = time.perf_counter()
            rows.append(round_trip(t, a, tokenizer, str(text_file), work))
            print(f"{t}: {rows[-1]['round_trip']} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    head = ["family", "params", "targets", "compress s", "peak MiB", "linear ratio", "max rel err", "round trip"]
    print(table([[r["family"], r.get("params"), r.get("layers"), r.get("seconds"), r.get("peak_mb"),
                  r.get("linear_ratio"), r.get("max_rel_err"), r["round_trip"]] for r in rows], head))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"bench": "architectures", "svdpress_version": svdpress.__version__, "torch": torch.__version__,
           "transformers": __import__("transformers").__version__, "machine": platform.machine(),
           "threads": torch.get_num_threads(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "settings": {k: v for k, v in vars(a).items() if k != "out"}, "results": rows}
    write_json(out, doc)
    print(f"\nwritten {out}")
    return 0 if all(r["round_trip"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    bench_main(main)
