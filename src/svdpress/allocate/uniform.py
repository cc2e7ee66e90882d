"""Uniform allocation: every layer keeps the same fraction of its parameters.

r_l = ⌊r(ratio)⌋ (rounded down to the rank multiple), r(c) the rank whose factors hold c·m·n parameters under the
problem's counting: c·m·n/(m+n) classically (SVD-LLM's "compression ratio" protocol), the smaller root of
r·(m+n) − r² = c·m·n with PivGa. A layer's bias stays whole, so its factors get c·(m·n + m) − m (no bias: c·m·n).
Each layer, and hence the model, stays at or under the target.
"""

from . import Allocation, AllocationProblem, allocator, round_down


@allocator("uniform")
def uniform(p: AllocationProblem) -> Allocation:
    if p.ratio >= 1:
        return Allocation({name: None for name in p.shapes})
    step = max(1, p.rank_multiple)
    counting = p.counting
    # the layer's share of the budget is ratio·(m·n + bias); the bias stays whole, the factors get the rest
    ranks = {name: max(step, round_down(counting.rank_for(s, p.ratio * s.dense - (s.dense - s.m * s.n)), step))
             for name, s in p.shapes.items()}
    return Allocation(ranks)

uniform.measures_model = False  # reads the shapes alone (--lm-head can include the LM head)
