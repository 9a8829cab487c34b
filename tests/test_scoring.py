from __future__ import annotations

import pytest
import torch

from diffqc.config import DiffusionConfig, ScoringConfig
from diffqc.diffusion import Denoiser, NoiseSchedule
from diffqc.scoring import ScoreBank, aggregate, denoising_error, upsample_and_smooth


def test_bank_is_seeded_and_antithetic() -> None:
    cfg = ScoringConfig(bank_timesteps=(100, 300), noises_per_timestep=2, seed=7)
    a = ScoreBank.make(cfg, 16, 4)
    b = ScoreBank.make(cfg, 16, 4)
    assert len(a) == 4 and torch.equal(a.noise, b.noise)
    assert a.timesteps.tolist() == [100, 100, 300, 300]
    assert torch.equal(a.noise[1], -a.noise[0])
    c = ScoreBank.make(ScoringConfig(seed=8), 16, 4)
    assert not torch.equal(a.noise[0], c.noise[0])


def test_aggregate_small_defect_counts() -> None:
    maps = torch.zeros(2, 32, 32)
    maps[1, 3:6, 3:6] = 5.0  # a 9-pixel defect
    top = aggregate(maps, "topk", 0.01)
    assert top[1] > top[0] and float(top[1]) > 3.0
    assert torch.equal(aggregate(maps, "max"), torch.tensor([0.0, 5.0]))


def test_upsample_smooth_shape_and_mass() -> None:
    m = torch.zeros(1, 8, 8)
    m[0, 4, 4] = 1.0
    up = upsample_and_smooth(m, 64, 2.0)
    assert up.shape == (1, 64, 64) and torch.isfinite(up).all()
    peak = divmod(int(up[0].argmax()), 64)
    assert abs(peak[0] - 36) <= 4 and abs(peak[1] - 36) <= 4


def _per_pair_error(m: Denoiser, sch: NoiseSchedule, bank: ScoreBank, x: torch.Tensor,
                    types: torch.Tensor) -> torch.Tensor:
    """The reference: one denoiser call per (t, ε) pair, channels in their natural order."""
    n, locs, _ = x.shape
    pos = torch.arange(locs).expand(n, locs)
    total = torch.zeros(n, locs)
    for k in range(len(bank)):
        t = bank.timesteps[k].expand(n)
        eps = bank.noise[k].expand_as(x)
        total += (m(sch.q_sample(x, t, eps), t, types, pos) - eps).pow(2).mean(-1)
    return total / len(bank)


@pytest.mark.parametrize("trained", [False, True])
def test_bank_pass_equals_one_call_per_pair(trained: bool) -> None:
    """denoising_error runs the whole bank at once, in the prior's channel order, grouped by
    type; it must give the per-pair errors for mixed and single-type batches."""
    torch.manual_seed(0)
    locs, ch, n_types = 16, 12, 3
    m = Denoiser(ch, n_types, locs, DiffusionConfig(prior_dims=5, hidden=16, depth=1)).eval()
    good = torch.randn(40, locs, ch) * torch.rand(ch) + torch.randn(ch)
    m.fit_prior(good, torch.arange(40) % n_types)
    if trained:
        torch.nn.init.normal_(m.out.weight, std=0.1)
    sch = NoiseSchedule(1000)
    bank = ScoreBank.make(ScoringConfig(bank_timesteps=(100, 300, 600)), locs, ch)
    in_order = ScoreBank(bank.timesteps, bank.noise[..., m.prior_perm])
    x = torch.randn(7, locs, ch)
    for types in (torch.tensor([0, 2, 2, 1, 0, 3, 2]), torch.full((7,), 2)):
        with torch.inference_mode():
            got = denoising_error(m, sch, in_order, x[..., m.prior_perm], types)
            want = _per_pair_error(m, sch, bank, x, types)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
