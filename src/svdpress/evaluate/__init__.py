"""Evaluation through the model runner: perplexity and the whole evaluation (`evaluate`) here; zero-shot, speed
and memory in sibling modules."""

from .perplexity import perplexity, text_perplexity
from .run import evaluate

__all__ = ["evaluate", "perplexity", "text_perplexity"]
