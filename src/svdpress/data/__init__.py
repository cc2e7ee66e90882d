"""Calibration and evaluation text: named texts from installed packages or any local file, and mixtures of them."""

from .text import (TEXT_NAMES, TextPart, calibration_samples, check_sources, evaluation_tokens, load_text,
                   parse_sources, resolve_text, split_text)

__all__ = ["TEXT_NAMES", "TextPart", "calibration_samples", "check_sources", "evaluation_tokens", "load_text",
           "parse_sources", "resolve_text", "split_text"]
