"""SVD-LLM v2-style whitening (Wang et al. 2025): the whitener comes from the eigen-decomposition of C = X·Xᵀ
instead of its Cholesky factor.

C = Q Λ Qᵀ ⇒ S = Q Λ^½ (S·Sᵀ = C), SVD of W·S = U Σ Vᵀ, V ← Vᵀ S⁻¹. The truncation is the same optimum of
‖(W − W_r) X‖_F as SVD-LLM's, but needs no positive definiteness: tiny eigenvalues are clamped (whiten.EIG_FLOOR)
instead of failing, which is what makes it robust when X·Xᵀ is singular (few tokens, dead channels).
"""

import torch

from . import LayerSpectrum, LayerStats, register_factorizer, spectrum_from_svd
from .whiten import right_mul_, whitener


@register_factorizer("svd-llm-v2", description="eigen-whitened SVD (SVD-LLM v2 whitening)")
def svd_llm_v2(W: torch.Tensor, stats: LayerStats) -> LayerSpectrum:
    wh = whitener(stats.inputs, "eigen")
    M = right_mul_(W, wh.S.to(W)) if stats.consume else W @ wh.S.to(W)  # W·S (over W when W is ours)
    return spectrum_from_svd(M, right=wh.undo, note=wh.note, overwrite=True)
