"""Random Fourier features of a Gaussian kernel and minimum-norm least squares (Belkin et al. 2018).

The paper's features are phi(x; v) = exp(i<v, x>) with v ~ N(0, sigma^-2 I). Here they take their
real form, phi(x) = sqrt(2/N) cos(V x + b) with b ~ U[0, 2 pi): then phi(x).phi(y) tends to the
Gaussian kernel exp(-|x - y|^2 / (2 sigma^2)) as N grows, and the l2 norm of the coefficients of a
predictor tends to its norm in the kernel's RKHS. A sweep draws one set of N_max features and the
model with N features uses the first N of them, so the sweep's models are nested.

The fit is the minimum-norm solution of least squares, from an SVD-based solver (LAPACK gelsd):
below N = n it is the least-squares fit, from N = n on the interpolant of smallest norm. No matrix
is ever inverted: near N = n the feature matrix is nearly singular, which is the point.

    python -m pipelines double_descent --methods rff    (the pipeline that uses this module)
"""
from __future__ import annotations

import math

import torch

MEDIAN_SAMPLE = 2000  # the median pairwise distance is estimated on at most this many points


def median_distance(x: torch.Tensor, seed: int = 0) -> float:
    """Median pairwise Euclidean distance of the rows of x (on a seeded sample of MEDIAN_SAMPLE rows when larger)."""
    if len(x) > MEDIAN_SAMPLE:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:MEDIAN_SAMPLE]]
    return torch.pdist(x.double()).median().item()


class RandomFourierFeatures:
    """Up to `max_features` random Fourier features of the Gaussian kernel of bandwidth `sigma` (float64)."""

    def __init__(self, in_features: int, max_features: int, sigma: float, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.v = torch.randn(in_features, max_features, generator=generator, dtype=torch.float64) / sigma
        self.b = 2 * math.pi * torch.rand(max_features, generator=generator, dtype=torch.float64)

    def cosines(self, x: torch.Tensor) -> torch.Tensor:
        """cos(V x + b) for every feature: (len(x), max_features); `features` slices and scales it."""
        return torch.cos(x.flatten(1).double() @ self.v + self.b)

    @staticmethod
    def features(cosines: torch.Tensor, n_features: int) -> torch.Tensor:
        """phi(x) of the model with the first `n_features` features, from `cosines(x)`."""
        return math.sqrt(2 / n_features) * cosines[:, :n_features]

    def __call__(self, x: torch.Tensor, n_features: int) -> torch.Tensor:
        return self.features(torch.cos(x.flatten(1).double() @ self.v[:, :n_features] + self.b[:n_features]), n_features)


def min_norm_least_squares(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """argmin ||a|| among the minimizers of ||features @ a - targets||: gelsd (SVD), never an inverse."""
    return torch.linalg.lstsq(features.cpu().double(), targets.cpu().double(), driver="gelsd").solution


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.exp(-torch.cdist(a.flatten(1).double(), b.flatten(1).double()) ** 2 / (2 * sigma**2))


def kernel_interpolant(x: torch.Tensor, targets: torch.Tensor, sigma: float) -> torch.Tensor:
    """Coefficients alpha of the minimum-RKHS-norm interpolant h(.) = sum_i alpha_i k(x_i, .): the N -> infinity limit.

    Its RKHS norm is sqrt(trace(targets^T alpha)). The Gaussian kernel matrix of distinct points is
    positive definite, so a linear solve (LU, not an inverse) gives alpha.
    """
    return torch.linalg.solve(gaussian_kernel(x, x, sigma), targets.double())
