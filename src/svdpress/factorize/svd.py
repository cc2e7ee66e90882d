"""Plain truncated SVD: the Eckart–Young optimum for ‖W − W_r‖_F, blind to the inputs the layer sees."""

import torch

from . import LayerSpectrum, LayerStats, register_factorizer, spectrum_from_svd


@register_factorizer("svd", description="plain truncated SVD of W")
def svd(W: torch.Tensor, stats: LayerStats) -> LayerSpectrum:
    return spectrum_from_svd(W, overwrite=stats.consume)  # W itself is factored only when it is ours
