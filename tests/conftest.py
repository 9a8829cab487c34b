"""Shared fixtures: a tiny dataset with an obvious answer and a tiny trained model bundle."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import resource
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.ci_strict import pytest_runtest_makereport  # noqa: F401 (the CI=true skip rule, a hook)

pytest_plugins = ["pytester"]

torch.set_num_threads(min(2, os.cpu_count() or 1))

CLEAR_TYPES = ("stripes", "dots")


@contextlib.contextmanager
def full_disk(limit: int) -> Iterator[None]:
    """A real write failure, as a full disk gives: the kernel refuses to grow any file of this
    process past ``limit`` bytes (RLIMIT_FSIZE; EFBIG where a full disk says ENOSPC)."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def run_with_mount(source: Path, target: Path, argv: list[str], *,
                   read_only: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` where ``target`` is a bind mount of ``source`` (read-only with ``read_only``),
    as a volume mounted into a container is: in a mount namespace of the command's own
    (util-linux ``unshare``; a user namespace where the test runs unprivileged), so the mount is
    real and gone when the command ends. Skips where the system allows no mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare (a mount namespace)")
    remount = 'mount -o remount,bind,ro "$2" && ' if read_only else ""
    script = f'mount --bind "$1" "$2" && {remount}shift 2 && exec "$@"'
    flags = "-m" if os.geteuid() == 0 else "-rm"
    probe = subprocess.run(["unshare", flags, "sh", "-c", 'mount --bind "$1" "$1"', "sh", str(source)],
                           capture_output=True, text=True)
    if probe.returncode:  # no mount namespace or no mount(8) here: the system's, not diffqc's
        pytest.skip(f"cannot bind-mount in a mount namespace here: {probe.stderr.strip()}")
    return subprocess.run(["unshare", flags, "sh", "-c", script, "sh", str(source), str(target), *argv],
                          capture_output=True, text=True, timeout=300)


def calibrated_an_hour_ago(tmp_path: Path, **settings: Any) -> tuple[Path, Any, float]:
    """A stand-in bundle for the service's line (``LineServices``): a folder whose
    ``calibration.json`` was written an hour ago; the drift settings it is read with (window 20,
    10 parts, level 0.01; ``settings`` beside or instead); and the time now."""
    import time
    from types import SimpleNamespace

    bundle = tmp_path / "model"
    bundle.mkdir()
    (bundle / "calibration.json").write_text("{}")
    now = time.time()
    os.utime(bundle / "calibration.json", (now - 3600, now - 3600))
    line = {"drift_window": 20, "drift_min_parts": 10, "drift_level": 0.01, "model_path": bundle,
            "calibration_poll_s": 1.0, **settings}
    return bundle, SimpleNamespace(**line), now


def memory_cgroup(limit: int) -> Path:
    """A memory cgroup of this machine limited to ``limit`` bytes, as a container's is (v2, or
    v1's memory controller, as Docker on an Ubuntu 20.04 host gives); skips where none can be
    made (not root, a read-only cgroup file system). A process joins it by writing its pid to
    ``cgroup.procs``; the caller removes the folder once its processes have ended."""
    import uuid

    unified, name = Path("/sys/fs/cgroup"), f"diffqc-test-{uuid.uuid4().hex[:8]}"
    if (unified / "cgroup.controllers").is_file() and "memory" in (
            unified / "cgroup.subtree_control").read_text(errors="replace"):
        folder, limit_file = unified / name, "memory.max"
    elif (unified / "memory" / "memory.limit_in_bytes").is_file():
        folder, limit_file = unified / "memory" / name, "memory.limit_in_bytes"
    else:
        pytest.skip("no memory cgroup hierarchy here")
    try:
        folder.mkdir()
        (folder / limit_file).write_text(str(limit))
    except OSError as exc:
        if folder.is_dir():
            folder.rmdir()
        pytest.skip(f"cannot make a memory cgroup here: {exc}")
    return folder


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with a few bytes of pixel data:
    a decompression bomb when large (Pillow refuses to open one above 2 x its pixel limit)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))


def load_benchmark(script: str) -> Any:
    """``benchmarks/<script>.py`` as a module (the benchmarks are scripts, not a package), loaded
    once per session under ``diffqc_bench_<script>``."""
    name = f"diffqc_bench_{script}"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class FakeClock:
    """``time`` as a benchmark reads it (``perf_counter``, ``process_time``): a clock that moves
    only when a test moves it, so that a timing method can be checked on a loaded machine."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def process_time(self) -> float:
        return self.now


def _pattern(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    shift = rng.uniform(-1.5, 1.5, 2)
    if kind == "stripes":
        img = 0.5 + 0.35 * np.sin(2 * np.pi * (xx + shift[0]) / 8.0)
    else:
        img = 0.85 - 0.6 * ((np.sin(2 * np.pi * (xx + shift[0]) / 10) > 0.5)
                            & (np.sin(2 * np.pi * (yy + shift[1]) / 10) > 0.5))
    img = img * rng.uniform(0.9, 1.1) + rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def write_clear_dataset(root: Path, n_train: int = 24, n_test: int = 8, size: int = 64,
                        seed: int = 0) -> Path:
    """Two feature types in MVTec layout; defects are big dark or bright blobs (with masks)."""
    rng = np.random.default_rng(seed)
    for t in CLEAR_TYPES:
        for split, kind, n in (("train", "good", n_train), ("test", "good", n_test),
                               ("test", "blob", n_test)):
            folder = root / t / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = _pattern(t, rng, size)
                name = f"{t}_{split}_{kind}_{i:03d}.png"
                if kind == "blob":
                    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
                    r = size // 7
                    yy, xx = np.mgrid[0:size, 0:size]
                    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                    img[mask] = 0.05 if i % 2 else 0.98
                    mdir = root / t / "ground_truth" / kind
                    mdir.mkdir(parents=True, exist_ok=True)
                    Image.fromarray((mask * 255).astype(np.uint8)).save(mdir / f"{Path(name).stem}_mask.png")
                Image.fromarray((img * 255).astype(np.uint8)).save(folder / name)
    return root


@pytest.fixture(scope="session")
def clear_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clear_dataset(tmp_path_factory.mktemp("clear"))


def tiny_config(method: str = "diffusion", **over: object):
    from diffqc.config import DetectorConfig, with_overrides

    base = {
        "method": method, "backbone.input_size": 64, "diffusion.hidden": 64, "diffusion.depth": 2,
        "train.steps": 250, "train.batch_images": 8, "train.locations_per_image": 32,
        "scoring.smooth_sigma": 2.0, "scoring.topk": 0.05, "calibration.fraction": 0.35,
        "patchcore.max_bank": 2000,
    }
    base.update(over)
    return with_overrides(DetectorConfig(), base)


def write_mono12_dataset(root: Path) -> Path:
    """``write_clear_dataset`` as a 12-bit camera saves it: 16-bit grey PNGs holding 0..4095, read
    nearly black; the masks as they are."""
    write_clear_dataset(root)
    for path in root.rglob("*.png"):
        if "ground_truth" not in path.parts:
            grey = np.asarray(Image.open(path).convert("L"), dtype=np.int64)
            Image.fromarray((grey * 4095 // 255).astype(np.uint16)).save(path)
    return root


MONO12_GAIN = 65535 / 4095  # backbone.input_gain that reads 4095 as white, as train names it


@pytest.fixture(scope="session")
def mono12_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(bundle, dataset): a diffusion model of a 12-bit camera's parts, trained with the gain."""
    from diffqc.data import load_dataset
    from diffqc.model import Detector

    data = write_mono12_dataset(tmp_path_factory.mktemp("mono12"))
    det = Detector(tiny_config(**{"backbone.input_gain": MONO12_GAIN}), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # too few calibration images for the levels: a tiny set's
        det.fit(load_dataset(data), progress=False)
    return det.save(tmp_path_factory.mktemp("models") / "mono12"), data


def drawn_part_brightness(heatmap: Path) -> float:
    """The median grey level (0..255) of the part as a heat-map panel draws it (its left image,
    below the header): a 12-bit part drawn as read is nearly black (about 14), as the model reads
    it as bright as an 8-bit one."""
    grey = np.asarray(Image.open(heatmap).convert("L"), dtype=np.float64)
    h, w = grey.shape
    return float(np.median(grey[int(0.3 * h): int(0.9 * h), int(0.05 * w): int(0.35 * w)]))


@pytest.fixture(scope="session")
def tiny_model(clear_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusion model bundle trained on ``clear_dataset`` (seconds on a CPU)."""
    from diffqc.data import load_dataset
    from diffqc.model import Detector

    det = Detector(tiny_config(), device="cpu").fit(load_dataset(clear_dataset), progress=False)
    return det.save(tmp_path_factory.mktemp("models") / "tiny")


CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NEEDS_BROWSER = pytest.mark.skipif(not (CHROMIUM and Path(CHROMEDRIVER).exists()),
                                   reason="chromium / chromedriver not installed "
                                          "(scripts/install_browser.sh)")


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Chromium driven by Selenium (the dashboard's, the evaluation report's reader)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
