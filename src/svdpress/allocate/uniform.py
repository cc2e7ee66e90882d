"""Uniform allocation: every layer keeps the same fraction of its parameters.

r_l = ⌊ratio · m·n/(m+n)⌋ (rounded down to the rank multiple), so each layer, and hence the model, stays at or
under the target. This is SVD-LLM's "compression ratio" protocol.
"""

from . import Allocation, AllocationProblem, allocator, round_down


@allocator("uniform")
def uniform(p: AllocationProblem) -> Allocation:
    if p.ratio >= 1:
        return Allocation({name: None for name in p.shapes})
    step = max(1, p.rank_multiple)
    ranks = {name: max(step, round_down(p.ratio * s.m * s.n / (s.m + s.n), step)) for name, s in p.shapes.items()}
    return Allocation(ranks)
