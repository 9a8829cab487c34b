from __future__ import annotations

import torch

from diffqc.config import ScoringConfig
from diffqc.scoring import ScoreBank, aggregate, upsample_and_smooth


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
