"""FWSVD (Hsu et al. 2022): Fisher-weighted SVD.

Row importance I_i = Σ_j F_ij with F = Σ_s (∂L_s/∂W)² the per-sequence empirical Fisher of the weights
(calibrate.gradient_stats). The rank-r problem min ‖diag(√I)(W − W_r)‖_F is solved exactly by the SVD of
diag(√I)·W = U Σ Vᵀ followed by U ← diag(√I)⁻¹ U.
"""

import torch

from ..errors import SvdpressError
from . import LayerSpectrum, LayerStats, register_factorizer, spectrum_from_svd

FLOOR = 1e-6  # rows with no measured importance get FLOOR·max(I), so the un-weighting never divides by zero


@register_factorizer("fwsvd", needs_fisher=True, description="Fisher-weighted SVD (row importance from grad²)")
def fwsvd(W: torch.Tensor, stats: LayerStats) -> LayerSpectrum:
    if stats.weight_fisher is None:
        raise SvdpressError("fwsvd needs weight Fisher statistics (calibrate.gradient_stats)")
    imp = stats.weight_fisher.to(W).sum(1)  # I_i = Σ_j F_ij
    w = imp.clamp_min(FLOOR * float(imp.max().clamp_min(1e-300))).sqrt()[:, None]
    return spectrum_from_svd(w * W, left=lambda U: U / w, overwrite=True)
