"""Remote code for svdpress checkpoints: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

This file and `lowrank.py` are copied next to every exported model and import only torch and transformers.
A checkpoint's config is the original architecture's config plus `svdpress.layers` ({name: {kind, rank}}).
Loading builds a subclass of the original architecture whose constructor swaps in empty factored layers; the
rest (meta-device init, safetensors, dtype, device_map, tied weights) is transformers' own `from_pretrained`.
svdpress's own loader (`svdpress.load`) calls the same `load_factored`, so both paths give the same model.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .lowrank import install_empty_layers

_CLASSES: dict = {}


def factored_class(base: type) -> type:
    """`base` (e.g. LlamaForCausalLM) with its target layers replaced by the checkpoint's factored layers."""
    if base not in _CLASSES:
        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            install_empty_layers(self, (getattr(config, "svdpress", None) or {}).get("layers", {}))

        _CLASSES[base] = type(f"Svdpress{base.__name__}", (base,), {"__init__": __init__})
    return _CLASSES[base]


def load_factored(path: str, *args, config=None, **kwargs):
    config = config if config is not None else AutoConfig.from_pretrained(path)
    if not getattr(config, "svdpress", None):
        raise ValueError(f"{path} is not an svdpress checkpoint (config.json has no 'svdpress' entry)")
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return factored_class(base).from_pretrained(path, *args, config=config, **kwargs)


class SvdpressForCausalLM(PreTrainedModel):
    """Entry point named in config.auto_map; `from_pretrained` returns the factored original architecture."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        kwargs.pop("trust_remote_code", None)
        return load_factored(pretrained_model_name_or_path, *args, config=config, **kwargs)
