"""A PivGa-aware budget (issue 13): the counting r·(m+n) − r², every allocator meeting it, the model it builds, and
rank files re-checked under the counting in force."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from svdpress.allocate import AllocationProblem, allocate
from svdpress.allocate.common import fit_budget, rank_at, slack_ok
from svdpress.allocate.record import plot_ranks, ranks_document
from svdpress.errors import SvdpressError
from svdpress.params import (CLASSICAL, PIVGA, Counting, LayerShape, break_even, count_params, dense_count,
                             factored_params, is_dense, layer_params, rank_for_params)

PROBE = {"probe_samples": 2, "probe_seqlen": 32}
FERMI = {"steps": 6, "samples": 4, "seqlen": 32, "batch_size": 2, "lr": 0.05, "r_min": 2, "top_k": 16}
METHODS = {  # fast settings (those of tests/test_allocate_more.py; measured fractions up to 0.9)
    "uniform": {},
    "lems": {**PROBE, "rank_multiple": 4},
    "asvd-threshold": {**PROBE, "fractions": [0.5, 0.9]},
    "mrcs": {**PROBE, "fractions": [0.5, 0.9]},
    "atp": {**PROBE, "beta_steps": 3},
    "svd-llm-v2": {},
    "fermigrad": FERMI,
}
SHAPES = [LayerShape(64, 64), LayerShape(32, 64), LayerShape(160, 64, True), LayerShape(576, 1536)]


# ---- the counting ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s", SHAPES)
def test_pivga_count_is_below_dense_for_every_rank_below_full(s):
    """r·(m+n) − r² = m·n − (m−r)(n−r): every r < min(m, n) is a saving, so break-even is min(m, n)."""
    bias = s.m if s.bias else 0
    assert break_even(s, pivga=True) == s.full_rank and PIVGA.break_even(s) == s.full_rank
    for r in range(1, s.full_rank):
        assert not is_dense(s, r, pivga=True)
        assert layer_params(s, r, pivga=True) == s.m * s.n - (s.m - r) * (s.n - r) + bias < s.dense
    assert layer_params(s, s.full_rank, pivga=True) == s.dense and is_dense(s, s.full_rank, pivga=True)
    # classical counting is unchanged: break-even ⌈m·n/(m+n)⌉
    assert CLASSICAL.break_even(s) == s.break_even == -(-s.m * s.n // (s.m + s.n))
    assert layer_params(s, s.break_even - 1) == (s.break_even - 1) * (s.m + s.n) + bias
    assert layer_params(s, s.break_even) == s.dense
    # the two agree up to r² below the classical break-even
    for r in (1, s.break_even // 2, s.break_even - 1):
        assert layer_params(s, r) - layer_params(s, r, pivga=True) == r * r


@pytest.mark.parametrize("counting", [CLASSICAL, PIVGA])
@pytest.mark.parametrize("s", SHAPES)
def test_rank_of_a_fraction_inverts_the_count(s, counting):
    for f in (0.05, 0.3, 0.6, 0.9):
        r = counting.rank_of_fraction(s, f)
        assert counting.fraction_of_rank(s, r) == pytest.approx(f, rel=1e-12)
        w = f * s.m * s.n
        assert factored_params(s, rank_for_params(s, w, counting.pivga), counting.pivga) == pytest.approx(w)
        if counting.pivga:  # the integer rank keeps at most f of the weights
            assert counting.factored(s, rank_at(s, f, 1, counting)) <= f * s.m * s.n
    assert PIVGA.rank_of_fraction(s, 1.0) == pytest.approx(s.full_rank)
    # a kept fraction is a higher rank under PivGa counting, past the classical break-even from f ≈ 3/4 (square)
    assert PIVGA.rank_of_fraction(s, 0.5) > CLASSICAL.rank_of_fraction(s, 0.5)


def test_smooth_fermigrad_count_is_the_pivga_count():
    """(Σ_j F_j)·(m+n) − (Σ_j F_j)², equal to the hard count as T → 0 for every rank below min(m, n)."""
    from svdpress.allocate.fermigrad import smooth_params

    s = LayerShape(64, 160, True)
    for r in (1, 20, s.break_even + 5, s.full_rank - 1):
        cold = smooth_params(torch.tensor(float(r), dtype=torch.float64), s, 1e-5, PIVGA)
        assert float(cold) == pytest.approx(layer_params(s, r, pivga=True), rel=1e-9)
    assert r > s.break_even  # ranks past the classical break-even are priced, not stored dense
    full = smooth_params(torch.tensor(s.full_rank + 1.0, dtype=torch.float64), s, 1e-5, PIVGA)
    assert float(full) == pytest.approx(s.dense, rel=1e-9)


# ---- every allocator under a PivGa budget --------------------------------------------------------------------

def svd_spectra(model):
    from svdpress.factorize import spectrum_from_svd
    from svdpress.model import arch_map

    return {t.name: spectrum_from_svd(model.get_submodule(t.name).weight.detach().double())
            for t in arch_map(model).targets}


def decaying_llama(vocab: int):
    """The tiny random Llama with spectra decaying as S_j = S_0·exp(−2j/N) and its final norm ×30. A random
    model's flat spectra and nearly uniform next-token distribution make the loss-measuring methods keep whole
    layers dense; real weights' spectra decay and real logits are peaked, which this imitates."""
    from conftest import make_llama

    from svdpress.model import arch_map

    model = make_llama(vocab, layers=2)
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)
        for t in arch_map(model).targets:
            w = model.get_submodule(t.name).weight
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
            w.copy_((U * (S[0] * torch.exp(-2.0 * torch.arange(len(S)) / len(S)))) @ Vh)
    return model


@pytest.fixture(scope="module")
def parts(tokenizer, text_file):
    from svdpress.data import calibration_samples
    from svdpress.model import Placement, Runner

    model = decaying_llama(len(tokenizer))
    samples, _ = calibration_samples(tokenizer, text_file, 4, 48, seed=0)
    spectra = svd_spectra(model)
    with Runner(model, Placement(offload="none")) as runner:
        yield runner, samples, spectra, runner.arch.shapes(), {}


def make_problem(parts, ratio, options=None, pivga=True, rank_multiple=4):
    runner, samples, spectra, shapes, cache = parts
    return AllocationProblem(shapes, spectra, ratio, rank_multiple, dict(options or {}), runner=runner,
                             samples=samples, progress=False, cache=cache, pivga=pivga)


@pytest.mark.parametrize("method", list(METHODS))
def test_allocator_meets_a_pivga_budget_and_passes_the_classical_break_even(parts, method):
    ratio = 0.8
    p = make_problem(parts, ratio, METHODS[method])
    a = allocate(p, method)
    kept = count_params(p.shapes, a.ranks, pivga=True)
    assert a.info["budget_counting"] == "pivga" and a.ranks.counting == PIVGA
    assert kept <= p.target
    if method == "uniform":  # each layer rounded down: less than one rank step a layer
        assert p.target - kept < sum(4 * (s.m + s.n) for s in p.shapes.values())
    else:
        assert slack_ok(p, a.ranks, 4), (kept, p.target)
    past = [n for n, r in a.ranks.items() if r is not None and r >= p.shapes[n].break_even]
    assert past, "no rank past the classical break-even: the PivGa budget was not spent on rank"
    # PivGa applied after a classical allocation of the same ratio leaves the r² a layer unspent
    classical = allocate(make_problem(parts, ratio, METHODS[method], pivga=False), method)
    assert classical.info["budget_counting"] == "classical"
    assert count_params(p.shapes, classical.ranks, pivga=True) < kept


def test_fit_budget_fills_past_the_classical_break_even(parts):
    p = make_problem(parts, 0.85)
    small = {n: 4 for n in p.shapes}
    ranks = fit_budget(p, small, 4, priority=lambda n: 0.0)
    assert slack_ok(p, ranks, 4)
    assert all(r is None or r < p.shapes[n].full_rank for n, r in ranks.items())
    assert any(r is not None and r >= p.shapes[n].break_even for n, r in ranks.items())


# ---- the model a PivGa budget builds -------------------------------------------------------------------------

def test_pivga_budget_model_matches_svd_at_its_ranks_and_round_trips(tiny_model, tokenizer, text_file, tmp_path):
    """Gauge-fixing the higher ranks changes no output: the PivGa model equals the SVD model at the same ranks;
    the export loads back with identical logits, and the manifest's counts are the loaded model's parameters."""
    import svdpress
    from svdpress.config import CompressConfig
    from svdpress.export import read_manifest
    from svdpress.lowrank import PivGaLinear
    from svdpress.model import Placement, Runner
    from svdpress.params import model_params
    from svdpress.pipeline import build

    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(3))
    # 1. same ranks, SVD vs PivGa (plain SVD spectra: no calibration needed for this)
    spectra = svd_spectra(tiny_model)
    outs = {}
    for pivga in (False, True):
        model = copy.deepcopy(tiny_model)
        with Runner(model, Placement(offload="none")) as runner:
            p = AllocationProblem(runner.arch.shapes(), spectra, 0.8, 1, {}, pivga=True, progress=False)
            ranks = allocate(p, "uniform").ranks
            assert any(r >= p.shapes[n].break_even for n, r in ranks.items())
            build(runner, spectra, ranks, pivga=pivga, progress=False)
        with torch.no_grad():
            outs[pivga] = model(input_ids=ids).logits
    scale = outs[False].abs().max()
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=1e-5 * float(scale))

    # 2. through compress(), export and load
    out = tmp_path / "piv"
    cfg = CompressConfig(ratio=0.8, calib=text_file, calib_samples=4, calib_seqlen=32, progress=False, pivga=True,
                         allocate="svd-llm-v2", rank_multiple=2, out=str(out))
    dense_total = model_params(tiny_model)
    model, report = svdpress.compress(tiny_model, cfg, tokenizer=tokenizer)
    loaded, _ = svdpress.load(str(out))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    man = read_manifest(out)
    assert man["allocation"]["budget_counting"] == "pivga" and man["pivga"]
    direct = sum(sum(t.numel() for t in loaded.get_submodule(n).parameters()) for n in man["layers"])
    assert man["params"]["linear_kept"] == direct <= int(0.8 * man["params"]["linear_dense"])
    assert man["params"]["model_compressed"] == model_params(loaded) == dense_total - (
        man["params"]["linear_dense"] - direct)
    for name, e in man["layers"].items():
        layer = loaded.get_submodule(name)
        assert e["params"] == sum(t.numel() for t in layer.parameters())
        assert e["rank"] is None or (type(layer) is PivGaLinear and layer.rank == e["rank"])
    assert any(e["rank"] is not None and e["rank"] >= LayerShape(*e["shape"]).break_even
               for e in man["layers"].values())
    doc = json.loads((out / "ranks.json").read_text())
    assert doc["budget_counting"] == "pivga"
    assert doc["ratio"]["achieved"] == pytest.approx(man["ratio"]["achieved"])


# ---- rank files re-checked under the counting in force ---------------------------------------------------------

def write(tmp_path, doc, name):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def test_ranks_document_records_its_counting(parts):
    p = make_problem(parts, 0.8, METHODS["svd-llm-v2"])
    ranks = allocate(p, "svd-llm-v2").ranks
    doc = ranks_document("svd-llm-v2", p.shapes, ranks, 0.8)  # the counting comes with the ranks
    assert doc["budget_counting"] == "pivga"
    assert doc["ratio"]["achieved"] == count_params(p.shapes, ranks, pivga=True) / dense_count(p.shapes) <= 0.8
    assert ranks_document("x", p.shapes, dict(ranks), 0.8, pivga=False)["budget_counting"] == "classical"
    assert plot_ranks(doc)[:4] == b"\x89PNG"


def test_pivga_rank_file_loaded_without_pivga_breaks_the_budget_clearly(parts, tmp_path):
    p = make_problem(parts, 0.8, METHODS["svd-llm-v2"])
    ranks = allocate(p, "svd-llm-v2").ranks
    doc = ranks_document("svd-llm-v2", p.shapes, ranks, 0.8)
    path = write(tmp_path, doc, "pivga.json")
    # with --pivga: the same ranks
    assert allocate(make_problem(parts, 0.8, {"ranks": path}), "load").ranks == ranks
    # without: its layers past the classical break-even would be dense
    legacy = dict(doc)
    del legacy["budget_counting"]  # a file that does not say: inferred from its ranks
    for name, d in (("pivga.json", doc), ("legacy.json", legacy)):
        path = write(tmp_path, d, name)
        with pytest.raises(SvdpressError) as e:
            allocate(make_problem(parts, 0.8, {"ranks": path}, pivga=False), "load")
        msg = str(e.value)
        assert "\n" not in msg and "classical counting" in msg and "pass --pivga" in msg
        assert "past the classical break-even" in msg


def test_classical_rank_file_is_rechecked_under_pivga_counting(parts, tmp_path):
    p = make_problem(parts, 0.6, METHODS["svd-llm-v2"], pivga=False)
    ranks = allocate(p, "svd-llm-v2").ranks
    path = write(tmp_path, ranks_document("svd-llm-v2", p.shapes, ranks, 0.6), "classical.json")
    loaded = allocate(make_problem(parts, 0.6, {"ranks": path}), "load")  # r² a layer smaller: it fits
    assert loaded.ranks == ranks and loaded.info["file_budget_counting"] == "classical"
    pivga_ratio = count_params(p.shapes, ranks, pivga=True) / dense_count(p.shapes)
    with pytest.raises(SvdpressError, match="PivGa counting.*it was allocated under classical counting") as e:
        allocate(make_problem(parts, pivga_ratio - 0.01, {"ranks": path}), "load")
    assert "\n" not in str(e.value)
    suggested = float(re.search(r"--ratio of at least ([0-9.]+)", str(e.value)).group(1))
    assert allocate(make_problem(parts, suggested, {"ranks": path}), "load").ranks == ranks  # and it works


def test_cli_pivga_rank_file_without_pivga_is_one_line(tiny_model_dir, text_file, tmp_path, capsys, monkeypatch):
    import svdpress.pipeline as pipeline
    from svdpress.cli import main

    common = ["--model", tiny_model_dir, "--calib", text_file, "--calib-samples", "4", "--calib-seqlen", "32",
              "--ratio", "0.8", "--rank-multiple", "4", "--no-progress", "--device", "cpu"]
    assert main(["compress", *common, "--pivga", "--out", str(tmp_path / "a")]) == 0
    ranks_file = str(tmp_path / "a" / "ranks.json")
    capsys.readouterr()
    with monkeypatch.context() as m:  # the budget is checked before any calibration
        m.setattr(pipeline, "factorize_model", lambda *a, **k: pytest.fail("calibrated before the budget check"))
        assert main(["compress", *common, "--ranks", ranks_file]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --pivga" in err and "Traceback" not in err
    assert main(["compress", *common, "--pivga", "--ranks", ranks_file, "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "ranks.json").read_text()) for d in "ab")
    assert a["layers"] == b["layers"] and b["budget_counting"] == "pivga"
