"""The service's OpenAPI description (``GET /openapi.json``) and its Swagger UI page (``GET /docs``).

FastAPI derives the paths and query parameters from the routes (their groups and short ids:
:data:`TAGS`, :func:`operation_id`); what it cannot see is added here: the bodies that
``/v1/inspect`` and ``/v1/inspect/batch`` read by hand (raw image bytes, multipart, JSON with
base64), the line's query values and the ``Idempotency-Key`` header they read by hand, the
bearer token, the error answers each route gives (the service's ``{"detail", "code"}``, not
FastAPI's validation list), every answer typed field by field (the record, a part's verdict,
the status answers; the files as files), and what the webhook sink posts (``webhooks``).
docs/API.md stays the reference; the description is what a client generator or Swagger UI
reads.

Swagger UI's script and style sheet are served from the installed ``fastapi-offline`` package
(Swagger UI 5, Apache-2.0): FastAPI's own page loads them from a CDN, which a factory network
usually cannot reach.
"""

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from pydantic import TypeAdapter

from diffqc.service.buffer import OverflowPolicy
from diffqc.service.sinks import ALARM, DECISION, NOT_PUSHED, PART
from diffqc.service.store import DECISIONS, JSON_FIELDS, SUMMARY_COLUMNS, SUMMARY_KEYS, VERDICTS, ResultRecord

# the page's script and style sheet, by the names /docs/{asset} serves them under
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css")
PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
               "script-src 'self' 'unsafe-inline'")


# the routes' groups, in docs/API.md's order and under its sections' names: Swagger UI lists them
# so, and a client generator makes a module (a class) of each
TAGS = (("Inspection", "send a part's image, get its decision"),
        ("Results", "the stored decisions, their heat maps and images"),
        ("Parts", "a part's verdict from its crops"),
        ("Review", "operators' verdicts on flagged parts"),
        ("Model and status", "the model, a period's counts, rates, and what the service does for the line"),
        ("Sinks", "the decisions pushed to a MES (webhook, MQTT)"))


def operation_id(route: APIRoute) -> str:
    """A route's ``operationId``: its function's name (``inspect``, ``get_result``), the name a
    client generator gives its method; FastAPI's own appends the path and method
    (``result_v1_results__record_id__get``)."""
    return route.name


def _ref(name: str) -> dict[str, Any]:
    """The description's schema ``name`` (``components.schemas``)."""
    return {"$ref": f"#/components/schemas/{name}"}


def _object(description: str = "", *, optional: Sequence[str] = (), **props: Any) -> dict[str, Any]:
    """An object of these fields, each always there but the ``optional`` ones."""
    out = {"type": "object", "required": sorted(set(props) - set(optional)), "properties": props}
    return {**out, "description": description} if description else out


def _map(value: dict[str, Any], description: str) -> dict[str, Any]:
    """An object keyed by names of the line's own (feature types, cameras, sinks)."""
    return {"type": "object", "additionalProperties": value, "description": description}


def _list(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


def _nullable(kind: str) -> dict[str, Any]:
    """A value of this JSON type, or null."""
    return {"type": [kind, "null"]}


def _or_null(schema: dict[str, Any]) -> dict[str, Any]:
    """An object (or any schema) or null: ``anyOf``, as client generators read it."""
    return {"anyOf": [schema, {"type": "null"}]}


_INT: Any = {"type": "integer"}
_NUMBER: Any = {"type": "number"}
_BOOL: Any = {"type": "boolean"}
_STR: Any = {"type": "string"}
_NAMES = _list(_STR)
_EPOCH = _nullable("number")  # a time as epoch seconds, or null before there is one
_BINARY = {"type": "string", "format": "binary"}
_ERROR = _ref("Error")
_TEXT = {"type": "string", "minLength": 1, "maxLength": 200}
_IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False, "schema": _TEXT,
                "description": "makes a retry safe: the same key answers the record stored for it "
                               "(docs/API.md, Idempotency)"}


# what an upload's values mean, as query parameters (app.py) and as the body's fields
FEATURE_TYPE_TEXT = "one of the model's types (`GET /v1/model`'s classes); none: the type it is closest to"
PART_ID_TEXT = "the part this image is a crop of (stored on the record)"
_EACH = "one per image, in their order, or one for all"


def _line_text(name: str) -> str:
    return f"where the part was seen: its {name} (stored on the record)"


def _described(schema: dict[str, Any], text: str) -> dict[str, Any]:
    return {**schema, "description": text}


def upload_extra(line_fields: Sequence[str], *, batch: bool) -> dict[str, Any]:
    """What FastAPI cannot see of an upload route (``openapi_extra``): its body, read by hand
    (raw image bytes, multipart, JSON with base64; a batch's fields repeated or lists), and the
    query values and header it reads by hand."""
    line: dict[str, Any] = {name: _described(_STR, _line_text(name)) for name in line_fields}
    parameters = [*({"name": name, "in": "query", "required": False, "schema": _TEXT,
                     "description": _line_text(name)} for name in line_fields), _IDEMPOTENCY]
    if batch:
        # optional lists empty by default: Swagger UI's "Try it out" sent a placeholder item
        # ("string") where none was given, a part of type 'string'
        types = f"each image's type ({_EACH}); none: the query's `feature_type`, else the closest"
        parts = f"each image's part ({_EACH}; stored on its record)"
        form = {"image": _described(_list(_BINARY), "the image files, one field `image` each"),
                "feature_type": _described({**_NAMES, "default": []}, types),
                "part_id": _described({**_NAMES, "default": []}, parts), **line}
        listed = {"image": _described(_NAMES, "the image files, base64 or data URLs"),
                  "feature_type": _described({"anyOf": [_STR, _list({"type": ["string", "null"]}),
                                                        {"type": "null"}]}, types),
                  "part_id": _described({"anyOf": [_STR, _INT, _list({"type": ["string", "integer", "null"]}),
                                                   {"type": "null"}]}, parts),
                  **line}
        content: dict[str, Any] = {}
        description = ("1 to 32 images: repeated multipart file fields `image` (a `part_id` and "
                       "`feature_type` each, or one for all), or JSON with the same fields as lists")
    else:
        form = {"image": _described(_BINARY, "the image file"),
                "feature_type": _described(_STR, FEATURE_TYPE_TEXT),
                "part_id": _described(_STR, PART_ID_TEXT), **line}
        listed = {"image": _described(_STR, "the image file, base64 or a data URL"),
                  "feature_type": _described(_STR, FEATURE_TYPE_TEXT),
                  "part_id": _described({"type": ["string", "integer"]}, PART_ID_TEXT), **line}
        # the raw body: any other Content-Type (image/png, none) is read so too; image/* is not
        # listed, as client generators take no wildcard
        content = {"application/octet-stream": {"schema": _BINARY}}
        description = ("the image file (PNG, JPEG, BMP, TIFF, WebP, ...) as the raw body (any "
                       "Content-Type but the two below: image/png, application/octet-stream), as a "
                       "multipart file field `image`, or as base64 in JSON")
    optional = [name for name in form if name != "image"]
    content["multipart/form-data"] = {"schema": _object(optional=optional, **form)}
    content["application/json"] = {"schema": {**_object(optional=optional, **listed),
                                              "additionalProperties": False}}
    return {"parameters": parameters,
            "requestBody": {"required": True, "description": description, "content": content}}


# what a record and a part's verdict share: a decision, an operator's verdict, a time
_DECISION = {"type": "string", "enum": list(DECISIONS)}
_VERDICT_NAME = {"type": "string", "enum": list(VERDICTS)}
_REVIEW = _or_null(_VERDICT_NAME)
_DATE_TIME = {"type": "string", "format": "date-time"}
_TIME = _or_null(_DATE_TIME)


def record_schema() -> dict[str, Any]:
    """The result record as the API answers it (``app.record_json``): the stored fields
    (:data:`~diffqc.service.store.JSON_FIELDS`, typed as :class:`ResultRecord` types them), its
    times also in ISO 8601, its pictures as URLs, and whether it was mis-routed."""
    hints = typing.get_type_hints(ResultRecord)
    props: dict[str, Any] = {name: TypeAdapter(hints[name]).json_schema() for name in JSON_FIELDS}
    props["id"] = _INT  # None only until stored
    props["decision"], props["review"] = _DECISION, _REVIEW
    # a score that is not finite is written null, as every number the service answers
    props["type_scores"] = _or_null(_map(_nullable("number"), "per feature type"))
    props.update(created=_DATE_TIME, reviewed=_TIME, heatmap_url=_nullable("string"),
                 image_url=_nullable("string"), misrouted=_BOOL)
    for name in ("heatmap", "image"):  # files of the service's own: answered as URLs
        props.pop(name)
    return _object("one stored decision, field by field in docs/API.md (The result record)", **props)


_RECORD, _PART = _ref("Record"), _ref("Part")
# one verdict of a record's history (``ResultStore.review_history``), as the record gives its latest
_VERDICT = _object("a verdict given, in the order given", review=_VERDICT_NAME, reviewed_at=_EPOCH,
                   reviewed=_TIME, reviewer=_nullable("string"), review_note=_nullable("string"),
                   review_defect=_nullable("string"))


def part_schema() -> dict[str, Any]:
    """A part's verdict as the API answers it and the sinks push it (``PartVerdict.to_json``)."""
    return _object("a part's verdict from its images, field by field in docs/API.md (Parts)",
                   part_id=_STR, decision=_DECISION, review=_REVIEW, pending_review=_INT,
                   types=_map(_DECISION, "per feature type: its latest image's decision"), images=_INT,
                   superseded=_INT, complete=_nullable("boolean"), missing=_or_null(_NAMES), first=_TIME,
                   last=_TIME)


_THRESHOLDS = _ref("Thresholds")


def status_schemas() -> dict[str, dict[str, Any]]:
    """The answers of the model and status routes (``/v1/model``, ``/v1/summary``,
    ``/v1/stats``, ``/v1/line``, ``/v1/defects``), field by field in docs/API.md."""
    group = _object("one group's counts: its `by` values (the last group `all`), then the counts",
                    optional=SUMMARY_KEYS, **{k: _nullable("string") for k in SUMMARY_KEYS},
                    **{c: _nullable("number") if c == "flagged_share" else _INT for c in SUMMARY_COLUMNS})
    drift: dict[str, Any] = dict(statistic=_nullable("number"), threshold=_nullable("number"), alarm=_BOOL,
                                 alarm_since=_EPOCH, window_parts=_INT, alarms_total=_INT, parts_total=_INT)
    return {
        "Thresholds": _object(
            "the scores where the decision changes (null where no score reaches it)",
            alpha_review=_nullable("number"), alpha_reject=_nullable("number"),
            types=_map(_object(review=_nullable("number"), reject=_nullable("number")), "per feature type")),
        "Summary": _object(
            "a period's counts per group (`diffqc results summary`)", optional=("images_without_part",),
            by=_list({"type": "string", "enum": list(SUMMARY_KEYS)}),
            since=_EPOCH, until=_EPOCH, parts=_BOOL, images_without_part=_INT,
            groups=_list(group)),
        "Stats": _object(
            "counts per type and recent scores over a window",
            types=_map(_object(**{d: _INT for d in DECISIONS}, total=_INT, per_minute=_NUMBER),
                       "per feature type"),
            scores=_map(_list(_NUMBER), "per feature type, newest first"),
            pending_reviews=_INT, window_s=_NUMBER, thresholds=_THRESHOLDS,
            queue=_object(depth=_INT, capacity=_INT, dropped=_INT, refused=_INT,
                          policy={"type": "string", "enum": [p.value for p in OverflowPolicy]})),
        "Model": _object(
            "the loaded model and the service's buffer settings",
            classes=_NAMES, version=_STR, model_id=_nullable("string"), created=_nullable("string"),
            method=_nullable("string"), runtime=_STR, precision=_STR, diffqc_version=_nullable("string"),
            thresholds=_THRESHOLDS,
            calibration=_object(
                "the calibration summary (none for a model never calibrated)",
                optional=("alpha_review", "alpha_reject", "tail", "types"),
                alpha_review=_NUMBER, alpha_reject=_NUMBER, tail=_STR,
                types=_map(_object(n=_INT, min=_NUMBER, median=_NUMBER, max=_NUMBER,
                                   review_threshold=_nullable("number"), reject_threshold=_nullable("number"),
                                   warnings=_NAMES), "per feature type")),
            config={"type": ["object", "null"], "additionalProperties": True,
                    "description": "the detector configuration (config.json's sections)"},
            service=_object(buffer_size=_INT, max_batch=_INT, overflow=_STR, store=_STR,
                            queue_depth=_nullable("integer"), part_types=_NAMES)),
        "Line": _object(
            "what the service does for the line besides answering",
            drift=_map(_object(**drift, misrouted_total=_INT, untracked_camera_parts=_INT,
                               cameras=_map(_object(**drift), "per camera")), "per feature type"),
            sinks=_map(_object(ready=_BOOL, pending=_INT, dead_letters=_INT, delivered_total=_INT,
                               failures_total=_INT, last_error=_nullable("string")), "per sink"),
            retention=_or_null(_object(max_age_s=_nullable("number"), max_bytes=_nullable("integer"),
                                       expired_total=_INT, kept_bytes=_INT)),
            disk=_list(_object(path=_STR, free_bytes=_INT, total_bytes=_INT, free_ratio=_NUMBER, low=_BOOL)),
            clock=_object(steps_total=_INT, last_step_s=_nullable("number"), behind_model=_BOOL),
            tls=_or_null(_object(file=_STR, not_after=_EPOCH, days_left=_nullable("number"), expiring=_BOOL,
                                 expired=_BOOL, file_not_after=_EPOCH, renewed_on_disk=_BOOL, reloads=_INT)),
            opcua=_or_null(_object(endpoint=_STR, namespace=_STR, published_total=_INT, running=_BOOL,
                                   security={"type": "string", "enum": ["none", "sign_and_encrypt"]},
                                   certificate_sha1=_nullable("string"),
                                   trusted_clients=_nullable("integer"))),
            parts=_or_null(_object(types=_NAMES, timeout_s=_NUMBER, waiting=_INT, overdue_total=_INT,
                                   lacking=_map(_INT, "per type"), last_at=_map(_NUMBER, "per type"))),
            model=_or_null(_object(bundle=_STR, model_id=_nullable("string"), reloads=_INT,
                                   last_error=_nullable("string"))),
            calibration=_or_null(_object(file=_STR, reloads=_INT, last_error=_nullable("string"))),
            started=_NUMBER,
            images=_list(_object(feature_type=_STR, check=_STR, parts=_INT, first_at=_NUMBER, last_at=_NUMBER,
                                note=_STR))),
        "Defects": _object("the defect kinds given with BAD verdicts, the most given first",
                           defects=_list(_object(defect=_STR, verdicts=_INT))),
    }


def message_schemas() -> dict[str, dict[str, Any]]:
    """What the webhook sink posts (and MQTT publishes), by ``kind``: a decision, a part's
    verdict (``--push-parts``), a drift alarm raised or cleared; docs/API.md, Sinks."""
    record = record_schema()["properties"]
    decision = {k: v for k, v in record.items() if k not in (*NOT_PUSHED, "id", "heatmap_url", "image_url")}
    part = part_schema()["properties"]
    return {
        "DecisionMessage": _object(
            "one stored decision, as pushed (the record without its review and files)",
            **decision, record_id=_INT, kind={"type": "string", "const": DECISION}),
        "PartMessage": _object(
            "a part's verdict from its stored crops, after each commit holding images of it",
            **part, kind={"type": "string", "const": PART}, overdue=_BOOL, record_id=_nullable("integer"),
            created_at=_NUMBER, created=_STR, line=_nullable("string"), station=_nullable("string")),
        "AlarmMessage": _object(
            "a drift alarm raised or cleared, of a type or of one of its cameras",
            optional=("reason", "share_p_below_0.05"),
            kind={"type": "string", "const": ALARM},
            event={"type": "string", "enum": ["drift_alarm", "drift_cleared"]},
            feature_type=_nullable("string"), camera=_nullable("string"), alarm=_BOOL,
            statistic=_NUMBER, threshold=_nullable("number"), window_parts=_INT, at=_NUMBER,
            reason={"type": "string", "description": "why an alarm was cleared without the parts' "
                                                     "saying so (a new calibration or model)"},
            **{"share_p_below_0.05": {"type": "number", "description": "of an event of the parts: the share "
                                      "of the window's parts with a p-value at or below 0.05"}}),
    }


def webhooks() -> dict[str, Any]:
    """The description's ``webhooks``: a push of each kind, as the endpoint given to ``--webhook``
    receives it, and the headers diffqc sets on it."""
    header = {"Idempotency-Key": "the same on every attempt at one message, another for every other: "
                                 "drop repeats by it",
              "X-Diffqc-Kind": "the message's kind",
              "X-Diffqc-Record-Id": "the record's id (a decision, and a part's latest image)",
              "webhook-id": "with --webhook-secret (Standard Webhooks): the Idempotency-Key",
              "webhook-timestamp": "with --webhook-secret: this attempt's time, epoch seconds",
              "webhook-signature": "with --webhook-secret: `v1,` and base64 of HMAC-SHA256 (docs/API.md)"}
    out = {}
    for kind, schema, text in ((DECISION, "DecisionMessage", "each decision, after it is stored"),
                               (PART, "PartMessage", "a part's verdict (--push-parts)"),
                               (ALARM, "AlarmMessage", "a drift alarm raised or cleared")):
        parameters = [{"name": name, "in": "header", "required": name in ("Idempotency-Key", "X-Diffqc-Kind"),
                       "schema": {"type": "string"}, "description": said} for name, said in header.items()]
        out[kind] = {"post": {
            "operationId": f"receive_{kind}", "tags": ["Sinks"], "summary": text, "parameters": parameters,
            "security": [],  # not the service's token: the endpoint's own (--webhook-header), or signed
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(schema)}}},
            "responses": {"200": {"description": "taken (any 2xx answer): delivered; any other answer, "
                                                 "or none, and it is sent again (docs/API.md, Sinks)"}}}}
    return out


def _with(base: dict[str, Any], **more: Any) -> dict[str, Any]:
    """A record or a part (``base``) with more fields (an inspection's answer, a record with its
    review history, a part with its records)."""
    return {"allOf": [base, _object(**more)]}


# the answers that carry records: (path, method) -> the 200 answer's schema
ANSWERS: dict[tuple[str, str], dict[str, Any]] = {
    ("/v1/inspect", "post"): _with(_RECORD, total_ms=_NUMBER, duplicate=_BOOL),
    ("/v1/inspect/batch", "post"): _object(results=_list(_with(_RECORD, duplicate=_BOOL)), parts=_list(_PART),
                                           total_ms=_NUMBER),
    ("/v1/results", "get"): _object(results=_list(_RECORD), count=_INT),
    ("/v1/results/{record_id}", "get"): _with(_RECORD, review_history=_list(_VERDICT)),
    ("/v1/review", "get"): _object(queue=_list(_RECORD), pending=_INT),
    ("/v1/review/{record_id}", "post"): _RECORD,
    ("/v1/parts", "get"): _object(parts=_list(_PART), truncated=_BOOL),
    ("/v1/parts/{part_id}", "get"): _with(_PART, truncated=_BOOL, results=_list(_RECORD)),
    **{(f"/v1/{name.lower()}", "get"): _ref(name)
       for name in ("Summary", "Stats", "Model", "Line", "Defects")},
    ("/v1/sinks/{name}/requeue", "post"): _object(sink=_STR, requeued=_INT),
}
# the answers that are files: (path, method) -> the media types of the 200 answer (a generator
# read FastAPI's default, JSON, and a generated client parsed the PNG as JSON)
FILES: dict[tuple[str, str], tuple[str, ...]] = {
    ("/v1/results/{record_id}/heatmap", "get"): ("image/png",),
    ("/v1/results/{record_id}/image", "get"): ("image/png", "image/jpeg", "image/bmp", "image/webp"),
}


# the error answers of the routes, each `{"detail", "code"}` (docs/API.md, Error code index)
ERRORS = {
    "400": "no image in the body, or a multipart body that cannot be read (the code names it)",
    "401": "no API token, or a wrong one",
    "404": "no such record, part or sink (`not_found`), or no file kept of it",
    "408": "the body stopped arriving (`body_timeout`)",
    "409": "a conflict: the Idempotency-Key was used for another image, or a verdict came meanwhile "
           "(`replaces`), or the record was not inspected",
    "413": "the body, the image's pixels or the batch is over its limit (the code names which)",
    "415": "the body is neither multipart/form-data nor JSON (`multipart_required`)",
    "422": "a value the route does not take (the code names it)",
    "503": "the service is starting or stopping, its store is down, or (an upload) its buffer is full: "
           "try again after `Retry-After`",
}


def _errors(path: str, op: dict[str, Any], *, token: bool) -> list[str]:
    """The error statuses a route (``op``, its operation at ``path``) answers: 422 each (a query
    parameter it does not take), 503 each that reads the store or the line, 401 with a token, 404
    with a path parameter, 408 and 409 with a body, 400 and 413 an upload, 415 a batch."""
    upload = path.startswith("/v1/inspect")
    body = "requestBody" in op
    found = [(token, "401"), ("{" in path, "404"), (body, "408"), (body, "409"), (upload, "400"),
             (upload, "413"), (path == "/v1/inspect/batch", "415"), (True, "422"),
             (path != "/v1/model", "503")]
    return sorted(status for given, status in found if given)


_RST = re.compile(r":[a-z]+:`~?([^`]+)`")  # :func:`diffqc.service.parts.x` -> `x`


def _markdown(text: str) -> str:
    """A route's docstring as Swagger UI's Markdown: ``code`` as `code`, roles as their names."""
    return _RST.sub(lambda m: "`" + m.group(1).rsplit(".", 1)[-1] + "`", text).replace("``", "`")


def api_schema(app: FastAPI, *, token: bool, root_path: str) -> dict[str, Any]:
    """The OpenAPI 3.1 description of ``app``'s routes in its schema. ``token``: the service asks
    for one (a bearer token on every route); ``root_path``: the path a proxy serves it under."""
    if app.openapi_schema is None:  # the routes do not change once built
        app.openapi_schema = get_openapi(
            title=app.title, version=app.version, routes=app.routes,
            description="diffqc's inspection service. The reference, with every error code: "
                        "docs/API.md.")
    schema = copy.deepcopy(app.openapi_schema)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # not what the service answers
        schemas.pop(name, None)
    schemas["Record"] = record_schema()
    schemas["Part"] = part_schema()
    schemas.update(status_schemas())
    schemas.update(message_schemas())
    schema["webhooks"] = webhooks()
    for (path, method), answer in ANSWERS.items():
        ok = schema["paths"][path][method]["responses"]["200"]
        ok["content"] = {"application/json": {"schema": answer}}
    for (path, method), media in FILES.items():
        ok = schema["paths"][path][method]["responses"]["200"]
        ok["content"] = {kind: {"schema": _BINARY} for kind in media}
    schemas["Error"] = _object(detail=_described(_STR, "what was wrong, for a person"),
                               code=_described(_STR, "what was wrong, for a program (docs/API.md)"))
    for path, operations in schema.get("paths", {}).items():
        for op in operations.values():
            if "description" in op:
                op["description"] = _markdown(op["description"])
            responses = op.setdefault("responses", {})
            for status in _errors(path, op, token=token):
                responses[status] = {"description": ERRORS[status],
                                     "content": {"application/json": {"schema": _ERROR}}}
    if token:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
    schema["tags"] = [{"name": name, "description": text} for name, text in TAGS]
    schema["servers"] = [{"url": root_path or "."}]
    return schema


def api_page() -> HTMLResponse:
    """Swagger UI on the description, its script and style sheet from this service; every URL
    relative to the page, so a proxy that serves the service under a path serves the page too."""
    page = get_swagger_ui_html(
        openapi_url="openapi.json", title="diffqc inspection service – API",
        swagger_js_url="docs/swagger-ui-bundle.js", swagger_css_url="docs/swagger-ui.css",
        swagger_favicon_url="data:,")
    page.headers["Content-Security-Policy"] = PAGE_POLICY
    page.headers["X-Content-Type-Options"] = "nosniff"
    return page


def asset_path(name: str) -> Path | None:
    """The file of one of the page's assets (:data:`ASSETS`), or None for any other name."""
    if name not in ASSETS:
        return None
    return Path(str(resources.files("fastapi_offline") / "static" / name))
