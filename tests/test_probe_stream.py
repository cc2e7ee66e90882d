"""The sensitivity probe on the runner: chunked losses equal the full-logits computation, a measurement costs the
blocks after the first truncated layer plus one pass over the vocabulary, and streaming from disk changes
nothing (sensitivities and LEMS ranks)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from svdpress.allocate import AllocationProblem, allocate
from svdpress.allocate.lems import LemsConfig
from svdpress.allocate.sensitivity import Probe, ProbeConfig, get_probe, layer_sensitivity, probe_config
from svdpress.errors import SvdpressError
from svdpress.model import Placement, Runner


def svd_spectra(model):
    from svdpress.factorize import spectrum_from_svd
    from svdpress.model import arch_map

    return {t.name: spectrum_from_svd(model.get_submodule(t.name).weight.detach().double())
            for t in arch_map(model).targets}


@pytest.mark.parametrize("variant", ["plain", "bias", "softcap"])
def test_chunked_probe_equals_full_logits(monkeypatch, variant):
    """KL (every token, τ) and NLL (next tokens) of a truncated model, over 4 vocabulary chunks, equal a direct
    computation from the model's full logits with the truncated weights written into it; with a head bias and
    with final-logit soft-capping (where the reference's logits are recomputed instead of its mean row)."""
    from conftest import make_llama

    V, tau, cap = 1000, 0.6, 3.0
    bias = torch.randn(V, generator=torch.Generator().manual_seed(1)) if variant != "plain" else None
    softcap = cap if variant == "softcap" else None
    direct, model = make_llama(V, seed=1, layers=3).double(), make_llama(V, seed=1, layers=3)
    spectra = svd_spectra(model)
    samples = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(0))
    head = Runner.head.fget
    monkeypatch.setattr(Runner, "head", property(
        lambda self: replace(head(self), elements=600, bias=bias, softcap=softcap)))
    cases = [{"model.layers.1.self_attn.v_proj": 3, "model.layers.2.mlp.down_proj": 10},
             {"model.layers.0.mlp.up_proj": 5}, {"model.layers.2.self_attn.q_proj": None}]
    with Runner(model, Placement(offload="none")) as runner:
        assert len(runner.head.spans(2 * 20)) == 4  # 256, 256, 256, 232
        p = AllocationProblem(runner.arch.shapes(), spectra, 0.5, runner=runner, samples=samples, progress=False)
        probe = Probe(p, ProbeConfig(samples=3, seqlen=20, temperature=tau, batch_size=2))  # batches of 2 and 1
        assert all((m is None) == (variant == "softcap") for _, _, m in probe.ref)
        got = [probe.loss(ranks) for ranks in cases]

    def losses(logits):
        logits = logits + (bias.double() if bias is not None else 0)  # float64: the exact values
        if softcap:
            logits = torch.tanh(logits / cap) * cap
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, V), samples[:, 1:].reshape(-1))
        return F.log_softmax(logits / tau, -1), float(nll)

    with torch.no_grad():
        ref_logp, ref_nll = losses(direct(samples).logits)
        assert probe.ref_nll == pytest.approx(ref_nll, rel=1e-5)
        for ranks, g in zip(cases, got):
            saved = {}
            for name, r in ranks.items():
                if r is not None:
                    w = direct.get_submodule(name).weight
                    saved[name] = w.clone()
                    w.copy_(spectra[name].weight(r))
            logp, nll = losses(direct(samples).logits)
            kl = float(F.kl_div(logp, ref_logp, log_target=True, reduction="sum")) / samples.numel()
            for name, w in saved.items():
                direct.get_submodule(name).weight.copy_(w)
            # float32 chunks vs a float64 reference: a KL of ~3e-4 carries ~1e-8 of float32 rounding (4e-5 of it
            # with soft-capping under transformers 5.24); a chunking error would be orders of magnitude larger
            assert g["kl"] == pytest.approx(kl, rel=1e-4)
            assert g["nll"] == pytest.approx(nll, rel=1e-5)
            assert g["dnll"] == pytest.approx(nll - ref_nll, rel=1e-3, abs=1e-6)
    assert got[0]["kl"] > 1e-3 and got[2] == {"kl": 0.0, "nll": probe.ref_nll, "dnll": 0.0}


def test_a_measurement_costs_the_blocks_after_the_layer_and_one_vocabulary_pass(tokenizer, calib, monkeypatch):
    """A layer of block b: blocks b..L−1 run once per batch, then one pass over the vocabulary (each head chunk
    fetched once per batch, one matmul), and nothing else (no embedding, no earlier block)."""
    from conftest import make_llama

    model = make_llama(len(tokenizer), layers=3)
    with Runner(model, Placement(offload="none")) as runner:
        p = AllocationProblem(runner.arch.shapes(), svd_spectra(model), 0.5, runner=runner, samples=calib,
                              progress=False)
        cfg = ProbeConfig(samples=6, seqlen=32, batch_size=4)  # two batches: 4 and 2 sequences
        probe = get_probe(p, cfg)
        probe.head = replace(probe.head, elements=600)  # two chunks: 256 + 44
        blocks, rows = [], []
        block, fetch = runner.block, probe._chunk.rows
        monkeypatch.setattr(runner, "block", lambda i, overrides=None: blocks.append(i) or block(i, overrides))
        monkeypatch.setattr(runner, "embed", lambda *a: pytest.fail("a measurement must not embed again"))
        monkeypatch.setattr(probe._chunk, "rows", lambda a, b: rows.append((a, b)) or fetch(a, b))
        for b in range(3):
            blocks.clear(), rows.clear()
            probe.loss({f"model.layers.{b}.mlp.down_proj": 8})
            assert blocks == list(range(b, 3))  # each block once, every batch inside it
            assert len(rows) == len(probe.head.spans(4 * 32)) + len(probe.head.spans(2 * 32)) == 4


def test_streaming_from_disk_gives_the_same_sensitivities_and_lems_ranks(tokenizer, calib):
    from conftest import make_llama

    opts = {"probe_samples": 3, "probe_seqlen": 32, "rank_multiple": 4}
    cfg = probe_config(LemsConfig(probe_samples=3, probe_seqlen=32))
    spectra, out = None, {}
    for mode in ("none", "disk"):
        model = make_llama(len(tokenizer), seed=0, layers=3)  # a fresh copy: the disk runner leaves it on meta
        spectra = spectra or svd_spectra(model)
        with Runner(model, Placement(offload=mode)) as runner:
            assert runner.offload == mode
            on_meta = all(t.device.type == "meta" for t in runner.blocks.parameters())
            assert on_meta == (mode == "disk")
            p = AllocationProblem(runner.arch.shapes(), spectra, 0.6, 4, opts, runner=runner, samples=calib,
                                  progress=False)
            sens = layer_sensitivity(p, (0.1,), cfg)  # what LEMS measures: allocate() reuses it
            out[mode] = sens.loss, allocate(p, "lems").ranks
    (s_none, r_none), (s_disk, r_disk) = out["none"], out["disk"]
    for name, per_f in s_none.items():
        for f, v in per_f.items():
            for key in ("kl", "nll"):
                assert s_disk[name][f][key] == pytest.approx(v[key], rel=1e-5), (name, f, key)
            assert s_disk[name][f]["dnll"] == pytest.approx(v["dnll"], rel=1e-3, abs=1e-6)
    assert r_disk == r_none and any(r is not None for r in r_none.values())


def test_methods_without_the_model_need_no_runner(tokenizer, calib):
    """LEMS without global importance needs only spectra (block from the name as a fallback); a method that
    measures the model says it needs the runner."""
    from conftest import make_llama

    model = make_llama(len(tokenizer), layers=3)
    spectra = svd_spectra(model)
    opts = {"global_importance": False, "rank_multiple": 4}
    with Runner(model, Placement(offload="none")) as runner:
        shapes = runner.arch.shapes()
        with_runner = allocate(AllocationProblem(shapes, spectra, 0.6, 4, opts, runner=runner), "lems").ranks
    without = allocate(AllocationProblem(shapes, spectra, 0.6, 4, opts), "lems").ranks
    assert without == with_runner
    assert allocate(AllocationProblem(shapes, spectra, 0.6, 4), "svd-llm-v2").ranks
    for method in ("lems", "atp", "asvd-threshold"):
        with pytest.raises(SvdpressError, match="runner"):
            allocate(AllocationProblem(shapes, spectra, 0.6, 4, samples=calib, progress=False), method)


def test_an_interrupted_sensitivity_pass_keeps_the_fractions_it_finished(tokenizer, calib, monkeypatch):
    """Measurements land in the problem cache one kept fraction at a time, each handed to `on_measured` (the
    matrix bench writes its probe file there): an interruption in the second fraction keeps the first, and a
    rerun on the kept entries measures only what is missing, to the same values as one uninterrupted pass."""
    from conftest import make_llama
    from svdpress.allocate.sensitivity import export_measurements, import_measurements

    model = make_llama(len(tokenizer), seed=0, layers=2)
    spectra = svd_spectra(model)
    cfg = ProbeConfig(samples=2, seqlen=16, batch_size=2)
    with Runner(model, Placement(offload="none")) as runner:
        def problem(cache, hook=None):
            return AllocationProblem(runner.arch.shapes(), spectra, 0.6, 1, {}, runner, calib, 0, False, cache,
                                     on_measured=hook)

        whole = layer_sensitivity(problem({}), (0.3, 0.6), cfg).loss
        kept: list[list[dict]] = []
        cache: dict = {}
        calls = {"n": 0}
        real = Probe.loss

        def dies_in_the_second_fraction(self, overrides):
            calls["n"] += 1
            if calls["n"] > len(spectra) + 1:
                raise KeyboardInterrupt
            return real(self, overrides)

        monkeypatch.setattr(Probe, "loss", dies_in_the_second_fraction)
        with pytest.raises(KeyboardInterrupt):
            layer_sensitivity(problem(cache, lambda: kept.append(export_measurements(cache))), (0.3, 0.6), cfg)
        assert len(kept) == 1 and [e["fraction"] for e in kept[0]] == [0.3]

        monkeypatch.setattr(Probe, "loss", real)
        resumed = problem(import_measurements(kept[-1]))
        counted = {"n": 0}
        monkeypatch.setattr(Probe, "loss", lambda self, o: (counted.__setitem__("n", counted["n"] + 1),
                                                            real(self, o))[1])
        again = layer_sensitivity(resumed, (0.3, 0.6), cfg).loss
    assert counted["n"] == len(spectra)  # only the 0.6 fraction was measured again
    for name in whole:
        for f in (0.3, 0.6):
            assert again[name][f]["kl"] == pytest.approx(whole[name][f]["kl"], rel=1e-9, abs=1e-12)
