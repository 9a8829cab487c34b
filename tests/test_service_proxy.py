"""The service over real HTTP connections, as proxies and clients make them: behind a real nginx
configured as docs/API.md ("Behind a reverse proxy") says, and a client that asks before it
sends its body (``Expect: 100-continue``).

The nginx test needs nginx (Debian's ``nginx-light``; ``.ci/run`` installs it): under
``CI=true`` it may not skip.
"""

# ruff: noqa: F811  (fixtures imported from tests.test_service_common are re-bound as arguments)

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from tests.test_service_common import (  # noqa: F401 (fixtures)
    AUTH,
    NGINX,
    TOKEN,
    Samples,
    behind_nginx,
    detector,
    png,
    samples,
    service_model,
    serving,
)


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx not installed (apt-get install nginx-light)")
def test_a_cameras_image_passes_the_documented_nginx_and_a_too_large_one_is_answered_by_the_service(
        detector: Any, samples: Samples, tmp_path: Path) -> None:
    """docs/API.md showed nginx's ``location /qc/ { proxy_pass ...; }`` alone: nginx takes request
    bodies up to 1 MB unless told more, so a camera's 2 MB image was refused by nginx (`413
    Request Entity Too Large`, an HTML page) before the service saw it. The documented block now
    sets ``client_max_body_size`` above the service's own limit: such an image is inspected, and
    one beyond ``--max-upload-mb`` is answered by the service (its JSON 413), not by nginx. The
    service answered such a body before reading the rest of it, and closed the connection with it
    unread, which is a reset: nginx, which sends a body on once it has it whole, answered its
    client `502 Bad Gateway` (6 times in 8 by hand), as it did any answer given before the body
    was read (a wrong token: 502 once in 3). The rest is now read and dropped first."""
    from diffqc.service.app import ServiceSettings, create_app

    app = create_app(ServiceSettings(db_url=str(tmp_path / "r.db"), tokens=(TOKEN,), root_path="/qc"),
                     detector=detector)
    ftype = samples.all[0][1]
    camera = png(np.random.default_rng(0).integers(0, 256, (1400, 1400), dtype=np.uint8))
    assert len(camera) > 1_500_000  # more than nginx's default of 1 MB
    with serving(app, "/qc") as url, behind_nginx(url, tmp_path / "nginx") as proxy:
        r = httpx.post(f"{proxy}/qc/v1/inspect", files={"image": ("part.png", camera, "image/png")},
                       data={"feature_type": ftype, "part_id": "cam-1"}, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text[:300]
        assert r.json()["image_url"] is None or r.json()["image_url"].startswith("/qc/v1/results/")
        too_large = b"\0" * (app.state.diffqc.settings.max_upload_bytes + 2_000_000)
        for _ in range(5):  # the service's answer each time (nginx answered most 502: see below)
            r = httpx.post(f"{proxy}/qc/v1/inspect", params={"feature_type": ftype}, headers=AUTH,
                           content=too_large, timeout=60)
            assert r.status_code == 413 and r.json()["code"] == "upload_too_large", r.text[:300]
            r = httpx.post(f"{proxy}/qc/v1/inspect", params={"feature_type": ftype}, content=too_large,
                           headers={"Authorization": "Bearer a-wrong-token-of-a-camera"}, timeout=60)
            assert r.status_code == 401, r.text[:300]  # any answer before the body: a wrong token
        page = httpx.get(f"{proxy}/qc/dashboard", timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower()


def test_a_client_that_asks_before_sending_a_body_too_large_is_refused_before_it_sends_it(
        detector: Any, tmp_path: Path) -> None:
    """A client that asks before it sends a large body (``Expect: 100-continue``: curl above 1 MB,
    .NET's HttpClient) and declares one over the limit is answered 413 at once, without the
    ``100 Continue`` that would have it send the body only to have it dropped."""
    from diffqc.service.app import ServiceSettings, create_app

    app = create_app(ServiceSettings(db_url=str(tmp_path / "r.db"), tokens=(TOKEN,)), detector=detector)
    size = app.state.diffqc.settings.max_upload_bytes + 2_000_000
    with serving(app) as url:
        where = urlsplit(url)
        with socket.create_connection((where.hostname, where.port), timeout=10) as conn:
            conn.sendall(f"POST /v1/inspect HTTP/1.1\r\nHost: {where.netloc}\r\nAuthorization: "
                         f"{AUTH['Authorization']}\r\nContent-Type: image/png\r\nContent-Length: {size}"
                         "\r\nExpect: 100-continue\r\n\r\n".encode())
            answer = b""
            deadline = time.monotonic() + 10
            while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
                answer += conn.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
