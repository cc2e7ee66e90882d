"""torch.compile with a fallback (issue 13): a compiled model gives the same logits; where the compiler fails,
one warning and the uncompiled model, never an error. Inductor itself takes ~20 s per model on 2 cores, so the
plumbing is tested with dynamo's "eager" backend (the same graph capture, no code generation)."""

from __future__ import annotations

import warnings

import pytest
import torch

from svdpress.compiled import compile_model
from svdpress.errors import SvdpressError
from svdpress.lowrank import LowRankLinear, set_module


def _factored(model):
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and name.endswith("mlp.down_proj"):
            W = m.weight.detach().double()
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            r = 8
            set_module(model, name, LowRankLinear.from_factors((U[:, :r] * S[:r]).float(), Vh[:r].float()))
    return model


def test_compiled_factored_model_gives_the_same_logits(tiny_model):
    model = _factored(tiny_model).eval()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    original = model.forward
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning when it compiles
        model, why = compile_model(model, backend="eager")
    assert why is None and model.forward is not original
    with torch.no_grad():
        out = model(ids).logits
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_failing_compiler_falls_back_with_one_warning(tiny_model, monkeypatch):
    model = tiny_model.eval()
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    original = model.forward

    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("Cannot find a working triton installation\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning) as rec:
        model, why = compile_model(model)
    assert len(rec) == 1 and "compile unavailable" in str(rec[0].message) and "triton" in str(rec[0].message)
    assert "\n" not in str(rec[0].message) and "triton" in why
    assert model.forward == original  # restored: the model runs as before
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_load_with_compile_falls_back(tiny_model_dir, monkeypatch):
    import svdpress

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (_ for _ in ()).throw(RuntimeError("no C++ compiler")))
    with pytest.warns(UserWarning, match="compile unavailable.*no C\\+\\+ compiler"):
        model, tok = svdpress.load(tiny_model_dir, compile=True)
    ids = tok("the river city", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_unknown_mode_is_a_user_error(tiny_model):
    with pytest.raises(SvdpressError, match="reduce-overhead"):
        compile_model(tiny_model, mode="fastest")
