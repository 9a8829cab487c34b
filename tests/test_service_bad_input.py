"""Bad input and faults through the HTTP interface of ``diffqc serve`` (real tiny model, real SQLite).

Every row of the table gets a 4xx with the service's own error shape ``{"detail", "code"}``,
never a 500, and the service stays up: a good inspection right after each row succeeds.
The fault tests break what the service writes to (the artifact folders, the SQLite file) and
check what the client gets, what ``/readyz`` says, and that the decisions are kept.
"""

# ruff: noqa: F811  (fixtures imported from tests.test_service_common are re-bound as arguments)

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import png_header_only
from tests.test_service_common import (  # noqa: F401 (fixtures)
    AUTH,
    TOKEN,
    Samples,
    detector,
    png,
    running_app,
    samples,
    service_model,
)

pytestmark = pytest.mark.anyio

HUGE = "99999999999999999999"  # > 2**63 - 1: once a 500 (OverflowError in the driver)
SMALL_UPLOAD = 300_000  # max_upload_bytes of the app under test


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"




def _multipart(fields: list[tuple[str, bytes | str]]) -> tuple[bytes, str]:
    boundary = "diffqcboundary"
    out = b""
    for name, value in fields:
        out += f"--{boundary}\r\n".encode()
        if isinstance(value, bytes):
            out += f'Content-Disposition: form-data; name="{name}"; filename="x.png"\r\n'.encode()
            out += b"Content-Type: image/png\r\n\r\n" + value + b"\r\n"
        else:
            out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            out += value.encode("utf-8", "surrogatepass") + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


GOOD = b"<good image>"  # placeholders replaced by a real PNG (or its first half) in the test
HALF = b"<half image>"
BAD_MULTIPART, BAD_MULTIPART_TYPE = b"--x\r\nnot a multipart body", "multipart/form-data; boundary=x"
DEL_FORM, DEL_FORM_TYPE = _multipart([("image", GOOD), ("part_id", "cam\x7f1")])
TYPO_FORM, TYPO_FORM_TYPE = _multipart([("image", GOOD), ("partid", "cam1")])
TWICE_FORM, TWICE_FORM_TYPE = _multipart([("image", GOOD), ("feature_type", "a"), ("feature_type", "b")])
TWICE_LINE, TWICE_LINE_TYPE = _multipart([("image", GOOD), ("line", "L1"), ("line", "L2")])
DEEP_JSON = {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"Content-Type": "application/json"}}

# (id, method, url, request kwargs, status, code)
ROWS: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    ("result id > int64", "GET", f"/v1/results/{HUGE}", {}, 422, "bad_record_id"),
    ("heatmap id > int64", "GET", f"/v1/results/{HUGE}/heatmap", {}, 422, "bad_record_id"),
    ("image id > int64", "GET", f"/v1/results/{HUGE}/image", {}, 422, "bad_record_id"),
    ("review id > int64", "POST", f"/v1/review/{HUGE}", {"json": {"verdict": "GOOD"}}, 422, "bad_record_id"),
    ("negative id", "GET", "/v1/results/-1", {}, 422, "bad_record_id"),
    ("id not a number", "GET", "/v1/results/abc", {}, 422, "bad_record_id"),
    ("unknown id", "GET", "/v1/results/123456", {}, 404, "not_found"),
    ("after_id > int64", "GET", "/v1/results", {"params": {"after_id": HUGE}}, 422, "bad_after_id"),
    ("before_id > int64", "GET", "/v1/results", {"params": {"before_id": HUGE}}, 422, "bad_before_id"),
    ("limit 0", "GET", "/v1/results", {"params": {"limit": "0"}}, 422, "bad_limit"),
    ("since not a time", "GET", "/v1/results", {"params": {"since": "yesterday"}}, 422, "bad_time"),
    ("since not a number", "GET", "/v1/results", {"params": {"since": "nan"}}, 422, "bad_time"),
    ("until infinite", "GET", "/v1/results", {"params": {"until": "inf"}}, 422, "bad_time"),
    ("unknown decision", "GET", "/v1/results", {"params": {"decision": "MAYBE"}}, 422, "bad_decision"),
    ("reviewed not a bool", "GET", "/v1/results", {"params": {"reviewed": "perhaps"}}, 422, "bad_reviewed"),
    ("stats window < 0", "GET", "/v1/stats", {"params": {"window_s": "-1"}}, 422, "bad_window_s"),
    ("review limit 0", "GET", "/v1/review", {"params": {"limit": "0"}}, 422, "bad_limit"),
    ("verdict MAYBE", "POST", "/v1/review/1", {"json": {"verdict": "MAYBE"}}, 422, "bad_verdict"),
    ("review body not JSON", "POST", "/v1/review/1", {"content": b"{not json"}, 422, "bad_request"),
    ("review body broken JSON", "POST", "/v1/review/1",
     {"content": b'{"verdict": GOOD}', "headers": {"Content-Type": "application/json"}}, 422, "bad_json"),
    ("empty upload", "POST", "/v1/inspect", {"content": b""}, 400, "empty_body"),
    ("not an image", "POST", "/v1/inspect", {"content": b"\x00garbage" * 50}, 422, "unreadable_image"),
    ("truncated PNG", "POST", "/v1/inspect", {"content": HALF}, 422, "unreadable_image"),
    (
        "bomb header",
        "POST",
        "/v1/inspect",
        {"content": png_header_only(60000, 60000)},
        413,
        "image_too_large",
    ),
    (
        "upload over limit",
        "POST",
        "/v1/inspect",
        {"content": b"\x89PNG" + b"\0" * SMALL_UPLOAD},
        413,
        "upload_too_large",
    ),
    (
        "unknown type",
        "POST",
        "/v1/inspect",
        {"params": {"feature_type": "nope"}},
        422,
        "unknown_feature_type",
    ),
    (
        "type too long",
        "POST",
        "/v1/inspect",
        {"params": {"feature_type": "t" * 201}},
        422,
        "bad_feature_type",
    ),
    ("part_id newline", "POST", "/v1/inspect", {"params": {"part_id": "a\nb"}}, 422, "bad_part_id"),
    ("part_id DEL", "POST", "/v1/inspect", {"params": {"part_id": "a\x7fb"}}, 422, "bad_part_id"),
    ("part_id C1", "POST", "/v1/inspect", {"params": {"part_id": "a\x85b"}}, 422, "bad_part_id"),
    ("part_id U+2028", "POST", "/v1/inspect", {"params": {"part_id": "a\u2028b"}}, 422, "bad_part_id"),
    ("part_id U+2029", "POST", "/v1/inspect", {"params": {"part_id": "a\u2029b"}}, 422, "bad_part_id"),
    ("part_id invalid UTF-8", "POST", "/v1/inspect?part_id=a%FFb", {}, 422, "bad_part_id"),
    ("part_id too long", "POST", "/v1/inspect", {"params": {"part_id": "p" * 201}}, 422, "bad_part_id"),
    (
        "part_id DEL in form",
        "POST",
        "/v1/inspect",
        {"content": DEL_FORM, "headers": {"Content-Type": DEL_FORM_TYPE}},
        422,
        "bad_part_id",
    ),
    (
        "key invalid UTF-8",
        "POST",
        "/v1/inspect",
        {"headers": {"Idempotency-Key": b"k\xff\xfe"}},
        422,
        "bad_idempotency_key",
    ),
    (
        "key with DEL",
        "POST",
        "/v1/inspect",
        {"headers": {"Idempotency-Key": "k\x7f"}},
        422,
        "bad_idempotency_key",
    ),
    (
        "bad multipart",
        "POST",
        "/v1/inspect",
        {"content": BAD_MULTIPART, "headers": {"Content-Type": BAD_MULTIPART_TYPE}},
        400,
        "bad_multipart",
    ),
    ("batch not multipart", "POST", "/v1/inspect/batch", {"content": GOOD}, 415, "multipart_required"),
    # a misspelled parameter or field was ignored: the part scored under the router's type, its
    # part id lost, a results filter not applied (every row returned)
    ("query parameter misspelled", "POST", "/v1/inspect", {"params": {"partid": "cam1"}}, 422,
     "unknown_parameter"),
    ("results filter misspelled", "GET", "/v1/results", {"params": {"feature-type": "dots"}}, 422,
     "unknown_parameter"),
    ("form field misspelled", "POST", "/v1/inspect", {"content": TYPO_FORM, "headers": {
        "Content-Type": TYPO_FORM_TYPE}}, 422, "unknown_field"),
    # a name given twice (a form built from a template and appended to, a query string joined
    # twice): the last one was taken, in silence, the part scored under the other type, filed
    # under the other part id, or a filter other than the one meant applied
    ("query parameter given twice", "POST", "/v1/inspect", {"params": [("part_id", "a"), ("part_id", "b")]},
     422, "repeated_parameter"),
    ("results filter given twice", "GET", "/v1/results", {"params": [("decision", "PASS"),
                                                                     ("decision", "REJECT")]},
     422, "repeated_parameter"),
    ("form field given twice", "POST", "/v1/inspect", {"content": TWICE_FORM, "headers": {
        "Content-Type": TWICE_FORM_TYPE}}, 422, "repeated_field"),
    ("batch line field given twice", "POST", "/v1/inspect/batch", {"content": TWICE_LINE, "headers": {
        "Content-Type": TWICE_LINE_TYPE}}, 422, "repeated_field"),
    # JSON nested deeper than Python's parser goes (a fuzzer's, a client's runaway encoder): a 500
    # and a RecursionError's traceback in the log
    ("JSON nested deep", "POST", "/v1/inspect", DEEP_JSON, 422, "bad_request"),
    ("batch JSON nested deep", "POST", "/v1/inspect/batch", DEEP_JSON, 422, "bad_request"),
    ("JSON field given twice", "POST", "/v1/inspect", {"content": b'{"image": "x", "feature_type": "a", '
                                                                  b'"feature_type": "b"}', "headers": {
        "Content-Type": "application/json"}}, 422, "repeated_field"),
    # a review whose verdict is given twice ({"verdict": "GOOD", ..., "verdict": "BAD"}) was filed as the last
    ("review verdict given twice", "POST", "/v1/review/1", {"content": b'{"verdict": "GOOD", "note": "n", '
                                                                       b'"verdict": "BAD"}', "headers": {
        "Content-Type": "application/json"}}, 422, "repeated_field"),
    # text PostgreSQL cannot store (a NUL) read there as the store being down (503)
    ("reviewer with NUL", "POST", "/v1/review/1", {"json": {"verdict": "BAD", "reviewer": "a\x00b"}},
     422, "bad_reviewer"),
    ("note with ESC", "POST", "/v1/review/1", {"json": {"verdict": "BAD", "note": "x\x1b[2Jy"}},
     422, "bad_note"),
    ("defect kind with NUL", "POST", "/v1/review/1", {"json": {"verdict": "BAD", "defect": "cr\x00ack"}},
     422, "bad_defect"),
    ("filter with NUL", "GET", "/v1/results", {"params": {"part_id": "p\x00"}}, 422, "bad_part_id"),
    ("source filter with NUL", "GET", "/v1/results", {"params": {"source": "\x00"}}, 422, "bad_source"),
    ("unknown route", "GET", "/v1/nothing-here", {}, 404, "no_such_route"),
    ("wrong method", "DELETE", "/v1/results", {}, 405, "method_not_allowed"),
    ("no token", "GET", "/v1/results", {"headers": {"Authorization": ""}}, 401, "unauthorized"),
    ("wrong token", "GET", "/v1/results", {"headers": {"Authorization": "Bearer nope"}}, 401, "unauthorized"),
]


def _fill(value: Any, good: bytes) -> Any:
    """The row's request with the placeholder image replaced by a real one."""
    if isinstance(value, bytes):
        return value.replace(GOOD, good).replace(HALF, good[: len(good) // 2])
    if isinstance(value, dict):
        return {k: _fill(v, good) for k, v in value.items()}
    return value


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "code"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
async def test_bad_input_gets_a_4xx_with_a_code_and_the_service_stays_up(
    detector: Any,
    samples: Samples,
    tmp_path: Path,
    method: str,
    url: str,
    kwargs: dict[str, Any],
    status: int,
    code: str,
) -> None:
    good, ftype = samples.one("PASS")
    kwargs = _fill(kwargs, good)
    if url.startswith("/v1/inspect") and "content" not in kwargs:
        kwargs["content"] = good
    headers = {**AUTH, **kwargs.pop("headers", {})}
    headers = {k: v for k, v in headers.items() if v != ""}
    async with running_app(detector, tmp_path, max_upload_bytes=SMALL_UPLOAD) as (client, _):
        r = await client.request(method, url, headers=headers, **kwargs)
        assert r.status_code == status, r.text
        body = r.json()
        assert set(body) == {"detail", "code"} and body["code"] == code, body
        assert isinstance(body["detail"], str) and body["detail"]
        ok = await client.post("/v1/inspect", content=good, headers=AUTH, params={"feature_type": ftype})
        assert ok.status_code == 200, ok.text
        assert (await client.get("/readyz")).status_code == 200


async def test_a_route_without_its_version_or_with_another_method_is_told_the_one_there_is(
    detector: Any, samples: Samples, tmp_path: Path
) -> None:
    """``POST /inspect`` (the API's prefix left out, as a URL typed from memory) was answered
    "Not Found", and ``curl -T part.png`` (a PUT) "Method Not Allowed": each now names the route
    or the method there is; a route that is nowhere is still only not found."""
    good, ftype = samples.one("PASS")
    async with running_app(detector, tmp_path) as (client, _):
        r = await client.post("/inspect", content=good, headers=AUTH, params={"feature_type": ftype})
        assert (r.status_code, r.json()["code"]) == (404, "no_such_route"), r.text
        assert "no route POST /inspect; the API's is POST /v1/inspect" in r.json()["detail"], r.text
        r = await client.get("/results/7", headers=AUTH)
        assert "the API's is GET /v1/results/7" in r.json()["detail"], r.text
        r = await client.put("/v1/inspect", content=good, headers=AUTH, params={"feature_type": ftype})
        assert (r.status_code, r.json()["code"]) == (405, "method_not_allowed"), r.text
        assert r.json()["detail"] == "PUT /v1/inspect: this route takes POST", r.text
        assert r.headers["allow"] == "POST"
        r = await client.get("/nothing-here", headers=AUTH)
        assert r.status_code == 404 and "/v1" not in r.json()["detail"], r.text


async def test_a_verdict_with_a_misspelled_field_or_not_in_json_is_refused_and_not_stored(
    detector: Any, samples: Samples, tmp_path: Path
) -> None:
    """`{"verdict": "GOOD", "reviewr": "anna"}` stored the verdict without its reviewer (the
    audit trail's who), the misspelled field ignored; a verdict sent as a form (`curl -d
    verdict=GOOD`) or without a body was answered "request: Field required". A field the route
    does not take is refused with the near miss and the fields it takes; a body that is no JSON
    object is named as such; nothing is stored."""
    good, ftype = samples.one("PASS")
    async with running_app(detector, tmp_path) as (client, _):
        rid = (await client.post("/v1/inspect", content=good, headers=AUTH,
                                 params={"feature_type": ftype})).json()["id"]
        r = await client.post(f"/v1/review/{rid}", headers=AUTH, json={"verdict": "GOOD", "reviewr": "anna"})
        assert (r.status_code, r.json()["code"]) == (422, "unknown_field"), r.text
        assert "'reviewr' (did you mean 'reviewer'?)" in r.json()["detail"]
        assert "defect, note, replaces, reviewer, verdict" in r.json()["detail"]
        for kwargs in ({"data": {"verdict": "GOOD"}}, {}, {"json": "GOOD"}, {"json": ["GOOD"]}):
            r = await client.post(f"/v1/review/{rid}", headers=AUTH, **kwargs)
            assert (r.status_code, r.json()["code"]) == (422, "bad_request"), (kwargs, r.text)
            assert "a JSON object" in r.json()["detail"] and '"verdict"' in r.json()["detail"], r.text
        # the verdict as a query parameter (`curl -X POST .../v1/review/7?verdict=GOOD`) was told
        # "/v1/review/{record_id} takes " and nothing more
        r = await client.post(f"/v1/review/{rid}", headers=AUTH, params={"verdict": "GOOD"})
        assert (r.status_code, r.json()["code"]) == (422, "unknown_parameter"), r.text
        assert r.json()["detail"] == ("'verdict' is a field of /v1/review/{record_id}'s JSON body, not a "
                                      'query parameter: send {"verdict": "GOOD"} (Content-Type: '
                                      "application/json)")
        r = await client.post(f"/v1/review/{rid}", headers=AUTH, params={"who": "anna"})
        assert r.json()["detail"] == ("unknown query parameter 'who'; /v1/review/{record_id} takes "
                                      "none"), r.text
        # a verdict in another word a line uses (a manifest's label takes them) names the one meant
        for word, meant in (("good", "GOOD"), ("NOK", "BAD"), ("i.O.", "GOOD"), ("fail", "BAD")):
            r = await client.post(f"/v1/review/{rid}", headers=AUTH, json={"verdict": word})
            assert (r.status_code, r.json()["code"]) == (422, "bad_verdict"), r.text
            assert f"(got {word!r}) (did you mean {meant!r}?)" in r.json()["detail"], r.text
        r = await client.post(f"/v1/review/{rid}", headers=AUTH, json={"verdict": "MAYBE"})
        assert "did you mean" not in r.json()["detail"], r.text
        stored = (await client.get(f"/v1/results/{rid}", headers=AUTH)).json()
        assert stored["review"] is None and stored["reviewer"] is None
        r = await client.post(f"/v1/review/{rid}", headers=AUTH, json={"verdict": "GOOD", "reviewer": "anna"})
        assert r.status_code == 200 and r.json()["reviewer"] == "anna"


async def test_idempotency_key_replayed_with_another_body_is_refused(
    detector: Any, samples: Samples, tmp_path: Path
) -> None:
    (a, ftype), (b, _) = samples.by_decision["PASS"][:2]
    headers = {**AUTH, "Idempotency-Key": "cam1-000042"}
    params = {"feature_type": ftype, "part_id": "p42"}
    async with running_app(detector, tmp_path) as (client, state):
        first = await client.post("/v1/inspect", content=a, headers=headers, params=params)
        assert first.status_code == 200 and first.json()["duplicate"] is False
        same = await client.post("/v1/inspect", content=a, headers=headers, params=params)
        assert same.status_code == 200 and same.json()["duplicate"] is True
        assert same.json()["id"] == first.json()["id"]
        for changed in (
            {"content": b, "params": params},  # another image
            {"content": a, "params": {**params, "part_id": "p43"}},  # another part
        ):
            r = await client.post("/v1/inspect", headers=headers, **changed)
            assert r.status_code == 409 and r.json()["code"] == "idempotency_key_reused", r.text
        # two different bodies racing with one new key: one stored, the other refused
        race = {**AUTH, "Idempotency-Key": "cam1-race"}
        answers = await asyncio.gather(
            client.post("/v1/inspect", content=a, headers=race, params=params),
            client.post("/v1/inspect", content=b, headers=race, params=params),
        )
        assert sorted(r.status_code for r in answers) == [200, 409]
        assert state.store.count() == 2  # p42 once, the race's winner once


async def test_an_image_under_another_field_name_is_told_the_name(
    detector: Any, samples: Samples, tmp_path: Path
) -> None:
    """A client sending the image as ``file`` (the name FastAPI's and most HTTP examples use)
    was told "multipart body has no file field 'image'", not what it had sent instead. The
    answer names the fields it got and what to send."""
    good, ftype = samples.one("PASS")
    async with running_app(detector, tmp_path) as (client, state):
        for url in ("/v1/inspect", "/v1/inspect/batch"):
            r = await client.post(url, files={"file": ("part.png", good, "image/png")},
                                  data={"feature_type": ftype}, headers=AUTH)
            assert r.status_code == 400 and r.json()["code"] == "missing_image", r.text
            assert "it has file 'file' and field 'feature_type'" in r.json()["detail"], r.text
            assert "send the image as the file field 'image' (curl -F image=@part.png)" in r.json()["detail"]
        assert state.store.count() == 0


async def test_an_image_part_without_a_filename_is_told_so(detector: Any, samples: Samples,
                                                          tmp_path: Path) -> None:
    """An image part without a filename (Node-RED's `http request` node given `{image: buffer}`,
    .NET's `content.Add(new ByteArrayContent(bytes), "image")`) is a text field to a multipart
    parser, and was answered "no file field 'image' (it has field 'image')", which named no
    cause. The answer says the part has no filename and how each client gives one."""
    good, ftype = samples.one("PASS")
    boundary = "b0undary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n")
    body = head.encode() + good + f"\r\n--{boundary}--\r\n".encode()
    async with running_app(detector, tmp_path) as (client, state):
        r = await client.post("/v1/inspect", content=body, params={"feature_type": ftype},
                              headers={**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 400 and r.json()["code"] == "missing_image", r.text
        said = r.json()["detail"]
        assert "its part 'image' has no filename" in said, said
        assert "curl -F image=@part.png" in said and '"image", "part.png"' in said, said
        assert state.store.count() == 0


async def test_an_image_sent_as_base64_text_is_told_how_to_send_it(
    detector: Any, samples: Samples, tmp_path: Path
) -> None:
    """A line's client written in JavaScript or a PLC's HTTP block often sends the image as
    base64 text, bare, as a data URL or inside JSON without saying so: the answer was "not a
    recognised image format", as for a damaged file. It says what the body is and what to send
    (a JSON upload says so with its Content-Type: see test_an_image_sent_as_json_is_inspected)."""
    import base64
    import json

    good, ftype = samples.one("PASS")
    text = base64.b64encode(good)
    bodies = {
        "the body is JSON": json.dumps({"image": text.decode(), "feature_type": ftype}).encode(),
        "the body is base64 text": text,
        "the body is base64 text (a data URL)": b"data:image/png;base64," + text,
    }
    async with running_app(detector, tmp_path) as (client, state):
        for said, body in bodies.items():
            r = await client.post("/v1/inspect", content=body, headers=AUTH, params={"feature_type": ftype})
            assert r.status_code == 422 and r.json()["code"] == "unreadable_image", r.text
            assert f"{said}: send the image file's own bytes as the body (curl --data-binary @part.png)" \
                   in r.json()["detail"], r.text
            assert "or as JSON with Content-Type: application/json" in r.json()["detail"], r.text
        damaged = await client.post("/v1/inspect", content=good[:200], headers=AUTH,
                                    params={"feature_type": ftype})
        assert damaged.status_code == 422 and "the body is" not in damaged.json()["detail"]
        assert state.store.count() == 0  # a refused upload is answered, not stored


async def test_an_image_sent_with_curl_d_is_told_its_line_breaks_were_dropped(
    detector: Any, samples: Samples, tmp_path: Path
) -> None:
    """``curl -d @part.png``, the first form of curl most people type, sends a file as a form
    (``application/x-www-form-urlencoded``) with its carriage returns and line feeds removed, a
    PNG's own signature among them: the answer was "not a recognised image format", as for a
    damaged file. It says what curl did and what to send; an image that came whole is inspected."""
    good, ftype = samples.one("PASS")
    form = {"Content-Type": "application/x-www-form-urlencoded", **AUTH}
    async with running_app(detector, tmp_path) as (client, state):
        r = await client.post("/v1/inspect", content=good.replace(b"\r", b"").replace(b"\n", b""),
                              headers=form, params={"feature_type": ftype})
        assert r.status_code == 422 and r.json()["code"] == "unreadable_image", r.text
        said = r.json()["detail"]
        assert "sent as a form (Content-Type: application/x-www-form-urlencoded" in said, said
        assert "curl --data-binary @part.png" in said and "curl -F image=@part.png" in said, said
        assert state.store.count() == 0
        whole = await client.post("/v1/inspect", content=good, headers=form, params={"feature_type": ftype})
        assert whole.status_code == 200, whole.text


async def test_an_image_sent_as_json_is_inspected(detector: Any, samples: Samples, tmp_path: Path) -> None:
    """A PLC's HTTP block or a JavaScript client that can send only text sends JSON:
    ``{"image": "<base64>" or a data URL, "feature_type", "part_id", "line", ...}`` with
    ``Content-Type: application/json``. It is inspected as the same image's bytes are; what is
    wrong with one is said (no image, not base64, a misspelled field, not an object, too large)
    and nothing is stored."""
    import base64

    good, ftype = samples.one("PASS")
    text = base64.b64encode(good).decode()
    async with running_app(detector, tmp_path, max_upload_bytes=len(good) + 10) as (client, state):
        raw = (await client.post("/v1/inspect", content=good, headers=AUTH,
                                 params={"feature_type": ftype})).json()
        r = await client.post("/v1/inspect", headers=AUTH, json={
            "image": text, "feature_type": ftype, "part_id": 4711, "line": "L1", "camera": "cam-2"})
        assert r.status_code == 200, r.text
        got = r.json()
        assert (got["feature_type"], got["part_id"], got["line"], got["camera"]) == (
            ftype, "4711", "L1", "cam-2")
        assert got["score"] == raw["score"] and got["type_known"] is True
        r = await client.post("/v1/inspect", headers=AUTH, params={"feature_type": ftype},
                              json={"image": f"data:image/png;base64,{text}"})
        assert r.status_code == 200 and r.json()["score"] == raw["score"], r.text
        assert state.store.count() == 3
        refused = {
            "missing_image": ({"feature_type": ftype}, 400, "the JSON body has no 'image'"),
            "not_base64": ({"image": "not base64!"}, 422, "JSON field 'image' is not base64"),
            "unknown_field": ({"image": text, "partid": "7"}, 422,
                              "unknown JSON field 'partid' (did you mean 'part_id'?)"),
            "not_an_object": ([text], 422, "a JSON upload is an object"),
            "a_list_for_a_field": ({"image": text, "part_id": ["7"]}, 422, "JSON field 'part_id'"),
            "too_large": ({"image": base64.b64encode(good + b"\0" * 64).decode()}, 413, "upload exceeds"),
        }
        for name, (body, status, said) in refused.items():
            r = await client.post("/v1/inspect", headers=AUTH, json=body)
            assert r.status_code == status and said in r.json()["detail"], (name, r.text)
        r = await client.post("/v1/inspect", headers={**AUTH, "Content-Type": "application/json"},
                              content=b"{broken")
        assert r.status_code == 422 and "not valid JSON" in r.json()["detail"], r.text
        assert state.store.count() == 3


async def test_base64_wrapped_in_lines_or_url_safe_is_inspected(detector: Any, samples: Samples,
                                                                tmp_path: Path) -> None:
    """Base64 as most encoders write it was refused "not base64": wrapped in lines of 76
    characters (GNU `base64 part.png`, Python's `base64.encodebytes`, MIME; .NET's with
    `InsertLineBreaks`, `\\r\\n`) and the URL-safe alphabet (`-_`, unpadded: Go's `RawURLEncoding`,
    a JWT library's). Each is now read as the same bytes; the body may be as much longer as the
    line breaks make it, so an image at the size limit sent wrapped is taken too."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    good, ftype = samples.one("PASS")
    noise = np.random.default_rng(0).integers(0, 256, (900, 900, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    large = buf.getvalue()  # 2.4 MB: the body limit's 64 KiB to spare does not cover its line breaks
    async with running_app(detector, tmp_path, max_upload_bytes=len(large)) as (client, state):
        raw = (await client.post("/v1/inspect", content=good, headers=AUTH,
                                 params={"feature_type": ftype})).json()
        forms = {
            "lines": base64.encodebytes(good).decode(),
            "crlf lines": base64.encodebytes(good).decode().replace("\n", "\r\n"),
            "url-safe": base64.urlsafe_b64encode(good).decode().rstrip("="),
            "data url, lines": "data:image/png;base64," + base64.encodebytes(good).decode(),
        }
        for name, text in forms.items():
            r = await client.post("/v1/inspect", headers=AUTH, json={"image": text, "feature_type": ftype})
            assert r.status_code == 200 and r.json()["score"] == raw["score"], (name, r.text)
        wrapped = base64.encodebytes(large).decode().replace("\n", "\r\n")
        r = await client.post("/v1/inspect", headers=AUTH, json={"image": wrapped, "feature_type": ftype})
        assert r.status_code == 200, r.text
        for text in ("abcde", "not base64!", base64.b64encode(good).decode()[:-4] + "-_+/"):
            r = await client.post("/v1/inspect", headers=AUTH, json={"image": text})
            assert r.status_code == 422 and "is not base64" in r.json()["detail"], (text[-8:], r.text)
        assert state.store.count() == 1 + len(forms) + 1


async def test_a_batch_sent_as_json_is_inspected(detector: Any, samples: Samples, tmp_path: Path) -> None:
    """The batch route took multipart only: a client that sends only text had no batch. JSON
    with the form's fields as lists — ``{"image": [base64, ...], "feature_type": one or a list,
    "part_id": [...], "line": ...}`` — is inspected as the same images' bytes are; a fault is
    named and nothing stored."""
    import base64

    (good, gtype), (other, otype) = samples.all[0], samples.all[1]
    texts = [base64.b64encode(b).decode() for b in (good, other)]
    async with running_app(detector, tmp_path, max_batch_items=2) as (client, state):
        raw = [(await client.post("/v1/inspect", content=b, headers=AUTH, params={"feature_type": t})).json()
               for b, t in ((good, gtype), (other, otype))]
        r = await client.post("/v1/inspect/batch", headers=AUTH, json={
            "image": [texts[0], f"data:image/png;base64,{texts[1]}"], "feature_type": [gtype, otype],
            "part_id": ["a-1", 2], "station": "S2"})
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        assert [g["score"] for g in got] == pytest.approx([x["score"] for x in raw], rel=1e-5)  # batched
        assert [(g["part_id"], g["station"], g["feature_type"]) for g in got] == [
            ("a-1", "S2", gtype), ("2", "S2", otype)]
        assert state.store.count() == 4
        refused = {
            "no image list": ({"image": texts[0]}, 400, "the JSON body has no 'image' list"),
            "too many": ({"image": texts * 2}, 413, "4 images; at most 2"),
            "not base64": ({"image": [texts[0], "??"]}, 422, "JSON field 'image' 1 is not base64"),
            "misspelled": ({"image": texts, "partids": ["a", "b"]}, 422, "unknown JSON field 'partids'"),
            "ids for more": ({"image": texts, "part_id": ["a", "b", "c"]}, 422,
                             "3 part_id fields for 2 images"),
        }
        for name, (body, status, said) in refused.items():
            r = await client.post("/v1/inspect/batch", headers=AUTH, json=body)
            assert r.status_code == status and said in r.json()["detail"], (name, r.text)
        r = await client.post("/v1/inspect/batch", headers=AUTH, content=good)
        assert r.status_code == 415 and "or JSON" in r.json()["detail"]
        assert state.store.count() == 4


async def test_a_null_in_a_json_batchs_lists_is_that_images_none(detector: Any, samples: Samples,
                                                                   tmp_path: Path) -> None:
    """A null in a JSON batch's ``part_id`` or ``feature_type`` list was thrown away and the rest
    moved up: ``"part_id": [null, "P-2"]`` filed both images under P-2, ``"feature_type": [null,
    "angle"]`` scored both as angle, and ``["P-1", null, "P-3"]`` for three images was refused as
    "2 part_id fields for 3 images". A null keeps its place and is none, as a form's empty field."""
    import base64

    texts = [base64.b64encode(b).decode() for b, _ in samples.all[:3]]
    types = [t for _, t in samples.all[:3]]
    async with running_app(detector, tmp_path) as (client, _):
        r = await client.post("/v1/inspect/batch", headers=AUTH, json={
            "image": texts[:2], "part_id": [None, "P-2"], "feature_type": [None, types[1]]})
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        assert [g["part_id"] for g in got] == [None, "P-2"]
        assert [g["type_known"] for g in got] == [False, True] and got[1]["feature_type"] == types[1]
        r = await client.post("/v1/inspect/batch", headers=AUTH, params={"feature_type": types[0]}, json={
            "image": texts, "part_id": ["P-1", None, "P-3"], "feature_type": [None, *types[1:]]})
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        assert [(g["part_id"], g["feature_type"], g["type_known"]) for g in got] == [
            ("P-1", types[0], True), (None, types[1], True), ("P-3", types[2], True)]


async def test_a_text_field_sent_as_a_file_is_refused_and_named(detector: Any, samples: Samples,
                                                                tmp_path: Path) -> None:
    """A form's text field sent as a file part (``curl -F part_id=@id.txt``) was filed as its
    description, ``UploadFile(filename='id.txt', ...)``, for the part id of a batch, and answered
    200; a line, station or camera so sent, and any such field on ``/v1/inspect``, was dropped
    without a word. Each is a 422 naming the field and how to send its text; nothing is stored."""
    good, _ = samples.one("PASS")
    async with running_app(detector, tmp_path) as (client, state):
        for route in ("/v1/inspect", "/v1/inspect/batch"):
            for name in ("part_id", "feature_type", "line", "station", "camera"):
                files = [("image", ("part.png", good, "image/png")), (name, ("id.txt", b"P-1", "text/plain"))]
                r = await client.post(route, headers=AUTH, files=files)
                assert (r.status_code, r.json()["code"]) == (422, f"bad_{name}"), (route, name, r.text)
                assert f"form field {name!r} is a file" in r.json()["detail"], r.text
        assert state.store.count() == 0


async def test_a_refused_upload_is_counted_behind_a_reverse_proxys_path(detector: Any, samples: Samples,
                                                                        tmp_path: Path) -> None:
    """Under ``--root-path /qc`` (behind a reverse proxy) ``diffqc_bad_uploads_total`` never
    counted a refused upload: it looked for ``/v1/inspect`` at the start of the path, which the
    service sees as ``/qc/v1/inspect``."""
    from diffqc.service.app import ServiceSettings, create_app

    app = create_app(ServiceSettings(db_url=str(tmp_path / "r.db"), tokens=(TOKEN,), root_path="/qc"),
                     detector=detector)
    transport = httpx.ASGITransport(app=app, root_path="/qc")  # the path as uvicorn gives it
    client = httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60.0)
    async with app.router.lifespan_context(app), client:
        r = await client.post("/qc/v1/inspect", headers=AUTH, content=b"")
        assert (r.status_code, r.json()["code"]) == (400, "empty_body"), r.text
        r = await client.post("/qc/v1/inspect/batch", headers=AUTH, files=[("other", ("a.png", b"x"))])
        assert (r.status_code, r.json()["code"]) == (400, "missing_image"), r.text
        text = (await client.get("/qc/metrics", headers=AUTH)).text
        assert 'diffqc_bad_uploads_total{reason="empty_body"} 1' in text, text
        assert 'diffqc_bad_uploads_total{reason="missing_image"} 1' in text, text


async def test_a_misspelled_parameter_or_field_is_refused_with_the_names_it_takes(
    detector: Any, samples: Samples, tmp_path: Path
) -> None:
    """``?type=edge1``, ``?featureType=edge1`` or a form's ``partid`` were ignored: the part was
    scored under the type router's pick (``type_known`` false) and its part id lost, and
    ``GET /v1/results?feature-type=dots`` returned every row. Each is a 422 naming the names the
    route takes (and a near miss); the names it takes still work, line fields included."""
    good, ftype = samples.one("PASS")
    async with running_app(detector, tmp_path) as (client, state):
        r = await client.post("/v1/inspect", content=good, headers=AUTH, params={"featureType": ftype})
        assert r.status_code == 422, r.text
        assert r.json()["detail"] == ("unknown query parameter 'featureType' (did you mean 'feature_type'?); "
                                      "/v1/inspect takes camera, feature_type, line, part_id, station")
        r = await client.post("/v1/inspect", content=good, headers=AUTH, params={"type": ftype})
        assert "unknown query parameter 'type' (did you mean 'feature_type'?);" in r.json()["detail"], r.text
        r = await client.post("/v1/inspect/batch", files=[("image", ("a.png", good, "image/png"))],
                              data={"type": ftype}, headers=AUTH)
        assert r.status_code == 422 and r.json()["code"] == "unknown_field", r.text
        assert r.json()["detail"] == ("unknown form field 'type' (did you mean 'feature_type'?); "
                                      "/v1/inspect/batch takes the fields camera, feature_type, image, "
                                      "line, part_id, station")
        r = await client.post("/v1/inspect", content=good, headers=AUTH, params={"id": "p1"})
        assert "unknown query parameter 'id' (did you mean 'part_id'?);" in r.json()["detail"], r.text
        assert state.store.count() == 0
        ok = await client.post("/v1/inspect", content=good, headers=AUTH,
                               params={"feature_type": ftype, "part_id": "p1", "line": "L1"})
        assert ok.status_code == 200 and ok.json()["type_known"] and ok.json()["line"] == "L1", ok.text
        form = await client.post("/v1/inspect", files={"image": ("a.png", good, "image/png")},
                                 data={"feature_type": ftype, "part_id": "p2", "station": "S1"}, headers=AUTH)
        assert form.status_code == 200 and form.json()["station"] == "S1", form.text
        listed = await client.get("/v1/results", headers=AUTH, params={"feature_type": ftype, "limit": 5})
        assert listed.status_code == 200 and len(listed.json()["results"]) == 2


async def _stalled_body() -> AsyncIterator[bytes]:
    yield b"\x89PNG\r\n\x1a\n"
    await asyncio.sleep(30)  # the client stops sending
    yield b"never"


async def test_a_stalled_upload_gets_408(detector: Any, samples: Samples, tmp_path: Path) -> None:
    good, ftype = samples.one("PASS")
    async with running_app(detector, tmp_path, body_timeout_s=0.3) as (client, state):
        r = await client.post("/v1/inspect", content=_stalled_body(), headers=AUTH)
        assert r.status_code == 408 and r.json()["code"] == "body_timeout", r.text
        assert "stalled" in r.json()["detail"]
        r = await client.post(  # any route: a stalled JSON body too
            "/v1/review/1", content=_stalled_body(), headers={**AUTH, "Content-Type": "application/json"}
        )
        assert r.status_code == 408 and r.json()["code"] == "body_timeout", r.text
        ok = await client.post("/v1/inspect", content=good, headers=AUTH, params={"feature_type": ftype})
        assert ok.status_code == 200
        assert state.store.count() == 1


async def test_a_store_that_refuses_writes_is_said_once_not_for_every_part(
    detector: Any, samples: Samples, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The database refusing writes (a full disk) logged three errors for every part refused,
    hundreds of lines a minute on a line, which bury the first one (and journald drops lines
    past its rate limit): it is said once when it starts, and once more, with the parts not
    stored, when the store writes again. Each part is still answered 503 store_unavailable."""
    db = tmp_path / "results.db"
    (body, ftype) = samples.all[0]
    caplog.set_level("INFO", logger="diffqc")
    async with running_app(detector, tmp_path) as (client, state):
        with sqlite3.connect(db) as admin:  # the database refuses every new row, as a full disk does
            admin.execute("CREATE TRIGGER full BEFORE INSERT ON diffqc_results "
                          "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        for n in range(5):
            r = await client.post("/v1/inspect", content=body, headers=AUTH,
                                  params={"feature_type": ftype, "part_id": f"F-{n}"})
            assert r.status_code == 503 and r.json()["code"] == "store_unavailable", r.text
        with sqlite3.connect(db) as admin:
            admin.execute("DROP TRIGGER full")
        r = await client.post("/v1/inspect", content=body, headers=AUTH, params={"feature_type": ftype})
        assert r.status_code == 200, r.text
        assert state.store.count() == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "cannot store parts: " in errors[0], errors
    assert "database or disk is full" in errors[0]
    assert "the result store can write again; parts not stored meanwhile: 5, over" in caplog.text


async def test_a_store_that_cannot_be_read_is_said_once_a_minute_not_for_every_request(
    detector: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A dashboard, an HMI and a MES polling while the database is down (a PostgreSQL failover,
    a SQLite file damaged) logged an error for every request refused: the first is said, the
    later ones counted into the next such line, at most one a minute. Each request is still
    answered 503."""
    db = tmp_path / "results.db"
    caplog.set_level("INFO", logger="diffqc")
    async with running_app(detector, tmp_path) as (client, _):
        with sqlite3.connect(db) as admin:  # the store's table gone from under it: every read fails
            admin.execute("ALTER TABLE diffqc_results RENAME TO moved_away")
        for _ in range(6):
            r = await client.get("/v1/results", headers=AUTH)
            assert r.status_code == 503 and r.json()["code"] == "store_unavailable", r.text
        with sqlite3.connect(db) as admin:
            admin.execute("ALTER TABLE moved_away RENAME TO diffqc_results")
        assert (await client.get("/v1/results", headers=AUTH)).status_code == 200
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("result store error on /v1/results: "), errors
    assert "moved_away" not in errors[0] and "no such table" in errors[0]


async def test_a_kept_image_not_in_the_data_folder_is_said_so(detector: Any, samples: Samples,
                                                             tmp_path: Path) -> None:
    """A record naming a kept image whose file is not in this service's folder (a history copied
    from a pilot's store, `results copy`, served without the pilot's --data-dir; a folder moved)
    was answered "result 1 has no stored image", as if none had been kept. The 404 names the
    file and the folder it was looked for in, and what to give."""
    art = tmp_path / "art"
    body, ftype = samples.all[0]
    async with running_app(detector, tmp_path, data_dir=str(art), keep_images="all", heatmaps="all") as (
        client,
        _,
    ):
        sent = await client.post("/v1/inspect", content=body, headers=AUTH, params={"feature_type": ftype})
        rec = sent.json()
        kept = next((art / "images").iterdir())
        kept.unlink()
        r = await client.get(rec["image_url"], headers=AUTH)
        assert r.status_code == 404, r.text
        assert r.json()["detail"] == (
            f"result {rec['id']}'s image {kept.name} is not in {art.resolve() / 'images'}, where this "
            "service keeps its files (--data-dir): a history copied from another store (results copy) "
            "names the files of that service's --data-dir; give it")
        assert (await client.get(rec["heatmap_url"], headers=AUTH)).status_code == 200


async def test_an_artifact_that_cannot_be_written_fails_only_itself(
    detector: Any, samples: Samples, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The kept-image folder replaced by a regular file (fails as root too, unlike chmod): every
    part of the micro-batch is still answered 200 and stored, with its heat map; the record
    says its image is missing and why; /readyz stays ready and reports the degraded folder.
    The log says so once, not for every part, and once more when images are kept again."""
    art = tmp_path / "art"
    parts = samples.all[:4]
    caplog.set_level("INFO", logger="diffqc")
    async with running_app(detector, tmp_path, data_dir=str(art), keep_images="all", heatmaps="all") as (
        client,
        state,
    ):
        shutil.rmtree(art / "images")
        (art / "images").write_bytes(b"not a folder")
        body, ctype = _multipart([("image", p) for p, _ in parts] + [("feature_type", t) for _, t in parts])
        r = await client.post("/v1/inspect/batch", content=body, headers={**AUTH, "Content-Type": ctype})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == len(parts) and {x["decision"] for x in results} <= {"PASS", "REVIEW", "REJECT"}
        for rec in results:
            assert rec["image_url"] is None and rec["heatmap_url"] is not None
            assert rec["reason"].startswith("kept image not written")
        assert state.store.count() == len(parts)
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and "artifacts" in ready.json()["degraded"]
        metrics = (await client.get("/metrics", headers=AUTH)).text
        assert f"diffqc_artifact_errors_total {len(parts)}" in metrics
        # nothing half-written, no heat map without its row
        heatmaps = sorted(p.name for p in (art / "heatmaps").iterdir())
        assert not [n for n in heatmaps if n.endswith(".tmp")]
        assert len(heatmaps) == len(parts)
        (art / "images").unlink()
        (art / "images").mkdir()
        assert "degraded" not in (await client.get("/readyz")).json()
        said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(said) == 1 and "kept image not written: a part without id:" in said[0], said
        p, t = parts[0]
        r = await client.post("/v1/inspect", content=p, headers=AUTH, params={"feature_type": t})
        assert r.status_code == 200 and r.json()["image_url"] is not None, r.text
        said = f"kept images are written again; parts without one meanwhile: {len(parts)}, over"
        assert said in caplog.text


async def test_a_failed_store_write_leaves_no_orphan_heat_map_and_readyz_says_why(
    detector: Any, samples: Samples, tmp_path: Path
) -> None:
    """Another connection holds the SQLite write lock: inserts time out, the client gets 503
    with a code, /readyz is 503 with the reason, no heat map is left without its row; once
    the lock is released the same service stores again."""
    good, ftype = samples.one("PASS")
    db = tmp_path / "results.db"
    art = tmp_path / "art"
    async with running_app(detector, tmp_path, data_dir=str(art), store_busy_timeout_s=0.2,
                           heatmaps="all") as (client, state):  # a PASS part's heat map too
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            r = await client.post("/v1/inspect", content=good, headers=AUTH, params={"feature_type": ftype})
            assert r.status_code == 503 and r.json()["code"] == "store_unavailable", r.text
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["store"] is False
            assert "locked" in ready.json()["reason"]
            assert list((art / "heatmaps").iterdir()) == []
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert (await client.get("/readyz")).status_code == 200
        r = await client.post("/v1/inspect", content=good, headers=AUTH, params={"feature_type": ftype})
        assert r.status_code == 200
        assert len(list((art / "heatmaps").iterdir())) == 1 and state.store.count() == 1


async def test_store_errors_on_read_routes_are_503_and_the_store_recovers(
    detector: Any, samples: Samples, tmp_path: Path
) -> None:
    """The SQLite file replaced under the running service, first by a file that is not a
    database (reads and writes: 503 with a code, never 500), then by a fresh database: the
    service reconnects by itself and writes into the new file."""
    good, ftype = samples.one("PASS")
    db = tmp_path / "results.db"
    async with running_app(detector, tmp_path) as (client, _):
        first = await client.post("/v1/inspect", content=good, headers=AUTH, params={"feature_type": ftype})
        assert first.status_code == 200
        saved = tmp_path / "saved.db"
        for suffix in ("", "-wal", "-shm"):  # an operator moves the whole store away
            if Path(f"{db}{suffix}").exists():
                Path(f"{db}{suffix}").rename(f"{saved}{suffix}")
        db.write_bytes(b"this is not a database" * 300)
        for path in (
            "/v1/results",
            "/v1/review",
            "/v1/stats",
            "/metrics",
            f"/v1/results/{first.json()['id']}",
        ):
            r = await client.get(path, headers=AUTH)
            assert r.status_code == 503 and r.json()["code"] == "store_unavailable", (path, r.text)
        r = await client.post("/v1/inspect", content=good, headers=AUTH, params={"feature_type": ftype})
        assert r.status_code == 503 and r.json()["code"] == "store_unavailable"
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["code"] == "not_ready"
        db.unlink()  # an operator puts a new, empty store in place
        r = await client.post("/v1/inspect", content=good, headers=AUTH, params={"feature_type": ftype})
        assert r.status_code == 200, r.text
        assert (await client.get("/readyz")).status_code == 200
        listed = (await client.get("/v1/results", headers=AUTH)).json()["results"]
        assert [x["id"] for x in listed] == [r.json()["id"]]
    with sqlite3.connect(saved) as old:  # the acknowledged part is still in the old file
        assert old.execute("SELECT COUNT(*) FROM diffqc_results").fetchone()[0] == 1
    with sqlite3.connect(db) as new:
        assert new.execute("SELECT COUNT(*) FROM diffqc_results").fetchone()[0] == 1


async def test_inspections_failing_make_readyz_not_ready(
    detector: Any, samples: Samples, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every inspection failing (the model's weights unreadable): each part is NOT_INSPECTED,
    /readyz says so; the log says it once, not for every part, and once more when parts are
    inspected again."""
    good, ftype = samples.one("PASS")
    caplog.set_level("INFO", logger="diffqc")
    async with running_app(detector, tmp_path) as (client, state):
        pipeline = state.pipeline
        real = pipeline.detector

        class Broken:
            classes_ = real.classes_

            def inspect(self, *a: Any, **k: Any) -> Any:
                raise RuntimeError("model weights unreadable")

        pipeline.detector = Broken()
        for _ in range(3):
            r = await client.post("/v1/inspect", content=good, headers=AUTH, params={"feature_type": ftype})
            assert r.status_code == 200 and r.json()["decision"] == "NOT_INSPECTED"
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and "inspections failed" in ready.json()["reason"]
        pipeline.detector = real
        r = await client.post("/v1/inspect", content=good, headers=AUTH, params={"feature_type": ftype})
        assert r.json()["decision"] != "NOT_INSPECTED"
        assert (await client.get("/readyz")).status_code == 200
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "model weights unreadable" in errors[0], errors
    assert "parts are inspected again; parts not inspected meanwhile: 3, over" in caplog.text


def test_a_full_disk_fails_the_artifact_write_cleanly(tmp_path: Path) -> None:
    """A full disk simulated with a per-process file-size limit (RLIMIT_FSIZE = 4 KiB, SIGXFSZ
    ignored so that write() returns EFBIG): the write raises OutputError naming the file, and
    no temporary or partial file is left; small writes still work."""
    script = textwrap.dedent(
        f"""
        import resource, signal
        from pathlib import Path
        from diffqc.errors import OutputError
        from diffqc.service.store import ArtifactStore
        art = ArtifactStore({str(tmp_path)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        small = art.save_bytes("images", b"x" * 100, "png")
        try:
            art.save_bytes("images", b"x" * 100_000, "png")
        except OutputError as exc:
            print("OutputError", exc)
        print("files", sorted(p.name for p in Path({str(tmp_path)!r}, "images").iterdir()) == [small])
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OutputError cannot write image" in out.stdout and "File too large" in out.stdout
    assert "files True" in out.stdout


def test_entrypoint_bad_model_or_db_is_one_line_and_exit_1(
    service_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffqc.service.__main__ import main

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    (tmp_path / "cam2").mkdir()
    users = tmp_path / "users"
    users.write_text("plc:s3cret\n")
    cases = [
        (["serve", str(tmp_path / "no-model"), "--no-auth"], "no-model"),
        (["serve", str(service_model[0]), "--no-auth", "--db", str(blocker / "r.db")], "SQLite"),
        (
            ["serve", str(service_model[0]), "--no-auth", "--db", "postgresql://nobody@127.0.0.1:1/none"],
            "cannot connect",
        ),
        (["serve", str(service_model[0])], "no API token"),
        # the push targets and watched folders: checked before the model loads, not a traceback
        # from inside the application's start (exit 3)
        (["serve", str(service_model[0]), "--no-auth", "--mqtt", "mqtt://broker:99999/line1"],
         "MQTT URL 'mqtt://broker:99999/line1' has a bad port"),
        (["serve", str(service_model[0]), "--no-auth", "--mqtt", "tcp://broker/l1"],
         "must look like mqtt://host:1883/prefix (or mqtts://; over WebSockets, wss://host/mqtt?"
         "prefix=PREFIX): tcp://, as Paho's Java and C clients write it, is mqtt:// here: mqtt://broker/l1"),
        (["serve", str(service_model[0]), "--no-auth", "--mqtt", "ssl://u@broker:8883"],
         "ssl://, as Paho's Java and C clients write it, is mqtts:// here: mqtts://u@broker:8883"),
        (["serve", str(service_model[0]), "--no-auth", "--mqtt", "broker.local:1883"],
         "must look like mqtt://host:1883/prefix (or mqtts://; over WebSockets, wss://host/mqtt?"
         "prefix=PREFIX): write it as a URL: mqtt://broker.local:1883"),
        (["serve", str(service_model[0]), "--no-auth", "--mqtt", "mqtt://broker/l+1"], "may not contain '+'"),
        (["serve", str(service_model[0]), "--no-auth", "--webhook", "ftp://mes/in"], "must be http://"),
        (["serve", str(service_model[0]), "--no-auth", "--root-path", "qc/"],
         "--root-path 'qc/' must look like /qc or /line-1/qc (the path a reverse proxy serves"),
        (["serve", str(service_model[0]), "--no-auth", "--opcua", "opc.tcp://127.0.0.1:0", "--opcua-users",
          str(blocker)], f"line 1 of --opcua-users {blocker} is not name:password"),
        (["serve", str(service_model[0]), "--no-auth", "--opcua", "tcp://plc:4840"],
         "OPC UA endpoint 'tcp://plc:4840' must look like opc.tcp://0.0.0.0:4840"),
        (["serve", str(service_model[0]), "--no-auth", "--webhook", "http://mes/in", "--webhook-secret",
          "whsec_c2hvcnQ="], "--webhook-secret holds 5 bytes: a signing key needs at least 24"),
        (["serve", str(service_model[0]), "--no-auth", "--watch", str(tmp_path / "camera-1")],
         f"watch folder {tmp_path.resolve() / 'camera-1'} does not exist"),
        # a share's address (as a file manager shows it) is no folder here: where it is mounted is
        (["serve", str(service_model[0]), "--no-auth", "--watch", "smb://nas/cam1"],
         "does not exist (smb://nas/cam1 is a share's address, not a path here: mount it, mount -t cifs "
         "//nas/cam1 /mnt/cam1, and give /mnt/cam1)"),
        (["serve", str(service_model[0]), "--no-auth", "--watch", "\\\\nas\\qc\\cam1"],
         "(\\\\nas\\qc\\cam1 is a share's address, not a path here: mount it, mount -t cifs //nas/qc "
         "/mnt/qc, and give /mnt/qc/cam1)"),
        (["serve", str(service_model[0]), "--no-auth", "--watch", f"file://{tmp_path}/cam"],
         f"(file://{tmp_path}/cam is a URL: give the path, {tmp_path}/cam)"),
        (["serve", str(service_model[0]), "--no-auth", "--watch", str(blocker)], "is a file, not a folder"),
        (["serve", str(service_model[0]), "--no-auth", "--watch", str(tmp_path), "--watch", str(tmp_path),
          "--camera", "a", "--camera", "b", "--camera", "c"],
         "--camera is given 3 times for 2 --watch folders: give it once (every folder's parts) or once "
         "per --watch, in the same order"),
        # a folder and one in it: the first's watcher reads the second's files too (each inspected
        # twice, stored twice, the second named a repeated frame); or one folder twice
        (["serve", str(service_model[0]), "--no-auth", "--watch", str(tmp_path), "--watch",
          str(tmp_path / "cam2")], f"--watch {tmp_path / 'cam2'} lies in --watch {tmp_path}, whose watcher "
         "reads its sub-folders too: each of its files would be inspected twice; give one of them"),
        (["serve", str(service_model[0]), "--no-auth", "--watch", str(tmp_path / "cam2"), "--watch",
          str(tmp_path)], f"--watch {tmp_path / 'cam2'} lies in --watch {tmp_path}, whose watcher "
         "reads its sub-folders too"),
        (["serve", str(service_model[0]), "--no-auth", "--watch", str(tmp_path / "cam2"), "--watch",
          f"{tmp_path}/cam2/../cam2/"], f"--watch {tmp_path}/cam2/../cam2/ is the folder --watch "
         f"{tmp_path / 'cam2'} names: give it once"),
        (["watch", str(tmp_path), str(service_model[0]), "--feature-type", "typo", "--once"], "typo"),
        # a part type the model does not know: every part would read incomplete
        (["serve", str(service_model[0]), "--no-auth", "--part-types", "typo"],
         "--part-types names 'typo', not a type of this model"),
        (["watch", str(tmp_path), str(service_model[0]), "--part-types", "typo", "--once"],
         "--part-types names 'typo', not a type of this model"),
        (["serve", str(service_model[0]), "--no-auth", "--push-parts"],
         "--push-parts needs --mqtt or --webhook (the sinks it pushes to)"),
        (["serve", str(service_model[0]), "--no-auth", "--push-parts", "complete"],
         "--push-parts needs --mqtt or --webhook (the sinks it pushes to)"),
        (["watch", str(tmp_path), str(service_model[0]), "--opcua", "tcp://plc:4840", "--once"],
         "OPC UA endpoint 'tcp://plc:4840' must look like opc.tcp://0.0.0.0:4840"),
        (["watch", str(tmp_path), str(service_model[0]), "--opcua-users", str(blocker), "--once"],
         "--opcua-users needs --opcua"),
        (["watch", str(tmp_path), str(service_model[0]), "--opcua", "opc.tcp://127.0.0.1:0", "--opcua-trust",
          str(tmp_path), "--once"], "--opcua-trust needs --opcua-users"),
        (["serve", str(service_model[0]), "--no-auth", "--opcua", "opc.tcp://127.0.0.1:0", "--opcua-users",
          str(users), "--opcua-trust", str(blocker)], f"--opcua-trust {blocker} is not a folder"),
        (["watch", str(tmp_path), str(service_model[0]), "--part-id-pattern", "P-(", "--once"],
         "--part-id-pattern 'P-(' is not a regular expression"),
        (["serve", str(service_model[0]), "--no-auth", "--watch", str(tmp_path), "--part-id-pattern",
          "(L\\d)-(\\d+)"], "has 2 groups: name the part id's (?P<part>...)"),
        # a pattern without a folder to read names from was ignored, an invalid one included
        (["serve", str(service_model[0]), "--no-auth", "--part-id-pattern", "P-("],
         "--part-id-pattern needs --watch DIR (it reads the part id from a watched file's name)"),
        # an IPv6 host without its ']': urllib's ValueError was a traceback
        (["serve", str(service_model[0]), "--no-auth", "--webhook", "http://[::1/in"],
         "webhook URL 'http://[::1/in' is not a URL (Invalid IPv6 URL)"),
        (["serve", str(service_model[0]), "--no-auth", "--mqtt", "mqtt://qc:pw@[::1/line1"],
         "MQTT URL 'mqtt://qc:***@[::1/line1' is not a URL (Invalid IPv6 URL)"),
        (["watch", str(tmp_path), str(service_model[0]), "--opcua", "opc.tcp://[::1", "--once"],
         "OPC UA endpoint 'opc.tcp://[::1' is not a URL (Invalid IPv6 URL)"),
    ]
    for argv, needle in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) >= 1 and err[-1].startswith("diffqc: error: ") and needle in err[-1], (argv, err)
        assert "Traceback" not in "\n".join(err)
    # a list with an empty name is a usage error, before anything else
    with pytest.raises(SystemExit) as exc:
        main(["serve", str(service_model[0]), "--no-auth", "--part-types", "dots,,edge1"])
    assert exc.value.code == 2
    assert "expected names separated by commas (dots,edge1), got 'dots,,edge1'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["serve", "MODEL", "--no-auth"],
                                  ["results", "export", "--db", "r.db", "out"]])
def test_service_without_its_extra_names_the_extra(argv: list[str], service_model: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    """``pip install diffqc`` without ``[serve]``: the service's commands say which extra to
    install (was a ModuleNotFoundError traceback); run where FastAPI cannot be imported."""
    argv = [str(service_model[0]) if a == "MODEL" else a for a in argv]
    code = ("import sys\nsys.modules['fastapi'] = None\nsys.modules['uvicorn'] = None\n"
            f"from diffqc.cli import main\nraise SystemExit(main({argv!r}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "diffqc: error: the service needs fastapi, which is not installed: pip install 'diffqc[serve]'")
    assert "Traceback" not in out.stderr


def test_serve_on_a_port_in_use_is_one_line_before_anything_starts(
    service_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second ``serve`` on the port of a running one: one error line, and no store opened, no
    watcher started (it would take the first one's files), no sink told "offline" (retained, over
    the running service's "online"): the port is bound before the model loads."""
    import socket

    from diffqc.service.__main__ import main

    watched = tmp_path / "incoming"
    watched.mkdir()
    part = next(service_model[1].rglob("*.png"))
    (watched / part.name).write_bytes(part.read_bytes())
    with socket.socket() as running:
        running.bind(("127.0.0.1", 0))
        running.listen()
        port = running.getsockname()[1]
        db = tmp_path / "second.db"
        argv = ["serve", str(service_model[0]), "--no-auth", "--port", str(port), "--db", str(db),
                "--watch", str(watched)]
        assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1] == (f"diffqc: error: cannot listen on 127.0.0.1:{port}: Address already in use "
                               "(is another diffqc serve running?)"), err
    assert not db.exists() and sorted(p.name for p in watched.iterdir()) == [part.name]


def test_serve_warns_of_an_api_token_short_enough_to_guess(
    service_model: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`serve --token abc` (a first try, left in place on the line) was taken without a word,
    though anyone on the plant's network can guess three characters. The service starts (it is
    the user's choice) and says so, with how to make a good one; a long token says nothing. The
    port is taken here, so nothing more starts."""
    import socket

    from diffqc.service.__main__ import main

    with socket.socket() as running:
        running.bind(("127.0.0.1", 0))
        running.listen()
        port = running.getsockname()[1]
        said = {}
        for token in ("abc", "k3" * 12):
            caplog.clear()
            assert main(["serve", str(service_model[0]), "--token", token, "--port", str(port), "--db",
                         str(tmp_path / "r.db")]) == 1
            said[token] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said["abc"] == ["an API token of 3 characters can be guessed by anyone on the network: use "
                           "16 or more (python -c \"import secrets; print(secrets.token_urlsafe(32))\")"]
    assert said["k3" * 12] == []


def test_serve_without_a_token_on_an_address_others_reach_says_so(
    service_model: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`serve --no-auth --host 0.0.0.0` (the first try at reaching the dashboard from another
    machine) started without a word, though anyone on the plant's network could then read the
    parts' images and record verdicts. It starts (the user's choice) and says so; on 127.0.0.1
    it says nothing. The port is taken here, so nothing more starts."""
    import socket

    from diffqc.service.__main__ import main

    with socket.socket() as running:
        running.bind(("0.0.0.0", 0))
        running.listen()
        port = running.getsockname()[1]
        said = {}
        for host in ("0.0.0.0", "127.0.0.1"):
            caplog.clear()
            assert main(["serve", str(service_model[0]), "--no-auth", "--host", host, "--port", str(port),
                         "--db", str(tmp_path / "r.db")]) == 1
            said[host] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said["0.0.0.0"] == [f"serving without an API token (--no-auth) on 0.0.0.0:{port}, which other "
                               "machines can reach: anyone on the network can read the parts' images and "
                               "results and record verdicts; give --token (or $DIFFQC_TOKEN_FILE), or "
                               "--host 127.0.0.1"]
    assert said["127.0.0.1"] == []


def test_serve_checks_its_store_before_loading_the_model_and_the_model_path_before_the_store(
    service_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture
) -> None:
    """A --db that is not a database was refused only after the model had loaded (2 s here, more
    for a large bundle on an edge device); a model path that is no bundle must still not leave a
    new, empty store behind."""
    import logging

    from diffqc.service.__main__ import main

    notes = tmp_path / "notes.csv"
    notes.write_text("a,b,c\n")
    with caplog.at_level(logging.INFO, logger="diffqc.service"):
        assert main(["serve", str(service_model[0]), "--no-auth", "--port", "0", "--db", str(notes)]) == 1
    assert "file is not a database" in capsys.readouterr().err
    assert not [r for r in caplog.records if "loaded in" in r.getMessage()]  # the model never loaded
    assert notes.read_text() == "a,b,c\n"
    db = tmp_path / "new.db"
    assert main(["serve", str(tmp_path / "no-model"), "--no-auth", "--port", "0", "--db", str(db)]) == 1
    assert "does not exist" in capsys.readouterr().err and not db.exists()


def test_the_entrypoint_says_a_warning_in_one_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The container's entry point (`docker run IMAGE results list ...`) had an error boundary
    of its own: a command's warnings came as Python prints them, with the file, line number and
    source line of diffqc's code; `serve --log-format json`'s error was a text line in a JSON
    log; `| head` ended with "error: [Errno 32] Broken pipe". It is now the CLI's."""
    import json

    from diffqc.service.__main__ import main
    from diffqc.service.store import ResultStore

    with ResultStore(str(tmp_path / "r.db")):
        pass
    argv = ["results", "list", "--db", str(tmp_path / "r.db"), "--since", "2999-01-01T00:00Z"]
    assert main(argv) == 0
    assert capsys.readouterr().err.splitlines() == [
        "diffqc: warning: --since 2999-01-01T00:00Z lies in the future (2999-01-01T00:00:00+00:00): "
        "nothing is stored after it yet", "diffqc: no stored results match"]
    assert main(["serve", str(tmp_path / "none"), "--no-auth", "--log-format", "json"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    said = json.loads(line)
    assert said["level"] == "ERROR" and "none does not exist" in said["message"], said


def test_a_model_larger_than_the_machine_is_said_so_not_a_damaged_bundle(
    service_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bundle whose load cannot find the memory it needs (here a noise schedule of 2^53 steps,
    64 PiB; on a GPU, another process holding its memory) was
    called a bundle that "does not match its config", with PyTorch's allocator text: the operator
    would retrain a sound model. `serve` (the container's entry point) and `inspect` say out of
    memory, with how much was asked, in one line."""
    from diffqc.cli import main as cli_main
    from diffqc.service.__main__ import main

    model = tmp_path / "model"
    shutil.copytree(service_model[0], model)
    config = json.loads((model / "config.json").read_text())
    config["diffusion"]["timesteps"] = 2**53
    (model / "config.json").write_text(json.dumps(config))
    meta = json.loads((model / "metadata.json").read_text())  # as fitted so: no edit of config.json
    meta["fitted_settings"]["diffusion.timesteps"] = 2**53
    (model / "metadata.json").write_text(json.dumps(meta))
    assert main(["serve", str(model), "--no-auth", "--port", "0", "--db", str(tmp_path / "r.db")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "diffqc: error: out of memory: it tried to allocate 64.0 PiB at once; DIFFQC_TRACEBACK=1 shows where"]
    assert cli_main(["inspect", str(model), str(service_model[1])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("diffqc: error: out of memory: it tried to allocate 64.0 PiB at once; "
                       "DIFFQC_TRACEBACK=1 shows where"), err
    assert not any("Traceback" in line or "config" in line for line in err), err


def test_watch_checks_its_store_before_loading_the_model(
    service_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``diffqc watch`` with a --db it cannot open loaded the model first and then printed
    ``error: ...`` (not ``diffqc: error: ...``, as every other command says it); as `serve`, it
    opens its store first, and a model path that is no bundle leaves no new store behind."""
    from diffqc.cli import main

    model = tmp_path / "model"  # a bundle whose weights would fail to load: the store is first
    shutil.copytree(service_model[0], model)
    (model / "weights.safetensors").write_bytes(b"cut short")
    notes = tmp_path / "notes.csv"
    notes.write_text("a,b,c\n")
    assert main(["watch", str(tmp_path), str(model), "--db", str(notes), "--once"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("diffqc: error: ") and "not a database" in err[-1], err
    assert notes.read_text() == "a,b,c\n"
    db = tmp_path / "new.db"
    assert main(["watch", str(tmp_path), str(tmp_path / "no-model"), "--db", str(db), "--once"]) == 1
    assert "does not exist" in capsys.readouterr().err and not db.exists()
    # the runtime options serve has (watch ran "auto" on all cores, whatever was asked for)
    assert main(["watch", str(tmp_path), str(service_model[0]), "--db", str(db), "--once",
                 "--runtime", "onnx", "--threads", "1"]) == 1
    assert "has no ONNX export" in capsys.readouterr().err


def test_pipeline_logs_a_part_outside_its_types_training_sizes(
    detector: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The service (and the watcher, through the same pipeline) says once per type, in its log,
    that parts arrive at a size the type was not trained on; they are inspected all the same."""
    import logging

    from diffqc.service.buffer import InspectionPipeline, Job
    from diffqc.service.store import ResultStore

    t = detector.classes_[0]
    (h0, _), (w0, _) = detector.metadata["training_data"]["image_sizes"][t]
    with ResultStore(str(tmp_path / "r.db")) as store:
        pipeline = InspectionPipeline(detector, store, None)
        jobs = [Job(image=np.full((h0, w0, 3), 0.5, np.float32), feature_type=t),
                Job(image=np.full((h0, 3 * w0, 3), 0.5, np.float32), feature_type=t),
                Job(image=np.full((3 * h0, w0, 3), 0.5, np.float32), feature_type=t)]
        with caplog.at_level(logging.WARNING, logger="diffqc.service"):
            pipeline.process(jobs)
        assert all(j.future.result().decision in {"PASS", "REVIEW", "REJECT"} for j in jobs)
    notes = [r.getMessage() for r in caplog.records if "px image of type" in r.getMessage()]
    assert len(notes) == 1 and f"a {3 * w0}x{h0} px image of type {t!r}" in notes[0], notes
    # the model learned grey parts (the synthetic set): a colour camera's part is named too
    assert detector.metadata["training_data"]["image_colours"][t] == "grey"
    colour = np.full((h0, w0, 3), 0.5, np.float32)
    colour[..., 0] = 0.8
    jobs = [Job(image=colour, feature_type=t) for _ in range(2)]
    with ResultStore(str(tmp_path / "c.db")) as store, caplog.at_level(logging.WARNING, "diffqc.service"):
        InspectionPipeline(detector, store, None).process(jobs)
    notes = [r.getMessage() for r in caplog.records if "a colour image of type" in r.getMessage()]
    assert len(notes) == 1 and "whose training images were grey" in notes[0], notes
    # an upload's JPEG where the model learned PNGs (the job knows its file's compression)
    assert detector.metadata["training_data"]["image_compression"][t] == "lossless"
    jobs = [Job(image=np.full((h0, w0, 3), 0.5, np.float32), feature_type=t, compression="lossy")
            for _ in range(2)]
    with ResultStore(str(tmp_path / "j.db")) as store, caplog.at_level(logging.WARNING, "diffqc.service"):
        pipeline = InspectionPipeline(detector, store, None)
        pipeline.process(jobs)
    notes = [r.getMessage() for r in caplog.records if "a lossy (JPEG or WebP) image" in r.getMessage()]
    assert len(notes) == 1 and "whose training images were lossless" in notes[0], notes
    assert [(s["check"], s["parts"]) for s in pipeline.image_check.snapshot()] == [("compression", 2)]


def test_watch_feature_type_is_checked_against_the_model(detector: Any, tmp_path: Path) -> None:
    from diffqc.errors import UnknownFeatureTypeError
    from diffqc.service.buffer import InspectionPipeline
    from diffqc.service.store import ResultStore
    from diffqc.service.watch import FolderWatcher, WatchSettings

    with ResultStore(str(tmp_path / "r.db")) as store:
        pipeline = InspectionPipeline(detector, store, None)
        with pytest.raises(UnknownFeatureTypeError) as err:
            FolderWatcher(WatchSettings(tmp_path, feature_type="tpye_a"), pipeline, store)
        assert "'tpye_a'" in str(err.value)
        assert all(t in str(err.value) for t in detector.classes_)
        FolderWatcher(WatchSettings(tmp_path, feature_type=detector.classes_[0]), pipeline, store)


async def test_a_request_while_the_service_starts_or_stops_is_told_when_to_retry(
        detector: Any, tmp_path: Path) -> None:
    """Before its lifespan has started (or after it ended) the app answers 503 not_ready, with
    the Retry-After its other 503s (overloaded, store_unavailable) carry."""
    from diffqc.service.app import ServiceSettings, create_app

    app = create_app(ServiceSettings(db_url=str(tmp_path / "r.db"), tokens=("t",), retry_after_s=3),
                     detector=detector)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
        for url in ("/v1/results", "/v1/line"):
            r = await client.get(url, headers={"Authorization": "Bearer t"})
            assert (r.status_code, r.json()["code"], r.headers.get("retry-after")) == (503, "not_ready", "3")


def test_a_sqlite_database_of_another_program_is_not_taken_as_the_store(tmp_path: Path) -> None:
    """`--db ../mes/orders.db` (a typo, or a path copied from the wrong line) wrote diffqc's tables
    into another program's database and switched its journal to WAL, without a word. Such a file is
    refused, unchanged; a diffqc store a user added a table of their own to is still opened."""
    from diffqc.errors import StoreError
    from diffqc.service.store import ResultStore

    app = tmp_path / "orders.db"
    with sqlite3.connect(app) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)")
        conn.execute("INSERT INTO orders (item) VALUES ('bracket')")
    conn.close()
    before = app.read_bytes()
    with pytest.raises(StoreError) as err:
        ResultStore(str(app))
    assert str(err.value) == (
        f"{app.absolute()} is a SQLite database of another program (its tables: orders), not a diffqc "
        "result store; nothing was written to it: give --db a new file or a diffqc store")
    assert app.read_bytes() == before and not Path(f"{app}-wal").exists()
    # read (`results list --db`): "no such table: diffqc_results" before, for it and an empty file
    empty = tmp_path / "empty.db"
    empty.touch()
    for path, holds in ((app, "its tables: orders"), (empty, "it holds no table")):
        with pytest.raises(StoreError) as err:
            ResultStore(str(path), read_only=True)
        assert str(err.value) == (
            f"{path.absolute()} holds no diffqc result store ({holds}): give the --db that `diffqc serve` or "
            "`watch` write to"), path
    assert app.read_bytes() == before and empty.read_bytes() == b""
    ours = tmp_path / "results.db"
    ResultStore(str(ours)).close()
    with sqlite3.connect(ours) as conn:
        conn.execute("CREATE TABLE my_notes (id INTEGER PRIMARY KEY)")
    conn.close()
    with ResultStore(str(ours)) as store:
        assert store.count() == 0


def test_kept_images_and_heat_maps_are_never_written_into_a_dataset(clear_dataset: Path,
                                                                     tmp_path: Path) -> None:
    """`serve --data-dir data/dots/train/good/kept` (or a store beside a dataset's images) put
    every kept upload, REJECTs too, and every heat map where the next train reads GOOD parts."""
    from diffqc.errors import OutputError
    from diffqc.service.store import ArtifactStore

    data = shutil.copytree(clear_dataset, tmp_path / "data")
    kept = data / "dots" / "train" / "good" / "kept"
    said = r"the data folder \(--data-dir; by default the store's folder\) .*kept lies in .*good, a folder"
    with pytest.raises(OutputError, match=said):
        ArtifactStore(kept)
    assert not kept.exists()
    ArtifactStore(data / "kept")  # beside the dataset's types: no type reads it
    assert (data / "kept" / "heatmaps").is_dir()
