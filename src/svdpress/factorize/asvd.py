"""ASVD (Yuan et al. 2023): scale input channels by their mean activation magnitude before the SVD.

W·diag(s) = U Σ Vᵀ with s_i = (mean_t |x_ti|)^α, then V ← Vᵀ·diag(s)⁻¹; α = 0.5 as in the paper.
"""

import torch

from . import LayerSpectrum, LayerStats, register_factorizer, spectrum_from_svd

ALPHA = 0.5


@register_factorizer("asvd", description="activation-scaled SVD, s = mean|x|^0.5")
def asvd(W: torch.Tensor, stats: LayerStats) -> LayerSpectrum:
    a = stats.inputs.mean_abs.to(W)
    s = a.clamp_min(1e-6 * float(a.max().clamp_min(1e-30))) ** ALPHA  # dead channels must not divide by zero
    return spectrum_from_svd(W * s, right=lambda Vh: Vh / s, overwrite=True)
