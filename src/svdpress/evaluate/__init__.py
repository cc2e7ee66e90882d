"""Evaluation: perplexity here; zero-shot, speed and memory in sibling modules."""

from .perplexity import perplexity, text_perplexity

__all__ = ["perplexity", "text_perplexity"]
