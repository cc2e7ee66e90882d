"""Evaluation through the runner: perplexity equals the model's own logits, and every placement (resident,
CPU offload, disk streaming) gives the same numbers without moving the model."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from svdpress.config import EvalConfig
from svdpress.evaluate import evaluate, perplexity, text_perplexity
from svdpress.evaluate.perplexity import windows
from svdpress.model import Placement, Runner

ppl_module = importlib.import_module("svdpress.evaluate.perplexity")  # the attribute is the function


def model_perplexity(model, tokens: torch.Tensor, seqlen: int) -> float:
    """The reference: the model's own full logits, float32 cross-entropy, window by window."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows(tokens, seqlen):
            x = w[None]
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
            count += x.shape[1] - 1
    return math.exp(nll / count)


def tokens_with_tail(n: int = 700, vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))


def test_windows_keep_a_tail_of_two_tokens():
    ids = torch.arange(10)[None]
    assert [len(w) for w in windows(ids, 4)] == [4, 4, 2]
    assert [len(w) for w in windows(torch.arange(9)[None], 4)] == [4, 4]  # a 1-token tail predicts nothing


def test_perplexity_through_runner_equals_the_models_own_logits(tiny_model):
    toks = tokens_with_tail(700, tiny_model.config.vocab_size)
    ref = model_perplexity(tiny_model, toks, 128)
    with Runner(tiny_model, Placement(offload="none")) as runner:
        for bs in (1, 3):
            got = perplexity(runner, toks, 128, batch_size=bs, progress=False)
            assert got == pytest.approx(ref, rel=1e-6), bs


def test_placements_give_identical_perplexity(tiny_model, monkeypatch):
    """Several forward groups and several head passes: each block is streamed once per group, the head is
    read once per pass, and the numbers are the same bits whatever the placement."""
    monkeypatch.setattr(ppl_module, "GROUP_WINDOWS", 2)
    monkeypatch.setattr(ppl_module, "HEAD_BYTES", 3 * 128 * 64 * 4)
    toks = tokens_with_tail(700, tiny_model.config.vocab_size)
    ref = model_perplexity(tiny_model, toks, 128)
    got = {}
    for offload in ("none", "cpu", "disk"):
        model = copy.deepcopy(tiny_model)
        with Runner(model, Placement(offload=offload)) as runner:
            assert runner.offload == offload
            loads = []
            if offload == "disk":
                real = runner._load
                monkeypatch.setattr(runner, "_load", lambda name, dev: (loads.append(name), real(name, dev)))
            got[offload] = perplexity(runner, toks, 128, batch_size=1, progress=False)
            if offload == "disk":
                q = "model.layers.0.self_attn.q_proj.weight"
                assert loads.count(q) == 3  # 6 windows, 2 per group: block 0 read 3 times
                assert all(p.device.type == "meta" for p in model.model.layers.parameters())
    assert got["none"] == got["cpu"] == got["disk"]
    assert got["none"] == pytest.approx(ref, rel=1e-6)


def test_text_perplexity_and_evaluate_through_a_streamed_runner(tiny_model, tokenizer, text_file):
    with Runner(copy.deepcopy(tiny_model), Placement(offload="none")) as runner:
        dense = text_perplexity(runner, tokenizer, text_file, seqlen=1000, limit=600, progress=False)
    assert dense["seqlen"] == 256 and dense["tokens"] == 600  # capped at max_position_embeddings
    with Runner(tiny_model, Placement(offload="disk")) as runner:
        res = evaluate(runner, tokenizer, EvalConfig(ppl=(text_file,), seqlen=1000, limit=600), progress=False)
    assert set(res) == {"ppl"} and res["ppl"][text_file] == dense
