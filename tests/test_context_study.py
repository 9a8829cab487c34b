"""The mode variant of ``benchmarks/context_study.py`` (its linear variant is diffqc.context's
ImageContext without the cap, tested in tests/test_context.py)."""

from __future__ import annotations

import torch

from .conftest import load_benchmark

study = load_benchmark("context_study")


def test_modes_subtract_each_modes_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    offset = torch.randn(4, 6, 6, generator=gen)
    a = torch.randn(60, 4, 6, 6, generator=gen) * 0.1
    b = torch.randn(60, 4, 6, 6, generator=gen) * 0.1 + 5.0 * offset
    remove = study.fit_modes(torch.cat([a, b]), m=2, k=2, prior=0.0)
    assert (remove(a).mean(0) - remove(b).mean(0)).abs().max() < 0.1  # the modes' means now coincide
    gap = (a.mean(0) - b.mean(0)).abs().max()
    assert gap > 1.0
    shrunk = study.fit_modes(torch.cat([a, b]), m=2, k=2, prior=60.0)  # weight n / (n + 60) = 1/2
    left = (shrunk(a).mean(0) - shrunk(b).mean(0)).abs().max()
    assert 0.4 * gap < left < 0.6 * gap
    new = torch.randn(5, 4, 6, 6, generator=gen) * 0.1 + 5.0 * offset  # a new image of mode b
    assert (remove(new) - new + b.mean(0) - remove(b).mean(0)).abs().max() < 1e-4


def test_linear_variant_uses_every_component_asked_for() -> None:
    gen = torch.Generator().manual_seed(1)
    raw = torch.randn(12, 8, 3, 3, generator=gen)  # 12 images: the option's cap would allow 1
    remove = study.fit_linear(raw, 6)
    left = remove(raw)
    # 6 components + the intercept fitted to 12 images: most of the variation is explained
    assert left.var(dim=0).mean() < 0.6 * raw.var(dim=0).mean()
