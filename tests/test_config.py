"""Every config field is validated when it is set: --set, config.json and the Python API."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from diffqc.config import (
    CalibrationConfig,
    DetectorConfig,
    ScoringConfig,
    TrainConfig,
    config_keys,
    parse_overrides,
    with_overrides,
)
from diffqc.errors import ConfigError


@pytest.mark.parametrize(("key", "value", "message"), [
    ("train.steps", "abc", "train.steps must be an integer, got 'abc'"),
    ("train.steps", -1, "train.steps must be >= 0"),
    ("train.lr", -1, "train.lr must be in (0, 1]"),
    # values a slip of the keyboard gives (--set ...=1e308, 10^11): each was a traceback, or ate
    # the machine's memory until the kernel killed the process
    ("train.lr", 1e308, "train.lr must be in (0, 1], got 1e+308"),
    ("scoring.smooth_sigma", 1e308,
     "scoring.smooth_sigma must be < 63.875 (its kernel reaches round(4 x sigma) px each way, fewer than "
     "backbone.input_size, 256 px), got 1e+308"),
    ("backbone.pool", 10**11,
     "backbone.pool must be in [1, 256] (at most backbone.input_size), got 100000000000"),
    ("scoring.quadrature_nodes", 10**11, "scoring.quadrature_nodes must be at most the 751 timesteps the "
     "network is trained on (train.t_min..t_max, 50..800), got 100000000000"),
    ("scoring.noises_per_timestep", 10**11,
     "scoring.noises_per_timestep must be in [1, 4096], got 100000000000"),
    ("scoring.bank_timesteps", [100, 1000], "unknown config field 'scoring.bank_timesteps'"),
    ("scoring.quadrature_nodes", 0, "scoring.quadrature_nodes must be >= 1"),
    ("scoring.log_det", "yes", "scoring.log_det must be true or false"),
    ("scoring.topk", 2, "scoring.topk must be in (0, 1]"),
    ("scoring.topk", 0, "scoring.topk must be in (0, 1]"),
    ("scoring.aggregation", "median", "one of topk, max, mean"),
    ("calibration.tail", "exp", "calibration.tail must be one of exponential, none; got 'exp'"),
    ("calibration.alpha_reject", 0.2, "must be <= calibration.alpha_review"),
    ("calibration.fraction", 1.0, "calibration.fraction must be in (0, 1)"),
    ("diffusion.schedule", "foo", "diffusion.schedule must be one of cosine, linear; got 'foo'"),
    # a block per unit of depth, built one by one: 10^30 (a hand edit) built until the OOM killer
    ("diffusion.depth", 65, "diffusion.depth must be in [1, 64], got 65"),
    ("diffusion.prior", "global", "one of local, none"),
    ("train.t_max", 1000, "train.t_max must be < diffusion.timesteps"),
    ("scoring.smooth_sigma", 1e6, "scoring.smooth_sigma must be < 63.875 (its kernel"),
    ("backbone.name", "resnet", "efficientnet-lite2, mobilenet-v2 or onnx:PATH; got 'resnet'"),
    ("backbone.name", "mobilenet", "or onnx:PATH; got 'mobilenet' (did you mean 'mobilenet-v2'?)"),
    ("backbone.layers", "blocks.3", "must be a list of str"),
    # --set reads a value as JSON: a comma-separated string is not a list, and it says how
    ("backbone.layers", "blocks.3,blocks.5", "backbone.layers must be a list of str, got 'blocks.3,blocks.5' "
     """(a list in JSON: --set 'backbone.layers=["blocks.3", "blocks.5"]')"""),
    ("backbone.grid", "4,4",
     "backbone.grid must be a list of int, got '4,4' (a list in JSON: --set 'backbone.grid=[4, 4]')"),
    # a list written with its brackets but without JSON's quotes (as Python or YAML write it):
    # the hint quoted the brackets into the names, ["[features.6", "features.13]"]
    ("backbone.layers", "[features.6,features.13]", "backbone.layers must be a list of str, got "
     "'[features.6,features.13]' (a list in JSON: "
     """--set 'backbone.layers=["features.6", "features.13"]')"""),
    ("backbone.layers", "['a', 'b']", """(a list in JSON: --set 'backbone.layers=["a", "b"]')"""),
    ("backbone.grid", "(4, 4)", "(a list in JSON: --set 'backbone.grid=[4, 4]')"),
    ("method", "vae", "method must be one of diffusion, patchcore, padim; got 'vae'"),
    # a decimal comma (`--set calibration.alpha_review=0,05`): named, not taken
    ("calibration.alpha_review", "0,05",
     "calibration.alpha_review must be a number, got '0,05': write the decimal with a point, 0.05"),
    # a share as `calibrate --alpha-review` takes it (5%, or a 5 meant as 5 %): named, not taken
    ("calibration.alpha_review", "5%",
     "calibration.alpha_review must be a number, got '5%': write the share as a number, 0.05"),
    ("calibration.alpha_reject", "0.5%",
     "calibration.alpha_reject must be a number, got '0.5%': write the share as a number, 0.005"),
    ("calibration.alpha_review", 5,
     "calibration.alpha_review must be in (0, 1), got 5.0: for 5 % write 0.05"),
    ("method", "difusion", "method must be one of diffusion, patchcore, padim; got 'difusion' (did you "
     "mean 'diffusion'?)"),
    ("method", "PaDiM", "got 'PaDiM' (did you mean 'padim'?)"),
    ("train.seed", True, "must be an integer, got True"),
    ("train.step", 3, "unknown config field 'train.step'; did you mean train.steps"),
    # a field without its section (as train's --fit / --steps options read): the full key
    ("resize", "pad", "unknown config field 'resize'; did you mean backbone.resize?"),
    ("steps", 5, "unknown config field 'steps'; did you mean train.steps?"),
    ("scoring", 3, "unknown config field 'scoring'"),
    ("nosuch.key", 3, "unknown config field 'nosuch.key'"),
    # a key nothing is near sent the user to docs/INTERFACES.md, which lists no keys: the keys
    # of the section it names (or of the nearest) are named, else every key
    ("train.gradient_clipping", 3, "unknown config field 'train.gradient_clipping'; the keys of train are "
     "train.steps, train.batch_images, train.locations_per_image, train.lr,"),
    ("traning.momentum", 3, "unknown config field 'traning.momentum'; the keys of train are train.steps,"),
    ("scoring", 3, "unknown config field 'scoring'; the keys of scoring are scoring.quadrature_nodes,"),
    ("nosuch.key", 3, "unknown config field 'nosuch.key'; the keys are method, backbone.{name, layers, "),
])
def test_bad_override_is_a_config_error_naming_the_field(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        with_overrides(DetectorConfig(), {key: value})
    assert message in str(exc.value)


def test_the_smoothing_limit_named_is_the_one_checked() -> None:
    """``scoring.smooth_sigma=15.9`` at a 64 px input was refused as "must be < backbone.input_size
    / 4 (16 px), got 15.9": 15.9 is below 16. The kernel reaches round(4 x sigma) px each way and
    must stay inside the input, so the limit is 15.875 there, and the message names it."""
    with pytest.raises(ConfigError) as exc:
        with_overrides(DetectorConfig(), {"backbone.input_size": 64, "scoring.smooth_sigma": 15.9})
    assert str(exc.value) == ("scoring.smooth_sigma must be < 15.875 (its kernel reaches round(4 x sigma) px "
                              "each way, fewer than backbone.input_size, 64 px), got 15.9")
    taken = with_overrides(DetectorConfig(), {"backbone.input_size": 64, "scoring.smooth_sigma": 15.87})
    assert taken.scoring.smooth_sigma == 15.87  # just below the limit named


def test_numbers_written_without_a_leading_zero_or_with_one_are_numbers() -> None:
    """``--set scoring.topk=.01`` was refused as "must be a number, got '.01'" and ``--set
    train.steps=01`` as "must be an integer, got '01'" (JSON writes neither so): both are taken as
    the numbers they are. A decimal comma is still named, not taken."""
    given = ["scoring.topk=.01", "train.steps=01", "train.lr=+2e-3", "calibration.alpha_review=0.1"]
    cfg = with_overrides(DetectorConfig(), parse_overrides(given))
    assert (cfg.scoring.topk, cfg.train.steps, cfg.train.lr, cfg.calibration.alpha_review) == (
        0.01, 1, 0.002, 0.1)
    assert isinstance(cfg.train.steps, int)
    with pytest.raises(ConfigError, match=r"must be a number, got '0,05': write the decimal with a point"):
        with_overrides(DetectorConfig(), parse_overrides(["scoring.topk=0,05"]))
    with pytest.raises(ConfigError, match=r"train\.steps must be an integer, got 1\.5"):
        with_overrides(DetectorConfig(), parse_overrides(["train.steps=1.5"]))


def test_the_plain_network_is_refused_for_training_without_steps() -> None:
    """``--set diffusion.prior=none`` without ``--steps`` trained nothing: the network alone
    scored every part, untrained and so random (its output layer starts at zero only beside the
    Gaussians): mean AUROC 0.37 and no defect flagged on the synthetic set, and not a word. A
    config to train with is refused so, naming ``--steps``; a bundle's config with it still reads."""
    from diffqc.config import check_trainable

    plain = with_overrides(DetectorConfig(), {"diffusion.prior": "none"})  # read, as a bundle's config
    with pytest.raises(ConfigError, match=r"^diffusion\.prior=none .*untrained.*--steps N"):
        check_trainable(plain)
    check_trainable(with_overrides(plain, {"train.steps": 10}))  # trained: fine
    check_trainable(DetectorConfig())  # the Gaussians alone: fine
    check_trainable(with_overrides(plain, {"method": "padim"}))  # PaDiM trains no network


@pytest.mark.parametrize(("over", "said"), [
    ({"backbone.layers": ["features.6", "features.6"]}, "tap block 6 twice"),
    ({"backbone.layers": ["features.6", "6"]}, "tap block 6 twice"),
    ({"backbone.layers": ["blocks.6", "features.13"]}, "'blocks.6' is not a block of mobilenet-v2"),
    ({"backbone.layers": ["features.x"]}, "'features.x' is not a block of mobilenet-v2"),
    ({"backbone.name": "efficientnet-lite0", "backbone.layers": ["features.6"]},
     "'features.6' is not a block of efficientnet-lite0: name one as blocks.N or N"),
    ({"backbone.name": "onnx:/m.onnx", "backbone.layers": ["/model.4", "/model.6", "/model.4"]},
     "tap '/model.4' twice"),
])
def test_taps_named_twice_or_by_another_backbones_names_are_refused_for_training(
        over: dict[str, object], said: str) -> None:
    """``--layers features.6,features.6`` trained one tap without a word (config.json saying two),
    and ``blocks.6`` (EfficientNet-Lite's name) tapped MobileNetV2's block 6. A config to train
    with is refused so; a bundle's config still reads (it was trained as it is)."""
    from diffqc.config import check_trainable

    config = with_overrides(DetectorConfig(), over)
    with pytest.raises(ConfigError, match=re.escape(said)):
        check_trainable(config)
    check_trainable(with_overrides(DetectorConfig(), {"backbone.layers": ["6", "features.13"]}))
    check_trainable(with_overrides(DetectorConfig(), {"backbone.name": "efficientnet-lite0",
                                                      "backbone.layers": ["blocks.2", "4", "blocks.10"]}))


def test_settings_that_change_nothing_are_named() -> None:
    """The settings given that the rest of the config leaves unused (``--method padim --steps
    10``, a tiling setting without tiling) trained as if absent, and config.json recorded them as
    if used: each is named, with what leaves it unused. Settings not given are never named."""
    from diffqc.config import unused_settings

    padim = with_overrides(DetectorConfig(), {"method": "padim", "train.steps": 10,
                                              "scoring.heat_map": "fused", "tiling.scale": 0.5})
    said = unused_settings(padim, ["method", "train.steps", "train.seed", "scoring.heat_map",
                                   "scoring.smooth_sigma", "padim.dims", "tiling.scale"])
    assert said == ("settings given that change nothing, recorded in config.json all the same: train.steps "
                    "and scoring.heat_map (not used by method=padim), tiling.scale (tiling.mode=off: "
                    "--tile cuts large images into tiles)")
    gaussians = with_overrides(DetectorConfig(), {"train.lr": 1e-5, "diffusion.context": "ring"})
    assert unused_settings(gaussians, ["train.lr", "diffusion.context", "diffusion.prior_dims",
                                       "scoring.topk", "patchcore.max_bank"]) == (
        "settings given that change nothing, recorded in config.json all the same: train.lr and "
        "diffusion.context (train.steps=0: the network is not trained, --steps N trains it)")
    trained = with_overrides(gaussians, {"train.steps": 10, "tiling.mode": "auto"})
    assert unused_settings(trained, ["train.lr", "diffusion.context", "tiling.scale", "padim.dims"]) == (
        "settings given that change nothing, recorded in config.json all the same: padim.dims "
        "(not used by method=diffusion)")
    assert unused_settings(DetectorConfig(), []) is None


def test_python_api_validates_too() -> None:
    with pytest.raises(ConfigError, match=r"train\.steps must be an integer"):
        TrainConfig(steps="10")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"scoring\.topk"):
        ScoringConfig(topk=1.5)
    with pytest.raises(ConfigError, match=r"calibration\.tail"):
        CalibrationConfig(tail="exp")
    with pytest.raises(ConfigError, match=r"train\.t_max must be < diffusion\.timesteps"):
        DetectorConfig(train=TrainConfig(t_max=2000))


def test_values_are_normalised() -> None:
    cfg = with_overrides(DetectorConfig(), {"train.lr": 1, "backbone.layers": ["a", "b"],
                                            "train.steps": 20.0})
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert cfg.backbone.layers == ("a", "b")
    assert isinstance(cfg.train.steps, int) and cfg.train.steps == 20


def test_json_round_trip_and_bad_file(tmp_path: Path) -> None:
    cfg = with_overrides(DetectorConfig(), {"method": "padim", "scoring.topk": 0.02})
    cfg.to_json(tmp_path / "config.json")
    assert DetectorConfig.from_json(tmp_path / "config.json") == cfg
    data = json.loads((tmp_path / "config.json").read_text())
    data["scoring"]["topk"] = 5
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"bad\.json: scoring\.topk must be in \(0, 1\]"):
        DetectorConfig.from_json(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot read config"):
        DetectorConfig.from_json(tmp_path / "broken.json")


def test_a_config_saved_with_a_byte_order_mark_reads(tmp_path: Path) -> None:
    """A config.json edited in Windows Notepad or written by PowerShell starts with a UTF-8 byte
    order mark: it was refused as damaged ("cannot read config ...: Unexpected UTF-8 BOM")."""
    cfg = with_overrides(DetectorConfig(), {"method": "padim", "scoring.topk": 0.02})
    (tmp_path / "config.json").write_bytes(b"\xef\xbb\xbf" + cfg.json_bytes())
    assert DetectorConfig.from_json(tmp_path / "config.json") == cfg


def test_every_default_key_is_settable() -> None:
    base = DetectorConfig()
    for key in config_keys():
        section, _, leaf = key.rpartition(".")
        node = getattr(base, section) if section else base
        assert with_overrides(base, {key: getattr(node, leaf)}) == base


# The settings of diffqc's version (``__version__``). A bundle records the version that wrote it,
# and an older diffqc refuses a setting it does not know as a newer version's ("upgrade diffqc
# here", tests/test_bundle.py), which tells the user the truth only if each version that adds a
# setting (or drops one), or a value of one that an older diffqc does not read (0.3.0:
# diffusion.prior_storage=int8), raises the minor version: write the new version and settings here then.
SETTINGS_OF_VERSION = ("0.3.0", (
    "method", "backbone.name", "backbone.layers", "backbone.input_size", "backbone.pool",
    "backbone.weights_sha256", "backbone.resize", "backbone.grid", "backbone.input_gain",
    "diffusion.timesteps", "diffusion.schedule", "diffusion.hidden", "diffusion.depth",
    "diffusion.embed_dim", "diffusion.null_prob", "diffusion.prior", "diffusion.prior_dims",
    "diffusion.prior_seed", "diffusion.prior_radius", "diffusion.prior_rank", "diffusion.prior_covariance",
    "diffusion.prior_storage", "diffusion.context", "diffusion.prior_context",
    "diffusion.prior_context_maps", "train.steps", "train.batch_images", "train.locations_per_image",
    "train.lr", "train.weight_decay", "train.ema_decay", "train.t_min", "train.t_max",
    "train.separation_weight", "train.separation_margin", "train.seed", "scoring.quadrature_nodes",
    "scoring.noises_per_timestep", "scoring.log_det", "scoring.aggregation", "scoring.topk",
    "scoring.smooth_sigma", "scoring.seed", "scoring.type_candidates", "scoring.heat_map",
    "scoring.memory_ratio", "calibration.fraction", "calibration.alpha_reject", "calibration.alpha_review",
    "calibration.tail", "calibration.min_per_type", "calibration.scheme", "calibration.folds",
    "patchcore.coreset_ratio", "patchcore.projection_dim", "patchcore.max_bank", "patchcore.neighbors",
    "patchcore.aggregation", "patchcore.topk", "patchcore.seed", "patchcore.chunk", "padim.dims",
    "padim.covariance", "padim.epsilon", "padim.aggregation", "padim.topk", "padim.seed", "batch_size",
    "tiling.mode", "tiling.overlap", "tiling.scale",
))


def test_a_version_that_adds_a_setting_raises_the_minor_version() -> None:
    from diffqc import __version__

    version, settings = SETTINGS_OF_VERSION
    added, dropped = sorted(set(config_keys()) - set(settings)), sorted(set(settings) - set(config_keys()))
    assert (__version__, sorted(config_keys())) == (version, sorted(settings)), (
        f"settings added {added}, dropped {dropped} since diffqc {version} (this is {__version__}): "
        f"diffqc {version} refuses a bundle with a setting it does not know as a newer version's, so a "
        f"version that adds or drops one raises the minor: write it and its settings here")
