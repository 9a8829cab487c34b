"""Covariance estimation shared by the diffusion model's Gaussian path and PaDiM."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["covariance_batched", "ledoit_wolf_batched", "sample_covariance_batched"]


def ledoit_wolf_batched(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, Ledoit-Wolf shrunk covariance and shrinkage of each sample set in ``x [B, n, p]``.

    Returns ``mean [B, p]``, ``cov [B, p, p]`` and ``shrinkage [B]``, in the dtype of ``x``.
    With ``S`` the maximum-likelihood covariance (divided by ``n``), ``mu = tr(S) / p`` and
    centred samples ``x_i``, the shrinkage toward ``mu * I`` is ``min(beta, delta) / delta`` with
    ``delta = |S - mu I|_F^2 / p`` and ``beta = (sum_i |x_i|^4 / n - |S|_F^2) / (n p)``, and the
    estimate is ``(1 - shrinkage) S + shrinkage mu I`` (Ledoit & Wolf 2004, as in scikit-learn).
    """
    if x.ndim != 3 or x.shape[1] < 1:
        raise ValueError(f"x must be [B, n, p] with n >= 1, got {tuple(x.shape)}")
    _, n, p = x.shape
    mean = x.mean(dim=1)
    xc = x - mean.unsqueeze(1)
    emp = xc.transpose(1, 2) @ xc / n
    trace = torch.diagonal(emp, dim1=1, dim2=2).sum(dim=1)
    mu = trace / p
    sum_fourth = (xc * xc).sum(dim=2).square().sum(dim=1)
    emp_fro = emp.square().sum(dim=(1, 2))
    beta = (sum_fourth / n - emp_fro) / (n * p)
    delta = (emp_fro - 2.0 * mu * trace + p * mu.square()) / p
    beta = torch.minimum(beta, delta)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    shrinkage = torch.where(delta > 0, (beta / safe).clamp(0.0, 1.0), torch.zeros_like(delta))
    eye = torch.eye(p, dtype=x.dtype, device=x.device)
    s = shrinkage.view(-1, 1, 1)
    cov = (1.0 - s) * emp + (s * mu.view(-1, 1, 1)) * eye
    return mean, cov, shrinkage


def sample_covariance_batched(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[B, p]`` and unbiased sample covariance ``[B, p, p]`` (divided by ``n - 1``; zero
    for ``n = 1``) of each sample set in ``x [B, n, p]``: PaDiM's estimate before ``+ epsilon I``."""
    if x.ndim != 3 or x.shape[1] < 1:
        raise ValueError(f"x must be [B, n, p] with n >= 1, got {tuple(x.shape)}")
    n = x.shape[1]
    mean = x.mean(dim=1)
    xc = x - mean.unsqueeze(1)
    return mean, xc.transpose(1, 2) @ xc / max(n - 1, 1)


def covariance_batched(x: Tensor, method: str) -> tuple[Tensor, Tensor]:
    """Mean ``[B, p]`` and covariance ``[B, p, p]`` of each sample set in ``x [B, n, p]`` by
    ``method``: ``"sample"`` (unbiased) or ``"ledoit_wolf"`` (shrunk toward a scaled identity)."""
    if method == "sample":
        return sample_covariance_batched(x)
    if method == "ledoit_wolf":
        mean, cov, _ = ledoit_wolf_batched(x)
        return mean, cov
    raise ValueError(f"unknown covariance estimator {method!r} (sample or ledoit_wolf)")
