"""Dobi-SVD's weight update (Wang et al., ICLR 2025, arXiv 2502.02723, §3.3): the PCA of the layer's OUTPUT activations.

Dobi-SVD truncates activations, not weights: the layer output on the calibration tokens, stacked as Y = X·Wᵀ
(N × m), has the SVD Y = P·Σ·Qᵀ, and keeping its top k terms is the best rank-k approximation of the activations
(Eckart–Young–Mirsky). The weight that produces exactly these truncated activations from the same inputs is

    W' = Q_k·Q_kᵀ·W    (A = Q_k, B = Q_kᵀ·W: the projection of W onto the top-k principal output directions),

which the paper obtains with incremental PCA over the calibration set, because the activations do not fit in
memory. Here no activation is ever stored: the output second moments follow from the input ones that calibration
already gathers, Σ_t y_t y_tᵀ = W·(Σ_t x_t x_tᵀ)·Wᵀ = W C Wᵀ, so Q and Σ² are its eigenvectors and eigenvalues
(float64), with no extra forward pass:

- m ≤ n: eigen-decomposition of the m×m matrix W C Wᵀ, C being the shared input's X·Xᵀ (all m directions, so the
  full-rank spectrum reproduces W exactly even if C is singular);
- m > n (or C already consumed by a sibling's whitener): C = S·Sᵀ from the shared eigen whitener (cached once per
  input, small eigenvalues clamped, see whiten.py) and the thin SVD W·S = Q·Σ·Hᵀ, whose left singular vectors are
  the eigenvectors of W C Wᵀ: an m×n SVD instead of an m×m eigen-decomposition of a rank-n matrix.

The spectrum is U = Q, S = Σ (the activation singular values: Σ_{j≥r} S_j² is the energy of the activations cut
at rank r, i.e. ‖Y − Y_r‖²_F), V = diag(1/S)·Qᵀ·W. Singular values below 1e-6·S_0 (directions the calibration
outputs barely use, or not at all when C is singular) are raised to that floor, so V stays finite and in range
for 16-bit factors, and the full-rank spectrum still reproduces W exactly (S·V = Qᵀ·W); the energy this adds is
below 1e-12 of the largest direction's. Any rank cut is then W_r = Q_r Q_rᵀ W, Dobi-SVD's update at that rank.

Mathematically this is the same optimum as SVD-LLM's whitened truncation (both minimize ‖(W − W_r)X‖_F, and with
C = L Lᵀ, W_r = U_r U_rᵀ W for W L = U Σ Hᵀ), reached without a Cholesky factor, so a singular C needs no jitter.
What makes the method Dobi-SVD is where the ranks come from: the allocator `dobi` (allocate/dobi.py) learns them by
differentiable truncation of these activation spectra.

Differences from the paper and its reference code (github.com/wangqinsi1/Dobi-SVD, weight_updater.py):
- exact PCA from second moments instead of incremental PCA: the official IPCA runs over the top-γ right singular
  vectors of each calibration sequence's activations (unweighted by their singular values, mean-centred); the
  paper's theorem (the Eckart–Young–Mirsky optimum for the stacked activations) is what is computed here, exactly,
  uncentred (a linear layer without bias maps 0 to 0; a bias is kept dense, outside the factors, as everywhere in
  svdpress).
- remapping (§3.4, modules/remapping.py) is left out: it stores the factors' first min(m, n) rows in 8 bits
  (bitsandbytes' dynamic map) and the rest in 16, so that rank k costs max(m, n)·k of 16-bit storage. That changes the
  bytes per parameter, which svdpress's one parameter count (params.py: r·(m+n), or PivGa's r·(m+n) − r², all in the
  model's dtype) does not express; it is a quantization scheme on top of the factors, not a different factorization.
"""

from __future__ import annotations

import torch

from . import LayerSpectrum, LayerStats, register_factorizer, thin_svd
from .whiten import whitener

S_FLOOR = 1e-6  # relative: S is raised to at least S_FLOOR·S_0 before V = diag(1/S)·Qᵀ·W is formed


def output_pca(W: torch.Tensor, stats: LayerStats) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(Q (m, k), Σ (k,) descending, note): principal directions and singular values of the layer's outputs Y = X·Wᵀ
    on the calibration tokens, from Σ y yᵀ = W C Wᵀ (float64), k = min(m, n)."""
    m, n = W.shape
    W = W.double()
    C = stats.inputs.xtx
    if m <= n and C is not None:
        G = W @ C.to(W) @ W.T  # Σ_t y_t y_tᵀ (m × m)
        G = (G + G.T) / 2
        lam, Q = torch.linalg.eigh(G)
        del G
        lam, Q = lam.flip(0), Q.flip(1)
        return Q, lam.clamp_min(0).sqrt(), ""
    wh = whitener(stats.inputs, "eigen")  # C = S Sᵀ, shared by the layers reading this input
    Q, sig, _ = thin_svd(W @ wh.S.to(W), overwrite=True)  # (W S)(W S)ᵀ = W C Wᵀ
    return Q, sig, wh.note


@register_factorizer("dobi-svd", description="output-activation PCA, W_r = Q_r Q_rᵀ W (Dobi-SVD's weight update)",
                     allocator="dobi")
def dobi_svd(W: torch.Tensor, stats: LayerStats) -> LayerSpectrum:
    Q, S, note = output_pca(W, stats)
    floor = S_FLOOR * float(S[0]) if S.numel() and float(S[0]) > 0 else 1.0
    S = S.clamp_min(floor)  # still descending
    V = (Q.T @ W.double()) / S[:, None]  # diag(1/S)·Qᵀ·W
    return LayerSpectrum(Q.float(), S, V.float(), note)
