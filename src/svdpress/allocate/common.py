"""Helpers shared by the search allocators: method settings from `--opt`, candidate ranks, and the last step
every baseline takes to land on the budget to within one rank step (fill up / trim down).

Search methods (ASVD's threshold, MRCS's greedy, ATP's schedule, SVD-LLM v2's formula) produce ranks that
sit somewhat under (or, after rounding, over) the budget. Comparing them at "the same ratio" is only fair
when each spends the same parameters, so each one ends with `fit_budget`, which moves single rank steps
(in the method's own priority order) until no further step fits.

Every helper prices ranks with the problem's counting (`AllocationProblem.counting`, classical or PivGa), or with
the `counting` it is given: under PivGa the break-even rank is min(m, n), so the same steps reach ranks a classical
budget would have stored dense.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Callable, Mapping, Optional, TypeVar

from ..errors import SvdpressError
from ..params import CLASSICAL, Counting, LayerShape
from . import AllocationProblem

C = TypeVar("C")


def fill_config(cls: type[C], options: Mapping[str, Any], method: str, ignore: tuple[str, ...] = ()) -> C:
    """The method's config dataclass filled from `--opt key=value`: an unknown key or a value of the wrong type
    is a user error naming the valid keys; values are converted to the fields' types. The config's own
    `check()` / `validate()` then checks ranges."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in options if k not in names and k not in ignore)
    if unknown:
        raise SvdpressError(f"unknown option(s) for --allocate {method}: {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    kw = {}
    for k, v in options.items():
        if k not in names:
            continue
        try:
            kw[k] = coerce(hints[k], v)
        except (TypeError, ValueError):
            raise SvdpressError(f"--opt {k}={v!r} for --allocate {method} is not a valid "
                                f"{getattr(hints[k], '__name__', str(hints[k]))}") from None
    cfg = cls(**kw)
    for check in ("check", "validate"):
        if callable(getattr(cfg, check, None)):
            getattr(cfg, check)()
    return cfg


def coerce(tp: Any, v: Any) -> Any:
    """`v` (from JSON or a plain string) as type `tp`: bool, int, float (finite), str, Optional[X], tuple[X, ...]."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if v is None or (isinstance(v, str) and v.lower() in ("none", "null")):
            return None
        return coerce(next(a for a in args if a is not type(None)), v)
    if typing.get_origin(tp) is tuple:
        items = v.split(",") if isinstance(v, str) else v
        if not isinstance(items, (list, tuple)):
            raise TypeError(v)
        return tuple(coerce(args[0], x) for x in items)
    if tp is bool:
        if isinstance(v, str):
            if v.lower() not in ("true", "false", "1", "0"):
                raise ValueError(v)
            return v.lower() in ("true", "1")
        if not isinstance(v, (bool, int)):
            raise TypeError(v)
        return bool(v)
    if tp is int:
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError(v)
        return int(v)
    if tp is float:
        if isinstance(v, bool):
            raise ValueError(v)
        x = float(v)
        if not math.isfinite(x):
            raise ValueError(v)
        return x
    if tp is str:
        if not isinstance(v, (str, int, float)):
            raise TypeError(v)
        return str(v)
    return v


def block_index(problem: AllocationProblem) -> tuple[dict[str, int], int]:
    """({layer: decoder block}, number of blocks), from the runner's architecture map. Without a runner (only
    for methods that need no model, given spectra alone) the block is read from the layer name as a fallback:
    its first integer component (model.layers.<b>.…), 0 if none."""
    runner = problem.runner
    if runner is not None:
        arch = runner.arch
        try:
            return {name: arch.block_of(name) for name in problem.shapes}, arch.num_blocks
        except KeyError as e:
            raise SvdpressError(f"layer {e.args[0]} is not a target layer of the model") from None
    blocks = {name: next((int(x) for x in name.split(".") if x.isdigit()), 0) for name in problem.shapes}
    return blocks, max(blocks.values(), default=0) + 1


def step_of(problem: AllocationProblem, override: Optional[int] = None) -> int:
    step = int(override) if override is not None else max(1, problem.rank_multiple)
    if step < 1:
        raise SvdpressError(f"rank multiple must be ≥ 1, got {step}")
    return step


def candidate_ranks(shape: LayerShape, step: int, min_fraction: float = 0.0,
                    counting: Counting = CLASSICAL) -> list[int]:
    """Ranks k·step with r(min_fraction) ≤ r < r_be (r_be = the counting's break-even rank, r(f) the rank keeping
    f of the layer's weights); dense is the extra choice."""
    lo = max(step, -(-int(counting.rank_of_fraction(shape, min_fraction)) // step) * step)
    return list(range(lo, counting.break_even(shape), step))


def rank_at(shape: LayerShape, fraction: float, step: int = 1, counting: Counting = CLASSICAL) -> Optional[int]:
    """Rank keeping `fraction` of the layer's parameters under `counting` (classically ⌊f · r_be⌋), to the step;
    None when dense."""
    if fraction >= 1:
        return None
    r = max(step, int(counting.rank_of_fraction(shape, fraction)) // step * step)
    return None if counting.is_dense(shape, r) else r


def _up(shape: LayerShape, r: Optional[int], step: int, counting: Counting) -> Optional[int]:
    if r is None:
        return None
    nxt = r + step
    return None if counting.is_dense(shape, nxt) else nxt


def _down(shape: LayerShape, r: Optional[int], step: int, counting: Counting) -> Optional[int]:
    if r is None:  # dense → the largest rank on the grid below break-even
        top = (counting.break_even(shape) - 1) // step * step
        return top if top >= step else None
    return r - step if r - step >= step else None


def fit_budget(problem: AllocationProblem, ranks: dict[str, Optional[int]], step: int,
               priority: Callable[[str], float]) -> dict[str, Optional[int]]:
    """Trim (lowest priority first) until under the budget, then fill (highest priority first, round-robin)
    until no single rank step fits: the result is at most one step of one layer under the target. Parameters
    are counted under the problem's counting."""
    shapes, target, counting = problem.shapes, problem.target, problem.counting
    ranks = dict(ranks)
    kept = counting.total(shapes, ranks)
    order = sorted(shapes, key=priority)  # ascending: least important first
    while kept > target:
        moved = False
        for name in order:
            r = _down(shapes[name], ranks[name], step, counting)
            if r is None:  # already at the smallest rank
                continue
            kept += counting.layer(shapes[name], r) - counting.layer(shapes[name], ranks[name])
            ranks[name], moved = r, True
            if kept <= target:
                break
        if not moved:
            raise SvdpressError(f"ratio {problem.ratio} cannot be met with rank multiple {step}")
    moved = True
    while moved:
        moved = False
        for name in reversed(order):
            if ranks[name] is None:
                continue
            r = _up(shapes[name], ranks[name], step, counting)
            extra = counting.layer(shapes[name], r) - counting.layer(shapes[name], ranks[name])
            if kept + extra <= target:
                ranks[name], kept, moved = r, kept + extra, True
    return ranks


def slack_ok(problem: AllocationProblem, ranks: Mapping[str, Optional[int]], step: int) -> bool:
    """Under the budget by less than one rank step of the largest layer (what `fit_budget` guarantees); a step
    costs at most step·(m+n) under either counting."""
    kept = problem.counting.total(problem.shapes, ranks)
    one_step = max(step * (s.m + s.n) for s in problem.shapes.values())
    return kept <= problem.target and problem.target - kept < one_step
