"""GFWSVD (Chekalina et al. 2025, "Generalized Fisher-Weighted SVD"): SVD under a Kronecker-factored Fisher whose
output factor is estimated from PER-SEQUENCE gradients. It is the baseline whose rank collapse KFAC-SVD fixes.

GFWSVD approximates the empirical Fisher of vec(W) over calibration samples s,
F = Σ_s vec(∂L_s/∂W) vec(∂L_s/∂W)ᵀ, by a Kronecker product and then solves the same two-sided whitened problem
as KFAC-SVD (kfac.py): with the output factor G = L_G L_Gᵀ and the input factor C = L_C L_Cᵀ,

    M = L_Gᵀ · W · L_C = U Σ Vᵀ,   W_r = (L_G⁻ᵀ U_r) Σ_r (V_rᵀ L_C⁻¹).

What differs is where the output factor comes from: a sample is a whole sequence, so the gradient seen at the
layer's output is the sequence's summed ḡ_s = Σ_{t∈s} g_t, and

    G_seq = Σ_s ḡ_s ḡ_sᵀ        (calibrate.gradient_stats(out_grad="sequence"))

a sum of S rank-one terms: rank(G_seq) ≤ S, the number of calibration sequences (the reference pipeline even
averages 16 batches into one sample). With S below the layer's width m (256 sequences against m = 4096 … 14336)
most output directions carry no measured curvature, only the damping: the un-whitening L_G⁻ᵀ then amplifies
exactly the directions the calibration never saw, which is the collapse KFAC-SVD's token-wise G = Σ_t g_t g_tᵀ
(rank up to #tokens) avoids. The input factor is the token-wise C = Σ_t x_t x_tᵀ shared with SVD-LLM and kfac,
so gfwsvd and kfac differ in exactly one estimator, the one under study.

Departure from the reference code (lems-svd/lems, compression/factorization/gfwsvd.py, after the GFWSVD
authors' FisherKronecker): it finds both factors at once as the nearest Kronecker product to F (Van Loan and
Pitsianis: the leading singular pair of F's rearrangement, by Lanczos over every sample's stored m×n gradient,
a sample there being the mean gradient of 16 batches). That needs all per-sample weight gradients held at once
(S times the layer's size, for every layer); here G comes from the same single backward pass as kfac's, with
m×m memory per layer, and is the per-sequence estimator named in KFAC-SVD's rank-collapse argument. The two are
not identical: the reference's output factor Σ_s ∂L_s/∂W · B · (∂L_s/∂W)ᵀ is bounded by S·min(T, n) rather
than S. The FWSVD diagonal of the same F is `fwsvd`.

Damping and the robust Cholesky are kfac's (kfac_spectrum is reused): G_seq + δ·mean(diag G_seq)·I.
"""

from __future__ import annotations

import torch

from ..errors import SvdpressError
from . import LayerSpectrum, LayerStats, register_factorizer
from .kfac import DAMPING, kfac_spectrum


@register_factorizer("gfwsvd", needs_gradients=True, out_grad="sequence",
                     description="GFWSVD: two-sided whitening with a per-sequence gradient factor (rank ≤ #sequences)")
def gfwsvd(W: torch.Tensor, stats: LayerStats) -> LayerSpectrum:
    if stats.out_grad_seq is None:
        raise SvdpressError("gfwsvd needs per-sequence output-gradient statistics "
                            "(calibrate.gradient_stats(out_grad='sequence'))")
    G = stats.out_grad_seq
    if stats.consume:
        stats.out_grad_seq = None
    return kfac_spectrum(W, stats.inputs, G, DAMPING, stats.consume)
