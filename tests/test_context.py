"""diffqc.context: the image's context, a per-location mean that moves with the whole image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffqc.config import DetectorConfig, with_overrides
from diffqc.context import ImageContext
from diffqc.metrics import image_auroc
from diffqc.scoring import DiffusionScorer


def _parts(n: int, seed: int, *, factor: float = 2.0) -> torch.Tensor:
    """GOOD features ``[n, 4, 6, 6]`` = base + a · pattern + small noise, ``a`` one number per image
    (an exposure-like change of the whole image, which a per-location Gaussian holds as variance);
    ``base`` and ``pattern`` are the same part in every call."""
    fixed = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, 6, generator=fixed)
    pattern = torch.randn(4, 6, 6, generator=fixed)
    gen = torch.Generator().manual_seed(100 + seed)
    a = factor * torch.randn(n, 1, 1, 1, generator=gen)
    return base + a * pattern + 0.05 * torch.randn(n, 4, 6, 6, generator=gen)


def _one_type(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


def test_context_removes_variation_shared_by_the_whole_image() -> None:
    raw = _parts(200, 0)
    ctx = ImageContext.fit(raw, _one_type(200), 1, 4, torch.float32)
    left = ctx.remove(raw, _one_type(200))
    assert left.var(dim=0).mean() < 0.01 * raw.var(dim=0).mean()  # about the 0.05 noise is left
    held = _parts(50, 1)  # new images of the part: not memorised
    assert ctx.remove(held, _one_type(50)).var(dim=0).mean() < 0.01 * held.var(dim=0).mean()
    assert torch.allclose(left.mean(0), raw.mean(0), atol=0.05)  # the intercept is kept


def test_context_keeps_a_local_defect() -> None:
    ctx = ImageContext.fit(_parts(200, 0), _one_type(200), 1, 4, torch.float32)
    good = _parts(1, 2)
    bad = good.clone()
    bad[0, :, 2, 3] += 3.0  # one location of 36 changes by 3 in every channel
    change = ctx.remove(bad, _one_type(1)) - ctx.remove(good, _one_type(1))
    assert change[0, :, 2, 3].min() > 2.0  # the descriptor moves by 1/36 of it: the defect stays
    others = torch.ones(6, 6, dtype=torch.bool)
    others[2, 3] = False
    assert change[0][:, others].abs().max() < 1.0


def test_components_are_capped_per_type_by_its_images() -> None:
    feats = torch.cat([_parts(40, 0), _parts(16, 1)])
    types = torch.cat([_one_type(40), torch.ones(16, dtype=torch.long)])
    ctx = ImageContext.fit(feats, types, 3, 8, torch.float32)  # type 2 has no image at all
    used = (ctx.basis.abs().sum(dim=1) > 0).sum(dim=1)  # non-zero whitening columns per type
    assert used.tolist() == [4, 2, 0]  # 40 // 8, 16 // 8 (also < the 4 channels), none
    assert ctx.components == 4 and ctx.effect.shape[1] == 4  # the widest type's, not the 8 asked for
    assert torch.equal(ctx.effect[2], torch.zeros_like(ctx.effect[2]))
    x = _parts(3, 5)
    assert torch.equal(ctx.remove(x, torch.full((3,), 2)), x)  # no context: unchanged
    uncapped = ImageContext.fit(feats, types, 3, 8, torch.float32, per_component=0)
    assert (uncapped.basis.abs().sum(dim=1) > 0).sum(dim=1).tolist() == [4, 4, 0]  # rank of 4 channels


def test_traced_gather_equals_the_eager_per_type_path() -> None:
    feats = torch.cat([_parts(40, 0), _parts(40, 1, factor=1.0) * 0.5])
    types = torch.cat([_one_type(40), torch.ones(40, dtype=torch.long)])
    ctx = ImageContext.fit(feats, types, 2, 4)  # float16 storage: the export gathers float16 rows
    x = torch.cat([_parts(3, 7), _parts(2, 8)])
    t = torch.tensor([1, 0, 1, 0, 0])
    traced = torch.jit.trace(lambda f, k: ctx.remove(f, k), (x, t), check_trace=False)
    # the same numbers, summed in another order (a batched product instead of addmm)
    torch.testing.assert_close(traced(x, t), ctx.remove(x, t), rtol=1e-6, atol=1e-6)


def test_scorer_with_context_is_the_gaussian_of_what_the_context_leaves(tmp_path: Path) -> None:
    """``diffusion.prior_context``: the per-location Gaussians are fitted on, and score, the
    features minus their context; the effect is stored in float16 (rounded when fitted) and the
    bundle's tensors reload the same scorer; a bundle without them is refused."""
    from safetensors.torch import load_file, save_file

    feats, types = _parts(64, 0), _one_type(64)
    over = {"train.steps": 0, "diffusion.prior_dims": 4, "diffusion.prior_rank": 0,
            "diffusion.prior_context": 0}
    config = with_overrides(DetectorConfig(), over | {"diffusion.prior_context": 4})
    scorer = DiffusionScorer(config).fit(feats, types, 1)
    assert scorer.context_ is not None
    left = scorer.context_.remove(feats, types)
    plain = DiffusionScorer(with_overrides(DetectorConfig(), over)).fit(left, types, 1)
    x = _parts(5, 3)
    x[0, :, 1, 1] += 1.0
    k = _one_type(5)
    assert torch.allclose(scorer.score_maps(x, k), plain.score_maps(scorer.context_.remove(x, k), k))
    state = scorer.state_tensors()
    assert state["context.effect"].dtype == torch.float16
    assert torch.equal(state["context.effect"].float(), scorer.context_.effect)  # already rounded
    save_file({n: v.contiguous() for n, v in state.items()}, str(tmp_path / "w.safetensors"))
    loaded = DiffusionScorer.from_state(config, load_file(str(tmp_path / "w.safetensors")), 1, 4)
    assert torch.equal(loaded.score_maps(x, k), scorer.score_maps(x, k))
    with pytest.raises(KeyError, match="image context"):
        without = {n: v for n, v in state.items() if not n.startswith("context.")}
        DiffusionScorer.from_state(config, without, 1, 4)


def test_context_separates_a_local_defect_that_the_whole_image_variation_hides() -> None:
    """Where GOOD parts vary as a whole (a strong global factor), a local change along that
    factor looks normal to each location's Gaussian and abnormal given the image's context."""
    over = {"train.steps": 0, "diffusion.prior_dims": 4, "diffusion.prior_rank": 0}
    fit = _parts(120, 0, factor=3.0)
    good, bad = _parts(40, 1, factor=3.0), _parts(40, 2, factor=3.0)
    pattern = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))[1]  # _parts' pattern
    # one location changes the way the whole image does (as a local stain or glare would):
    # inside the range the GOOD parts span there, so each location's own Gaussian cannot tell,
    # but against the rest of its image it is out of place
    bad[:, :, 3, 2] += 1.5 * pattern[:, 3, 2]
    x, k = torch.cat([good, bad]), _one_type(80)
    labels = torch.cat([torch.zeros(40), torch.ones(40)]).numpy()
    auroc = {}
    for name, context in (("plain", 0), ("context", 4)):
        config = with_overrides(DetectorConfig(), over | {"diffusion.prior_context": context})
        scorer = DiffusionScorer(config).fit(fit, _one_type(120), 1)
        auroc[name] = image_auroc(labels, scorer.score_maps(x, k).flatten(1).amax(dim=1).numpy())
    assert auroc["context"] > 0.95 and auroc["plain"] < 0.8, auroc
