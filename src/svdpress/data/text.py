"""Named texts (wiki, c4, tiny, code, ...) and their disjoint calibration / evaluation halves.

The embedded defaults are the calibration texts that the PyPI package `exllamav2` ships. We only need its data
files, and importing it would compile a CUDA extension, so the files are located with `importlib.util.find_spec`,
which finds a top-level package without executing it.

Every text is cut once, at a paragraph boundary near its middle: the first half feeds calibration, the second
half evaluation, so a perplexity is never measured on text the compression has seen.

Calibration may mix texts: `wiki:0.5,code:0.3,multilingual:0.2` (names or files, each with its share of the
samples; `wiki,code` splits them evenly). `task:mmlu` is a text made of a task's unscored examples, written as
lm-eval prompts them (data/tasks.py). The FermiGrad paper's finding is that the calibration data decides which
knowledge survives compression, so the mixture is the user's lever on it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SvdpressError
from .tasks import is_task_source, task_text

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


def resolve_text(name: str) -> Path | str:
    """A named text's file, a local file path, or a `task:NAME` source (checked: see data/tasks.py)."""
    if is_task_source(name):
        task_text(name)
        return name
    if name in TEXT_NAMES:
        path = _package_data_dir() / f"{name}.utf8"
    else:
        path = Path(os.path.expanduser(name))
        if not path.is_file():
            raise SvdpressError(f"unknown text {name!r}: use one of {', '.join(TEXT_NAMES)}, task:NAME (e.g. "
                                "task:mmlu) or a path to a text file")
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
    if is_task_source(name):
        return task_text(name)
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


_WEIGHT = re.compile(r"^(.*):([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


def parse_sources(spec: str, warn: bool = True) -> list[tuple[str, float]]:
    """[(text, share)] of a calibration spec: one text (`wiki`, a file), or a comma list of texts each with an
    optional `:weight` (missing weights: even shares). Weights that do not sum to 1 are normalized, with a warning.
    Texts are not opened here (see `check_sources`)."""
    if "," not in spec and not _WEIGHT.match(spec):
        return [(spec, 1.0)]
    parts = []
    for item in spec.split(","):
        item = item.strip()
        m = _WEIGHT.match(item)
        name, w = (m.group(1), float(m.group(2))) if m else (item, None)
        if not name:
            raise SvdpressError(f"calibration mixture {spec!r}: an entry has no text name ({item!r})")
        parts.append((name, w))
    names = [n for n, _ in parts]
    if len(set(names)) < len(names):
        raise SvdpressError(f"calibration mixture {spec!r} names a text twice")
    given = [w for _, w in parts if w is not None]
    if given and len(given) < len(parts):
        raise SvdpressError(f"calibration mixture {spec!r}: give a weight to every text or to none")
    weights = [w if w is not None else 1.0 for _, w in parts]
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise SvdpressError(f"calibration mixture {spec!r}: weights must be positive")
    total = sum(weights)
    if warn and given and abs(total - 1) > 1e-6:
        warnings.warn(f"calibration mixture {spec!r}: weights sum to {total:g}, normalized to 1", stacklevel=2)
    return [(n, w / total) for n, w in zip(names, weights)]


def check_sources(spec: str) -> list[tuple[str, float]]:
    """`parse_sources`, with every text resolved (a clear error for an unknown name or a missing file)."""
    parts = parse_sources(spec)
    for name, _ in parts:
        resolve_text(name)
    return parts


def shares(n: int, weights: list[float]) -> list[int]:
    """n samples apportioned to the weights (largest remainder; ties to the earlier text), summing to n."""
    raw = [n * w for w in weights]
    out = [int(math.floor(x)) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: (-(raw[i] - out[i]), i))[: n - sum(out)]:
        out[i] += 1
    return out


def calibration_samples(tokenizer, name: str, n: int, seqlen: int, seed: int = 0) -> tuple[torch.Tensor, TextPart]:
    """`n` windows of `seqlen` tokens drawn at seeded random offsets from the calibration half: (n, seqlen).
    A mixture (`parse_sources`) draws each text's share of the n windows from that text, in the order given."""
    if n < 1 or seqlen < 2:
        raise SvdpressError(f"calibration needs at least 1 sample of 2 tokens (got {n} x {seqlen})")
    parts = parse_sources(name, warn=False)  # warned about once, when the config was checked
    if len(parts) == 1:
        return _windows(tokenizer, parts[0][0], n, seqlen, seed)
    rows, chars = [], 0
    for i, ((text, _), k) in enumerate(zip(parts, shares(n, [w for _, w in parts]))):
        ids, info = _windows(tokenizer, text, max(k, 1), seqlen, seed + 1000 * i)
        chars += info.chars
        if k:
            rows.append(ids)
    label = ",".join(f"{Path(t).name if t not in TEXT_NAMES else t}:{w:.3g}" for t, w in parts)
    return torch.cat(rows), TextPart(label, "calib", chars)


def _windows(tokenizer, name: str, n: int, seqlen: int, seed: int) -> tuple[torch.Tensor, TextPart]:
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
