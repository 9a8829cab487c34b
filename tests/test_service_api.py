"""HTTP API of ``diffqc serve`` answered by a real (tiny) trained model."""

# ruff: noqa: F811  (fixtures imported from tests.test_service_common are re-bound as arguments)

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from diffqc import __version__
from tests.conftest import drawn_part_brightness, full_disk, png_header_only
from tests.test_service_common import (  # noqa: F401 (fixtures)
    AUTH,
    TOKEN,
    Samples,
    detector,
    png,
    running_app,
    samples,
    service_model,
    tinted,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"




def _png16(samples: Samples) -> bytes:
    data, _ = samples.one("PASS")
    gray = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.uint16) * 257
    img16 = png(gray)
    assert Image.open(io.BytesIO(img16)).mode.startswith("I;16")
    return img16


def _rgba(samples: Samples) -> bytes:
    data, _ = samples.one("PASS")
    rgba = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA")).copy()
    rgba[..., 3] = 200
    return png(rgba)


async def test_inspect_raw_and_multipart_store_one_record_each(
    detector: Any, samples: Samples, tmp_path: Path
) -> None:
    body, ftype = samples.one("REVIEW")
    async with running_app(detector, tmp_path) as (client, state):
        r = await client.post(
            "/v1/inspect", content=body, headers=AUTH, params={"feature_type": ftype, "part_id": "raw-1"}
        )
        assert r.status_code == 200, r.text
        raw = r.json()
        assert raw["decision"] == "REVIEW" and raw["part_id"] == "raw-1"
        assert raw["feature_type"] == ftype and raw["predicted_type"] in detector.classes_
        assert 0.0 < raw["p_value"] <= 1.0 and isinstance(raw["score"], float)
        # the request's total time contains the part's time from queue to verdict
        assert raw["total_ms"] >= raw["latency_ms"] > 0
        assert raw["heatmap_url"] == f"/v1/results/{raw['id']}/heatmap"
        assert raw["model_version"] == detector.version

        r = await client.post(
            "/v1/inspect",
            headers=AUTH,
            files={"image": ("x.png", body, "image/png")},
            data={"feature_type": ftype, "part_id": "mp-1", "line": "L1", "station": "S2", "camera": "C3"},
        )
        assert r.status_code == 200, r.text  # every form field the route reads (five were refused)
        mp = r.json()
        assert mp["part_id"] == "mp-1" and mp["score"] == pytest.approx(raw["score"], rel=1e-4)
        assert (mp["line"], mp["station"], mp["camera"]) == ("L1", "S2", "C3")

        # an empty part id is none, as an empty line, station or camera is (it was a 422 in the
        # query string, which a PLC template sending `part_id=` for a part without one met)
        r = await client.post("/v1/inspect", content=body, headers=AUTH,
                              params={"feature_type": ftype, "part_id": "", "line": ""})
        assert r.status_code == 200, r.text
        assert (r.json()["part_id"], r.json()["line"]) == (None, None)
        two = [("image", (f"{k}.png", body, "image/png")) for k in "ab"]
        r = await client.post("/v1/inspect/batch", headers=AUTH, data={"part_id": ["b-1", ""]}, files=two)
        assert r.status_code == 200, r.text
        assert [x["part_id"] for x in r.json()["results"]] == ["b-1", None]

        # stored before the answer: the store has exactly these rows
        rows = state.store.query(limit=None)
        assert sorted(x.part_id or "" for x in rows) == ["", "", "b-1", "mp-1", "raw-1"]
        # and an empty filter (a form's empty field) is no filter
        r = await client.get("/v1/results", headers=AUTH, params={"part_id": "", "line": "", "source": ""})
        assert r.json()["count"] == 5

        heat = await client.get(raw["heatmap_url"], headers=AUTH)
        assert heat.status_code == 200 and heat.headers["content-type"] == "image/png"
        overlay = Image.open(io.BytesIO(heat.content))  # image | overlay, header and colour bar
        w, h = Image.open(io.BytesIO(body)).size
        assert overlay.width >= 2 * w and overlay.height > h
        img = await client.get(raw["image_url"], headers=AUTH)  # REVIEW keeps the upload
        assert img.status_code == 200 and img.content == body


async def test_unknown_type_mode_predicts_type(detector: Any, samples: Samples, tmp_path: Path) -> None:
    body, _ = samples.one("PASS")
    async with running_app(detector, tmp_path) as (client, _):
        r = await client.post("/v1/inspect", content=body, headers=AUTH)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["type_known"] is False and out["feature_type"] in detector.classes_
        assert set(out["type_scores"]) == set(detector.classes_)


async def test_a_batch_larger_than_the_buffer_is_refused_as_too_large_not_busy(
        detector: Any, samples: Samples, tmp_path: Path) -> None:
    """Under ``--overflow reject`` a batch of more images than ``--buffer-size`` can never be
    taken, but was answered 503 ``overloaded`` with ``Retry-After: 1``: a client retried it for
    ever. It is a 413 ``batch_too_large`` naming the bound, without Retry-After; a client's
    mistake, counted as a bad upload, not as parts the busy buffer refused (the alert rules' buffer
    overflow, critical, fired on it)."""
    parts = samples.all[:3]
    files = [("image", (f"{i}.png", b, "image/png")) for i, (b, _) in enumerate(parts)]
    data = {"feature_type": [t for _, t in parts]}
    async with running_app(detector, tmp_path, buffer_size=2) as (client, _):
        r = await client.post("/v1/inspect/batch", headers=AUTH, files=files, data=data)
        assert (r.status_code, r.json()["code"]) == (413, "batch_too_large"), r.text
        assert "--buffer-size" in r.json()["detail"] and "retry-after" not in r.headers
        text = (await client.get("/metrics", headers=AUTH)).text
        assert "diffqc_parts_refused_total 0\n" in text, text
        assert 'diffqc_bad_uploads_total{reason="batch_too_large"} 1\n' in text
        r = await client.post("/v1/inspect/batch", headers=AUTH, files=files[:2],
                              data={"feature_type": data["feature_type"][:2]})
        assert r.status_code == 200, r.text


async def test_batch_route(detector: Any, samples: Samples, tmp_path: Path) -> None:
    parts = samples.all[:5]
    files = [("image", (f"{i}.png", b, "image/png")) for i, (b, _) in enumerate(parts)]
    data = {"feature_type": [t for _, t in parts], "part_id": [f"b-{i}" for i in range(5)]}
    async with running_app(detector, tmp_path, max_batch=4) as (client, state):
        r = await client.post("/v1/inspect/batch", headers=AUTH, files=files, data=data)
        assert r.status_code == 200, r.text
        res_body = r.json()
        res = res_body["results"]
        assert [x["part_id"] for x in res] == [f"b-{i}" for i in range(5)]
        assert [x["feature_type"] for x in res] == [t for _, t in parts]
        assert state.store.count() == 5
        # one bad image refuses the whole batch and names it; nothing is stored
        bad = [*files[:2], ("image", ("bad.png", b"not an image", "image/png"))]
        r = await client.post("/v1/inspect/batch", headers=AUTH, files=bad)
        assert r.status_code == 422 and "image 2" in r.json()["detail"]
        assert state.store.count() == 5
        r = await client.post("/v1/inspect/batch", headers=AUTH, content=parts[0][0])
        assert r.status_code == 415
        # the batch answers each part id's verdict from its images
        assert [(p["part_id"], p["images"]) for p in res_body["parts"]] == [(f"b-{i}", 1) for i in range(5)]
        assert [p["decision"] for p in res_body["parts"]] == [x["decision"] for x in res]
        # one part id: every image is a crop of that part
        r = await client.post("/v1/inspect/batch", headers=AUTH, files=files[:3],
                              data={"feature_type": data["feature_type"][:3], "part_id": "P-7"})
        assert r.status_code == 200, r.text
        crops = r.json()["results"]
        assert [x["part_id"] for x in crops] == ["P-7"] * 3
        (part,) = r.json()["parts"]
        decisions = {x["decision"] for x in crops}
        worst = next(d for d in ("REJECT", "NOT_INSPECTED", "REVIEW", "PASS") if d in decisions)
        assert (part["part_id"], part["decision"]) == ("P-7", worst)
        # a type given twice counts once, with its later image
        assert part["types"] == {x["feature_type"]: x["decision"] for x in crops}
        assert part["missing"] == [t for t in detector.classes_ if t not in part["types"]]
        assert part["images"] == len(set(data["feature_type"][:3])) == 3 - part["superseded"]
        stored = (await client.get("/v1/parts/P-7", headers=AUTH)).json()
        assert {k: stored[k] for k in part} == part
        # an empty feature_type field (Swagger UI's "Try it out" sends one) is none: the query's
        # type is every image's, as an empty value is absent on /v1/inspect (the model chose)
        one_type = parts[0][1]
        r = await client.post("/v1/inspect/batch", headers=AUTH, params={"feature_type": one_type},
                              files=files[:2], data={"feature_type": ""})
        assert r.status_code == 200, r.text
        assert [(x["feature_type"], x["type_known"]) for x in r.json()["results"]] == [(one_type, True)] * 2
    async with running_app(detector, tmp_path, max_batch_items=3) as (client, state):
        r = await client.post("/v1/inspect/batch", headers=AUTH, files=files[:4])
        assert (r.status_code, r.json()["code"]) == (413, "batch_too_large"), r.text
        assert "4 images; at most 3" in r.json()["detail"]
        r = await client.post("/v1/inspect/batch", headers=AUTH, files=files)  # past the parser's limit
        assert (r.status_code, r.json()["code"]) == (413, "batch_too_large"), r.text


async def test_the_buffers_byte_bound_is_the_one_configured(detector: Any, tmp_path: Path) -> None:
    """``serve --buffer-mb`` was not passed to the ring buffer: it held 512 MiB whatever was set."""
    async with running_app(detector, tmp_path, buffer_max_bytes=3 * 1024 * 1024) as (client, state):
        text = (await client.get("/metrics", headers=AUTH)).text
        assert "diffqc_queue_max_bytes 3145728\n" in text
        assert state.pipeline.buffer.max_bytes == 3 * 1024 * 1024


@pytest.mark.parametrize("overflow", ["reject", "drop_oldest"])
async def test_a_batch_heavier_than_the_buffer_has_every_image_inspected(
        detector: Any, samples: Samples, tmp_path: Path, overflow: str) -> None:
    """A batch into an idle service whose decoded images outweighed ``--buffer-mb`` (four
    4000x3000 crops of one part against the default 512 MiB) was answered 200 with its earlier
    images ``NOT_INSPECTED``, "dropped: buffer full (drop_oldest policy)", even under
    ``--overflow reject``: its later images had pushed them out. Every image is inspected now."""
    parts = samples.all[:3]
    files = [("image", (f"{i}.png", b, "image/png")) for i, (b, _) in enumerate(parts)]
    async with running_app(detector, tmp_path, buffer_max_bytes=1, overflow=overflow) as (client, state):
        r = await client.post("/v1/inspect/batch", headers=AUTH, files=files,
                              data={"feature_type": [t for _, t in parts], "part_id": "P-1"})
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        assert [x["decision"] in ("PASS", "REVIEW", "REJECT") for x in got] == [True] * 3, got
        assert state.pipeline.buffer.dropped_total == 0


def _held(real: Any) -> tuple[Any, threading.Event, threading.Event]:
    """A stand-in for the served detector that holds each inference call until ``gate`` is set
    (``entered``: one began), then inspects with ``real``: parts wait in the buffer meanwhile."""
    entered, gate = threading.Event(), threading.Event()

    class Held:
        classes_ = real.classes_

        def inspect(self, *args: Any, **kwargs: Any) -> Any:
            entered.set()
            gate.wait(60)
            return real.inspect(*args, **kwargs)

    return Held(), entered, gate


async def test_readyz_is_not_ready_while_the_buffer_is_full_by_bytes(detector: Any, samples: Samples,
                                                                       tmp_path: Path) -> None:
    """/readyz counted only the parts waiting, not their bytes: with ``--buffer-mb 64`` and
    eight 1600x1600 parts it answered 200 ready (62.9 of 67.1 MB waiting) while 5 of 8 uploads
    were refused 503 ``overloaded``. It is not ready while a part like the last one taken would
    not fit."""
    import anyio

    from diffqc.data import decode_image

    good, ftype = samples.one("PASS")
    part = decode_image(good).nbytes + len(good)  # what a part of this image holds while it waits

    def post() -> Any:
        return client.post("/v1/inspect", content=good, headers=AUTH, params={"feature_type": ftype})

    async with running_app(detector, tmp_path, buffer_max_bytes=3 * part - 1) as (client, state):
        pipeline = state.pipeline
        held, entered, gate = _held(pipeline.detector)
        pipeline.detector = held
        try:
            in_hand = asyncio.create_task(post())
            assert await anyio.to_thread.run_sync(entered.wait, 30)
            waiting = [asyncio.create_task(post()) for _ in range(2)]
            deadline = time.monotonic() + 60
            while pipeline.depth < 2:
                assert time.monotonic() < deadline, pipeline.depth
                await asyncio.sleep(0.01)
            assert pipeline.buffer.bytes == 2 * part and len(pipeline.buffer) < pipeline.buffer.capacity
            refused = await post()
            assert (refused.status_code, refused.json()["code"]) == (503, "overloaded"), refused.text
            ready = await client.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert ready.json()["checks"]["buffer"] is False and "bytes" in ready.json()["reason"]
        finally:
            gate.set()
        assert [r.status_code for r in await asyncio.gather(in_hand, *waiting)] == [200] * 3
        assert (await client.get("/readyz")).status_code == 200


def test_a_request_still_waiting_when_the_service_stops_is_answered_shutting_down(
        detector: Any, samples: Samples, tmp_path: Path) -> None:
    """Stopping with parts still waiting: the requests still open when the server's graceful
    shutdown ended were cancelled and answered 500, plain text, with a CancelledError traceback
    in the log each, though their parts were then stored. They are answered 503
    ``shutting_down``, saying that the part may have been stored and to retry with the same
    Idempotency-Key; every part has its record."""
    import httpx
    import uvicorn

    from diffqc.service.app import ServiceSettings, create_app
    from diffqc.service.store import ResultStore
    from tests.test_service_common import bench

    good, ftype = samples.one("PASS")
    db = str(tmp_path / "r.db")
    # one part a batch: the worker holds one, two wait (two taken at once never left two waiting)
    app = create_app(ServiceSettings(db_url=db, tokens=(TOKEN,), max_batch=1), detector=detector)
    port = bench.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=1))
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    answers: list[httpx.Response] = []

    def post(i: int) -> None:
        answers.append(httpx.post(f"http://127.0.0.1:{port}/v1/inspect", content=good, timeout=60,
                                  headers={**AUTH, "Idempotency-Key": f"key-{i}"},
                                  params={"feature_type": ftype, "part_id": f"q{i}"}))

    gate = threading.Event()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and serving.is_alive()
            time.sleep(0.05)
        pipeline = app.state.diffqc.pipeline
        held, entered, gate = _held(pipeline.detector)
        pipeline.detector = held
        posters = [threading.Thread(target=post, args=(i,)) for i in range(3)]
        for t in posters:
            t.start()
        assert entered.wait(30)
        while pipeline.depth < 2:  # one part in the worker's hands, two waiting
            assert time.monotonic() < deadline, pipeline.depth
            time.sleep(0.01)
        server.should_exit = True  # as on SIGTERM: the three requests outlast the graceful shutdown
        for t in posters:
            t.join(60)
    finally:
        gate.set()
        serving.join(60)
    assert [r.status_code for r in answers] == [503] * 3, [r.text for r in answers]
    assert all(r.json()["code"] == "shutting_down" for r in answers)
    detail = answers[0].json()["detail"]
    assert "may have been stored" in detail and "Idempotency-Key" in detail
    store = ResultStore(db)
    assert sorted(r.part_id or "" for r in store.query(limit=None)) == ["q0", "q1", "q2"]
    store.close()


@pytest.mark.parametrize("route", ["/v1/inspect", "/v1/inspect/batch"])
async def test_a_json_upload_is_decoded_off_the_event_loop(
        detector: Any, samples: Samples, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, route: str) -> None:
    """A JSON upload's base64 was decoded on the service's event loop: while one 80 MiB JSON
    batch was decoded every other request waited (``/healthz`` 1.2 s, a camera's part as long).
    It is decoded in the thread pool, as a multipart upload's images are: here its decoding is
    held until ``/healthz`` has been answered, which an event loop busy decoding cannot do."""
    import base64
    import threading

    import anyio

    from diffqc.service import app as service_app

    good, ftype = samples.one("PASS")
    entered, gate = threading.Event(), threading.Event()
    opened: list[bool] = []  # whether the decoding was let go by the answered /healthz
    decode = service_app._base64_bytes

    def held(text: str) -> bytes:
        entered.set()
        opened.append(gate.wait(10))  # on the event loop: /healthz is not answered meanwhile
        return decode(text)

    monkeypatch.setattr(service_app, "_base64_bytes", held)
    text = base64.b64encode(good).decode()
    body = {"image": [text] if route.endswith("batch") else text, "feature_type": ftype}
    async with running_app(detector, tmp_path) as (client, _):
        upload = asyncio.create_task(client.post(route, headers=AUTH, json=body))
        assert await anyio.to_thread.run_sync(entered.wait, 30)
        assert (await client.get("/healthz")).status_code == 200
        gate.set()
        r = await upload
        assert r.status_code == 200, r.text
    assert opened == [True]


async def test_results_filters_model_and_metrics(detector: Any, samples: Samples, tmp_path: Path) -> None:
    async with running_app(detector, tmp_path) as (client, _):
        sent = []
        for decision in ("PASS", "REVIEW", "REJECT"):
            body, ftype = samples.one(decision)
            r = await client.post(
                "/v1/inspect",
                content=body,
                headers=AUTH,
                params={"feature_type": ftype, "part_id": decision.lower()},
            )
            assert r.status_code == 200
            sent.append(r.json())
        r = await client.get("/v1/results", headers=AUTH)
        assert [x["id"] for x in r.json()["results"]] == [s["id"] for s in reversed(sent)]
        r = await client.get("/v1/results", headers=AUTH, params={"decision": "REVIEW"})
        assert [x["part_id"] for x in r.json()["results"]] == ["review"]
        # in any case, as /v1/parts takes it (`?decision=reject` was a 422 here, taken there)
        r = await client.get("/v1/results", headers=AUTH, params={"decision": "review"})
        assert r.status_code == 200 and [x["part_id"] for x in r.json()["results"]] == ["review"], r.text
        t = sent[1]["feature_type"]
        r = await client.get("/v1/results", headers=AUTH, params={"feature_type": t})
        assert all(x["feature_type"] == t for x in r.json()["results"]) and r.json()["count"] >= 1
        r = await client.get(
            "/v1/results", headers=AUTH, params={"since": sent[1]["created"], "order": "oldest"}
        )
        assert [x["part_id"] for x in r.json()["results"]] == ["review", "reject"]
        r = await client.get("/v1/results", headers=AUTH, params={"until": sent[1]["created_at"]})
        assert [x["part_id"] for x in r.json()["results"]] == ["pass"]
        r = await client.get("/v1/results", headers=AUTH, params={"since": "yesterday"})
        assert r.status_code == 422 and "ISO 8601" in r.json()["detail"]
        r = await client.get(f"/v1/results/{sent[0]['id']}", headers=AUTH)
        assert r.json()["part_id"] == "pass"
        assert (await client.get("/v1/results/999999", headers=AUTH)).status_code == 404

        m = (await client.get("/v1/model", headers=AUTH)).json()
        assert m["classes"] == detector.classes_ and m["version"] == detector.version
        assert m["thresholds"]["alpha_review"] == detector.config.calibration.alpha_review
        assert set(m["thresholds"]["types"]) == set(detector.classes_)
        assert set(m["calibration"]["types"]) == set(detector.classes_)

        text = (await client.get("/metrics", headers=AUTH)).text
        assert f'diffqc_decisions_total{{feature_type="{t}",decision="REVIEW"}} 1' in text
        assert "diffqc_inspection_latency_seconds_bucket" in text
        assert "diffqc_queue_depth 0" in text and "diffqc_parts_dropped_total 0" in text
        assert "diffqc_review_pending 1" in text
        # which diffqc each box runs (a bundle a newer one trained is refused by an older one)
        assert f'diffqc_build_info{{version="{__version__}"}} 1' in text

        stats = (await client.get("/v1/stats", headers=AUTH)).json()
        assert sum(row["total"] for row in stats["types"].values()) == 3
        assert stats["pending_reviews"] == 1 and stats["queue"]["capacity"] == 64


async def test_health_needs_no_token_everything_else_does(detector: Any, tmp_path: Path) -> None:
    async with running_app(detector, tmp_path) as (client, _):
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert (await client.get("/dashboard")).status_code == 200  # static page, no data
        for method, path in [
            ("GET", "/metrics"),
            ("GET", "/v1/results"),
            ("GET", "/v1/model"),
            ("GET", "/v1/review"),
            ("POST", "/v1/inspect"),
            ("POST", "/v1/review/1"),
            ("GET", "/v1/results/1/heatmap"),
            ("GET", "/v1/stats"),
        ]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                r = await client.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path, headers)
                assert r.headers["www-authenticate"] == "Bearer"


BAD_INPUTS: list[tuple[str, Any, int, str]] = [
    ("empty body", b"", 400, "empty body"),
    ("non-image bytes", b"hello, this is not an image" * 10, 422, "not a recognised image"),
    ("1x1 image", "1x1", 422, "at least 8x8"),
    ("40000x40000 header", "huge", 413, "claims 1600000000 pixels"),
    ("truncated PNG", "truncated", 422, "truncated"),
    ("unknown feature type", "unknown-type", 422, "unknown feature type"),
    ("a type in another case", "upper-type", 422, "(did you mean"),
    ("oversized upload", "oversized", 413, "exceeds the limit"),
]


async def test_bad_input_table(detector: Any, samples: Samples, tmp_path: Path) -> None:
    good, ftype = samples.one("PASS")
    async with running_app(detector, tmp_path, max_upload_bytes=200_000) as (client, state):
        for name, payload, status, message in BAD_INPUTS:
            params = {"feature_type": ftype}
            if payload == "1x1":
                payload = png(np.zeros((1, 1, 3), np.uint8))
            elif payload == "huge":
                payload = png_header_only(40_000, 40_000)
            elif payload == "truncated":
                payload = good[: len(good) // 2]
            elif payload == "unknown-type":
                payload, params = good, {"feature_type": "no-such-type"}
            elif payload == "upper-type":
                payload, params = good, {"feature_type": ftype.upper()}
            elif payload == "oversized":
                payload = good + b"\0" * 250_000
            r = await client.post("/v1/inspect", content=payload, headers=AUTH, params=params)
            assert r.status_code == status, (name, r.status_code, r.text)
            assert message in r.json()["detail"], (name, r.json())
            # the service keeps answering
            ok = await client.post("/v1/inspect", content=good, headers=AUTH, params={"feature_type": ftype})
            assert ok.status_code == 200, name
        # wrong / missing token and oversized multipart
        assert (await client.post("/v1/inspect", content=good)).status_code == 401
        r = await client.post(
            "/v1/inspect", headers=AUTH, files={"image": ("x.png", good + b"\0" * 250_000, "image/png")}
        )
        assert r.status_code == 413
        r = await client.post("/v1/inspect", headers=AUTH, files={"other": ("x.png", good, "image/png")})
        assert r.status_code == 400 and "'image'" in r.json()["detail"]
        # 16-bit and RGBA images are accepted and inspected
        for name, payload in (("16-bit", _png16(samples)), ("RGBA", _rgba(samples))):
            r = await client.post(
                "/v1/inspect", content=payload, headers=AUTH, params={"feature_type": ftype, "part_id": name}
            )
            assert r.status_code == 200, (name, r.text)
            assert r.json()["decision"] in ("PASS", "REVIEW", "REJECT")
        # only accepted parts are stored: len(BAD_INPUTS) good follow-ups + 16-bit + RGBA
        assert state.store.count() == len(BAD_INPUTS) + 2
        text = (await client.get("/metrics", headers=AUTH)).text
        assert 'diffqc_bad_uploads_total{reason="empty_body"} 1' in text
        # a bad query of another route is no refused upload
        assert (await client.get("/v1/results", headers=AUTH, params={"limit": 0})).status_code == 422
        text = (await client.get("/metrics", headers=AUTH)).text
        assert 'reason="bad_limit"' not in text
        assert (await client.get("/healthz")).status_code == 200


async def test_a_verdict_sent_again_after_its_answer_was_lost_is_taken_once(detector: Any, samples: Samples,
                                                                             tmp_path: Path) -> None:
    """A verdict whose answer a phone's Wi-Fi lost, given again (the dashboard sends the verdict
    it showed, `replaces: null`), was refused as a second reviewer's conflict with itself ("was
    reviewed meanwhile: BAD by ann"), and a MES's retry without `replaces` counted it twice in the
    history and in `GET /v1/defects`. The same verdict again (its reviewer, note and kind the
    same) is the one given: answered as given, stored once. Another one still conflicts."""
    body, ftype = samples.one("REVIEW")
    async with running_app(detector, tmp_path) as (client, _):
        sent = await client.post("/v1/inspect", content=body, headers=AUTH, params={"feature_type": ftype})
        rid = sent.json()["id"]
        url = f"/v1/review/{rid}"
        given = {"verdict": "BAD", "reviewer": "ann", "defect": "crack", "note": "edge", "replaces": None}
        first = await client.post(url, headers=AUTH, json=given)
        assert first.status_code == 200, first.text
        again = await client.post(url, headers=AUTH, json=given)  # the answer to the first was lost
        assert again.status_code == 200, again.text
        assert again.json() == first.json()
        latest_wins = {k: v for k, v in given.items() if k != "replaces"}  # a MES's retry
        retried = await client.post(url, headers=AUTH, json=latest_wins)
        assert retried.json()["reviewed_at"] == first.json()["reviewed_at"]
        got = (await client.get(url.replace("review", "results"), headers=AUTH)).json()
        assert len(got["review_history"]) == 1
        kinds = (await client.get("/v1/defects", headers=AUTH)).json()
        assert kinds == {"defects": [{"defect": "crack", "verdicts": 1}]}
        for other in ({"reviewer": "bob"}, {"note": "corner"}, {"verdict": "GOOD", "defect": None}):
            r = await client.post(url, headers=AUTH, json={**given, **other})
            assert (r.status_code, r.json()["code"]) == (409, "review_conflict"), other


async def test_review_flow_and_export(detector: Any, samples: Samples, tmp_path: Path) -> None:
    from diffqc.data import load_dataset
    from diffqc.service import export_reviewed_good

    db = str(tmp_path / "results.db")
    async with running_app(detector, tmp_path, db_url=db) as (client, _):
        ids = []
        for i, (body, ftype) in enumerate(samples.by_decision["REVIEW"][:3]):
            r = await client.post(
                "/v1/inspect",
                content=body,
                headers=AUTH,
                params={"feature_type": ftype, "part_id": f"rv-{i}"},
            )
            ids.append(r.json()["id"])
        q = (await client.get("/v1/review", headers=AUTH)).json()
        assert [x["id"] for x in q["queue"]] == ids and q["pending"] == 3
        assert q["queue"][0]["image_url"] and q["queue"][0]["heatmap_url"]
        r = await client.post(
            f"/v1/review/{ids[0]}", headers=AUTH, json={"verdict": "GOOD", "reviewer": "ann"}
        )
        assert r.status_code == 200
        out = r.json()
        assert out["review"] == "GOOD" and out["decision"] == "REVIEW" and out["reviewer"] == "ann"
        # a defect kind goes with a BAD verdict only (its text is checked as a note's: the table
        # of bad input)
        url = f"/v1/review/{ids[1]}"
        r = await client.post(url, headers=AUTH, json={"verdict": "GOOD", "defect": "crack"})
        assert (r.status_code, r.json()["code"]) == (422, "bad_defect")
        r = await client.post(url, headers=AUTH, json={"verdict": "BAD", "defect": " crack "})
        assert (r.json()["review"], r.json()["review_defect"]) == ("BAD", "crack")  # typed with spaces
        r = await client.post(url, headers=AUTH, json={"verdict": "GOOD", "defect": "  ", "reviewer": "",
                                                       "note": ""})
        assert (r.status_code, r.json()["review_defect"]) == (200, None)  # only spaces: no kind
        assert (r.json()["reviewer"], r.json()["review_note"]) == (None, None)  # empty fields: none
        await client.post(url, headers=AUTH, json={"verdict": "BAD", "defect": "crack"})
        kinds = (await client.get("/v1/defects", headers=AUTH)).json()
        assert kinds == {"defects": [{"defect": "crack", "verdicts": 2}]}  # the corrected one counted
        r = await client.post(f"/v1/review/{ids[2]}", headers=AUTH, json={"verdict": "MAYBE"})
        assert r.status_code == 422
        # a MES's note in cp1252 ("Oberfläche"): it was 400 "There was an error parsing the body"
        r = await client.post(f"/v1/review/{ids[2]}", content='{"verdict": "GOOD", "note": "Oberfläche"}'
                              .encode("cp1252"), headers={**AUTH, "Content-Type": "application/json"})
        assert (r.status_code, r.json()["code"]) == (422, "bad_json"), r.text
        assert "the body is not UTF-8 text (byte 35): send JSON in UTF-8" in r.json()["detail"]
        assert (
            await client.post("/v1/review/424242", headers=AUTH, json={"verdict": "GOOD"})
        ).status_code == 404
        q = (await client.get("/v1/review", headers=AUTH)).json()
        assert [x["id"] for x in q["queue"]] == [ids[2]]
        r = await client.get("/v1/results", headers=AUTH, params={"review": "GOOD"})
        assert [x["id"] for x in r.json()["results"]] == [ids[0]]
        got = (await client.get(f"/v1/results/{ids[0]}", headers=AUTH)).json()
        assert [(h["review"], h["reviewer"]) for h in got["review_history"]] == [("GOOD", "ann")]
        assert got["review_history"][0]["reviewed"] == got["reviewed"]  # ISO 8601, as the record's
        # two reviewers on one part: one whose screen was stale (it showed the part unreviewed)
        # replaced ann's verdict without knowing of it. Sent with the verdict it saw
        # (`replaces`), it is refused while another came first, and the record is unchanged
        r = await client.post(f"/v1/review/{ids[0]}", headers=AUTH,
                              json={"verdict": "BAD", "reviewer": "bob", "replaces": None})
        assert (r.status_code, r.json()["code"]) == (409, "review_conflict")
        assert r.json()["detail"].startswith(f"result {ids[0]} was reviewed meanwhile: GOOD by ann at 20")
        assert r.json()["detail"].endswith('nothing changed (send "replaces": "GOOD" to change it)')
        r = await client.post(f"/v1/review/{ids[0]}", headers=AUTH,
                              json={"verdict": "BAD", "reviewer": "bob", "replaces": "BAD"})
        assert (r.status_code, r.json()["code"]) == (409, "review_conflict")
        got = (await client.get(f"/v1/results/{ids[0]}", headers=AUTH)).json()
        assert (got["review"], got["reviewer"], len(got["review_history"])) == ("GOOD", "ann", 1)
        r = await client.post(f"/v1/review/{ids[0]}", headers=AUTH,
                              json={"verdict": "BAD", "reviewer": "bob", "replaces": "GOOD"})
        assert (r.status_code, r.json()["review"], r.json()["reviewer"]) == (200, "BAD", "bob")
        url = f"/v1/review/{ids[0]}"
        r = await client.post(url, headers=AUTH, json={"verdict": "GOOD", "reviewer": "ann"})
        assert r.status_code == 200  # without `replaces`: the latest verdict wins, as before
        r = await client.post(url, headers=AUTH, json={"verdict": "GOOD", "replaces": "MAYBE"})
        assert (r.status_code, r.json()["code"]) == (422, "bad_replaces")
    summary = export_reviewed_good(db, tmp_path / "export")
    assert summary["exported"] == 1 and summary["missing_image"] == 0
    exported = load_dataset(tmp_path / "export" / "manifest.csv")
    assert len(exported) == 1 and exported[0].label == 0 and exported[0].part_id == "rv-0"
    assert exported[0].path.read_bytes() == samples.by_decision["REVIEW"][0][0]
    # with the parts reviewed BAD, labelled defect (to test a model on); export.json and the
    # selection check count the GOOD ones only
    summary = export_reviewed_good(db, tmp_path / "both", defects=True)
    assert summary["exported"] == 2 and summary["defects"] == 1
    assert [t["exported"] for t in summary["types"].values()] == [1]
    both = sorted(load_dataset(tmp_path / "both"), key=lambda s: s.label)
    assert [(s.label, s.part_id, s.defect) for s in both] == [(0, "rv-0", "good"), (1, "rv-1", "crack")]
    assert both[1].path.read_bytes() == samples.by_decision["REVIEW"][1][0]
    from diffqc.holdout import holdout_report

    with pytest.warns(UserWarning, match="is a `diffqc results export`: its parts are those operators"):
        report = holdout_report(detector, tmp_path / "both")  # what `diffqc test MODEL OUT` says
    assert [(i["label"], i["decision"]) for i in report["images"]] == [
        ("good", "REVIEW"), ("defective", "REVIEW")]
    assert [list(kinds) for kinds in report["defect_kinds"].values()] == [["crack"]]  # recall by kind
    # again into the same folder (an earlier export): its own files are replaced; an export
    # written before the defect column is one too
    assert export_reviewed_good(db, tmp_path / "export")["exported"] == 1
    manifest = tmp_path / "export" / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(",defect\n", "\n", 1))
    assert export_reviewed_good(db, tmp_path / "export")["exported"] == 1
    assert len(load_dataset(tmp_path / "export" / "manifest.csv")) == 1
    # an export cut short (a full disk) names the file, and the next run into that folder
    # replaces it: every later run refused the folder (no manifest) as not an export
    from diffqc.errors import OutputError
    from diffqc.service.store import ResultStore

    image_bytes = len(samples.by_decision["REVIEW"][0][0])
    with ResultStore(db), full_disk(image_bytes // 2), pytest.raises(OutputError, match="incomplete"):
        export_reviewed_good(db, tmp_path / "cut")  # (the store held open: SQLite's files exist)
    assert export_reviewed_good(db, tmp_path / "cut")["exported"] == 1
    assert load_dataset(tmp_path / "cut" / "manifest.csv")[0].path.read_bytes() == \
        samples.by_decision["REVIEW"][0][0]
    # into a dataset folder with its own manifest: refused before anything is written

    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "manifest.csv").write_text("path,feature_type,label\nimg.png,edge,good\n")
    with pytest.raises(OutputError, match="holds no earlier `diffqc results export`"):
        export_reviewed_good(db, dataset)
    assert [p.name for p in dataset.iterdir()] == ["manifest.csv"]
    assert (dataset / "manifest.csv").read_text().startswith("path,feature_type,label\nimg.png")
    # a --data-dir typo: named, and no empty artifact folders made there
    with pytest.warns(UserWarning) as said:
        summary = export_reviewed_good(db, tmp_path / "export2", data_dir=tmp_path / "typo")
    assert [str(w.message).split(" under ")[0] for w in said] == [
        "no kept images", "1 reviewed part not exported, the image being 1 not found"]
    assert summary["exported"] == 0 and summary["missing_image"] == 1 and not (tmp_path / "typo").exists()


def test_results_export_takes_one_stations_or_lines_parts(tmp_path: Path) -> None:
    """A store shared by stations (a plant's PostgreSQL, each station's kept images in a data
    folder of its own) or by lines: `results export` took every part reviewed GOOD, so a model
    retrained on one station's export learnt another's parts as its GOOD ones (the same type
    names, another product) or counted them as images not found, and export.json counted
    every station's inspected parts as this one's. It now takes ``--station``, ``--line``,
    ``--camera``, ``--feature-type`` and ``--until`` as `results list` does, and an export of
    several stations' or lines' parts without one says so."""
    from diffqc.cli import main
    from diffqc.data import load_dataset
    from diffqc.service import export_reviewed_good
    from diffqc.service.store import ResultRecord, ResultStore

    db, data = str(tmp_path / "plant.db"), tmp_path / "data"
    (data / "images").mkdir(parents=True)
    now = time.time()
    with ResultStore(db) as store:
        records = store.insert_many([
            ResultRecord(created_at=now, source="t", decision=decision, part_id=f"{station}-{i}",
                         feature_type="dots", score=1, p_value=0.01, image=f"{ord(station):030x}{i:02x}.png",
                         station=station, line="L1")
            for station in "AB" for i, decision in enumerate(["REVIEW", "PASS", "REJECT"])])
        for rec in records:
            assert rec.image is not None and rec.id is not None
            (data / "images" / rec.image).write_bytes(rec.image.encode())
            if rec.decision != "PASS":
                store.set_review(rec.id, "GOOD")
    with pytest.warns(UserWarning, match=r"parts of 2 stations \(A, B\).*give --station"):
        assert export_reviewed_good(db, tmp_path / "all", data_dir=data)["exported"] == 4
    summary = export_reviewed_good(db, tmp_path / "a", data_dir=data, station="A")
    assert sorted(s.part_id for s in load_dataset(tmp_path / "a")) == ["A-0", "A-2"]
    assert summary["types"]["dots"] == {"inspected": 3, "flagged": 2, "exported": 2, "exported_flagged": 2}
    assert json.loads((tmp_path / "a" / "export.json").read_text())["station"] == "A"  # what it holds
    assert export_reviewed_good(db, tmp_path / "none", data_dir=data, line="L2")["exported"] == 0
    rc = main(["results", "export", str(tmp_path / "b"), "--db", db, "--data-dir", str(data),
               "--station", "B", "--line", "L1", "--feature-type", "dots", "--until", "2999-01-01"])
    assert rc == 0 and sorted(s.part_id for s in load_dataset(tmp_path / "b")) == ["B-0", "B-2"]


async def test_idempotency_key_returns_the_stored_record(
    detector: Any, samples: Samples, tmp_path: Path
) -> None:
    body, ftype = samples.one("PASS")
    async with running_app(detector, tmp_path) as (client, state):
        headers = {**AUTH, "Idempotency-Key": "cam1-000017"}
        a = await client.post("/v1/inspect", content=body, headers=headers, params={"feature_type": ftype})
        b = await client.post("/v1/inspect", content=body, headers=headers, params={"feature_type": ftype})
        assert a.status_code == b.status_code == 200
        assert a.json()["id"] == b.json()["id"] and b.json()["duplicate"] is True
        assert state.store.count() == 1


async def test_a_batch_retried_with_its_idempotency_key_is_not_stored_twice(
        detector: Any, samples: Samples, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch route did not read Idempotency-Key: a PLC retrying a batch whose answer it lost
    stored every part twice (and pushed every decision twice). Image i is keyed K/i: the retry
    gets the stored records, a part stored NOT_INSPECTED is inspected, other images under the
    key are refused."""
    parts = samples.all[:3]
    files = [("image", (f"{i}.png", b, "image/png")) for i, (b, _) in enumerate(parts)]
    data = {"feature_type": [t for _, t in parts], "part_id": [f"k-{i}" for i in range(3)]}
    headers = {**AUTH, "Idempotency-Key": "L1-batch-7"}
    async with running_app(detector, tmp_path) as (client, state):
        first = (await client.post("/v1/inspect/batch", headers=headers, files=files, data=data)).json()
        again = (await client.post("/v1/inspect/batch", headers=headers, files=files, data=data)).json()
        assert [r["id"] for r in again["results"]] == [r["id"] for r in first["results"]]
        assert [r["duplicate"] for r in first["results"]] == [False] * 3
        assert [r["duplicate"] for r in again["results"]] == [True] * 3 and state.store.count() == 3
        assert state.store.find_key("http", "L1-batch-7/2") is not None
        # one part of a batch not inspected (its micro-batch failed): the retry inspects it only
        original = state.pipeline._inspect

        def second_fails(batch: Any) -> Any:
            return [RuntimeError("GPU out of memory") if job.part_id == "k-1" else res
                    for job, res in zip(batch, original(batch), strict=True)]

        other = {**headers, "Idempotency-Key": "L1-batch-8"}
        with monkeypatch.context() as m:
            m.setattr(state.pipeline, "_inspect", second_fails)
            got = (await client.post("/v1/inspect/batch", headers=other, files=files, data=data)).json()
        assert [r["decision"] == "NOT_INSPECTED" for r in got["results"]] == [False, True, False]
        retry = (await client.post("/v1/inspect/batch", headers=other, files=files, data=data)).json()
        assert [r["duplicate"] for r in retry["results"]] == [True, False, True]
        assert retry["results"][1]["decision"] != "NOT_INSPECTED" and state.store.count() == 7
        # a different image under the key names the image, and stores nothing
        swapped = [files[0], files[2], files[1]]
        r = await client.post("/v1/inspect/batch", headers=headers, files=swapped, data=data)
        assert (r.status_code, r.json()["code"]) == (409, "idempotency_key_reused")
        assert r.json()["detail"].startswith("image 1: ") and state.store.count() == 7
        r = await client.post("/v1/inspect/batch", headers={**AUTH, "Idempotency-Key": "a\x7fb"}, files=files)
        assert (r.status_code, r.json()["code"]) == (422, "bad_idempotency_key")


async def test_a_not_inspected_part_is_inspected_when_retried_with_its_key(
    detector: Any, samples: Samples, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NOT_INSPECTED is the service's failure, not the part's answer: a client's retry with the
    same Idempotency-Key is inspected, and the failed attempt's record stays."""
    body, ftype = samples.one("PASS")
    async with running_app(detector, tmp_path) as (client, state):
        headers = {**AUTH, "Idempotency-Key": "cam1-000019"}
        params = {"feature_type": ftype, "part_id": "p19"}

        def broken(batch: Any) -> Any:
            raise RuntimeError("GPU out of memory")

        with monkeypatch.context() as m:
            m.setattr(state.pipeline, "_inspect", broken)
            a = await client.post("/v1/inspect", content=body, headers=headers, params=params)
        assert a.json()["decision"] == "NOT_INSPECTED"
        b = await client.post("/v1/inspect", content=body, headers=headers, params=params)
        assert b.status_code == 200 and b.json()["decision"] == "PASS"
        assert b.json()["duplicate"] is False and b.json()["id"] != a.json()["id"]
        c = await client.post("/v1/inspect", content=body, headers=headers, params=params)
        assert c.json()["id"] == b.json()["id"] and c.json()["duplicate"] is True
        first = state.store.get(a.json()["id"])
        assert first is not None and first.decision == "NOT_INSPECTED"  # the failure stays stored
        assert state.store.count() == 2
        other = {**params, "part_id": "x"}  # the key still names one part
        reused = await client.post("/v1/inspect", content=body, headers=headers, params=other)
        assert reused.status_code == 409


async def test_a_repeated_image_is_recorded_and_named(
    detector: Any, samples: Samples, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A camera client sending its last frame again (a stale buffer) gives the same bytes for a
    new part: it is recorded, named in the log and counted in /metrics; a retry with an
    Idempotency-Key is the same part, and is not."""
    body, ftype = samples.one("PASS")
    async with running_app(detector, tmp_path) as (client, state):
        state.pipeline.SAY_REPEATS_EVERY_S = 0.0  # each repeat named, as a minute apart
        headers = {**AUTH, "Idempotency-Key": "cam1-000018"}
        with caplog.at_level("WARNING", logger="diffqc.service"):
            for part, h in (("p1", headers), ("p1", headers), ("p2", AUTH)):
                r = await client.post("/v1/inspect", content=body, headers=h,
                                      params={"feature_type": ftype, "part_id": part})
                assert r.status_code == 200
        assert state.store.count() == 2
        assert "part p2 (record 2) is the same image as part p1 (record 1), from http" in caplog.text
        metrics = (await client.get("/metrics", headers=AUTH)).text
        assert "diffqc_repeated_images_total 1" in metrics
        # parts sent without an id (a camera that has none) were named "part None"
        with caplog.at_level("WARNING", logger="diffqc.service"):
            r = await client.post("/v1/inspect", content=body, headers=AUTH, params={"feature_type": ftype})
            assert r.status_code == 200
        assert "a part without id (record 3) is the same image as part p2 (record 2)" in caplog.text


async def test_a_camera_stuck_on_one_frame_is_named_once_a_minute(
    detector: Any, samples: Samples, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A camera stuck on its last frame sends it for every part, at the line's rate: a warning a
    part (30 a second on a fast line) buried the log. The first repeat is named, the next ones
    within a minute counted (in /metrics at once) and said with the next line."""
    body, ftype = samples.one("PASS")
    async with running_app(detector, tmp_path) as (client, state):
        with caplog.at_level("WARNING", logger="diffqc.service"):
            for i in range(6):
                r = await client.post("/v1/inspect", content=body, headers=AUTH,
                                      params={"feature_type": ftype, "part_id": f"p{i}"})
                assert r.status_code == 200
        said = [m for m in caplog.messages if "is the same image" in m]
        assert said == ["part p1 (record 2) is the same image as part p0 (record 1), from http: is the "
                        "camera repeating its last frame?"], said
        assert "diffqc_repeated_images_total 5" in (await client.get("/metrics", headers=AUTH)).text
        state.pipeline.SAY_REPEATS_EVERY_S = 0.0  # a minute on: the next repeat says those between
        caplog.clear()
        with caplog.at_level("WARNING", logger="diffqc.service"):
            await client.post("/v1/inspect", content=body, headers=AUTH,
                              params={"feature_type": ftype, "part_id": "p6"})
        assert [m for m in caplog.messages if "is the same image" in m] == [
            "part p6 (record 7) is the same image as part p5 (record 6), from http: is the camera repeating "
            "its last frame? (4 more parts' images were repeats since the last such line)"], caplog.messages


async def test_parts_unlike_their_training_images_are_shown_in_line_and_metrics(
        detector: Any, samples: Samples, tmp_path: Path) -> None:
    """A camera switched to colour (the model learned grey parts) was named once in the
    service's log only: the operators saw REJECTs without a word of why. /v1/line lists the
    type with the parts seen unlike its training images and when, and /metrics counts them."""
    import io

    from PIL import Image

    body, ftype = samples.one("PASS")
    colour = tinted(body)
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(body)).save(jpeg, format="JPEG", quality=90)  # a camera set to save JPEG
    async with running_app(detector, tmp_path) as (client, _):
        for image in (body, colour, colour, body, jpeg.getvalue()):
            r = await client.post("/v1/inspect", content=image, headers=AUTH, params={"feature_type": ftype})
            assert r.status_code == 200
        line = (await client.get("/v1/line", headers=AUTH)).json()
        metrics = (await client.get("/metrics", headers=AUTH)).text
    [seen, lossy] = line["images"]
    assert (seen["feature_type"], seen["check"], seen["parts"]) == (ftype, "colour", 2)
    assert "a colour image of type" in seen["note"] and seen["first_at"] <= seen["last_at"]
    assert f'diffqc_parts_unlike_training_total{{feature_type="{ftype}",check="colour"}} 2' in metrics
    assert (lossy["check"], lossy["parts"]) == ("compression", 1)
    assert "a lossy (JPEG or WebP)" in lossy["note"]
    assert f'diffqc_parts_unlike_training_total{{feature_type="{ftype}",check="compression"}} 1' in metrics


async def test_a_nearly_full_disk_is_shown_in_line_and_metrics(detector: Any, tmp_path: Path) -> None:
    """The store's file system is watched: /v1/line and /metrics say how much is free and
    whether it is low (here: below a threshold larger than any disk)."""
    async with running_app(detector, tmp_path, disk_min_free_bytes=2**60) as (client, _):
        line = (await client.get("/v1/line", headers=AUTH)).json()
        metrics = (await client.get("/metrics", headers=AUTH)).text
    [fs] = line["disk"]
    assert fs["low"] and fs["path"] == str(tmp_path) and fs["free_bytes"] > 0
    assert f'diffqc_disk_low{{path="{tmp_path}"}} 1' in metrics
    assert f'diffqc_disk_free_bytes{{path="{tmp_path}"}} ' in metrics


async def test_the_served_certificates_expiry_is_shown_in_line_and_metrics(detector: Any,
                                                                          tmp_path: Path) -> None:
    """With ``tls_cert`` the date the certificate expires is in /v1/line (``tls``) and /metrics
    (the blackbox exporter's convention: seconds since the epoch), so a line's monitoring can
    warn before browsers refuse the service; without TLS there is no entry."""
    import datetime as dt

    import trustme

    until = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=5)
    leaf = trustme.CA().issue_cert("localhost", not_after=until)
    pem = tmp_path / "server.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(pem))
    async with running_app(detector, tmp_path, tls_cert=pem) as (client, _):
        line = (await client.get("/v1/line", headers=AUTH)).json()
        metrics = (await client.get("/metrics", headers=AUTH)).text
    tls = line["tls"]
    assert tls["file"] == str(pem) and tls["not_after"] == until.timestamp()
    assert tls["expiring"] and not tls["expired"] and 4 < tls["days_left"] <= 5
    assert f'diffqc_tls_certificate_not_after_seconds{{file="{pem}"}} {until.timestamp():.0f}' in metrics
    assert f'diffqc_tls_certificate_expiring{{file="{pem}"}} 1' in metrics
    async with running_app(detector, tmp_path / "plain") as (client, _):
        assert (await client.get("/v1/line", headers=AUTH)).json()["tls"] is None


async def test_the_clock_watch_is_in_line_and_metrics(detector: Any, tmp_path: Path) -> None:
    """/v1/line's ``clock``: steps of the system clock seen and whether it reads before the
    model was trained (this machine's clock is set: neither)."""
    async with running_app(detector, tmp_path) as (client, _):
        line = (await client.get("/v1/line", headers=AUTH)).json()
        metrics = (await client.get("/metrics", headers=AUTH)).text
    assert line["clock"] == {"steps_total": 0, "last_step_s": None, "behind_model": False}
    assert "diffqc_clock_steps_total 0" in metrics and "diffqc_clock_behind_model 0" in metrics


async def test_json_uploads_and_summaries_as_docs_api_says(detector: Any, samples: Samples,
                                                          tmp_path: Path) -> None:
    """Three answers docs/API.md gives that the service did not: (1) a JSON upload whose `image`
    is not a string (`["..."]`, the batch's list form, or a number) was 400 `missing_image`, "the
    JSON body has no 'image'": it is 422 `bad_request`; (2) `/v1/summary?by=camera&by=camera`
    grouped twice and its total row lost its "all" (a `null` there, as the camera-less group's):
    a grouping given twice counts once, as `results summary` takes it; (3) a JSON batch's `null`
    in `part_id` or `feature_type` (docs: "Empty (in JSON, null)"), which the service takes, was
    forbidden by the OpenAPI description a typed client is generated from."""
    import base64

    good, ftype = samples.one("PASS")
    text = base64.b64encode(good).decode()
    async with running_app(detector, tmp_path) as (client, _):
        for image in ([text], 5):
            r = await client.post("/v1/inspect", headers=AUTH, json={"image": image, "feature_type": ftype})
            assert (r.status_code, r.json()["code"]) == (422, "bad_request"), r.text
            assert "one base64 string" in r.json()["detail"]
        r = await client.post("/v1/inspect", headers=AUTH, json={"feature_type": ftype})
        assert (r.status_code, r.json()["code"]) == (400, "missing_image"), r.text
        body = {"image": [text, text], "part_id": ["a-1", None], "feature_type": [ftype, None]}
        r = await client.post("/v1/inspect/batch", headers=AUTH, json=body)
        assert r.status_code == 200, r.text
        r = await client.get("/v1/summary", headers=AUTH, params={"by": ["camera", "camera"]})
        assert r.status_code == 200 and r.json()["by"] == ["camera"], r.text
        assert r.json()["groups"][-1]["camera"] == "all"
        schema = (await client.get("/openapi.json", headers=AUTH)).json()
    batch = schema["paths"]["/v1/inspect/batch"]["post"]["requestBody"]["content"]
    listed = batch["application/json"]["schema"]
    assert not _conforms(body, listed, schema["components"]["schemas"])


async def test_summary_counts_a_periods_parts_per_type_and_camera(detector: Any, samples: Samples,
                                                                  tmp_path: Path) -> None:
    """GET /v1/summary: a shift's counts for a MES or an HMI, as `results summary` prints them;
    an unknown grouping is a 422 naming the ones there are."""
    (good, ftype), (bad, btype) = samples.one("PASS"), samples.one("REJECT")
    async with running_app(detector, tmp_path) as (client, _):
        for body, kind, camera in ((good, ftype, "c1"), (good, ftype, "c1"), (bad, btype, "c2")):
            r = await client.post("/v1/inspect", content=body, headers=AUTH,
                                  params={"feature_type": kind, "camera": camera})
            assert r.status_code == 200
        rid = r.json()["id"]
        verdict = await client.post(f"/v1/review/{rid}", headers=AUTH, json={"verdict": "BAD"})
        assert verdict.status_code == 200
        r = await client.get("/v1/summary", headers=AUTH, params={"since": "1h", "by": ["camera"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["by"] == ["camera"] and body["until"] is None and body["since"] > 0
        groups = {g["camera"]: g for g in body["groups"]}
        assert groups["c1"]["inspected"] == 2 and groups["c1"]["PASS"] == 2
        assert groups["c2"]["REJECT"] == 1 and groups["c2"]["flagged_bad"] == 1
        assert groups["all"]["inspected"] == 3 and body["groups"][-1]["camera"] == "all"
        default = (await client.get("/v1/summary", headers=AUTH)).json()
        assert default["by"] == ["feature_type"] and default["groups"][-1]["inspected"] == 3
        r = await client.get("/v1/summary", headers=AUTH, params={"by": "score"})
        assert (r.status_code, r.json()["code"]) == (422, "bad_by")
        assert "feature_type, camera, line, station, source" in r.json()["detail"]

        # parts, each counted once by its verdict from its crops (`results summary --parts`)
        for body, kind, part in ((good, ftype, "P-1"), (bad, btype, "P-1"), (good, ftype, "P-2")):
            r = await client.post("/v1/inspect", content=body, headers=AUTH,
                                  params={"feature_type": kind, "part_id": part, "line": "L1"})
            assert r.status_code == 200
        parts = (await client.get("/v1/summary", headers=AUTH, params={"parts": "true"})).json()
        assert parts["by"] == ["line"] and parts["parts"] and parts["images_without_part"] == 3
        by_line = {g["line"]: g for g in parts["groups"]}
        assert (by_line["L1"]["inspected"], by_line["L1"]["PASS"], by_line["L1"]["REJECT"]) == (2, 1, 1)
        assert by_line["L1"]["flagged_share"] == 0.5 and set(by_line) == {"L1", "all"}
        r = await client.get("/v1/summary", headers=AUTH, params={"parts": "true", "by": "feature_type"})
        assert (r.status_code, r.json()["code"]) == (422, "bad_by") and "a part spans" in r.json()["detail"]


async def test_refused_tokens_are_logged_once_a_minute_per_client(detector: Any, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A MES configured with an old token (a rotation it missed) got 401 for every call and the
    service's log said nothing: "your service is broken" with nothing to look at, and a guesser
    went unseen too. A refused request is logged with the client's address and why (no token, a
    wrong one; never the token), once, then at most once a minute per client with the count."""
    async with running_app(detector, tmp_path) as (client, _):
        with caplog.at_level("INFO", logger="diffqc.service"):
            for _ in range(3):
                r = await client.get("/v1/line", headers={"Authorization": "Bearer old-token-from-the-mes"})
                assert r.status_code == 401
            assert (await client.get("/v1/line")).status_code == 401
            assert (await client.get("/v1/line", headers=AUTH)).status_code == 200
        metrics = (await client.get("/metrics", headers=AUTH)).text
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1, refused  # the same client within the minute: counted, not said again
    assert "127.0.0.1" in refused[0] and "a wrong API token" in refused[0]
    assert "old-token-from-the-mes" not in caplog.text
    assert 'diffqc_auth_refused_total{reason="wrong_token"} 3' in metrics
    assert 'diffqc_auth_refused_total{reason="no_token"} 1' in metrics


async def test_a_token_with_letters_beyond_ascii_is_taken_as_clients_send_it(detector: Any,
                                                                             tmp_path: Path) -> None:
    """A token chosen with an umlaut (``Prüfstand-3``) was taken at start and then refused on
    every request: HTTP reads a header's bytes as Latin-1, and curl (and most clients) send it
    as UTF-8, which never matched. The token is taken as a client sends it: its UTF-8 bytes, or
    its Latin-1 bytes (Python's http.client, Java's); anything else is still refused."""
    token = "Prüfstand-Linie3-geheim"
    async with running_app(detector, tmp_path, tokens=(token,)) as (client, _):
        for sent in (token.encode("utf-8"), token.encode("latin-1")):
            r = await client.get("/v1/line", headers={"Authorization": b"Bearer " + sent})
            assert r.status_code == 200, (sent, r.text)
        for sent in (b"Prufstand-Linie3-geheim", token.encode("utf-16-le")):
            r = await client.get("/v1/line", headers={"Authorization": b"Bearer " + sent})
            assert r.status_code == 401, sent


async def test_a_token_sent_in_another_form_is_told_where_it_goes(detector: Any, tmp_path: Path) -> None:
    """A client that sent its token as ``Authorization: <token>`` (no scheme), in an
    ``X-API-Key`` header (as many APIs take it) or in the URL (``?token=``) was told "missing or
    wrong API token", as one with a wrong token: the integrator checked the token, not the form,
    and the log counted it as sent without one. Each is now told where the token came and where it
    goes, and counted as ``token_form``; a wrong token is told it is wrong; neither names it."""
    token = AUTH["Authorization"].split()[1]
    no_bearer = "the Authorization header does not begin with 'Bearer '"
    cases = [
        ({"headers": {"Authorization": token}}, no_bearer),
        ({"headers": {"Authorization": f"Token {token}"}}, no_bearer),
        ({"headers": {"X-API-Key": token}}, "the token came in a 'x-api-key' header"),
        ({"params": {"token": token}}, "the token came in the URL's query ('token=')"),
        ({"params": {"api_key": token}}, "the token came in the URL's query ('api_key=')"),
        ({"headers": {"Authorization": "Bearer nope"}}, "wrong API token: not one the service accepts"),
        ({}, "no API token"),
    ]
    async with running_app(detector, tmp_path) as (client, _):
        for request, said in cases:
            r = await client.get("/v1/line", **request)  # type: ignore[arg-type]
            assert (r.status_code, r.json()["code"]) == (401, "unauthorized"), request
            assert said in r.json()["detail"], (request, r.json())
            assert "send it as 'Authorization: Bearer <token>'" in r.json()["detail"] or "wrong" in said
            assert token not in r.text and "nope" not in r.text
        metrics = (await client.get("/metrics", headers=AUTH)).text
    assert 'diffqc_auth_refused_total{reason="token_form"} 5' in metrics
    assert 'diffqc_auth_refused_total{reason="wrong_token"} 1' in metrics
    assert 'diffqc_auth_refused_total{reason="no_token"} 1' in metrics


async def test_no_path_traversal_in_file_routes(detector: Any, samples: Samples, tmp_path: Path) -> None:
    body, ftype = samples.one("REVIEW")
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    async with running_app(detector, tmp_path) as (client, state):
        r = await client.post("/v1/inspect", content=body, headers=AUTH, params={"feature_type": ftype})
        rid = r.json()["id"]
        for path in [
            "/v1/results/..%2F..%2Fsecret.txt/heatmap",
            "/v1/results/../../secret.txt",
            f"/v1/results/{rid}/..%2F..%2Fsecret.txt",
            "/v1/results/%2e%2e/image",
            "/static/../../secret.txt",
            "/dashboard/../secret.txt",
        ]:
            r = await client.get(path, headers=AUTH)
            assert r.status_code in (404, 405, 422), (path, r.status_code)
            assert b"top secret" not in r.content
        # a record whose stored name was tampered with still cannot leave the artifact folder
        writer = state.store._writer
        writer.execute("UPDATE diffqc_results SET heatmap = '../../secret.txt' WHERE id = ?", (rid,))
        r = await client.get(f"/v1/results/{rid}/heatmap", headers=AUTH)
        assert r.status_code == 404 and b"top secret" not in r.content


async def test_cors_off_by_default_and_on_when_configured(detector: Any, tmp_path: Path) -> None:
    pre = {"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    async with running_app(detector, tmp_path) as (client, _):
        r = await client.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = await client.options("/v1/results", headers=pre)
        assert "access-control-allow-origin" not in r.headers
    async with running_app(detector, tmp_path / "b", cors_origins=("https://hmi.line",)) as (client, _):
        r = await client.options("/v1/results", headers={**pre, "Origin": "https://hmi.line"})
        assert r.headers["access-control-allow-origin"] == "https://hmi.line"
        r = await client.options("/v1/results", headers=pre)
        assert r.headers.get("access-control-allow-origin") != "https://evil.example"


async def test_concurrent_requests_are_micro_batched(detector: Any, samples: Samples, tmp_path: Path) -> None:
    parts = samples.all[:24]
    async with running_app(detector, tmp_path, max_batch=8) as (client, state):
        rs = await asyncio.gather(
            *(
                client.post(
                    "/v1/inspect", content=b, headers=AUTH, params={"feature_type": t, "part_id": f"c-{i}"}
                )
                for i, (b, t) in enumerate(parts)
            )
        )
        assert all(r.status_code == 200 for r in rs)
        assert len({r.json()["id"] for r in rs}) == len(parts) == state.store.count()
        assert state.metrics.batch.n < len(parts)  # some batches held more than one part
        assert state.pipeline.buffer.high_water > 1


def test_settings_refuse_to_start_without_token(tmp_path: Path) -> None:
    from diffqc.service.app import ServiceSettings, create_app

    with pytest.raises(ValueError, match="token"):
        create_app(ServiceSettings(db_url=str(tmp_path / "x.db")))
    # with a token, or with auth turned off on purpose, the same settings are accepted
    app = create_app(ServiceSettings(db_url=str(tmp_path / "x.db"), tokens=(TOKEN,)))
    assert app.state.diffqc.settings.tokens == (TOKEN,)
    create_app(ServiceSettings(db_url=str(tmp_path / "x.db"), allow_no_token=True))


async def test_serve_also_ingests_a_watched_folder(detector: Any, samples: Samples, tmp_path: Path) -> None:
    folder = tmp_path / "cam"
    folder.mkdir()
    body, ftype = samples.one("PASS")
    async with running_app(detector, tmp_path, watch_dirs=(str(folder),), watch_feature_type=ftype) as (
        client,
        _,
    ):
        (folder / "w-1.png").write_bytes(body)
        for _ in range(100):
            res = (await client.get("/v1/results", headers=AUTH, params={"part_id": "w-1"})).json()
            if res["count"]:
                break
            await asyncio.sleep(0.1)
        assert res["count"] == 1
        rec = res["results"][0]
        assert rec["source"] == f"watch:{folder.resolve()}" and rec["feature_type"] == ftype
        for _ in range(50):  # the move follows the commit
            if (folder / "processed" / "w-1.png").exists():
                break
            await asyncio.sleep(0.05)
        assert (folder / "processed" / "w-1.png").exists()


async def test_serve_records_each_watched_folders_camera(detector: Any, samples: Samples,
                                                         tmp_path: Path) -> None:
    """`serve --watch A --watch B --camera cam-a` recorded one camera on both folders' parts, so
    the drift watch tested two cameras as one and the results could not tell them apart.
    `--camera` is taken once per `--watch`, in order (or once for all, as before)."""
    folders = [tmp_path / "cam-a", tmp_path / "cam-b"]
    for folder in folders:
        folder.mkdir()
    body, ftype = samples.one("PASS")
    async with running_app(detector, tmp_path, watch_dirs=tuple(map(str, folders)), watch_feature_type=ftype,
                           watch_camera=("cam-a", "cam-b")) as (client, _):
        for folder in folders:
            (folder / f"{folder.name}-1.png").write_bytes(body)
        for _ in range(200):
            res = (await client.get("/v1/results", headers=AUTH)).json()
            if res["count"] == 2:
                break
            await asyncio.sleep(0.1)
        assert sorted((r["part_id"], r["camera"]) for r in res["results"]) == [
            ("cam-a-1", "cam-a"), ("cam-b-1", "cam-b")]
        line = (await client.get("/v1/line", headers=AUTH)).json()
        assert set(line["drift"][ftype]["cameras"]) == {"cam-a", "cam-b"}


async def test_several_folders_under_one_camera_are_named_at_start(detector: Any, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    folders = (str(tmp_path / "a"), str(tmp_path / "b"))
    for folder in folders:
        Path(folder).mkdir()
    with caplog.at_level("INFO", logger="diffqc.service"):
        async with running_app(detector, tmp_path, watch_dirs=folders, watch_camera="cam-1"):
            pass
    assert ("the 2 watched folders' parts are recorded as camera 'cam-1': the drift watch tests them as one "
            "camera (give --camera once per --watch, in order, to tell them apart)") in caplog.messages


async def test_a_watched_folder_that_cannot_be_read_is_named_in_readyz(detector: Any, tmp_path: Path) -> None:
    """A camera share that dropped: the service still inspects what is posted (ready), but
    /readyz says, under ``degraded``, which folder it cannot read, until it can again."""
    folder = tmp_path / "cam"
    folder.mkdir()
    async with running_app(detector, tmp_path, watch_dirs=(str(folder),)) as (client, state):
        state.watchers[0].settings.poll_s = 0.05
        assert "degraded" not in (await client.get("/readyz")).json()
        folder.rename(tmp_path / "cam-offline")
        for _ in range(100):
            body = (await client.get("/readyz")).json()
            if "degraded" in body:
                break
            await asyncio.sleep(0.05)
        assert body["ready"] is True and str(folder.resolve()) in body["degraded"]["watch"]
        (tmp_path / "cam-offline").rename(folder)
        for _ in range(100):
            body = (await client.get("/readyz")).json()
            if "degraded" not in body:
                break
            await asyncio.sleep(0.05)
        assert "degraded" not in body


async def test_a_replaced_model_is_let_go(service_model: tuple[Path, Path], samples: Samples,
                                          tmp_path: Path) -> None:
    """A service that takes a retrained model every week for months must not keep the models it
    replaced: once the worker inspected with the new one, nothing holds the old one."""
    import gc
    import shutil
    import weakref

    from tests.test_service_common import bench

    served = tmp_path / "model"
    shutil.copytree(service_model[0], served)
    body, ftype = samples.all[0]
    async with running_app(None, tmp_path, model_path=served) as (client, state):
        old = weakref.ref(state.detector)
        bench.retrain_into(served, service_model[0], "retrained-gc")
        for _ in range(3):  # changed, settled, loaded
            state.line.check_model()
        assert state.model_version == "retrained-gc"
        r = await client.post("/v1/inspect", content=body, headers=AUTH, params={"feature_type": ftype})
        assert r.json()["model_version"] == "retrained-gc"
        gc.collect()
        assert old() is None, [type(x).__name__ for x in gc.get_referrers(old())]


async def test_part_verdict_from_its_images(detector: Any, samples: Samples, tmp_path: Path) -> None:
    passed: dict[str, bytes] = {}
    for body, ftype in samples.by_decision["PASS"]:
        passed.setdefault(ftype, body)
    (t1, b1), (t2, b2) = list(passed.items())[:2]
    flagged, t3 = samples.one("REVIEW")
    async with running_app(detector, tmp_path) as (client, _):
        async def send(body: bytes, ftype: str, part: str = "A/1", **extra: str) -> dict[str, Any]:
            r = await client.post("/v1/inspect", content=body, headers=AUTH,
                                  params={"feature_type": ftype, "part_id": part, **extra})
            assert r.status_code == 200, r.text
            return dict(r.json())

        first = await send(b1, t1, line="L1")
        await send(b2, t2, line="L1")
        await send(flagged, t3, part="B-2")  # another part
        r = await client.get("/v1/parts/A/1", headers=AUTH)  # a part id with a slash
        assert r.status_code == 200, r.text
        part = r.json()
        assert (part["part_id"], part["decision"], part["review"], part["images"]) == ("A/1", "PASS", None, 2)
        assert part["types"] == {t1: "PASS", t2: "PASS"} and part["superseded"] == 0 and not part["truncated"]
        # the model's other types have not come: the part's PASS is not its last word
        assert part["missing"] == [t for t in detector.classes_ if t not in (t1, t2)] and not part["complete"]
        assert [x["id"] for x in part["results"]] == [first["id"], first["id"] + 1]

        review = await send(flagged, t3, line="L2")  # a flagged crop of a third type (or of t1/t2 again)
        part = (await client.get("/v1/parts/A/1", headers=AUTH)).json()
        assert (part["decision"], part["pending_review"], part["types"][t3]) == ("REVIEW", 1, "REVIEW")
        r = await client.post(f"/v1/review/{review['id']}", headers=AUTH, json={"verdict": "GOOD"})
        assert r.status_code == 200, r.text
        part = (await client.get("/v1/parts/A/1", headers=AUTH)).json()
        assert (part["decision"], part["review"], part["pending_review"]) == ("REVIEW", "GOOD", 0)

        again = await send(b1, t1)  # the first crop sent again replaces the first record
        part = (await client.get("/v1/parts/A/1", headers=AUTH)).json()
        assert again["id"] in [x["id"] for x in part["results"]] and part["superseded"] >= 1
        assert first["id"] not in [x["id"] for x in part["results"]]

        # the part's images at one place; a part no record names; a bad id; the token
        part = (await client.get("/v1/parts/A/1", headers=AUTH, params={"line": "L1"})).json()
        assert part["decision"] == "PASS" and part["types"] == {t1: "PASS", t2: "PASS"}
        r = await client.get("/v1/parts/A/1", headers=AUTH, params={"line": "L9"})
        assert r.status_code == 404 and "period or place" in r.json()["detail"]
        r = await client.get("/v1/parts/nope", headers=AUTH)
        assert (r.status_code, r.json()["code"]) == (404, "not_found") and "'nope'" in r.json()["detail"]
        r = await client.get("/v1/parts/a%01b", headers=AUTH)
        assert (r.status_code, r.json()["code"]) == (422, "bad_part_id")
        r = await client.get("/v1/parts/A/1", headers=AUTH, params={"partid": "x"})
        assert (r.status_code, r.json()["code"]) == (422, "unknown_parameter")
        assert (await client.get("/v1/parts/A/1")).status_code == 401

        # the latest parts, newest first: A/1's image sent again is the newest
        listed = (await client.get("/v1/parts", headers=AUTH)).json()
        assert [p["part_id"] for p in listed["parts"]] == ["A/1", "B-2"] and not listed["truncated"]
        whole = (await client.get("/v1/parts/A/1", headers=AUTH)).json()
        assert listed["parts"][0] == {k: v for k, v in whole.items() if k not in ("results", "truncated")}
        one = (await client.get("/v1/parts", headers=AUTH, params={"limit": 1})).json()["parts"]
        assert [p["part_id"] for p in one] == ["A/1"]
        at_l2 = (await client.get("/v1/parts", headers=AUTH, params={"line": "L2"})).json()["parts"]
        assert [(p["part_id"], p["images"]) for p in at_l2] == [("A/1", 1)]  # its images seen there
        flagged_parts = (await client.get("/v1/parts", headers=AUTH, params={"decision": "review"})).json()
        assert {p["decision"] for p in flagged_parts["parts"]} == {"REVIEW"}
        none = (await client.get("/v1/parts", headers=AUTH, params={"complete": "true"})).json()["parts"]
        assert none == []  # no part has an image of every type of the model
        for bad, code in (({"decision": "MAYBE"}, "bad_decision"), ({"limit": 0}, "bad_limit"),
                          ({"partid": "x"}, "unknown_parameter"), ({"since": "soon"}, "bad_time")):
            r = await client.get("/v1/parts", headers=AUTH, params=bad)
            assert (r.status_code, r.json()["code"]) == (422, code), (bad, r.text)
        assert (await client.get("/v1/parts")).status_code == 401


async def test_a_part_left_incomplete_when_the_service_restarted_is_still_pushed_overdue(
        detector: Any, samples: Samples, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``--part-timeout`` over a restart (a deploy, a crash): a part whose other crops never
    came before the service stopped is judged by the next run, and pushed as overdue once."""
    body, ftype = samples.by_decision["PASS"][0]
    caplog.set_level("INFO", logger="diffqc")
    hook = {"webhook_url": "http://127.0.0.1:9/hook", "push_parts": "each", "calibration_poll_s": 0.1}

    def pushed(state: Any) -> list[tuple[str, bool]]:
        rows = state.line.outbox.due(state.line.outbox.sinks[0], time.time() + 3600, limit=1000)
        parts = [json.loads(m.payload) for m in rows if m.kind == "part"]
        return [(p["part_id"], p["overdue"]) for p in parts]

    async with running_app(detector, tmp_path, part_timeout_s=30.0, **hook) as (client, state):
        r = await client.post("/v1/inspect", content=body, headers=AUTH,
                              params={"feature_type": ftype, "part_id": "R-1"})
        assert r.status_code == 200, r.text
        assert state.line.overdue.waiting() == 1
    # the next run, with a shorter timeout: R-1 waits again, and is pushed as overdue
    async with running_app(detector, tmp_path, part_timeout_s=0.3, **hook) as (client, state):
        assert "parts a previous run left incomplete wait for their crops again: 1" in caplog.text
        for _ in range(100):
            if ("R-1", True) in pushed(state):
                break
            await asyncio.sleep(0.1)
        assert pushed(state) == [("R-1", False), ("R-1", True)]
    caplog.clear()
    async with running_app(detector, tmp_path, part_timeout_s=0.3, **hook) as (client, state):
        await asyncio.sleep(0.5)  # R-1 was judged: not again
        assert pushed(state) == [("R-1", False), ("R-1", True)] and "left incomplete" not in caplog.text


async def test_a_line_whose_parts_have_fewer_types_than_the_model(detector: Any, samples: Samples,
                                                                   tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A model trained for 8 types serving a station whose parts have 2: with ``part_types``
    (``--part-types``) a part of those 2 is complete, in a stored part, the latest parts, a
    batch's parts and the pushes; without it, it would wait for types its line never sends."""
    from diffqc.errors import ConfigError, UnknownFeatureTypeError

    passed: dict[str, bytes] = {}
    for body, ftype in samples.by_decision["PASS"]:
        passed.setdefault(ftype, body)
    (t1, b1), (t2, b2) = list(passed.items())[:2]
    assert len(detector.classes_) > 2
    caplog.set_level("INFO", logger="diffqc")
    async with running_app(detector, tmp_path, part_types=(t2, t1), webhook_url="http://127.0.0.1:9/hook",
                           push_parts="each", part_timeout_s=0.5, calibration_poll_s=0.2) as (client, state):
        # the start's log says what a part is, for whoever reads it on the line
        assert f"parts: complete with an image of each of {t2}, {t1}; overdue 0.5 s after" in caplog.text
        for body, ftype in ((b1, t1), (b2, t2)):
            r = await client.post("/v1/inspect", content=body, headers=AUTH,
                                  params={"feature_type": ftype, "part_id": "S-1"})
            assert r.status_code == 200, r.text
        part = (await client.get("/v1/parts/S-1", headers=AUTH)).json()
        assert (part["decision"], part["complete"], part["missing"]) == ("PASS", True, [])
        model = (await client.get("/v1/model", headers=AUTH)).json()
        assert model["service"]["part_types"] == [t2, t1] and len(model["classes"]) > 2
        listed = (await client.get("/v1/parts", headers=AUTH, params={"complete": "true"})).json()["parts"]
        assert [p["part_id"] for p in listed] == ["S-1"]
        files = [("image", ("a.png", b2, "image/png"))]
        r = await client.post("/v1/inspect/batch", headers=AUTH, files=files,
                              data={"feature_type": t2, "part_id": "S-2"})
        assert r.status_code == 200, r.text
        (batch_part,) = r.json()["parts"]
        assert (batch_part["complete"], batch_part["missing"]) == (False, [t1])
        assert state.line.outbox is not None
        rows = state.line.outbox.due(state.line.outbox.sinks[0], time.time() + 3600, limit=1000)
        pushed = [json.loads(m.payload) for m in rows if m.kind == "part"]
        assert [(p["part_id"], p["complete"]) for p in pushed] == [("S-1", False), ("S-1", True),
                                                                   ("S-2", False)]
        # --part-timeout: the line's loop pushes S-2, still incomplete, once more as overdue

        def overdue() -> list[str]:
            rows = state.line.outbox.due(state.line.outbox.sinks[0], time.time() + 3600, limit=1000)
            parts = [json.loads(m.payload) for m in rows if m.kind == "part"]
            return [p["part_id"] for p in parts if p["overdue"]]

        for _ in range(100):
            if overdue():
                break
            await asyncio.sleep(0.1)
        assert overdue() == ["S-2"]
        metrics = (await client.get("/metrics", headers=AUTH)).text
        assert f'diffqc_parts_overdue_total{{feature_type="{t1}"}} 1' in metrics
        assert f'diffqc_parts_overdue_total{{feature_type="{t2}"}} 0' in metrics
        parts = (await client.get("/v1/line", headers=AUTH)).json()["parts"]
        assert {k: parts[k] for k in ("types", "timeout_s", "waiting", "overdue_total", "lacking")} == {
            "types": [t2, t1], "timeout_s": 0.5, "waiting": 0, "overdue_total": 1, "lacking": {t1: 1}}
    # a type the model does not know (a typo) or one given twice: the service does not start
    with pytest.raises(UnknownFeatureTypeError, match=r"--part-types.*'Dots'.*did you mean 'dots'"):
        async with running_app(detector, tmp_path, part_types=("Dots",)):
            pass
    with pytest.raises(ConfigError, match=r"--part-types names 'dots' twice"):
        async with running_app(detector, tmp_path, part_types=("dots", "dots")):
            pass


async def test_the_part_window_tells_the_parts_of_a_repeated_id_apart(detector: Any, tmp_path: Path) -> None:
    """``--part-window 60`` (a ring counter repeating every few minutes): images of a part id
    two minutes before its latest are an earlier part's, in ``GET /v1/parts/{id}``, the latest
    parts and the summary of parts; without it (an hour) they count."""
    from diffqc.service.store import ResultRecord

    t1, t2 = detector.classes_[:2]
    for window, counted in ((60.0, {t2: "PASS"}), (None, {t1: "REJECT", t2: "PASS"})):
        settings = {} if window is None else {"part_window_s": window}
        async with running_app(detector, tmp_path / str(window), **settings) as (client, state):
            now = time.time()
            for at, ftype, decision in ((now - 120, t1, "REJECT"), (now, t2, "PASS")):
                state.store.insert(ResultRecord(created_at=at, source="test", decision=decision,
                                                part_id="W-1", feature_type=ftype, type_known=True))
            part = (await client.get("/v1/parts/W-1", headers=AUTH)).json()
            assert part["types"] == counted, window
            (listed,) = (await client.get("/v1/parts", headers=AUTH)).json()["parts"]
            assert listed["types"] == counted
            summary = (await client.get("/v1/summary", headers=AUTH, params={"parts": "true"})).json()
            assert summary["groups"][-1]["REJECT"] == (0 if window else 1)


async def test_metrics_say_when_each_type_and_camera_last_sent_a_part(
    detector: Any, samples: Samples, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A camera that stops sending (a cable, a crashed acquisition PC) went unnoticed: nothing
    in /metrics said when a type's or a camera's last part came. The gauge
    ``diffqc_last_decision_timestamp_seconds{feature_type,camera}`` says it (an alert:
    ``time() - ... > 900``), read back from the store at start, so a restart keeps the series of a
    camera already silent; a week back at most, and at most LAST_SERIES series."""
    import time

    from diffqc.service import app as app_module
    from diffqc.service.store import ResultRecord, ResultStore

    body, ftype = samples.one("PASS")
    now = time.time()
    with ResultStore(str(tmp_path / "results.db")) as store:
        store.insert_many([
            ResultRecord(created_at=now - age, source="http", decision="PASS", feature_type=ftype,
                         camera=camera)
            for age, camera in ((3600, "cam-2"), (1800, "cam-2"), (8 * 86400, "cam-old"))])
    gauge = "diffqc_last_decision_timestamp_seconds"
    async with running_app(detector, tmp_path) as (client, _):
        text = (await client.get("/metrics", headers=AUTH)).text
        assert f'{gauge}{{feature_type="{ftype}",camera="cam-2"}} {now - 1800:.3f}' in text
        assert "cam-old" not in text  # older than a week
        r = await client.post("/v1/inspect", content=body, headers=AUTH,
                              params={"feature_type": ftype, "camera": "cam-1"})
        assert r.status_code == 200, r.text
        text = (await client.get("/metrics", headers=AUTH)).text
        assert f'{gauge}{{feature_type="{ftype}",camera="cam-1"}} {r.json()["created_at"]:.3f}' in text
        assert f'{gauge}{{feature_type="{ftype}",camera="cam-2"}} {now - 1800:.3f}' in text
    monkeypatch.setattr(app_module, "LAST_SERIES", 1)
    metrics = app_module.Metrics()
    metrics.seed_last([("a", None, 5.0), ("b", "c", 6.0)])
    assert metrics.last_at == {("a", ""): 5.0}  # ("b", "c") is one series too many
    metrics.seed_last([("a", None, 4.0)])  # an older time does not move it back
    assert metrics.last_at == {("a", ""): 5.0}


async def test_heat_map_draws_a_12_bit_cameras_part_as_the_model_reads_it(mono12_model: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    """The review queue's heat map of a 12-bit camera's part (a model trained with the gain train
    names, backbone.input_gain) drew the part as read, nearly black: the operator judged a black
    square. It is drawn as the model reads it; the kept image stays the camera's file."""
    from diffqc.model import Detector

    model, data = mono12_model
    blob = sorted((data / "dots" / "test" / "blob").glob("*.png"))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = Detector.load(model, device="cpu")
    async with running_app(det, tmp_path, keep_images="flagged") as (client, _):
        r = await client.post("/v1/inspect", content=blob.read_bytes(), headers=AUTH,
                              params={"feature_type": "dots"})
        assert r.status_code == 200 and r.json()["decision"] != "PASS", r.text
        heat = await client.get(r.json()["heatmap_url"], headers=AUTH)
        (tmp_path / "heat.png").write_bytes(heat.content)
        assert drawn_part_brightness(tmp_path / "heat.png") > 100
        kept = await client.get(r.json()["image_url"], headers=AUTH)
        assert kept.content == blob.read_bytes()
        # for a screen: the kept file as the model reads it, an 8-bit PNG (a browser draws the
        # 16-bit file nearly black, and in 16 grey levels at most once brightened)
        seen = await client.get(r.json()["image_url"], headers=AUTH, params={"view": "model"})
        assert seen.status_code == 200 and seen.headers["content-type"] == "image/png"
        shown = Image.open(io.BytesIO(seen.content))
        assert shown.mode in ("L", "RGB") and np.asarray(shown).mean() > 100
        assert len(np.unique(np.asarray(shown))) > 16
        wrong = await client.get(r.json()["image_url"], headers=AUTH, params={"view": "camera"})
        assert wrong.status_code == 422 and "view" in wrong.text


@pytest.mark.parametrize("kind", ["mono12", "grey8", "rgb8"])
async def test_a_kept_tiff_part_is_kept_as_read(detector: Any, samples: Samples, tmp_path: Path,
                                                kind: str) -> None:
    """A part sent as TIFF (not a browser's format) is kept as a PNG of the decoded image: it was
    an 8-bit colour PNG whatever the file, so a 12-bit camera's part came back from `results
    export` with 17 grey levels of its 4096 (and the retrain on it read another part). It is kept
    at the depth that holds it: the kept file reads as the upload did, value for value."""
    from diffqc.data import decode_image

    body, ftype = samples.one("REVIEW")
    grey = np.asarray(Image.open(io.BytesIO(body)).convert("L"), dtype=np.int64)
    image = {"mono12": Image.fromarray((grey * 4095 // 255).astype(np.uint16)),
             "grey8": Image.fromarray(grey.astype(np.uint8)),
             "rgb8": Image.open(io.BytesIO(body)).convert("RGB")}[kind]
    buf = io.BytesIO()
    image.save(buf, format="TIFF")
    async with running_app(detector, tmp_path, keep_images="all") as (client, _):
        r = await client.post("/v1/inspect", content=buf.getvalue(), headers=AUTH,
                              params={"feature_type": ftype})
        assert r.status_code == 200, r.text
        kept = await client.get(r.json()["image_url"], headers=AUTH)
    assert kept.headers["content-type"] == "image/png"
    assert np.array_equal(decode_image(kept.content), decode_image(buf.getvalue()))


async def test_a_part_whose_alpha_is_padding_is_kept_as_it_was_read(detector: Any, samples: Samples,
                                                                      tmp_path: Path) -> None:
    """A camera's BGRX frame saved with its padding byte as alpha (0 everywhere) is read by its
    colours, but was kept as sent: the dashboard's review view showed a transparent square where
    the part was. It is kept as it was read, its colours without the alpha."""
    from diffqc.data import decode_image

    body, ftype = samples.one("REVIEW")
    rgba = Image.open(io.BytesIO(body)).convert("RGBA")
    rgba.putalpha(0)
    sent = png(np.asarray(rgba), "RGBA")
    async with running_app(detector, tmp_path, keep_images="all") as (client, _):
        r = await client.post("/v1/inspect", content=sent, headers=AUTH, params={"feature_type": ftype})
        assert r.status_code == 200, r.text
        kept = await client.get(r.json()["image_url"], headers=AUTH)
    assert Image.open(io.BytesIO(kept.content)).mode == "RGB"
    assert np.array_equal(decode_image(kept.content), decode_image(sent))


async def test_every_route_that_answers_get_answers_head_without_a_body(detector: Any, samples: Samples,
                                                                        tmp_path: Path) -> None:
    """Only /healthz and /readyz answered HEAD; the dashboard's page, a kept image (``curl -I``, to
    see it is there and its size) and every /v1/ read answered 405, where HTTP has every server
    take HEAD where it takes GET. Each now answers as its GET does (status, type, length; the
    token asked for alike), without a body; a route that takes POST only still does not."""
    body, ftype = samples.one("REVIEW")
    async with running_app(detector, tmp_path, keep_images="all") as (client, _):
        r = await client.post("/v1/inspect", content=body, headers=AUTH, params={"feature_type": ftype})
        assert r.status_code == 200, r.text
        image_url = r.json()["image_url"]
        for path, headers in [("/dashboard", {}), ("/docs", {}), ("/openapi.json", {}), ("/healthz", {}),
                              ("/readyz", {}), ("/v1/results", AUTH), (image_url, AUTH),
                              ("/v1/results?limit=0", AUTH), ("/v1/line", AUTH), ("/v1/results", {})]:
            got, head = await client.get(path, headers=headers), await client.head(path, headers=headers)
            assert head.status_code == got.status_code, (path, head.status_code, got.status_code)
            assert head.content == b"", path
            assert head.headers["content-type"] == got.headers["content-type"], path
            if path == image_url:
                assert int(head.headers["content-length"]) == len(got.content) > 0
        r = await client.head("/v1/inspect", headers=AUTH)
        assert (r.status_code, r.headers["allow"], r.content) == (405, "POST", b"")
        r = await client.post("/v1/results", headers=AUTH)  # a read route names both methods it takes
        assert (r.status_code, r.headers["allow"]) == (405, "GET, HEAD"), r.text


async def test_the_api_is_described_for_client_generators(tmp_path: Path) -> None:
    """An MES integrator used to FastAPI asks the service for /openapi.json (to generate a client,
    or import it in Postman) and /docs: both were switched off (404). The description lists every
    /v1/ route docs/API.md describes, with the bodies the upload routes read by hand, the bearer
    token, and the error body the service answers with; no token is needed to read it."""
    import httpx

    from diffqc.service.app import ServiceSettings, create_app
    from tests.test_api_doc import DOC, doc_headings

    app = create_app(ServiceSettings(db_url=str(tmp_path / "x.db"), tokens=(TOKEN,)), detector=None)
    # the lifespan (the model's load) is not needed to describe it
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
    r = await client.get("/openapi.json")
    assert r.status_code == 200, r.text
    schema = r.json()
    described = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    documented = {(m, p) for m, p in doc_headings(DOC.read_text(encoding="utf-8")) if p.startswith("/v1/")}
    assert described == documented
    inspect = schema["paths"]["/v1/inspect"]["post"]
    assert set(inspect["requestBody"]["content"]) == {"application/octet-stream", "multipart/form-data",
                                                      "application/json"}
    form = inspect["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert (form["image"]["type"], form["image"]["format"]) == ("string", "binary")
    params = {(p["in"], p["name"]) for p in inspect["parameters"]}
    assert {("query", "feature_type"), ("query", "part_id"), ("query", "line"), ("query", "station"),
            ("query", "camera"), ("header", "Idempotency-Key")} <= params
    batch = schema["paths"]["/v1/inspect/batch"]["post"]["requestBody"]["content"]
    assert set(batch) == {"multipart/form-data", "application/json"}
    assert batch["multipart/form-data"]["schema"]["properties"]["image"]["type"] == "array"
    assert schema["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert schema["security"] == [{"bearer": []}]
    assert schema["servers"] == [{"url": "."}]  # where it was read from: a proxy's path kept
    # the error body is the service's ({"detail", "code"}), not FastAPI's validation list
    refused = await client.get("/v1/results", params={"limit": "many"}, headers=AUTH)
    assert refused.status_code == 422 and set(refused.json()) == {"detail", "code"}
    error = schema["paths"]["/v1/results"]["get"]["responses"]["422"]["content"]["application/json"]["schema"]
    error_body = schema["components"]["schemas"][error["$ref"].rsplit("/", 1)[-1]]
    assert set(error_body["required"]) == {"detail", "code"}
    assert "HTTPValidationError" not in json.dumps(schema)
    assert ":func:" not in json.dumps(schema)  # docstrings as Markdown
    # the page's script from this service (a factory network reaches no CDN); nothing else served
    page = await client.get("/docs")
    assert page.status_code == 200 and 'src="docs/swagger-ui-bundle.js"' in page.text
    assert "https://" not in page.text
    script = await client.get("/docs/swagger-ui-bundle.js")
    assert script.status_code == 200 and "SwaggerUIBundle" in script.text
    assert (await client.get("/docs/..%2Fstore.py")).status_code == 404
    # a service without a token, behind a proxy's path
    schema = await _description(tmp_path / "other", tokens=(), allow_no_token=True, root_path="/qc")
    assert "security" not in schema and "securitySchemes" not in schema["components"]
    assert "401" not in schema["paths"]["/v1/model"]["get"]["responses"]
    assert schema["servers"] == [{"url": "/qc"}]


async def _description(tmp_path: Path, **settings: Any) -> dict[str, Any]:
    """The service's `/openapi.json` (with a token unless told; the model's load, its lifespan,
    is not needed to describe it)."""
    import httpx

    from diffqc.service.app import ServiceSettings, create_app

    settings.setdefault("tokens", (TOKEN,))
    app = create_app(ServiceSettings(db_url=str(tmp_path / "x.db"), **settings), detector=None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
        return dict((await client.get("/openapi.json")).json())


def _documented_routes() -> dict[tuple[str, str], tuple[str, list[str]]]:
    """docs/API.md's `/v1/` routes: ``(method, path)`` -> (the `## ` section it is under, its
    section's lines), in the page's order."""
    from tests.test_api_doc import DOC, HEADING

    routes: dict[tuple[str, str], tuple[str, list[str]]] = {}
    section, rows = "", None
    for row in DOC.read_text(encoding="utf-8").splitlines():
        if row.startswith("#"):
            section = row[3:] if row.startswith("## ") else section
            found = HEADING.match(row)
            rows = [] if found and found["path"].startswith("/v1/") else None
            if found and rows is not None:
                routes[(found["method"].lower(), found["path"])] = (section, rows)
        elif rows is not None:
            rows.append(row)
    return routes


async def test_the_description_is_valid_openapi(tmp_path: Path) -> None:
    """The description is valid OpenAPI 3.1 by an independent validator (openapi-spec-validator,
    the one client generators' users check a description with), with a token and without."""
    from openapi_spec_validator import validate

    for settings in (dict(tokens=(TOKEN,)), dict(tokens=(), allow_no_token=True, root_path="/qc")):
        schema = await _description(tmp_path, **settings)
        validate(schema)  # raises on any fault
        assert schema["openapi"].startswith("3.1")
    broken = {**schema, "paths": {"/v1/model": {"get": {"responses": {"200": {}}}}}}
    with pytest.raises(Exception, match="description"):  # a response without its description
        validate(broken)


async def test_the_described_routes_are_grouped_and_named_for_a_client(tmp_path: Path) -> None:
    """A client generated from the description (openapi-python-client, NSwag) named its methods
    after FastAPI's operation ids, path and method appended (`result_v1_results__record_id__get`,
    models `ResultV1ResultsRecordIdGetResponse200`), all in one module `default`, which Swagger UI
    listed in the order the routes were written (the line's status first). Each route's id is now
    its function's name, and its group (tag) the docs/API.md section that describes it, the groups
    in that page's order."""
    import re as regex

    schema = await _description(tmp_path)
    under = {route: section for route, (section, _) in _documented_routes().items()}
    ops = {(m, p): op for p, methods in schema["paths"].items() for m, op in methods.items()}
    assert {key: op["tags"] for key, op in ops.items()} == {key: [s] for key, s in under.items()}
    assert [t["name"] for t in schema["tags"]] == list(dict.fromkeys(under.values()))
    ids = [op["operationId"] for op in ops.values()]
    assert len(set(ids)) == len(ids) and all(regex.fullmatch(r"[a-z]+(_[a-z]+)*", i) for i in ids), ids
    assert ops[("get", "/v1/results/{record_id}")]["operationId"] == "get_result"
    assert ops[("post", "/v1/inspect")]["operationId"] == "inspect"
    # Swagger UI showed `since`, `by`, `after_id` as bare names: how is a time written?
    bare = [(path, p["name"]) for (_, path), op in ops.items() for p in op.get("parameters", [])
            if not p.get("description")]
    assert bare == []
    # nor an upload's body fields: Swagger UI's form showed `feature_type` and `camera` bare, and
    # a generated client's model of the body said nothing of them
    components = schema["components"]["schemas"]
    bodies = [(path, kind, content["schema"]) for (_, path), op in ops.items()
              for kind, content in op.get("requestBody", {}).get("content", {}).items()]
    bare = [(path, kind, name) for path, kind, body in bodies
            for name, field in components.get(body.get("$ref", "").rsplit("/", 1)[-1], body)
            .get("properties", {}).items() if not field.get("description")]
    assert len(bodies) >= 6 and bare == []
    since = next(p for p in ops[("get", "/v1/results")]["parameters"] if p["name"] == "since")
    assert "`8h`" in since["description"] and "ISO 8601" in since["description"]
    # the summary's groupings offered as a choice: Swagger UI added an item "string" to type after
    by = next(p for p in ops[("get", "/v1/summary")]["parameters"] if p["name"] == "by")
    assert by["schema"]["items"]["enum"] == ["feature_type", "camera", "line", "station", "source"]


async def test_the_described_error_answers_are_the_documented_ones(tmp_path: Path) -> None:
    """Swagger UI showed a 404, 409 or 503 answer as "Undocumented", and a generated client did
    not read its body: each route's error answers are described (the service's `{"detail",
    "code"}`), at least those its section of docs/API.md names, and none but the statuses of the
    page's error code index."""
    import re as regex

    from tests.test_api_doc import DOC

    schema = await _description(tmp_path)
    named: dict[tuple[str, str], set[str]] = {}
    for route, (_, rows) in _documented_routes().items():
        said, errors = set(), False  # its table rows `| 404 |` and its "Errors: `401` ..." lines
        for row in rows:
            errors = row.startswith("Errors") or (errors and row.strip() != "")
            said |= set(regex.findall(r"^\| (\d{3}) \|", row))
            said |= set(regex.findall(r"`(\d{3})`", row)) if errors else set()
        named[route] = said
    index = DOC.read_text(encoding="utf-8").split("## Error code index", 1)[1]
    statuses = set(regex.findall(r"^\| `[a-z_<>]+` \| (\d{3}) \|", index, regex.M))
    assert {"400", "401", "404", "409", "413", "415", "422", "503"} <= statuses
    assert named[("post", "/v1/review/{record_id}")] >= {"401", "404", "409", "422", "503"}  # read whole
    for (method, path), said in named.items():
        described = set(schema["paths"][path][method]["responses"]) - {"200"}
        assert said <= described <= statuses, (method, path, said, described)
        for status in described:
            content = schema["paths"][path][method]["responses"][status]["content"]
            assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}


def _conforms(value: Any, schema: dict[str, Any], components: dict[str, Any]) -> list[str]:
    """Where ``value`` breaks ``schema`` of the description (a JSON Schema 2020-12 validator, as
    OpenAPI 3.1 reads its schemas), each field it has that a schema naming its fields does not
    name, at any depth (what a generated client would drop), and each object with fields whose
    schema names none and is not free-form by intent (``additionalProperties: true``): a
    generated client read it as an untyped map."""
    from jsonschema import Draft202012Validator

    def check(s: dict[str, Any]) -> Any:  # references resolved in the description's components
        return Draft202012Validator({**s, "components": {"schemas": components}})

    def resolve(s: dict[str, Any]) -> dict[str, Any]:
        return resolve(components[s["$ref"].rsplit("/", 1)[-1]]) if "$ref" in s else s

    def undescribed(v: Any, s: dict[str, Any], at: str) -> list[str]:
        s = resolve(s)
        if "anyOf" in s:  # the branch it is (none: the validator says so)
            branch = next((b for b in s["anyOf"] if check(b).is_valid(v)), None)
            return [] if branch is None else undescribed(v, branch, at)
        parts = [resolve(part) for part in s.get("allOf", [s])]  # one object of every part's fields
        props = {k: sub for part in parts for k, sub in part.get("properties", {}).items()}
        more = next((part["additionalProperties"] for part in parts if "additionalProperties" in part), None)
        named = bool(props) or more is not None
        out = []
        if isinstance(v, dict) and v and more is not True and not named:
            out.append(f"{at}: an object whose fields are not described")
        elif isinstance(v, dict) and more is not True:
            for k, item in v.items():
                sub = props.get(k, more if isinstance(more, dict) else None)
                out += undescribed(item, sub, f"{at}.{k}") if sub is not None else (
                    [f"{at}.{k}: not described"] if named else [])
        if isinstance(v, list) and "items" in s:
            out += [e for i, item in enumerate(v) for e in undescribed(item, s["items"], f"{at}[{i}]")]
        return out

    wrong = check(schema).iter_errors(value)
    said = [f"$.{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in wrong]
    return said + undescribed(value, schema, "$")


async def test_the_described_answers_are_the_services(detector: Any, samples: Samples,
                                                      tmp_path: Path) -> None:
    """The description's record (typed from the store's record, as a client generator reads it)
    is what the routes answer, field for field, and what docs/API.md's table lists."""
    from tests.test_api_doc import record_fields

    flagged, ftype = samples.one("REVIEW")
    async with running_app(detector, tmp_path, keep_images="all") as (client, _):
        schema = (await client.get("/openapi.json")).json()
        components = schema["components"]["schemas"]

        def answer_of(path: str, method: str) -> dict[str, Any]:
            return schema["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]

        one = await client.post("/v1/inspect", content=flagged, headers=AUTH,
                                params={"feature_type": ftype, "part_id": "d-1", "line": "L1"})
        rid = one.json()["id"]
        batch = await client.post("/v1/inspect/batch", headers=AUTH,
                                  data={"feature_type": ftype, "part_id": "d-2"},
                                  files=[("image", ("a.png", flagged, "image/png"))])
        review = await client.post(f"/v1/review/{rid}", headers=AUTH,
                                   json={"verdict": "BAD", "reviewer": "ann", "defect": "smear"})
        answers = [(one, "/v1/inspect", "post"), (batch, "/v1/inspect/batch", "post"),
                   (review, "/v1/review/{record_id}", "post"),
                   (await client.get(f"/v1/results/{rid}", headers=AUTH), "/v1/results/{record_id}", "get"),
                   (await client.get("/v1/results", headers=AUTH), "/v1/results", "get"),
                   (await client.get("/v1/review", headers=AUTH), "/v1/review", "get"),
                   (await client.get("/v1/parts", headers=AUTH), "/v1/parts", "get"),
                   (await client.get("/v1/parts/d-1", headers=AUTH), "/v1/parts/{part_id}", "get")]
        for r, path, method in answers:
            assert r.status_code == 200, (path, r.text)
            assert _conforms(r.json(), answer_of(path, method), components) == [], path
        # the files: their media type described (a generated client parsed a PNG as JSON)
        for kind in ("heatmap", "image"):
            r = await client.get(f"/v1/results/{rid}/{kind}", headers=AUTH)
            ok = schema["paths"][f"/v1/results/{{record_id}}/{kind}"]["get"]["responses"]["200"]["content"]
            assert r.status_code == 200 and r.headers["content-type"] in ok, (kind, r.headers, ok)
            assert ok[r.headers["content-type"]]["schema"] == {"type": "string", "format": "binary"}
        record = components["Record"]["properties"]
        assert set(record) == set(review.json())  # no field the answer lacks, none it has undescribed
        (part,) = batch.json()["parts"]
        assert set(components["Part"]["properties"]) == set(part)
        wrong = {**review.json(), "decision": "MAYBE"}
        assert _conforms(wrong, components["Record"], components)  # the check finds a wrong value
        # and an object described without its fields, as review_history's verdicts were
        assert _conforms({"review": "BAD"}, {"type": "object"}, components) == [
            "$: an object whose fields are not described"]
    assert record_fields() == set(record)


async def test_the_described_status_answers_are_the_services(detector: Any, samples: Samples,
                                                             service_model: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    """The model and status routes' answers (summary, stats, line, model, defects, a sink's
    requeue) are typed in the description field by field, every section of /v1/line included
    (its sinks, retention, parts, OPC UA, TLS and watched model there): each answer conforms, and
    has no field the description does not name (a generated client would drop it)."""
    import datetime as dt

    import trustme

    from tests.test_service_common import bench

    pem = tmp_path / "server.pem"
    until = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    leaf = trustme.CA().issue_cert("localhost", not_after=until)
    leaf.private_key_and_cert_chain_pem.write_to_path(str(pem))
    sections = dict(model_path=service_model[0], retention_max_age_s=3600.0, part_timeout_s=60.0,
                    webhook_url=f"http://127.0.0.1:{bench.free_port()}/mes", tls_cert=pem,
                    opcua_url=f"opc.tcp://127.0.0.1:{bench.free_port()}")
    flagged, ftype = samples.one("REVIEW")
    async with running_app(detector, tmp_path, **sections) as (client, _):
        schema = (await client.get("/openapi.json")).json()
        components = schema["components"]["schemas"]
        for part in ("p-1", "p-2"):
            one = await client.post("/v1/inspect", content=flagged, headers=AUTH,
                                    params={"feature_type": ftype, "part_id": part, "camera": part})
        await client.post(f"/v1/review/{one.json()['id']}", headers=AUTH,
                          json={"verdict": "BAD", "defect": "smear"})
        answers = [(await client.get(path, headers=AUTH), path, "get") for path in (
            "/v1/summary", "/v1/summary?parts=true&by=camera", "/v1/stats", "/v1/line", "/v1/model",
            "/v1/defects")]
        answers.append((await client.post("/v1/sinks/webhook/requeue", headers=AUTH),
                        "/v1/sinks/{name}/requeue", "post"))
    line = answers[3][0].json()
    assert all(line[section] is not None for section in ("retention", "parts", "tls", "opcua", "model")), line
    assert line["sinks"] and line["drift"] and answers[5][0].json()["defects"]
    for r, path, method in answers:
        assert r.status_code == 200, (path, r.text)
        ok = schema["paths"][path.split("?")[0]][method]["responses"]["200"]
        answer = ok["content"]["application/json"]["schema"]
        assert _conforms(r.json(), answer, components) == [], path
    more = {**line, "new": 1}  # the check finds a field left out, and a wrong value
    assert _conforms(more, components["Line"], components) == ["$.new: not described"]
    assert _conforms({**line, "started": "now"}, components["Line"], components)
