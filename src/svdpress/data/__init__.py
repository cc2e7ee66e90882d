"""Calibration and evaluation text: named texts from installed packages or any local file."""

from .text import (TEXT_NAMES, TextPart, calibration_samples, evaluation_tokens, load_text, resolve_text,
                   split_text)

__all__ = ["TEXT_NAMES", "TextPart", "calibration_samples", "evaluation_tokens", "load_text", "resolve_text",
           "split_text"]
