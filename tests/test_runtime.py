"""The CLI imports only what a command uses: on an exported bundle, ``diffqc inspect --runtime
onnx|openvino`` and ``diffqc serve`` never import PyTorch or matplotlib (each checked in a fresh
process, through the CLI entry point)."""

from __future__ import annotations

import ast
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

pytest.importorskip("onnxruntime")

from diffqc import export as ex
from diffqc.runtime import _nvidia_driver_loaded

HEAVY = ("torch", "matplotlib")


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def exported(tiny_model: Path, clear_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = tmp_path_factory.mktemp("lazy") / "tiny"
    shutil.copytree(tiny_model, bundle)
    ex.export_bundle(bundle, data=clear_dataset, threads=1, check_images=4, log=_quiet)
    return bundle


def _run_main(args: list[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``diffqc ARGS`` in a fresh interpreter; it prints, last, which heavy modules it imported."""
    code = ("import sys\nfrom diffqc.cli import main\n"
            f"try:\n    rc = main({args!r})\nexcept SystemExit as exc:\n    rc = exc.code\n"
            f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], rc)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=env)


def _heavy(out: str) -> tuple[list[str], int]:
    line = out.strip().splitlines()[-1]
    assert line.startswith("HEAVY "), out
    names, rc = line.removeprefix("HEAVY ").rsplit(" ", 1)
    return ast.literal_eval(names), int(rc)


def test_version_imports_nothing_heavy() -> None:
    proc = _run_main(["--version"])
    assert proc.returncode == 0, proc.stderr
    assert "diffqc" in proc.stdout
    assert _heavy(proc.stdout) == ([], 0)


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_inspect_on_an_exported_bundle_imports_no_torch(exported: Path, clear_dataset: Path,
                                                        runtime: str) -> None:
    if runtime == "openvino":
        pytest.importorskip("openvino")
    image = next((clear_dataset / "dots" / "test").rglob("*.png"))
    proc = _run_main(["inspect", str(exported), str(image), "--runtime", runtime, "--threads", "1"])
    assert proc.returncode == 0, proc.stderr
    assert '"decision"' in proc.stdout  # it really inspected
    assert _heavy(proc.stdout) == ([], 0)


@pytest.mark.parametrize("runtime", ["auto", "onnx"])
def test_a_device_name_pytorch_does_not_take_is_refused_on_an_exported_bundle(exported: Path,
                                                                             runtime: str) -> None:
    """``--device gpu`` (or ``mps``) on a bundle ONNX Runtime runs was taken silently, the model
    run on the CPU; as on PyTorch, it is a :class:`DeviceError` naming the devices diffqc takes."""
    from diffqc.errors import ConfigError, DeviceError
    from diffqc.runtime import OnnxDetector, load_detector

    for name in ("gpu", "mps", "cuda:x"):
        with pytest.raises(DeviceError, match=rf"device '{name}' is not supported; use cpu, cuda or cuda:N"):
            load_detector(exported, runtime, device=name)
    assert isinstance(load_detector(exported, "onnx", device="cpu"), OnnxDetector)
    # more threads than this process may use: taken, and said (two jobs sharing cores slowed
    # each other far more than twice, README "Deployment")
    from diffqc.runtime import available_cores

    with pytest.warns(UserWarning, match=rf"--threads {available_cores() + 1} is more than the "
                                         rf"{available_cores()} core"):
        load_detector(exported, "onnx", threads=available_cores() + 1)
    if runtime == "onnx":  # ran on the CPU, said nothing (without a GPU too)
        with pytest.raises(ConfigError, match=r"ONNX Runtime runs the exported model on the CPU"):
            load_detector(exported, runtime, device="cuda")


def test_auto_on_an_exported_bundle_imports_no_torch_when_torch_is_slower(exported: Path,
                                                                          clear_dataset: Path) -> None:
    from diffqc.runtime import choose_runtime

    if _nvidia_driver_loaded():
        pytest.skip("an NVIDIA driver is loaded: auto asks PyTorch whether CUDA is usable")
    image = next((clear_dataset / "dots" / "test").rglob("*.png"))
    proc = _run_main(["inspect", str(exported), str(image), "--threads", "1"])
    assert proc.returncode == 0, proc.stderr
    heavy, _ = _heavy(proc.stdout)
    assert ("torch" in heavy) == (choose_runtime(exported).runtime == "torch")
    assert "matplotlib" not in heavy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_serve_on_an_exported_bundle_imports_no_torch(exported: Path, clear_dataset: Path, tmp_path: Path,
                                                      runtime: str) -> None:
    """The server loads the bundle, inspects a part over HTTP and stops on SIGINT; ``-X importtime``
    lists every module the process imported on the way."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    if runtime == "openvino":
        pytest.importorskip("openvino")
    port, token = _free_port(), "lazy-test-token-0123456789"
    env = {**os.environ, "DIFFQC_TOKEN": token}
    code = ("from diffqc.cli import main\n"
            f"raise SystemExit(main(['serve', {str(exported)!r}, '--host', '127.0.0.1', '--port', '{port}', "
            f"'--db', {str(tmp_path / 'r.db')!r}, '--data-dir', {str(tmp_path / 'data')!r}, "
            f"'--runtime', {runtime!r}, '--threads', '1', '--log-level', 'warning', "
            "'--max-image-mpx', '20']))\n")
    err = tmp_path / "stderr.txt"
    with open(err, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-X", "importtime", "-c", code], stderr=fh,
                                stdout=subprocess.DEVNULL, env=env, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, err.read_text()[-3000:]
            try:
                if httpx.get(url + "/readyz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail("the server did not become ready")
        body = next((clear_dataset / "dots" / "test").rglob("*.png")).read_bytes()
        r = httpx.post(url + "/v1/inspect", content=body, params={"feature_type": "dots", "part_id": "p1"},
                       headers={"Authorization": f"Bearer {token}",
                                "Content-Type": "application/octet-stream"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["decision"] in ("PASS", "REVIEW", "REJECT")
        frame = io.BytesIO()  # above the default 16.8 MP, within the --max-image-mpx 20 given
        Image.new("L", (4200, 4200), 128).save(frame, format="PNG")
        r = httpx.post(url + "/v1/inspect", content=frame.getvalue(), params={"feature_type": "dots"},
                       headers={"Authorization": f"Bearer {token}"}, timeout=120)
        assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    imported = {line.split("|")[-1].strip() for line in err.read_text().splitlines()
                if line.startswith("import time:")}
    assert "diffqc.service.app" in imported and "fastapi" in imported  # the log is complete
    assert not {m for m in imported if m.split(".")[0] in HEAVY}, sorted(
        m for m in imported if m.split(".")[0] in HEAVY)


@pytest.mark.parametrize("damage", ["classes", "format", "calibration"])
def test_one_bundle_reader_for_every_runtime(exported: Path, tmp_path: Path, damage: str) -> None:
    """PyTorch and the exported runtimes read a bundle through diffqc.bundle.read_bundle: the
    same damage is the same BundleError from each."""
    import json

    from diffqc.errors import BundleError
    from diffqc.model import Detector
    from diffqc.runtime import OnnxDetector

    bundle = tmp_path / "damaged"
    shutil.copytree(exported, bundle)
    meta = json.loads((bundle / "metadata.json").read_text())
    if damage == "classes":
        meta["classes"] = [*meta["classes"][:-1], "another"]
    elif damage == "format":
        meta["format"] = meta["format"] + 1
    (bundle / "metadata.json").write_text(json.dumps(meta))
    if damage == "calibration":
        (bundle / "calibration.json").write_text("{not json")
    messages = set()
    for load in (lambda: Detector.load(bundle, device="cpu"), lambda: OnnxDetector(bundle, threads=1)):
        with pytest.raises(BundleError) as info:
            load()
        messages.add(str(info.value))
    assert len(messages) == 1, messages
    assert {"classes": "calibration types", "format": "format", "calibration": "calibration.json"}[damage] \
        in messages.pop()


def test_inspect_samples_without_maps_cuts_each_frame_to_the_input_first(
        exported: Path, tmp_path: Path) -> None:
    """Calibration scores (inspect_samples, maps=False) come from images cut to the model's input
    as they are read — in either runtime, the same scores as inspecting the full frames."""
    import numpy as np
    from PIL import Image

    from diffqc.data import Sample, read_image
    from diffqc.model import Detector
    from diffqc.runtime import OnnxDetector

    rng = np.random.default_rng(0)
    samples = []
    for i in range(5):
        frame = (rng.uniform(0.3, 0.7, (150, 230, 3)) * 255).astype(np.uint8)  # not the input size
        Image.fromarray(frame).save(tmp_path / f"{i}.png")
        samples.append(Sample(tmp_path / f"{i}.png", "dots", 0))
    frames = [read_image(s.path) for s in samples]
    for det in (Detector.load(exported, device="cpu"), OnnxDetector(exported, threads=1)):
        streamed, kept = det.inspect_samples(samples, maps=False)
        whole = det.inspect(frames, ["dots"] * len(frames), maps=False)
        assert kept == samples
        assert [r.score for r in streamed] == [r.score for r in whole], type(det).__name__
        assert all(r.anomaly_map is None for r in streamed)


def test_inspect_of_a_long_list_scores_batch_size_images_at_a_time(
        exported: Path, clear_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`det.inspect(images)` on a whole test set at once (the README's call, from a notebook)
    scored every image, under every type, in one pass: 200 frames of 256 x 256 held 9.6 GB with
    the demo's 8 types (42 MB an image), a few hundred more ran out of memory. Either runtime
    scores ``batch_size`` images at a time, each as it is scored alone."""
    from dataclasses import replace

    import numpy as np

    from diffqc import routing
    from diffqc.data import load_dataset, read_image
    from diffqc.model import Detector
    from diffqc.runtime import OnnxDetector

    samples = [s for s in load_dataset(clear_dataset) if s.split == "test"][:7]
    images = [read_image(s.path) for s in samples]
    types = [s.feature_type if i % 2 else None for i, s in enumerate(samples)]  # known and unknown
    scored: list[int] = []
    route_and_score = routing.route_and_score

    def counted(given: Any, *args: Any, **kwargs: Any) -> Any:
        scored.append(len(given))
        return route_and_score(given, *args, **kwargs)

    monkeypatch.setattr(routing, "route_and_score", counted)
    for det in (Detector.load(exported, device="cpu"), OnnxDetector(exported, threads=1)):
        det.config = replace(det.config, batch_size=3)
        scored.clear()
        together = det.inspect(images, types)
        assert scored == [3, 3, 1], type(det).__name__
        alone = [det.inspect([image], [t])[0] for image, t in zip(images, types, strict=True)]
        for a, b in zip(together, alone, strict=True):
            assert (a.feature_type, a.decision, a.type_known) == (b.feature_type, b.decision, b.type_known)
            assert a.score == pytest.approx(b.score, rel=1e-5)
            assert a.type_scores == pytest.approx(b.type_scores, rel=1e-5)
            assert a.anomaly_map is not None and b.anomaly_map is not None
            np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-4, atol=1e-6)


def test_an_export_of_another_format_says_to_export_again(exported: Path, tmp_path: Path) -> None:
    """An export made by a newer diffqc on a workstation (another export format), copied with its
    bundle to an edge box: refused as "export.json format 2 is not 1", where the box can simply
    export again; it says so, and whose export it is."""
    import json

    from diffqc import __version__
    from diffqc.errors import BundleError
    from diffqc.runtime import OnnxDetector

    bundle = tmp_path / "b"
    shutil.copytree(exported, bundle)
    info = json.loads((bundle / "export.json").read_text())
    (bundle / "export.json").write_text(json.dumps({**info, "format": info["format"] + 1,
                                                    "diffqc_version": "99.0.0"}))
    at = re.escape(str(bundle))
    with pytest.raises(BundleError, match=(
            rf"model bundle {at}: its ONNX export is of format {info['format'] + 1}, by diffqc 99\.0\.0, and "
            rf"this diffqc {re.escape(__version__)} runs format {info['format']}: export it again here "
            rf"\(diffqc export {at}\), or upgrade diffqc to 99\.0\.0 or later")):
        OnnxDetector(bundle, threads=1)
    (bundle / "export.json").write_text(json.dumps({**info, "format": 0}))  # an older one: export again
    with pytest.raises(BundleError, match=r"its ONNX export is of format 0, by diffqc .* runs format 1: "
                                          r"export it again here \(diffqc export .*\)$"):
        OnnxDetector(bundle, threads=1)
