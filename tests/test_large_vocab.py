"""A 262,144-token vocabulary: kfac, fermigrad and lems never hold the logits of a whole batch.

The model is a tiny random Llama (hidden 32, 2 blocks, tied embeddings) whose weights are almost all embedding:
8.4M parameters, 34 MB in float32. One calibration batch of 4×64 tokens has 252 × 262,144 logits = 252 MB in
float32, seven times the weights; the backward pass and the log-softmax would add copies of the same size. Each
method runs through `svdpress.compress` in the default placement (the whole model resident, `offload="none"`,
the path of the "Reliability" issue), and the manifest's per-stage peak RSS must stay below

    bound = RSS before compress() + 3 × fp32 weights + 6 × (bytes of one vocabulary chunk) + 64 MB

(6 chunk-sized float32 temporaries: logits, exp, softmax × grad, ...; 64 MB: matplotlib's ranks.png at export,
allocator slack). The bound is checked to be *impossible* with full logits: it is below the weights plus two
full [tokens × vocabulary] float32 copies for the smallest batch any method sends to the head.

The vocabulary chunk is set to 2^20 logits (4 MB) through the runner's Head (`elements`). The default,
`svdpress.model.head.ELEMENTS` = 2^25 (128 MB), is sized for real models: at this scale it would put a whole
batch in two chunks, and no bound could tell chunked from unchunked. `test_unchunked_head_breaks_the_bound`
sets the chunk to the whole vocabulary and checks that the peak then exceeds the same bound. Measured by hand
(MB = MiB over the baseline; bound +184): chunked kfac +116 (at export, matplotlib), fermigrad +73, lems +50;
with one chunk kfac +821, fermigrad +812, lems +289, so each of the three runs below fails without chunking.

Torch runs on one thread here: ~500 chunk-sized ops per pass are cheap on one core but erratic with two OpenMP
threads on a shared, oversubscribed 2-core machine (the same pass measured 0.8–8 s). Memory is what is tested.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
from pathlib import Path

import pytest
import torch

import svdpress
from svdpress import CompressConfig
from svdpress.memory import MiB, rss
from svdpress.model.runner import Runner

VOCAB = 262144
CHUNK_ELEMENTS = 1 << 20  # logits per vocabulary chunk in these tests (4 MB of float32)
CHUNK_TEMPS = 6  # chunk-sized float32 temporaries allowed at once
SLACK = 64 * MiB
CALIB = dict(calib_samples=4, calib_seqlen=64, calib_batch_size=4)  # one batch: 4 × 63 = 252 predicted tokens
METHODS = {
    "kfac+uniform": {},
    "svd-llm+fermigrad": dict(steps=2, samples=4, seqlen=64, batch_size=4, r_min=2),  # 256 tokens per step
    "svd-llm+lems": dict(probe_samples=2, probe_seqlen=64, rank_multiple=4),  # 128 tokens per probe
}
MIN_TOKENS = 128  # the smallest number of tokens any of these runs sends to the head at once (lems' probe)


@pytest.fixture(scope="module")
def big_vocab_dir(tmp_path_factory, tokenizer):
    """(directory, fp32 weight bytes) of a tiny Llama with a 262,144-token vocabulary and the tests' tokenizer
    (ids < 300, all valid)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    weights = sum(p.numel() for p in model.parameters()) * 4  # tied: counted once
    d = tmp_path_factory.mktemp("vocab262k")
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    assert len(tokenizer) < VOCAB
    del model
    gc.collect()
    return str(d), weights


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _chunk(monkeypatch, elements: int) -> None:
    """Every Head the runner hands out (gradient pass, FermiGrad, the LEMS probe) uses `elements` per chunk."""
    original = Runner.head
    monkeypatch.setattr(Runner, "head", property(lambda self: dataclasses.replace(original.fget(self),
                                                                                  elements=elements)))


def _bound(base: int, weights: int) -> int:
    return base + 3 * weights + CHUNK_TEMPS * CHUNK_ELEMENTS * 4 + SLACK


def _compress(model_dir: str, text_file: str, method: str, out: Path) -> tuple[dict, int]:
    """(report, RSS just before compress())."""
    factorize, allocate = method.split("+")
    cfg = CompressConfig(model=model_dir, factorize=factorize, allocate=allocate, ratio=0.6, calib=text_file,
                         options=dict(METHODS[method]), out=str(out), progress=False, **CALIB)
    gc.collect()
    base = rss()
    _, report = svdpress.compress(None, cfg)
    return report, base


def _peak(report: dict) -> tuple[str, float]:
    """(stage, MiB) of the highest per-stage peak RSS in the manifest."""
    stages = report["memory"]["stages"]
    stage = max(stages, key=lambda s: stages[s]["cpu_rss_peak_mb"])
    return stage, stages[stage]["cpu_rss_peak_mb"]


def test_the_bound_rules_out_full_logits(big_vocab_dir):
    _, weights = big_vocab_dir
    full = MIN_TOKENS * VOCAB * 4  # one [tokens × vocabulary] float32 copy, smallest batch of these runs
    assert _bound(0, weights) < weights + 2 * full, "the bound would not catch materialized logits"


@pytest.mark.parametrize("method", list(METHODS))
def test_large_vocabulary_compresses_in_bounded_memory(big_vocab_dir, text_file, tmp_path, monkeypatch,
                                                       one_thread, method):
    model_dir, weights = big_vocab_dir
    _chunk(monkeypatch, CHUNK_ELEMENTS)
    out = tmp_path / "out"
    report, base = _compress(model_dir, text_file, method, out)

    assert report["placement"]["offload"] == "none"  # the default placement keeps this model resident
    stage, peak = _peak(report)
    bound = _bound(base, weights)
    assert peak * MiB < bound, (f"{method}: {stage} peaked at {peak:.0f} MB, bound {bound / MiB:.0f} MB "
                                f"(baseline {base / MiB:.0f} MB, weights {weights / MiB:.0f} MB)")
    assert set(report["timings_s"]) >= {"calibrate", "factorize", "allocate", "build", "export"}

    # finite results, and a model that was saved and loads back
    info = report["allocation"]
    for key in ("final_kl", "kl_fermigrad", "surrogate"):
        if key in info:
            assert math.isfinite(info[key]), (key, info[key])
    saved = json.loads((out / "svdpress.json").read_text())
    assert saved["memory"]["stages"] and saved["params"]["linear_ratio"] < 0.7
    model, _ = svdpress.load(str(out))
    with torch.no_grad():
        logits = model(torch.arange(1, 17)[None]).logits
    assert logits.shape == (1, 16, VOCAB) and torch.isfinite(logits).all()


def test_unchunked_head_breaks_the_bound(big_vocab_dir, text_file, tmp_path, monkeypatch, one_thread):
    """The same bound with the whole vocabulary in one chunk (what the head did before chunking): the gradient
    pass holds [252 × 262,144] logits and their softmax/gradient copies, and the bound fails."""
    model_dir, weights = big_vocab_dir
    _chunk(monkeypatch, 1 << 40)
    report, base = _compress(model_dir, text_file, "kfac+uniform", tmp_path / "out")
    stage, peak = _peak(report)
    assert stage == "calibrate_gradients"
    over = peak * MiB - base
    assert peak * MiB > _bound(base, weights), f"without chunks the peak was only {over / MiB:.0f} MB over the baseline"
    assert over > 2 * 252 * VOCAB * 4  # logits and at least one copy of them were resident at once
