"""svdpress: compress causal LMs by (data-aware) low-rank factorization, and measure what it cost.

Public API:
    model, report = svdpress.compress("default", svdpress.CompressConfig(ratio=0.8))
    model = svdpress.load("out/smol80")
    results = svdpress.evaluate(model_or_dir, svdpress.EvalConfig(ppl=("wiki",)))
    model, report = svdpress.heal("out/smol80", svdpress.HealConfig(steps=100, out="out/smol80-healed"))
"""

__version__ = "0.1.0"

from .config import CompressConfig, EvalConfig, HealConfig  # noqa: E402
from .errors import SvdpressError  # noqa: E402


from . import evaluate as _evaluate_package  # noqa: E402,F401  (loaded first: the function below keeps its name)


def compress(model_or_id=None, config=None, tokenizer=None, **overrides):
    """Compress a model; see `svdpress.pipeline.compress`."""
    from .pipeline import compress as _compress

    return _compress(model_or_id, config, tokenizer=tokenizer, **overrides)


def load(path: str, dtype: str = "float32", device: str = "cpu", compile: bool = False,
         compile_mode: str | None = None):
    """Load a compressed (or any) model directory; returns (model, tokenizer). `compile=True` compiles its
    forward with torch.compile (`compile_mode` e.g. "reduce-overhead" for CUDA graphs in decode); where the
    compiler is unavailable it warns in one line and returns the model uncompiled (see compiled.py)."""
    from .config import torch_dtype
    from .models import load_model

    model, tokenizer, _ = load_model(path, torch_dtype(dtype), device)
    if compile:
        from .compiled import compile_model

        model, _ = compile_model(model, compile_mode)
    return model, tokenizer


def evaluate(model_or_path, config=None, tokenizer=None, device: str = "auto"):
    """Evaluate a model (loaded, or a path/id) with an EvalConfig; returns a dict of results."""
    from .config import resolve_device
    from .pipeline import evaluate_model

    config = config or EvalConfig()
    if isinstance(model_or_path, str):
        model_or_path, tokenizer = load(model_or_path)
    return evaluate_model(model_or_path, tokenizer, config, resolve_device(device))


from . import heal as _heal_module  # noqa: E402,F401  (loaded first: the function below keeps its name)


def heal(model_or_dir, config=None, tokenizer=None, teacher=None, monitor=None, **overrides):
    """Heal a compressed model (directory or loaded) by distillation from its dense original; see `svdpress.heal`
    (the module). Returns (model, report)."""
    from .heal import heal as _heal

    return _heal(model_or_dir, config, tokenizer=tokenizer, teacher=teacher, monitor=monitor, **overrides)


__all__ = ["CompressConfig", "EvalConfig", "HealConfig", "SvdpressError", "compress", "load", "evaluate", "heal",
           "__version__"]
