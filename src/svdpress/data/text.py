"""Named texts (wiki, c4, tiny, code, ...) and their disjoint calibration / evaluation halves.

The embedded defaults are the calibration texts that the PyPI package `exllamav2` ships. We only need its data
files, and importing it would compile a CUDA extension, so the files are located with `importlib.util.find_spec`,
which finds a top-level package without executing it.

Every text is cut once, at a paragraph boundary near its middle: the first half feeds calibration, the second
half evaluation, so a perplexity is never measured on text the compression has seen.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SvdpressError

TEXT_NAMES = ("wiki", "c4", "tiny", "code", "multilingual", "technical")
_PACKAGE_DIR = ("exllamav2", "conversion/standard_cal_data")
MIN_ARTICLE_WORDS = 100  # wiki stubs shorter than this are dropped: they are mostly lists and infobox residue


@dataclass(frozen=True)
class TextPart:
    """Which part of which text was used; recorded in manifests and printed with every figure."""

    name: str
    part: str  # "calib" (first half) or "eval" (second half)
    chars: int

    def describe(self) -> str:
        half = "first half" if self.part == "calib" else "second half"
        return f"{self.name} ({half}, {self.chars:,} chars)"


def _package_data_dir() -> Path:
    pkg, sub = _PACKAGE_DIR
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise SvdpressError(f"named texts need the package {pkg!r}: pip install --no-deps exllamav2==0.3.2 "
                            "(or pass a path to a local text file)")
    return Path(list(spec.submodule_search_locations)[0]) / sub


def resolve_text(name: str) -> Path:
    """A named text's file, or a local file path."""
    if name in TEXT_NAMES:
        path = _package_data_dir() / f"{name}.utf8"
    else:
        path = Path(os.path.expanduser(name))
        if not path.is_file():
            raise SvdpressError(f"unknown text {name!r}: use one of {', '.join(TEXT_NAMES)} or a path to a text file")
    if not path.is_file():
        raise SvdpressError(f"text file {path} is missing")
    if path.stat().st_size == 0 or not path.read_text(errors="replace").strip():
        raise SvdpressError(f"text file {path} is empty")
    return path


def clean_wiki(raw: str) -> str:
    """Strip `<doc ...>` markup and the repeated title line; drop stub articles (< MIN_ARTICLE_WORDS words)."""
    articles = []
    for m in re.finditer(r"<doc[^>]*title=\"([^\"]*)\"[^>]*>\n(.*?)</doc>", raw, flags=re.S):
        title, body = m.group(1), m.group(2).strip()
        if body.startswith(title):
            body = body[len(title):].strip()
        if len(body.split()) >= MIN_ARTICLE_WORDS:
            articles.append(f" = {title} =\n\n{body}")
    return "\n\n".join(articles)


def load_text(name: str) -> str:
    path = resolve_text(name)
    try:
        raw = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise SvdpressError(f"cannot read text {path}: {e}") from None
    text = clean_wiki(raw) if "<doc " in raw[:10000] else raw
    if not text.strip():
        raise SvdpressError(f"text {name!r} ({path}) is empty")
    return text


def split_text(text: str, part: str) -> str:
    """First ('calib') or second ('eval') half of a text, cut at the paragraph break nearest the middle."""
    if part not in ("calib", "eval"):
        raise ValueError(part)
    mid = len(text) // 2
    cut = text.rfind("\n\n", 0, mid)
    cut = mid if cut < len(text) // 4 else cut
    return text[:cut] if part == "calib" else text[cut:].lstrip("\n")


def _tokens(tokenizer, name: str, part: str) -> tuple[torch.Tensor, TextPart]:
    text = split_text(load_text(name), part)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return ids, TextPart(Path(name).name if name not in TEXT_NAMES else name, part, len(text))


def calibration_samples(tokenizer, name: str, n: int, seqlen: int, seed: int = 0) -> tuple[torch.Tensor, TextPart]:
    """`n` windows of `seqlen` tokens drawn at seeded random offsets from the calibration half: (n, seqlen)."""
    if n < 1 or seqlen < 2:
        raise SvdpressError(f"calibration needs at least 1 sample of 2 tokens (got {n} x {seqlen})")
    ids, info = _tokens(tokenizer, name, "calib")
    if len(ids) < seqlen + 1:
        raise SvdpressError(f"calibration text {name!r} has {len(ids)} tokens in its calibration half, fewer than "
                            f"one sample of {seqlen}: use a longer text or a smaller --calib-seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen, (n,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()]), info


def evaluation_tokens(tokenizer, name: str, limit: int | None = None) -> tuple[torch.Tensor, TextPart]:
    """The evaluation half as one token stream (1, T), cut to `limit` tokens if given."""
    ids, info = _tokens(tokenizer, name, "eval")
    if limit is not None:
        ids = ids[:limit]
    if len(ids) < 2:
        raise SvdpressError(f"evaluation text {name!r} has no tokens in its evaluation half")
    return ids[None], info
