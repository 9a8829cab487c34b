"""The real server process on loopback: load, kill -9 + restart, overload (bounded sizes).

Heavier versions with figures: ``python benchmarks/service_load.py``.
"""

# ruff: noqa: F811  (fixtures imported from tests.test_service_common are re-bound as arguments)

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_service_common import (  # noqa: F401 (fixtures)
    AUTH,
    TOKEN,
    Samples,
    bench,
    detector,
    running_app,
    samples,
    service_model,
)

LOAD_REQUESTS = 120
CLIENTS = 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("svc-proc")


@pytest.fixture(scope="module")
def server(service_model: tuple[Path, Path], workdir: Path) -> Iterator[Any]:
    srv = bench.start_server(service_model[0], str(workdir / "results.db"), workdir=workdir)
    yield srv
    srv.stop()


def _parts(samples: Samples) -> list[tuple[bytes, str]]:
    return samples.all[:16]


def test_concurrent_load_every_ack_stored_once(server: Any, samples: Samples) -> None:
    res = asyncio.run(bench.run_load(server.url, _parts(samples), LOAD_REQUESTS, CLIENTS, prefix="load"))
    assert res.n_5xx == 0 and res.transport_errors == 0, res.summary()
    assert len(res.acked) == LOAD_REQUESTS and res.statuses == {200: LOAD_REQUESTS}
    check = bench.check_acked(server.db, res, "load")
    assert check == {
        "acked": LOAD_REQUESTS,
        "stored": LOAD_REQUESTS,
        "missing": 0,
        "duplicates": 0,
        "wrong_id": 0,
    }
    text = bench.get_metrics(server.url)
    assert bench.metric(text, "diffqc_inspection_latency_seconds_count") >= LOAD_REQUESTS
    assert bench.metric(text, "diffqc_queue_depth") == 0
    # micro-batching under load: fewer batches than parts
    assert bench.metric(text, "diffqc_batch_size_count") < LOAD_REQUESTS
    assert res.pct(50) > 0 and res.pct(99) >= res.pct(50)


def test_kill9_during_load_then_restart_and_overload_reject(
    server: Any, service_model: tuple[Path, Path], samples: Samples, workdir: Path
) -> None:
    parts = _parts(samples)
    res = bench.kill_during_load(server, parts, n=300, clients=CLIENTS, kill_after_acks=40)
    assert server.proc.poll() is not None  # really killed
    assert 40 <= len(res.acked) < 300
    # restart on the same store, this time with a tiny buffer that refuses when full
    restarted = bench.start_server(
        service_model[0],
        server.db,
        workdir=workdir,
        extra=(
            "--buffer-size",
            "2",
            "--max-batch",
            "1",
            "--overflow",
            "reject",
            "--retry-after",
            "2",
            "--heatmaps",
            "none",
        ),
    )
    try:
        check = bench.check_acked(server.db, res, "crash")
        assert check["missing"] == 0 and check["duplicates"] == 0 and check["wrong_id"] == 0, check
        # unacknowledged parts may or may not be stored, but never twice
        assert check["stored"] >= check["acked"]

        burst = asyncio.run(bench.run_load(restarted.url, parts, 48, 48, prefix="burst"))
        text = bench.get_metrics(restarted.url)
    finally:
        restarted.stop()
    ok, refused = burst.statuses.get(200, 0), burst.statuses.get(503, 0)
    assert ok + refused == 48 and burst.transport_errors == 0, burst.summary()
    assert refused > 0 and burst.retry_after == {"2"}
    assert bench.metric(text, "diffqc_parts_refused_total") == refused
    stored = bench.stored_by_part(server.db, "burst")
    assert set(stored) == set(burst.acked) and all(len(v) == 1 for v in stored.values())


@pytest.mark.anyio
async def test_overload_drop_oldest_accounts_for_every_part(
    detector: Any, samples: Samples, tmp_path: Path
) -> None:
    parts = _parts(samples)
    n = 40
    async with running_app(
        detector, tmp_path, buffer_size=2, max_batch=1, overflow="drop_oldest", heatmaps="none"
    ) as (client, state):
        rs = await asyncio.gather(
            *(
                client.post(
                    "/v1/inspect",
                    content=parts[i % len(parts)][0],
                    headers=AUTH,
                    params={"feature_type": parts[i % len(parts)][1], "part_id": f"d-{i}"},
                )
                for i in range(n)
            )
        )
        assert [r.status_code for r in rs] == [200] * n
        decisions = [r.json()["decision"] for r in rs]
        dropped = decisions.count("NOT_INSPECTED")
        text = (await client.get("/metrics", headers=AUTH)).text
        stored = state.store.query(limit=None)
    assert dropped > 0, "the burst did not overflow the buffer"
    assert bench.metric(text, "diffqc_parts_dropped_total") == dropped
    assert len(stored) == n and len({r.part_id for r in stored}) == n
    not_inspected = [r for r in stored if r.decision == "NOT_INSPECTED"]
    assert len(not_inspected) == dropped
    assert all("drop_oldest" in (r.reason or "") for r in not_inspected)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A certificate for 127.0.0.1 and localhost, its key and the CA that signed it (PEM)."""
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return cert, key, ca_file


@pytest.mark.parametrize("files", ["cert and key", "one PEM"])
def test_serve_over_tls(service_model: tuple[Path, Path], samples: Samples, tmp_path: Path,
                        files: str) -> None:
    """`serve --host 0.0.0.0` sent the API token and the parts' images over the network in the
    clear, with no way to serve HTTPS but a proxy in front. `--tls-cert` and `--tls-key` serve
    it over TLS (or `--tls-cert` alone, of a PEM holding the key too): the API, the dashboard
    and the log's address; plain HTTP is not answered."""
    import ssl

    import httpx

    cert, key, ca = _tls_files(tmp_path)
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    if files == "one PEM":
        combined = tmp_path / "combined.pem"
        combined.write_bytes(key.read_bytes() + cert.read_bytes())
        tls = ("--tls-cert", str(combined))
    trust = ssl.create_default_context(cafile=str(ca))
    srv = bench.start_server(service_model[0], str(tmp_path / "r.db"), workdir=tmp_path, ca=str(ca),
                             token=TOKEN, extra=(*tls, "--log-level", "info"))
    try:
        assert srv.url.startswith("https://")
        body, ftype = samples.all[0]
        r = httpx.post(srv.url + "/v1/inspect", content=body, headers=AUTH, params={"feature_type": ftype},
                       verify=trust, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["feature_type"] == ftype
        assert httpx.get(srv.url + "/dashboard", verify=trust).status_code == 200
        with pytest.raises(httpx.HTTPError):  # no certificate the client trusts
            httpx.get(srv.url + "/healthz")
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
            httpx.get(f"http://127.0.0.1:{srv.port}/healthz", timeout=5)
        # the container's health check finds it healthy over HTTPS (it said unhealthy: http://)
        assert _docker_healthcheck(srv.port) == 0
    finally:
        srv.stop()
    log = srv.log.read_text()
    assert f"listening on https://127.0.0.1:{srv.port}" in log
    assert f"dashboard at https://127.0.0.1:{srv.port}/dashboard" in log


def _docker_healthcheck(port: int) -> int:
    """The Dockerfile's HEALTHCHECK, run as Docker runs it (its exec form's JSON array) against
    ``port`` of this machine: its exit code (0 healthy)."""
    import json
    import re
    import subprocess
    import sys

    text = (Path(__file__).resolve().parents[1] / "Dockerfile").read_text()
    found = re.search(r"^HEALTHCHECK [^\n]*\\\n\s*CMD (\[.*\])$", text, re.MULTILINE)
    assert found, "no HEALTHCHECK ... CMD [...] in the Dockerfile"
    argv = json.loads(found.group(1))
    assert argv[:2] == ["python", "-c"] and ":8000/" in argv[2]
    code = argv[2].replace(":8000/", f":{port}/")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode


def test_the_containers_health_check_over_http(service_model: tuple[Path, Path], tmp_path: Path) -> None:
    srv = bench.start_server(service_model[0], str(tmp_path / "r.db"), workdir=tmp_path)
    try:  # a server of its own: the module's is killed by the kill -9 test
        assert _docker_healthcheck(srv.port) == 0
    finally:
        srv.stop()
    assert _docker_healthcheck(srv.port) == 1  # nothing listening


def test_serve_closes_a_connection_that_sends_no_request(service_model: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    """`serve` runs uvicorn with diffqc's connections (tests/test_service_connections.py): one
    that sends no request is closed after --body-timeout, where uvicorn kept it for ever; a
    request is answered."""
    import socket
    import time

    import httpx

    srv = bench.start_server(service_model[0], str(tmp_path / "r.db"), workdir=tmp_path, token=TOKEN,
                             extra=("--body-timeout", "1"))
    try:
        with socket.create_connection(("127.0.0.1", srv.port)) as idle:
            idle.settimeout(60)
            t0 = time.monotonic()
            assert idle.recv(1) == b"" and time.monotonic() - t0 < 30  # closed, not kept
        assert httpx.get(srv.url + "/healthz", timeout=30).status_code == 200
    finally:
        srv.stop()


def test_serve_takes_the_disk_watchs_thresholds(service_model: tuple[Path, Path], tmp_path: Path) -> None:
    """The nearly-full disk warning fires below 1 GiB or 5 % free: too late for a small edge
    box's card, early for a large disk. `--disk-min-free-mb` and `--disk-min-free-percent` set
    them (here: any disk is below 100 %; 0 and 0: none is ever low)."""
    import httpx

    for percent, low in (("100", True), ("0", False)):
        srv = bench.start_server(service_model[0], str(tmp_path / "r.db"), workdir=tmp_path, token=TOKEN,
                                 extra=("--disk-min-free-mb", "0", "--disk-min-free-percent", percent))
        try:
            [disk] = httpx.get(srv.url + "/v1/line", headers=AUTH, timeout=30).json()["disk"]
        finally:
            srv.stop()
        assert disk["path"] == str(tmp_path) and disk["low"] is low
        log = srv.log.read_text()
        assert log.count(f"the disk of {tmp_path} is nearly full") == int(low), log[-3000:]


def test_serve_in_a_container_too_small_for_its_buffer_says_so(service_model: tuple[Path, Path],
                                                                tmp_path: Path) -> None:
    """A container given less memory than the buffer may fill (`--buffer-mb` of decoded parts
    waiting, beside the loaded model) served until a burst of parts, when it was killed for
    memory (exit 137, restarted in a loop). At start the service compares its memory cgroup's
    room with the buffer's bound and says so: here a real cgroup of 3 GB, a buffer of 8 GB."""
    from tests.conftest import memory_cgroup

    folder = memory_cgroup(3 * 2**30)
    join = ("sh", "-c", f'echo $$ > "{folder}/cgroup.procs" && exec "$@"', "sh")
    try:
        srv = bench.start_server(service_model[0], str(tmp_path / "r.db"), workdir=tmp_path, token=TOKEN,
                                 prefix=join, extra=("--buffer-mb", "8000"))
        srv.stop()
    finally:
        folder.rmdir()
    log = srv.log.read_text()
    assert "its buffer holds up to 8000 MB of decoded parts" in log, log[-3000:]
    assert "lower --buffer-mb" in log



def test_serve_logs_json_lines(service_model: tuple[Path, Path], samples: Samples, tmp_path: Path) -> None:
    """`serve` logged text, its HTTP server's lines in uvicorn's own format (access lines on
    stdout, coloured), which a log collector (Loki, Elasticsearch) reads as free text, and a
    traceback as many entries. `--log-format json` makes every line of the process one JSON
    object: the service's, uvicorn's (an access line with its request as fields), and the
    error that ends a second `serve` on the same port."""
    import json
    import os
    import subprocess
    import sys

    import httpx

    srv = bench.start_server(service_model[0], str(tmp_path / "r.db"), workdir=tmp_path, token=TOKEN,
                             extra=("--log-level", "info", "--log-format", "json", "--access-log"))
    try:
        body, ftype = samples.all[0]
        r = httpx.post(srv.url + "/v1/inspect", content=body, headers=AUTH, params={"feature_type": ftype},
                       timeout=60)
        assert r.status_code == 200, r.text
        wrong = {"Authorization": "Bearer wrong"}
        assert httpx.get(srv.url + "/v1/results", headers=wrong).status_code == 401
        src = str(Path(bench.__file__).resolve().parents[1] / "src")
        second = subprocess.run([sys.executable, "-m", "diffqc.cli", "serve", str(service_model[0]), "--port",
                                 str(srv.port), "--db", str(tmp_path / "r.db"), "--log-format", "json"],
                                capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONPATH": src, "DIFFQC_TOKEN": TOKEN})
    finally:
        srv.stop()
    lines = [json.loads(line) for line in srv.log.read_text().splitlines() if line.strip()]
    messages = [(x["logger"], x["level"], x["message"]) for x in lines]
    assert ("diffqc.service", "INFO", f"listening on http://127.0.0.1:{srv.port}, dashboard at "
            f"http://127.0.0.1:{srv.port}/dashboard, API at http://127.0.0.1:{srv.port}/docs (only this "
            "computer reaches it: --host 0.0.0.0 serves the network too; Ctrl+C to stop)") in messages
    assert any(logger == "uvicorn.error" and "Application startup complete" in m for logger, _, m in messages)
    access = [x for x in lines if x["logger"] == "uvicorn.access"]
    assert {(x["method"], x["path"].split("?")[0], x["status"]) for x in access} >= {
        ("POST", "/v1/inspect", 200), ("GET", "/v1/results", 401)}
    assert any(x["level"] == "WARNING" and "token" in x["message"] for x in lines)  # the refused one
    assert second.returncode == 1
    last = json.loads(second.stderr.strip().splitlines()[-1])
    assert last["level"] == "ERROR" and last["message"].startswith(f"cannot listen on 127.0.0.1:{srv.port}")


def test_serve_takes_the_certificate_warnings_lead_time(service_model: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    """The certificate was named 14 days before it expired, a setting of the Python API only:
    too late where a restart waits for a monthly maintenance window. `--tls-warn-days`."""
    import datetime as dt
    import ssl

    import httpx
    import trustme

    ca = trustme.CA()
    until = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=60)
    leaf = ca.issue_cert("127.0.0.1", "localhost", not_after=until)
    pem, ca_file = tmp_path / "server.pem", tmp_path / "ca.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(pem))
    ca.cert_pem.write_to_path(str(ca_file))
    trust = ssl.create_default_context(cafile=str(ca_file))
    seen = {}
    for days in ("14", "90"):
        srv = bench.start_server(service_model[0], str(tmp_path / "r.db"), workdir=tmp_path, ca=str(ca_file),
                                 token=TOKEN, extra=("--tls-cert", str(pem), "--tls-warn-days", days))
        try:
            r = httpx.get(srv.url + "/v1/line", headers=AUTH, verify=trust)
            assert r.status_code == 200, r.text
            seen[days] = r.json()["tls"]
        finally:
            srv.stop()
    assert not seen["14"]["expiring"] and seen["90"]["expiring"]
    assert 59 < seen["90"]["days_left"] <= 60
    assert f"the TLS certificate {pem} expires on {until:%Y-%m-%d %H:%M} UTC (in " in srv.log.read_text()


def test_serve_serves_a_renewed_certificate_without_a_restart(service_model: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    """`serve --tls-cert` read its certificate once: one renewed on disk (certbot, cert-manager)
    was served only after a restart, which on a line waits for a maintenance window while the
    old one runs out. Renewed files are now served to new connections within seconds; a pair
    that does not fit (a key that is not the new certificate's) is said once and the working
    certificate stays."""
    import datetime as dt
    import os
    import socket
    import ssl
    import time

    import httpx
    import trustme

    ca = trustme.CA()
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    trust = ssl.create_default_context(cafile=str(ca_file))

    def install(days: int, key_of: Any = None) -> Any:  # as certbot does: new files moved into place
        leaf = ca.issue_cert("127.0.0.1", "localhost", not_after=now + dt.timedelta(days=days))
        leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "new-cert.pem"))
        (key_of or leaf).private_key_pem.write_to_path(str(tmp_path / "new-key.pem"))
        os.replace(tmp_path / "new-key.pem", key)
        os.replace(tmp_path / "new-cert.pem", cert)
        return leaf

    def served_until(port: int) -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                trust.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return str(tls.getpeercert()["notAfter"])

    def wait_for_served(port: int, days: int) -> str:
        want = (now + dt.timedelta(days=days)).strftime("%b %e %H:%M:%S %Y GMT")
        for _ in range(100):
            got = served_until(port)
            if got == want:
                return got
            time.sleep(0.2)
        raise AssertionError(f"still serving {got}, not {want}")

    first = install(5)
    srv = bench.start_server(service_model[0], str(tmp_path / "r.db"), workdir=tmp_path, ca=str(ca_file),
                             token=TOKEN, extra=("--tls-cert", str(cert), "--tls-key", str(key),
                                                 "--log-level", "info"))
    try:
        wait_for_served(srv.port, 5)
        with httpx.Client(verify=trust) as kept:  # a connection opened before the renewal
            assert kept.get(srv.url + "/healthz").status_code == 200
            install(90)
            wait_for_served(srv.port, 90)
            assert kept.get(srv.url + "/healthz").status_code == 200  # it goes on
        tls = httpx.get(srv.url + "/v1/line", headers=AUTH, verify=trust).json()["tls"]
        assert tls["reloads"] == 1 and not tls["expiring"] and not tls["renewed_on_disk"]
        assert tls["not_after"] == (now + dt.timedelta(days=90)).timestamp()
        metrics = httpx.get(srv.url + "/metrics", headers=AUTH, verify=trust).text
        assert f'diffqc_tls_certificate_reloads_total{{file="{cert}"}} 1' in metrics
        install(200, key_of=first)  # a certificate beside another's key: not served
        time.sleep(3)
        assert served_until(srv.port) == (now + dt.timedelta(days=90)).strftime("%b %e %H:%M:%S %Y GMT")
        assert httpx.get(srv.url + "/healthz", verify=trust).status_code == 200
    finally:
        srv.stop()
    log = srv.log.read_text()
    assert f"serving the renewed TLS certificate {cert} (it expires on " in log
    assert f"the TLS certificate {cert} changed on disk but cannot be served: cannot serve over TLS: " \
           f"{key} is not the key of {cert}; the service goes on serving the one it had" in log
    assert "restart the service" not in log


def test_a_bundle_copied_over_the_served_one_in_any_order_is_served_once_complete(
        service_model: tuple[Path, Path], tmp_path: Path) -> None:
    """A bundle copied over the served folder (`cp -r new/. SERVED/`, `scp`, `rsync`) arrives
    file by file in the copier's order, not diffqc's: with metadata.json before the weights, the
    bundle was loaded as metadata.json settled, refused (its checksums), and never looked at
    again: the new weights in place, the old model served until a restart. A bundle is loaded
    again when any of its files changed and all stayed as they are for one look (a result
    store kept in its folder, written with every decision, is not one of them)."""
    import os
    import shutil
    import warnings

    from diffqc.config import with_overrides
    from diffqc.data import load_dataset
    from diffqc.model import Detector
    from diffqc.service.line import ModelWatch

    served, new = tmp_path / "model", tmp_path / "new"
    shutil.copytree(service_model[0], served)
    with warnings.catch_warnings():  # another model: other weights (another training seed)
        warnings.simplefilter("ignore")
        retrained = Detector(with_overrides(bench.tiny_config(), {"train.seed": 1}), device="cpu")
        retrained.fit(load_dataset(service_model[1]), progress=False)
    retrained.metadata = {**retrained.metadata, "model_id": "retrained-copy"}
    retrained.save(new)
    first = Detector.load(served, device="cpu")
    watch = ModelWatch(served, str(first.metadata["model_id"]), lambda: Detector.load(served, device="cpu"))

    def look() -> Any:  # a change, then the look that finds it settled; the line's decisions meanwhile
        (served / "results.db").write_bytes(os.urandom(64))
        first = watch.check()
        (served / "results.db-wal").write_bytes(os.urandom(64))
        return first or watch.check()

    shutil.copy2(new / "metadata.json", served / "metadata.json")  # the copier's order
    assert look() is None and watch.last_error is not None  # the weights are the old ones yet
    for name in sorted(p.name for p in new.iterdir() if p.name != "metadata.json"):
        shutil.copy2(new / name, served / name)
    found = look()
    assert found is not None, watch.last_error
    detector, retrained = found
    assert retrained and detector.metadata["model_id"] == "retrained-copy" and watch.last_error is None


def test_a_retrain_undone_is_served_and_logged_as_the_earlier_model(
        service_model: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`diffqc train --undo --out SERVED` puts back the model a retrain replaced: the service
    logged "serving the retrained model <the old id>", so an operator reading the log took the
    model put back for yet another retrain. It is logged as the earlier model (trained before the
    one it replaces); the retrain redone is the retrained model again."""
    import logging
    import os
    import shutil

    from diffqc.bundle import undo_retrain
    from diffqc.model import Detector
    from diffqc.service.line import ModelWatch

    served = tmp_path / "model"
    shutil.copytree(service_model[0], served)
    first = str(Detector.load(served, device="cpu").metadata["model_id"])
    retrained = Detector.load(served, device="cpu")
    retrained.metadata = {**retrained.metadata, "model_id": "retrained-1",
                          "created": "2099-01-01T00:00:00+00:00"}  # trained after the first
    retrained.save(served)  # the first kept in previous/
    watch = ModelWatch(served, "retrained-1", lambda: Detector.load(served, device="cpu"))

    def look() -> Any:  # the change, then the look that finds it settled
        os.utime(served / "metadata.json", ns=(os.stat(served / "metadata.json").st_mtime_ns + 10**9,) * 2)
        found = watch.check()
        return found if found is not None else watch.check()

    with caplog.at_level(logging.INFO, logger="diffqc.service"):
        undo_retrain(served)
        found = look()
        assert found is not None and found[1], watch.last_error
        assert f"serving the earlier model {first} from {served} without a restart" in caplog.text
        assert "retrained-1): drift windows start again" in caplog.text
        caplog.clear()
        undo_retrain(served)  # redone
        assert look() is not None and "serving the retrained model retrained-1 from" in caplog.text


def test_a_config_edited_in_the_served_bundle_is_said_at_once(service_model: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    """A setting of the scores edited into the served bundle's config.json (``scoring.topk``, to
    make the line less sensitive) changed nothing and said nothing while the service ran (the
    same model id: taken for `diffqc calibrate`'s rewrite); the next start, after a power cut,
    refused the bundle and the line stopped. The watch says it as the edit settles (health's
    model.last_error and the log), the model served so far staying; put back, it is said no more."""
    import json
    import os
    import shutil

    from diffqc.model import Detector
    from diffqc.service.line import ModelWatch

    served = tmp_path / "model"
    shutil.copytree(service_model[0], served)
    model_id = str(Detector.load(served, device="cpu").metadata["model_id"])
    watch = ModelWatch(served, model_id, lambda: Detector.load(served, device="cpu"))
    original = (served / "config.json").read_text()

    def write(text: str) -> Any:  # the edit, then the look that finds it settled
        (served / "config.json").write_text(text)
        os.utime(served / "config.json", ns=(os.stat(served / "config.json").st_mtime_ns + 10**9,) * 2)
        first = watch.check()
        return first if first is not None else watch.check()

    config = json.loads(original)
    config["scoring"]["topk"] = 0.2
    assert write(json.dumps(config)) is None and watch.model_id == model_id
    assert watch.last_error is not None and "config.json was edited after training: scoring.topk is 0.2" in (
        watch.last_error) and "a restart would refuse this bundle" in watch.last_error
    assert write(original) is None and watch.last_error is None and watch.reloads == 0
    weights = served / "weights.safetensors"
    kept = weights.read_bytes()
    weights.write_bytes(kept[:-1] + bytes([kept[-1] ^ 1]))  # a bit flipped: the disk, a failed copy
    assert write(original) is None and "weights.safetensors is damaged" in str(watch.last_error)
    weights.write_bytes(kept)
    assert write(original) is None and watch.last_error is None


def test_serve_serves_a_retrained_model_without_a_restart(service_model: tuple[Path, Path],
                                                          samples: Samples, tmp_path: Path) -> None:
    """A model retrained into the served folder (`diffqc train DATA --out SERVED`, the
    README's loop) was not served until a restart, which stops the line; its new calibration
    was refused as another model's. The service loads it once its files are complete, as it
    loaded the first (runtime and precision chosen again), and inspects with it from the next
    batch on: records carry its version, /v1/model names it, its drift windows start again. A
    damaged bundle is said once and the model served so far stays."""
    import shutil
    import time

    import httpx

    served = tmp_path / "model"
    shutil.copytree(service_model[0], served)
    srv = bench.start_server(served, str(tmp_path / "r.db"), workdir=tmp_path, token=TOKEN,
                             extra=("--log-level", "info"))
    body, ftype = samples.all[0]

    def inspect() -> dict[str, Any]:
        r = httpx.post(srv.url + "/v1/inspect", content=body, headers=AUTH, params={"feature_type": ftype},
                       timeout=60)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def served_version() -> str:
        return str(httpx.get(srv.url + "/v1/model", headers=AUTH).json()["version"])

    try:
        first = served_version()
        assert inspect()["model_version"] == first
        bench.retrain_into(served, service_model[0], "retrained-1")
        for _ in range(100):
            if served_version() == "retrained-1":
                break
            time.sleep(0.2)
        assert served_version() == "retrained-1"
        assert inspect()["model_version"] == "retrained-1"
        model = httpx.get(srv.url + "/v1/line", headers=AUTH).json()["model"]
        assert model["model_id"] == "retrained-1" and model["reloads"] == 1 and model["last_error"] is None
        # `diffqc export SERVED` then: the faster runtime it measured is taken, the same model
        from diffqc.export import export_bundle

        assert httpx.get(srv.url + "/v1/model", headers=AUTH).json()["runtime"] == "torch"
        export_bundle(served, data=service_model[1], threads=1, check_images=4, openvino=False,
                      log=lambda _: None)
        for _ in range(100):
            if httpx.get(srv.url + "/v1/line", headers=AUTH).json()["model"]["reloads"] == 2:
                break
            time.sleep(0.2)
        info = httpx.get(srv.url + "/v1/model", headers=AUTH).json()
        assert info["version"] == "retrained-1" and info["runtime"] == "onnx", info
        assert inspect()["model_version"] == "retrained-1"
        (served / "metadata.json").write_text("{ damaged")
        for _ in range(100):
            if httpx.get(srv.url + "/v1/line", headers=AUTH).json()["model"]["last_error"]:
                break
            time.sleep(0.2)
        assert inspect()["model_version"] == "retrained-1"
    finally:
        srv.stop()
    log = srv.log.read_text()
    assert f"serving the retrained model retrained-1 from {served} without a restart (torch, fp32;" in log
    assert f"serving model retrained-1 from {served} again, as its files changed (onnx, fp32;" in log
    assert f"the model in {served} changed but cannot be served: its metadata.json cannot be read" in log
    assert "restart the service to serve the new model" not in log


def test_ctrl_c_pressed_twice_stops_serve_as_once(service_model: tuple[Path, Path], tmp_path: Path) -> None:
    """Ctrl-C pressed twice in quick succession (a double tap, 50 ms apart) stopped `serve` at once:
    uvicorn took the second as "force exit", the application's shutdown (its drain of the parts in
    hand, the store closed) was skipped, and a traceback of 40 lines ended the log. A second
    Ctrl-C within a second of the first is the same press; one later still stops at once."""
    import signal
    import time

    served = bench.start_server(service_model[0], str(tmp_path / "s.db"), workdir=tmp_path,
                                extra=("--log-level", "info"))
    served.proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    served.proc.send_signal(signal.SIGINT)
    served.proc.wait(60)
    log = served.log.read_text()
    assert "Application shutdown complete" in log and "Traceback" not in log, log[-3000:]


def test_a_closed_terminal_stops_serve_and_watch_as_sigterm_does(service_model: tuple[Path, Path],
                                                                 samples: Samples, tmp_path: Path) -> None:
    """`serve` or `watch` run in a terminal whose session ends (an SSH connection dropped: the
    kernel sends SIGHUP) ended at once, as under kill -9: no drain of the parts in hand, no last
    line in the log, `watch` without its totals. SIGHUP now stops them as SIGTERM and Ctrl-C do."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import diffqc

    served = bench.start_server(service_model[0], str(tmp_path / "s.db"), workdir=tmp_path,
                                extra=("--log-level", "info"))
    served.proc.send_signal(signal.SIGHUP)
    served.proc.wait(60)
    assert "Application shutdown complete" in served.log.read_text(), served.log.read_text()[-2000:]

    data, ftype = samples.all[0]
    (tmp_path / "cam" / ftype).mkdir(parents=True)
    (tmp_path / "cam" / ftype / "p1.png").write_bytes(data)
    log_path = tmp_path / "watch.log"
    env = dict(os.environ, PYTHONPATH=str(Path(diffqc.__file__).parents[1]), OMP_NUM_THREADS="1")
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "diffqc.service", "watch", str(tmp_path / "cam"),
                                 str(service_model[0]), "--db", str(tmp_path / "w.db"), "--settle", "0",
                                 "--poll", "0.05"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while "p1.png" not in str(list((tmp_path / "cam").rglob("processed/**/*.png"))):
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-2000:]
                time.sleep(0.1)
            proc.send_signal(signal.SIGHUP)
            assert proc.wait(60) == 0, log_path.read_text()[-2000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert "inspected 1, already recorded 0, failed 0" in log_path.read_text()


def test_a_start_that_fails_in_the_applications_start_is_one_line(service_model: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    """A start that failed once the application started (here `--opcua-users`' server certificate
    made in `--data-dir/opcua/`, where a file is in the way) ended in two chained tracebacks and
    uvicorn's "Application startup failed", exit 3, where `watch` says one line. It is the
    command line's one line now, and exit 1, as every error of the user's input is."""
    import os
    import subprocess
    import sys

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "opcua").write_text("not a folder")
    users = tmp_path / "users.txt"
    users.write_text("operator:a-long-password-123\n")
    users.chmod(0o600)
    env = {**os.environ, "DIFFQC_TOKEN": TOKEN}
    out = subprocess.run([sys.executable, "-m", "diffqc.cli", "serve", str(service_model[0]), "--db",
                          str(tmp_path / "r.db"), "--data-dir", str(tmp_path / "data"),
                          "--port", str(bench.free_port()), "--opcua",
                          f"opc.tcp://127.0.0.1:{bench.free_port()}", "--opcua-users", str(users)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.rstrip().splitlines()[-1].startswith("diffqc: error: "), out.stderr[-3000:]
    assert "opcua" in out.stderr.rstrip().splitlines()[-1]
