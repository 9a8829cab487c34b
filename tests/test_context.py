"""diffqc.context: the image's context, a per-location mean that moves with the whole image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffqc.config import DetectorConfig, with_overrides
from diffqc.context import ImageContext, spatial_maps, whitening
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
    features minus their context; the effect is stored in float16 here (rounded when fitted; in
    8 bits by default: tests/test_scoring.py) and the bundle's tensors reload the same scorer; a
    bundle without them is refused."""
    from safetensors.torch import load_file, save_file

    feats, types = _parts(64, 0), _one_type(64)
    over = {"train.steps": 0, "diffusion.prior_dims": 4, "diffusion.prior_rank": 0,
            "diffusion.prior_context": 0, "diffusion.prior_storage": "float16"}
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


def test_spatial_maps_are_the_best_low_rank_effect_and_exact_at_full_rank() -> None:
    """``maps = r``: the effect ``[k, C·L]`` as ``B [k, C·r]`` times ``r`` shared spatial maps; at
    ``r`` = the number of locations it is the whole effect, below it the best rank-``r`` fit
    over locations (Eckart–Young: no other ``r`` maps leave less)."""
    gen = torch.Generator().manual_seed(3)
    effect = torch.randn(5, 4 * 36, generator=gen, dtype=torch.float64)
    b, m = spatial_maps(effect, 4, 36)
    assert b.shape == (5, 4 * 20) and m.shape == (20, 36)  # r = min(36, k·C = 20)
    torch.testing.assert_close((b.view(5, 4, -1) @ m).reshape(5, -1), effect)
    b, m = spatial_maps(effect, 4, 6)
    torch.testing.assert_close(m @ m.T, torch.eye(6, dtype=torch.float64))
    left = (effect.view(20, 36) - b.view(20, 6) @ m).pow(2).sum()
    s = torch.linalg.svdvals(effect.view(20, 36))
    torch.testing.assert_close(left, s[6:].pow(2).sum())
    other = torch.linalg.qr(torch.randn(36, 6, generator=gen, dtype=torch.float64)).Q.T  # any 6 maps
    assert left < (effect.view(20, 36) - effect.view(20, 36) @ other.T @ other).pow(2).sum()


def test_context_through_spatial_maps_is_smaller_and_removes_a_smooth_variation() -> None:
    """A whole-image change that moves every location along a few smooth maps is removed as
    well through 2 maps as through the whole effect, at a fraction of the numbers; the factors
    are rounded to float16 when fitted and reload exactly; the traced (export) path agrees."""
    gen = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    # two smooth maps [2, 8, 8], of mean 1 (so that the descriptor sees them)
    smooth = torch.stack([1 + 0.5 * xx, 1 - 0.5 * yy])
    weights = torch.randn(2, 6, 2, generator=gen)  # per factor: each channel's weight per map
    base = torch.randn(6, 8, 8, generator=gen)

    def parts(n: int) -> torch.Tensor:
        a = torch.randn(n, 2, generator=gen)  # two whole-image factors per image
        shift = torch.einsum("nf,fcm,mhw->nchw", a, weights, smooth)
        return base + shift + 0.02 * torch.randn(n, 6, 8, 8, generator=gen)

    fit, held = parts(160), parts(40)
    one = torch.zeros(160, dtype=torch.long)
    whole = ImageContext.fit(fit, one, 1, 4, torch.float32)
    factored = ImageContext.fit(fit, one, 1, 4, maps=2)  # float16, 2 maps
    assert factored.maps is not None and factored.maps.shape == (1, 2, 64)
    assert factored.effect.numel() + factored.maps.numel() < whole.effect.numel() / 8  # 176 of 1,536
    k = torch.zeros(40, dtype=torch.long)
    raw_var = held.var(dim=0).mean()
    assert whole.remove(held, k).var(dim=0).mean() < 0.01 * raw_var
    assert factored.remove(held, k).var(dim=0).mean() < 0.01 * raw_var
    state = factored.state_tensors()
    assert state["context.maps"].dtype == torch.float16
    assert torch.equal(state["context.maps"].float(), factored.maps)  # already rounded
    loaded = ImageContext.from_state(state)
    assert torch.equal(loaded.remove(held, k), factored.remove(held, k))
    two = torch.tensor([0, 0, 0])
    traced = torch.jit.trace(lambda f, t: factored.remove(f, t), (held[:3], two), check_trace=False)
    torch.testing.assert_close(traced(held[:3], two), factored.remove(held[:3], two), rtol=1e-5, atol=1e-5)


def test_spatial_maps_pad_types_of_different_sizes() -> None:
    """Types with fewer components (and so fewer maps) than the widest are zero-padded; a type
    without images keeps no context; a mixed batch equals each type's own pass, with or without
    the components passed in."""
    feats = torch.cat([_parts(40, 0), _parts(8, 1)])
    types = torch.cat([_one_type(40), torch.ones(8, dtype=torch.long)])
    ctx = ImageContext.fit(feats, types, 3, 8, torch.float32, maps=100)
    assert ctx.maps is not None
    assert ctx.maps.shape == (3, 16, 36)  # widest: 4 components x 4 channels = 16 maps
    assert (ctx.maps[1].abs().sum(dim=1) > 0).sum() == 4  # 1 component x 4 channels
    assert torch.equal(ctx.maps[2], torch.zeros_like(ctx.maps[2]))
    x = torch.cat([_parts(2, 5), _parts(2, 6)])
    t = torch.tensor([0, 1, 2, 1])
    mixed = ctx.remove(x, t)
    for i in range(4):
        assert torch.allclose(mixed[i : i + 1], ctx.remove(x[i : i + 1], t[i : i + 1]))
    assert torch.equal(mixed[2], x[2])
    z = ctx.whitened(x, t)  # the components a caller that has them passes (diffusion.context=image)
    assert torch.equal(ctx.remove(x, t, z), mixed)
    assert not torch.allclose(ctx.remove(x, t, z.flip(0))[:2], mixed[:2])  # each image's own row
    whole = ImageContext.fit(feats, types, 3, 8, torch.float32)  # 16 maps >= rank: exact
    torch.testing.assert_close(mixed, whole.remove(x, t), rtol=1e-4, atol=1e-4)


def test_whitened_components_have_unit_norm_over_the_fit_images() -> None:
    """The docstring said the whitened components have unit variance; they are the left singular
    vectors, orthonormal over the n fit images (variance 1/n), which it says now."""
    scales = torch.tensor([5.0, 3, 2, 1, 0.5, 0.1])
    g = torch.randn(40, 6, generator=torch.Generator().manual_seed(0)) * scales
    centre, basis = whitening(g, 3)
    z = (g - centre) @ basis
    assert torch.allclose(z.T @ z, torch.eye(3), atol=1e-4)
    assert torch.allclose(z.var(dim=0, unbiased=False), torch.full((3,), 1 / 40), atol=1e-5)


def test_the_effect_is_the_ridge_least_squares_fit_of_each_types_images() -> None:
    """Each type's effect is the ridge least-squares fit of its images' features on their whitened
    components and an intercept, whatever the fit's chunks of images (more images than one chunk,
    the types interleaved)."""
    from diffqc.context import FIT_CHUNK, RIDGE, descriptor

    gen = torch.Generator().manual_seed(3)
    n = 2 * FIT_CHUNK + 9
    feats = torch.randn(n, 3, 4, 5, generator=gen) + torch.randn(n, 1, 1, 1, generator=gen)
    types = torch.arange(n) % 2
    ctx = ImageContext.fit(feats, types, 2, 4, torch.float32, per_component=1)
    for ty in range(2):
        x = feats[types == ty].double()
        centre, basis = whitening(descriptor(x), 4)
        design = torch.cat([(descriptor(x) - centre) @ basis, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        gram = design.T @ design + RIDGE * torch.eye(design.shape[1], dtype=x.dtype)
        want = torch.linalg.solve(gram, design.T @ x.flatten(1))[:-1]
        assert torch.allclose(ctx.effect[ty, :4].double(), want, atol=1e-5), ty


def test_8_bit_tables_are_exact_only_when_read_as_8_bit() -> None:
    """As the Denoiser's eigenbases: a context stored in 8 bits reads back its stored values under
    an 8-bit setting, and under a float setting is rounded to it (to float16 here), as a table
    stored at any other precision is; a saved-loaded-saved context writes the same bytes."""
    ctx = ImageContext.fit(_parts(200, 0), _one_type(200), 1, 4, torch.float16, maps=3, int8=True)
    state = ctx.state_tensors()
    assert state["context.effect"].dtype == torch.int8 and "context.maps_scale" in state
    again = ImageContext.from_state(state, torch.float16, int8=True)
    assert torch.equal(again.effect, ctx.effect) and again.maps is not None and ctx.maps is not None
    assert torch.equal(again.maps, ctx.maps)
    assert all(torch.equal(again.state_tensors()[k], v) for k, v in state.items())
    as_float = ImageContext.from_state(state, torch.float16)
    assert torch.equal(as_float.effect, ctx.effect.half().float())
    assert as_float.maps is not None and torch.equal(as_float.maps, ctx.maps.half().float())
