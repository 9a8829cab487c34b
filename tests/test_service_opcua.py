"""The OPC UA server of `serve --opcua`, read by a real OPC UA client (asyncua's), as a PLC or
SCADA system reads it."""

# ruff: noqa: F811  (fixtures imported from tests.test_service_common are re-bound as arguments)

from __future__ import annotations

import asyncio
import math
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from diffqc.errors import ConfigError
from diffqc.service.opcua import NAMESPACE, OpcUaServer, check_opcua_url
from diffqc.service.store import ResultRecord
from tests.test_service_common import (  # noqa: F401 (fixtures)
    AUTH,
    TOKEN,
    Samples,
    bench,
    detector,
    samples,
    service_model,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _read(url: str, paths: list[str]) -> dict[str, Any]:
    from asyncua import Client

    async with Client(url) as client:
        ns = await client.get_namespace_index(NAMESPACE)
        return {p: await client.get_node(f"ns={ns};s={p}").read_value() for p in paths}


def _record(i: int, decision: str, ftype: str | None = "edge", score: float | None = 1.5) -> ResultRecord:
    return ResultRecord(id=i, created_at=1_796_000_000.0 + i, source="test", decision=decision,
                        feature_type=ftype, score=score, p_value=None if score is None else 0.2,
                        part_id=f"p{i}", camera="cam-a")


def test_the_latest_decision_and_each_types_counts_are_read_by_a_client() -> None:
    url = f"opc.tcp://127.0.0.1:{_free_port()}"
    server = OpcUaServer(url, ["edge", "dots"], model_version="m-1")
    server.start()
    try:
        for i, decision in enumerate(["PASS", "PASS", "REVIEW", "REJECT"], 1):
            server.publish(_record(i, decision))
        server.publish(_record(5, "NOT_INSPECTED", score=None))
        server.publish(_record(6, "PASS", ftype=None))  # no type given, none predicted: Last only
        server.alarm("edge", True)
        for _ in range(50):
            if server.published_total == 6:
                break
            time.sleep(0.05)
        got = asyncio.run(_read(url, [
            "diffqc.Last.RecordId", "diffqc.Last.Decision", "diffqc.Last.FeatureType",
            "diffqc.Types.edge.RecordId", "diffqc.Types.edge.Decision", "diffqc.Types.edge.PartId",
            "diffqc.Types.edge.Score", "diffqc.Types.edge.Camera", "diffqc.Types.edge.Time",
            "diffqc.Types.edge.Inspected", "diffqc.Types.edge.Pass", "diffqc.Types.edge.Review",
            "diffqc.Types.edge.Reject", "diffqc.Types.edge.NotInspected", "diffqc.Types.edge.DriftAlarm",
            "diffqc.Types.dots.Inspected", "diffqc.Types.dots.DriftAlarm", "diffqc.TypeNames",
            "diffqc.ModelVersion"]))
    finally:
        server.stop()
    assert (got["diffqc.Last.RecordId"], got["diffqc.Last.Decision"], got["diffqc.Last.FeatureType"]) == (
        6, "PASS", "")
    edge = {k.rsplit(".", 1)[1]: v for k, v in got.items() if k.startswith("diffqc.Types.edge.")}
    assert (edge["RecordId"], edge["Decision"], edge["PartId"], edge["Camera"]) == (5, "NOT_INSPECTED", "p5",
                                                                                   "cam-a")
    assert math.isnan(edge["Score"]) and edge["Time"].timestamp() == 1_796_000_005.0
    assert [edge[k] for k in ("Inspected", "Pass", "Review", "Reject", "NotInspected")] == [5, 2, 1, 1, 1]
    assert edge["DriftAlarm"] is True and got["diffqc.Types.dots.DriftAlarm"] is False
    assert got["diffqc.Types.dots.Inspected"] == 0
    assert got["diffqc.TypeNames"] == ["edge", "dots"] and got["diffqc.ModelVersion"] == "m-1"


def test_connections_beyond_the_servers_few_are_refused() -> None:
    """asyncua takes up to 1000 connections: 1000 left idle (a scanner, a client in a loop) took
    the file descriptors of a service run under systemd's default 1024 (the store and model
    files could not be opened, 10 MB of log in 8 s). A line's OPC UA clients are few: the
    server takes 64, and closes any more as they come."""
    import socket

    from diffqc.service.opcua import MAX_CONNECTIONS

    port = _free_port()
    server = OpcUaServer(f"opc.tcp://127.0.0.1:{port}", ["edge"], model_version="m-1")
    server.start()
    held: list[socket.socket] = []
    try:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", port)) as extra:
            extra.settimeout(5)
            assert extra.recv(1) == b""  # closed at once
        for s in held[-3:]:  # the ones it took stay open
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
    finally:
        for s in held:
            s.close()
        server.stop()


def test_a_plc_reads_the_verdict_of_the_latest_part() -> None:
    """A part is seen as one crop per type: the reject gate's PLC needs the part's verdict, not
    each crop's. ``diffqc/Part`` holds the verdict of the latest decision's part (the worst of
    its types' latest decisions) and how many types it has so far."""
    url = f"opc.tcp://127.0.0.1:{_free_port()}"
    server = OpcUaServer(url, ["edge", "dots", "angle"])
    server.start()
    crops = [("edge", "PASS"), ("dots", "REVIEW"), ("dots", "PASS")]  # dots sent again: it passes
    try:
        before = asyncio.run(_read(url, ["diffqc.Part.PartId", "diffqc.Part.Images", "diffqc.Part.Complete",
                                         "diffqc.Part.RecordId"]))
        for i, (ftype, decision) in enumerate(crops, 1):
            server.publish(ResultRecord(id=i, created_at=1_796_000_000.0 + i, source="test",
                                        decision=decision, feature_type=ftype, type_known=True,
                                        part_id="P-7"))
        server.publish(ResultRecord(id=4, created_at=1_796_000_004.0, source="test", decision="REJECT",
                                    feature_type="edge", type_known=True))  # no part id: Part unchanged
        for _ in range(50):
            if server.published_total == 4:
                break
            time.sleep(0.05)
        got = asyncio.run(_read(url, [f"diffqc.Part.{n}" for n in
                                      ("PartId", "Decision", "Images", "Types", "Complete", "Missing",
                                       "RecordId")]))
        mid = asyncio.run(_read(url, ["diffqc.Last.Decision"]))
    finally:
        server.stop()
    assert before == {"diffqc.Part.PartId": "", "diffqc.Part.Images": 0, "diffqc.Part.Complete": False,
                      "diffqc.Part.RecordId": 0}
    part = {k.rsplit(".", 1)[1]: v for k, v in got.items()}
    # the PASS of two crops is not the part's yet: its angle has not come
    assert part == {"PartId": "P-7", "Decision": "PASS", "Images": 2, "Types": "edge=PASS dots=PASS",
                    "Complete": False, "Missing": "angle", "RecordId": 3}
    assert mid["diffqc.Last.Decision"] == "REJECT"


def test_a_part_of_a_line_with_fewer_types_than_the_model_is_complete(tmp_path: Path) -> None:
    """A station whose parts have 2 of the model's 3 types (``--part-types edge,dots``): its
    part is complete with those 2; after a retrained model of other types is served, the line's
    types still count (one the new model lacks is named missing)."""
    from types import SimpleNamespace

    from diffqc.service.line import LineServices
    from diffqc.service.store import ResultStore

    url = f"opc.tcp://127.0.0.1:{_free_port()}"
    store = ResultStore(str(tmp_path / "r.db"))
    line = LineServices(SimpleNamespace(opcua_url=url, part_types=("dots", "edge")), store, None,
                        SimpleNamespace(classes_=["edge", "dots", "angle"]))
    line.start()
    server = line.opcua
    names = [f"diffqc.Part.{n}" for n in ("PartId", "Complete", "Missing")]

    def publish(i: int, ftype: str, part: str) -> None:
        server.publish(ResultRecord(id=i, created_at=1_796_000_000.0 + i, source="test", decision="PASS",
                                    feature_type=ftype, type_known=True, part_id=part))
        for _ in range(50):
            if server.published_total == i:
                break
            time.sleep(0.05)

    try:
        publish(1, "edge", "P-1")
        publish(2, "dots", "P-1")
        complete = asyncio.run(_read(url, names))
        server = server.use_model(["edge", "angle"], "m-2")  # other types: the server starts again
        publish(1, "edge", "P-2")
        swapped = asyncio.run(_read(url, names))
    finally:
        server.stop()
        line.stop()
        store.close()
    assert list(complete.values()) == ["P-1", True, ""]
    assert list(swapped.values()) == ["P-2", False, "dots"]


def test_a_reject_gates_plc_asks_for_the_verdict_of_a_part_by_its_id(tmp_path: Path) -> None:
    """Parts are buffered between the camera and the reject gate: when part P-1 reaches the
    gate the latest part is another one. The gate's PLC calls ``diffqc.GetPart("P-1")`` and
    gets P-1's verdict from the store (parts inspected before a restart too); a part never seen
    answers an empty decision."""
    from types import SimpleNamespace

    from asyncua import Client

    from diffqc.service.line import LineServices
    from diffqc.service.store import ResultStore

    url = f"opc.tcp://127.0.0.1:{_free_port()}"
    with ResultStore(str(tmp_path / "r.db")) as store:
        for i, (part, ftype, decision) in enumerate([("P-1", "edge", "REJECT"), ("P-1", "dots", "PASS"),
                                                      ("P-2", "edge", "PASS")]):
            store.insert(ResultRecord(created_at=1_796_000_000.0 + i, source="test", decision=decision,
                                      feature_type=ftype, type_known=True, part_id=part))
        line = LineServices(SimpleNamespace(opcua_url=url), store, None,
                            SimpleNamespace(classes_=["edge", "dots", "angle"]))
        line.start()

        async def call(*args: object) -> list[Any]:
            async with Client(url) as client:
                ns = await client.get_namespace_index(NAMESPACE)
                root = client.get_node(f"ns={ns};s=diffqc")
                return [await root.call_method(f"{ns}:GetPart", *args)]

        try:
            (p1,), (p2,), (nobody,) = (asyncio.run(call(p)) for p in ("P-1", "P-2", "P-9"))
        finally:
            line.stop()
    # Decision, Images, Types, Complete, Missing, RecordId
    assert p1 == ["REJECT", 2, "edge=REJECT dots=PASS", False, "angle", 2]
    assert p2[:5] == ["PASS", 1, "edge=PASS", False, "dots angle"]
    assert nobody == ["", 0, "", False, "", 0]


def test_a_subscribed_client_gets_each_new_decision_and_cannot_write() -> None:
    """A reject gate's PLC subscribes to the latest decision's record id and reads the decision
    when it changes; nothing a client writes changes the server's values."""
    from asyncua import Client, ua

    url = f"opc.tcp://127.0.0.1:{_free_port()}"
    server = OpcUaServer(url, ["edge"])
    server.start()

    async def subscribe() -> tuple[list[int], str, Exception | None]:
        seen: list[int] = []

        class Handler:
            def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
                seen.append(int(value))

        async with Client(url) as client:
            ns = await client.get_namespace_index(NAMESPACE)
            record_id = client.get_node(f"ns={ns};s=diffqc.Last.RecordId")
            sub = await client.create_subscription(20, Handler())
            await sub.subscribe_data_change(record_id)
            await asyncio.sleep(0.3)
            server.publish(_record(41, "REJECT"))
            for _ in range(100):
                if 41 in seen:
                    break
                await asyncio.sleep(0.05)
            decision = await client.get_node(f"ns={ns};s=diffqc.Last.Decision").read_value()
            refused = None
            try:
                await client.get_node(f"ns={ns};s=diffqc.Last.Decision").write_value(
                    ua.DataValue(ua.Variant("PASS", ua.VariantType.String)))
            except Exception as exc:  # the server's Bad status
                refused = exc
            decision_after = await client.get_node(f"ns={ns};s=diffqc.Last.Decision").read_value()
            assert decision_after == "REJECT"
            return seen, decision, refused

    try:
        seen, decision, refused = asyncio.run(subscribe())
    finally:
        server.stop()
    assert seen[0] == 0 and seen[-1] == 41 and decision == "REJECT"
    assert refused is not None and "BadUserAccessDenied" in repr(refused), repr(refused)


def test_the_endpoint_is_checked_before_anything_starts() -> None:
    with pytest.raises(ConfigError, match=r"must look like opc\.tcp://0\.0\.0\.0:4840"):
        check_opcua_url("http://plc:4840")
    with pytest.raises(ConfigError, match="has a bad port"):
        check_opcua_url("opc.tcp://0.0.0.0:99999")
    meant = {"4840": "opc.tcp://0.0.0.0:4840", "0.0.0.0:4841": "opc.tcp://0.0.0.0:4841",
             "tcp://plc:4840": "opc.tcp://plc:4840", "opcua://[::]:4840": "opc.tcp://[::]:4840"}
    for given, url in meant.items():  # the URL meant, as the MQTT and store URLs' refusals give it
        with pytest.raises(ConfigError, match=rf"must look like .*: {re.escape(url)}$"):
            check_opcua_url(given)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve OPC UA on 127.0.0.1:{port}: .*in use"):
            check_opcua_url(f"opc.tcp://127.0.0.1:{port}")


def test_serve_publishes_its_decisions_over_opc_ua(service_model: tuple[Path, Path], samples: Samples,
                                                   tmp_path: Path) -> None:
    """`serve --opcua`: a part posted over HTTP is read by an OPC UA client as the latest
    decision and its type's, with the record id and decision the HTTP answer gave."""
    import httpx

    url = f"opc.tcp://127.0.0.1:{_free_port()}"
    srv = bench.start_server(service_model[0], str(tmp_path / "r.db"), workdir=tmp_path, token=TOKEN,
                             extra=("--opcua", url))
    try:
        body, ftype = samples.all[0]
        answer = httpx.post(srv.url + "/v1/inspect", content=body, headers=AUTH,
                            params={"feature_type": ftype, "part_id": "plc-1"}, timeout=60).json()
        got: dict[str, Any] = {}
        paths = ["diffqc.Last.RecordId", "diffqc.Last.Decision", "diffqc.Last.PartId",
                 f"diffqc.Types.{ftype}.Inspected"]
        for _ in range(50):
            got = asyncio.run(_read(url, paths))
            if got["diffqc.Last.RecordId"] == answer["id"]:
                break
            time.sleep(0.1)
        line = httpx.get(srv.url + "/v1/line", headers=AUTH).json()["opcua"]
    finally:
        srv.stop()
    assert got == {"diffqc.Last.RecordId": answer["id"], "diffqc.Last.Decision": answer["decision"],
                   "diffqc.Last.PartId": "plc-1", f"diffqc.Types.{ftype}.Inspected": 1}
    assert line == {"endpoint": url, "namespace": NAMESPACE, "published_total": 1, "running": True,
                    "security": "none", "certificate_sha1": None, "trusted_clients": None}


def test_watch_publishes_its_decisions_over_opc_ua(service_model: tuple[Path, Path], samples: Samples,
                                                   tmp_path: Path) -> None:
    """A line without HTTP, a camera writing into a folder: `watch --opcua` serves the PLC as
    `serve --opcua` does (it had no such option); a port already taken is one error line."""
    import signal
    import subprocess
    import sys

    body, ftype = samples.all[0]
    camera = tmp_path / "camera"
    (camera / ftype).mkdir(parents=True)
    url = f"opc.tcp://127.0.0.1:{_free_port()}"
    cmd = [sys.executable, "-m", "diffqc.cli", "watch", str(camera), str(service_model[0]), "--db",
           str(tmp_path / "r.db"), "--settle", "0.2", "--poll", "0.1", "--part-id-pattern", r"P-\d+"]
    proc = subprocess.Popen([*cmd, "--opcua", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        paths = ["diffqc.Last.RecordId", "diffqc.Last.Decision", "diffqc.Part.PartId", "diffqc.Part.Images"]
        got: dict[str, Any] = {}
        for _ in range(300):  # the model loads, then the server listens
            try:
                got = asyncio.run(_read(url, paths))
                break
            except (OSError, TimeoutError):
                time.sleep(0.2)
        assert got, "the OPC UA server did not start"
        (camera / ftype / f"P-0042_{ftype}.png").write_bytes(body)
        for _ in range(100):
            got = asyncio.run(_read(url, paths))
            if got["diffqc.Last.RecordId"]:
                break
            time.sleep(0.1)
        taken = subprocess.run([*cmd, "--opcua", url, "--once"], capture_output=True, text=True, timeout=120)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert got["diffqc.Last.RecordId"] == 1 and got["diffqc.Last.Decision"] in ("PASS", "REVIEW", "REJECT")
    assert (got["diffqc.Part.PartId"], got["diffqc.Part.Images"]) == ("P-0042", 1)
    assert taken.returncode == 1 and "Traceback" not in taken.stderr, taken.stderr
    last = taken.stderr.strip().splitlines()[-1]
    assert last.startswith("diffqc: error: cannot serve OPC UA on 127.0.0.1:"), last
    assert "already in use" in last, last


def test_a_drift_alarm_raised_before_a_restart_is_raised_over_opc_ua(tmp_path: Path) -> None:
    """The drift alarm a previous process left raised (kept in the store) is raised on the OPC
    UA server of the restarted service too, not shown clear until parts clear it."""
    import json
    from types import SimpleNamespace

    from diffqc.service.line import ALARM_KEY, LineServices
    from diffqc.service.store import ResultStore

    url = f"opc.tcp://127.0.0.1:{_free_port()}"
    with ResultStore(str(tmp_path / "r.db")) as store:
        store.set_meta(ALARM_KEY + json.dumps(["edge", None]),
                       json.dumps({"feature_type": "edge", "camera": None, "since": 1_796_000_000.0}))
        line = LineServices(SimpleNamespace(opcua_url=url), store, None,
                            SimpleNamespace(classes_=["edge", "dots"]))
        line.start()
        try:
            got: dict[str, Any] = {}
            alarms = ["diffqc.Types.edge.DriftAlarm", "diffqc.Types.dots.DriftAlarm"]
            for _ in range(50):
                got = asyncio.run(_read(url, alarms))
                if got["diffqc.Types.edge.DriftAlarm"]:
                    break
                time.sleep(0.05)
        finally:
            line.stop()
    assert got == {"diffqc.Types.edge.DriftAlarm": True, "diffqc.Types.dots.DriftAlarm": False}


def test_a_retrained_model_is_named_and_its_types_served() -> None:
    """A retrained model served without a restart: its version is written; with other types
    the address space is made again (clients reconnect) and has the new type's nodes."""
    url = f"opc.tcp://127.0.0.1:{_free_port()}"
    server = OpcUaServer(url, ["edge"], model_version="m-1")
    server.start()
    try:
        same = server.use_model(["edge"], "m-2")
        assert same is server
        for _ in range(50):
            got = asyncio.run(_read(url, ["diffqc.ModelVersion"]))
            if got["diffqc.ModelVersion"] == "m-2":
                break
            time.sleep(0.05)
        assert got == {"diffqc.ModelVersion": "m-2"}
        first = server
        server = server.use_model(["edge", "dots"], "m-3")
        assert not first.status()["running"] and server.status()["running"]  # the first one stopped
        server.publish(_record(7, "REVIEW", ftype="dots"))
        paths = ["diffqc.ModelVersion", "diffqc.TypeNames", "diffqc.Types.dots.Review"]
        for _ in range(50):
            got = asyncio.run(_read(url, paths))
            if got["diffqc.Types.dots.Review"] == 1:
                break
            time.sleep(0.05)
    finally:
        server.stop()
    assert got == {"diffqc.ModelVersion": "m-3", "diffqc.TypeNames": ["edge", "dots"],
                   "diffqc.Types.dots.Review": 1}


def test_no_client_can_change_what_a_plc_reads() -> None:
    """asyncua's default user manager gives a session that logs in as "admin", with any
    password, the administrator's role: such a client wrote PASS into the latest decision a
    reject gate's PLC reads, and added nodes. A user name login is refused; an anonymous
    session can neither write nor add nodes."""
    from asyncua import Client, ua

    url = f"opc.tcp://127.0.0.1:{_free_port()}"
    server = OpcUaServer(url, ["edge"])
    server.start()

    async def attempts() -> dict[str, str]:
        out: dict[str, str] = {}
        admin = Client(url)
        admin.set_user("admin")
        admin.set_password("anything")
        try:
            async with admin:
                out["admin"] = "connected"
        except Exception as exc:
            out["admin"] = type(exc).__name__
        async with Client(url) as client:
            ns = await client.get_namespace_index(NAMESPACE)
            decision = client.get_node(f"ns={ns};s=diffqc.Last.Decision")
            passed = ua.DataValue(ua.Variant("PASS", ua.VariantType.String))
            try:
                await decision.write_value(passed)
                out["write"] = "done"
            except Exception as exc:
                out["write"] = type(exc).__name__
            try:
                await client.nodes.objects.add_object(ns, "evil")
                out["add"] = "done"
            except Exception as exc:
                out["add"] = type(exc).__name__
            out["value"] = await decision.read_value()
        return out

    try:
        server.publish(_record(1, "REJECT"))
        time.sleep(0.3)
        got = asyncio.run(attempts())
    finally:
        server.stop()
    assert got["admin"] == "BadIdentityTokenRejected" and got["value"] == "REJECT"
    assert got["write"] == "BadUserAccessDenied" and got["add"] == "BadUserAccessDenied", got


def test_with_users_a_client_logs_in_over_an_encrypted_channel(tmp_path: Path) -> None:
    """A plant whose network policy wants OPC UA clients authenticated and the traffic
    encrypted: with users, a session logs in with a name and password over Basic256Sha256
    (sign and encrypt), the server's certificate made once in its folder (key readable by the
    service's user only) and kept across restarts; an anonymous or unencrypted client, and a
    wrong password, are refused."""
    import hashlib
    import stat

    from asyncua import Client
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from diffqc.service.opcua import read_users

    (tmp_path / "users").write_text("# the line's PLC\nplc:s3cret\n\nscada:other\n")
    users = read_users(tmp_path / "users")
    assert users == {"plc": "s3cret", "scada": "other"}
    url = f"opc.tcp://127.0.0.1:{_free_port()}"
    folder = tmp_path / "data" / "opcua"

    async def sessions() -> dict[str, Any]:
        key, cert = tmp_path / "plc-key.pem", tmp_path / "plc-cert.der"
        await setup_self_signed_certificate(key, cert, "urn:line:plc", "plc",
                                            [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": "plc"})
        out: dict[str, Any] = {}
        for name, password in (("good", "s3cret"), ("wrong", "guess"), ("anonymous", None)):
            client = Client(url)
            if password is not None:
                client.application_uri = "urn:line:plc"
                await client.set_security_string(f"Basic256Sha256,SignAndEncrypt,{cert},{key}")
                client.set_user("plc")
                client.set_password(password)
            try:
                async with client:
                    ns = await client.get_namespace_index(NAMESPACE)
                    out[name] = await client.get_node(f"ns={ns};s=diffqc.Last.Decision").read_value()
                    if name == "good":  # a user may call GetPart (it only reads)
                        root = client.get_node(f"ns={ns};s=diffqc")
                        out["get"] = await root.call_method(f"{ns}:GetPart", "p3")
            except Exception as exc:
                out[name] = type(exc).__name__
        return out

    from diffqc.service.store import ResultStore

    store = ResultStore(str(tmp_path / "r.db"))
    store.insert(_record(3, "REJECT"))
    thumbprints = []
    for _ in range(2):  # a restart keeps the certificate a client's administrator trusted
        server = OpcUaServer(url, ["edge"], users=users, certificate_dir=folder, store=store)
        server.start()
        try:
            server.publish(_record(3, "REJECT"))
            time.sleep(0.3)
            got = asyncio.run(sessions())
            status = server.status()
        finally:
            server.stop()
        assert got["good"] == "REJECT" and got["get"][:2] == ["REJECT", 1], got
        assert got["wrong"] == "BadUserAccessDenied" and got["anonymous"] not in ("REJECT", ""), got
        assert status["security"] == "sign_and_encrypt"
        thumbprints.append(status["certificate_sha1"])
    store.close()
    cert = folder / "server-cert.der"
    assert thumbprints[0] == thumbprints[1] == hashlib.sha1(cert.read_bytes()).hexdigest()
    assert stat.S_IMODE((folder / "server-key.pem").stat().st_mode) == 0o600


def test_users_file_is_checked_without_showing_it(tmp_path: Path) -> None:
    from diffqc.service.app import ServiceSettings
    from diffqc.service.opcua import read_users

    (tmp_path / "users").write_text("plc:secret\nno-colon-here\n")
    with pytest.raises(ConfigError) as info:
        read_users(tmp_path / "users")
    assert str(info.value) == f"line 2 of --opcua-users {tmp_path / 'users'} is not name:password"
    (tmp_path / "empty").write_text("# nobody yet\n")
    with pytest.raises(ConfigError, match="holds no name:password line"):
        read_users(tmp_path / "empty")
    with pytest.raises(ConfigError, match="--opcua-users needs --opcua"):
        ServiceSettings(allow_no_token=True, opcua_users=tmp_path / "users").validate()


async def _client_certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A client's self-signed application instance certificate (DER) and key, as a PLC has."""
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key, cert = folder / f"{name}-key.pem", folder / f"{name}-cert.der"
    await setup_self_signed_certificate(key, cert, f"urn:line:{name}", name,
                                        [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": name})
    return cert, key


def test_trust_list_holds_certificates_and_names_each_refused_one(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """``--opcua-trust DIR``: a client's certificate is trusted when DIR holds it (DER or PEM,
    read again when DIR changes); a refused one is written once to the rejected folder, named
    in the log once, for an administrator to move into DIR; an expired one is refused; a file
    that is no certificate is skipped and named."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from diffqc.service.opcua import TrustList

    keys = tmp_path / "keys"
    keys.mkdir()
    plc, _ = asyncio.run(_client_certificate(keys, "plc"))
    scada, _ = asyncio.run(_client_certificate(keys, "scada"))
    trust, rejected = tmp_path / "trusted", tmp_path / "data" / "opcua" / "rejected"
    trust.mkdir()
    (trust / "plc.der").write_bytes(plc.read_bytes())
    (trust / "notes.txt").write_text("the line's PLC and SCADA")  # not a certificate file's name
    (trust / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    trusted = TrustList(trust, rejected)
    assert trusted.count() == 1
    assert "junk.pem" in caplog.text and "notes.txt" not in caplog.text
    assert trusted.check(plc.read_bytes())
    assert not trusted.check(scada.read_bytes()) and not trusted.check(scada.read_bytes())
    thumb = hashlib.sha1(scada.read_bytes()).hexdigest()
    assert [p.name for p in rejected.iterdir()] == [f"{thumb}.der"]
    assert (rejected / f"{thumb}.der").read_bytes() == scada.read_bytes()
    assert caplog.text.count(f"refused the OPC UA client certificate CN=urn:line:scada (SHA-1 {thumb})") == 1
    assert f"move {rejected / (thumb + '.der')} into {trust}" in caplog.text
    assert not trusted.check(None) and not trusted.check(b"garbage")
    # the administrator trusts it (as PEM here): read again without a restart
    pem = x509.load_der_x509_certificate(scada.read_bytes()).public_bytes(Encoding.PEM)
    (trust / "scada.pem").write_bytes(pem)
    assert trusted.check(scada.read_bytes()) and trusted.count() == 2
    (trust / "plc.der").unlink()  # and no longer the PLC's
    assert not trusted.check(plc.read_bytes())
    # a certificate DIR holds that expired yesterday
    old = _expired_certificate()
    (trust / "old.der").write_bytes(old)
    assert not trusted.check(old)
    assert "it expired or is not yet valid" in caplog.text


def _expired_certificate() -> bytes:
    """A self-signed certificate (DER) valid from ten days ago until yesterday."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old-plc")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=10))
            .not_valid_after(now - dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(Encoding.DER)


def test_with_a_trust_list_only_its_clients_log_in(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A plant's security policy (IEC 62443) lets only known OPC UA clients in: with
    ``--opcua-trust DIR`` a client whose certificate DIR does not hold is refused with the right
    password (BadCertificateUntrusted), its certificate kept for an administrator, who moves it
    into DIR; it then logs in, the server not restarted."""
    from asyncua import Client

    from diffqc.service.opcua import read_users

    (tmp_path / "users").write_text("plc:s3cret\n")
    url = f"opc.tcp://127.0.0.1:{_free_port()}"
    trust, folder = tmp_path / "trusted", tmp_path / "data" / "opcua"
    trust.mkdir()
    keys = tmp_path / "keys"
    keys.mkdir()
    plc = asyncio.run(_client_certificate(keys, "plc"))
    intruder = asyncio.run(_client_certificate(keys, "laptop"))
    (trust / "plc.der").write_bytes(plc[0].read_bytes())

    async def login(cert: Path, key: Path, name: str) -> Any:
        client = Client(url)
        client.application_uri = f"urn:line:{name}"
        await client.set_security_string(f"Basic256Sha256,SignAndEncrypt,{cert},{key}")
        client.set_user("plc")
        client.set_password("s3cret")
        try:
            async with client:
                ns = await client.get_namespace_index(NAMESPACE)
                return await client.get_node(f"ns={ns};s=diffqc.Last.Decision").read_value()
        except Exception as exc:
            return type(exc).__name__

    server = OpcUaServer(url, ["edge"], users=read_users(tmp_path / "users"), certificate_dir=folder,
                         trust_dir=trust)
    caplog.set_level("INFO", logger="diffqc.service.opcua")
    server.start()
    try:
        server.publish(_record(3, "REJECT"))
        time.sleep(0.3)
        got = asyncio.run(login(*plc, "plc"))
        refused = asyncio.run(login(*intruder, "laptop"))
        (kept,) = (folder / "rejected").iterdir()
        kept.rename(trust / kept.name)  # the administrator trusts it
        later = asyncio.run(login(*intruder, "laptop"))
        status = server.status()
    finally:
        server.stop()
    assert (got, refused, later) == ("REJECT", "BadCertificateUntrusted", "REJECT")
    assert status["trusted_clients"] == 2
    assert "1 user, encrypted" in caplog.text and "the latest part's under diffqc/Part" in caplog.text
    assert f"only clients whose certificates {trust} holds (1 now), those refused kept in {folder}" \
        in caplog.text


def test_trust_list_needs_users_and_a_folder(tmp_path: Path) -> None:
    from diffqc.service.app import ServiceSettings

    (tmp_path / "users").write_text("plc:secret\n")
    url = "opc.tcp://127.0.0.1:4840"
    with pytest.raises(ConfigError, match="--opcua-trust needs --opcua-users"):
        ServiceSettings(allow_no_token=True, opcua_url=url, opcua_trust=tmp_path).validate()
    with pytest.raises(ConfigError, match=r"--opcua-trust .*nope is not a folder"):
        ServiceSettings(allow_no_token=True, opcua_url=url, opcua_users=tmp_path / "users",
                        opcua_trust=tmp_path / "nope").validate()


def test_get_part_and_the_latest_part_take_the_lines_part_window(tmp_path: Path) -> None:
    """``--part-window 0.5``: a part id whose crops are a second apart is two parts, in
    ``diffqc.GetPart`` (the store) as in ``diffqc.Part`` (the decisions as they come)."""
    from types import SimpleNamespace

    from asyncua import Client

    from diffqc.service.line import LineServices
    from diffqc.service.store import ResultStore

    url = f"opc.tcp://127.0.0.1:{_free_port()}"
    with ResultStore(str(tmp_path / "r.db")) as store:
        records = [store.insert(ResultRecord(created_at=1_796_000_000.0 + i, source="test", decision=d,
                                             feature_type=t, type_known=True, part_id="R-1"))
                   for i, (t, d) in enumerate([("edge", "REJECT"), ("dots", "PASS")])]
        line = LineServices(SimpleNamespace(opcua_url=url, part_window_s=0.5), store, None,
                            SimpleNamespace(classes_=["edge", "dots"]))
        line.start()

        async def read() -> tuple[Any, Any]:
            async with Client(url) as client:
                ns = await client.get_namespace_index(NAMESPACE)
                got = await client.get_node(f"ns={ns};s=diffqc").call_method(f"{ns}:GetPart", "R-1")
                return got, await client.get_node(f"ns={ns};s=diffqc.Part.Decision").read_value()

        try:
            for rec in records:
                line.on_record(rec, 0.0)
            for _ in range(50):
                if line.opcua.published_total == 2:
                    break
                time.sleep(0.05)
            got, latest = asyncio.run(read())
        finally:
            line.stop()
    assert got[:5] == ["PASS", 1, "dots=PASS", False, "edge"]  # the REJECT a second before: an earlier part
    assert latest == "PASS"


def test_get_part_called_with_wrong_arguments_answers_a_status_and_logs_no_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A PLC program's call set up wrongly (no argument, two, a part id the service never
    takes: a NUL byte, 201 characters) is answered the OPC UA status for it, not an
    ``BadUnexpectedError`` with a traceback in the service's log on every call, nor (a NUL byte
    on PostgreSQL) a store outage said and answered; a good call after them is answered."""
    from types import SimpleNamespace

    from asyncua import Client, ua

    from diffqc.service.line import LineServices
    from diffqc.service.store import ResultStore

    url = f"opc.tcp://127.0.0.1:{_free_port()}"
    calls: list[tuple[object, ...]] = [(), ("P-1", "P-2"), ("P\x001",), ("P" * 201,), ("P-1",)]
    with ResultStore(str(tmp_path / "r.db")) as store:
        store.insert(ResultRecord(created_at=1_796_000_000.0, source="test", decision="PASS",
                                  feature_type="edge", type_known=True, part_id="P-1"))
        line = LineServices(SimpleNamespace(opcua_url=url), store, None, SimpleNamespace(classes_=["edge"]))
        line.start()

        async def call_all() -> list[Any]:
            out: list[Any] = []
            async with Client(url) as client:
                ns = await client.get_namespace_index(NAMESPACE)
                root = client.get_node(f"ns={ns};s=diffqc")
                for args in calls:
                    try:
                        out.append(await root.call_method(f"{ns}:GetPart", *args))
                    except ua.UaStatusCodeError as exc:
                        out.append(type(exc).__name__)
            return out

        try:
            with caplog.at_level("DEBUG"):
                got = asyncio.run(call_all())
        finally:
            line.stop()
    assert got == ["BadArgumentsMissing", "BadTooManyArguments", "BadInvalidArgument", "BadInvalidArgument",
                   ["PASS", 1, "edge=PASS", True, "", 1]]
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert "result store" not in caplog.text


def test_each_value_carries_its_time_as_a_historian_logs_it() -> None:
    """A SCADA historian or a PLC's data log files a value under its SourceTimestamp: each
    decision's values carry the decision's time, every value the server's time of writing it
    (written without either, a client saw a null time, logged as 1601 or refused)."""
    from asyncua import Client

    url = f"opc.tcp://127.0.0.1:{_free_port()}"
    server = OpcUaServer(url, ["edge"])
    server.start()

    async def read() -> dict[str, Any]:
        async with Client(url) as client:
            ns = await client.get_namespace_index(NAMESPACE)
            return {p: await client.get_node(f"ns={ns};s=diffqc.{p}").read_data_value()
                    for p in ("Last.Decision", "Last.RecordId", "Types.edge.Inspected", "Part.Decision",
                              "ModelVersion")}

    try:
        before = time.time()
        server.publish(_record(7, "REJECT"))
        for _ in range(50):
            if server.published_total == 1:
                break
            time.sleep(0.05)
        values = asyncio.run(read())
    finally:
        server.stop()
    for path in ("Last.Decision", "Last.RecordId", "Types.edge.Inspected", "Part.Decision"):
        value = values[path]
        assert value.SourceTimestamp is not None, path
        assert value.SourceTimestamp.timestamp() == 1_796_000_007.0, path  # the decision's time
        assert value.ServerTimestamp is not None and value.ServerTimestamp.timestamp() >= before - 1, path
    assert values["Last.Decision"].Value.Value == "REJECT"
    assert values["ModelVersion"].SourceTimestamp is not None


def test_get_parts_arguments_are_named_and_type_names_is_an_array(tmp_path: Path) -> None:
    """An integrator's client shows a method's arguments by name (UaExpert's call dialog), and a
    PLC's OPC UA client interface imports them by name: GetPart's were unnamed. TypeNames is a
    one-dimensional array (ValueRank 1), as a client maps it to an array tag."""
    from asyncua import Client, ua

    from diffqc.service.store import ResultStore

    url = f"opc.tcp://127.0.0.1:{_free_port()}"
    with ResultStore(str(tmp_path / "r.db")) as store:
        server = OpcUaServer(url, ["edge", "dots"], store=store)
        server.start()

        async def read() -> tuple[list[Any], list[Any], int, list[int] | None]:
            async with Client(url) as client:
                ns = await client.get_namespace_index(NAMESPACE)
                method = client.get_node(f"ns={ns};s=diffqc.GetPart")
                inputs = await (await method.get_child("0:InputArguments")).read_value()
                outputs = await (await method.get_child("0:OutputArguments")).read_value()
                names = client.get_node(f"ns={ns};s=diffqc.TypeNames")
                return inputs, outputs, await names.read_value_rank(), await names.read_array_dimensions()

        try:
            inputs, outputs, rank, dims = asyncio.run(read())
        finally:
            server.stop()
    assert [a.Name for a in inputs] == ["PartId"]
    assert [a.Name for a in outputs] == ["Decision", "Images", "Types", "Complete", "Missing", "RecordId"]
    assert all(a.Description.Text for a in inputs + outputs)
    assert [a.DataType for a in outputs] == [ua.NodeId(i) for i in (
        ua.ObjectIds.String, ua.ObjectIds.UInt32, ua.ObjectIds.String, ua.ObjectIds.Boolean,
        ua.ObjectIds.String, ua.ObjectIds.Int64)]
    assert all(a.ValueRank == -1 for a in inputs + outputs)
    assert rank == 1 and dims == [0]


def test_the_server_names_itself_diffqc_and_its_version() -> None:
    """An integrator's client shows the server's BuildInfo, and a plant's asset inventory (an OT
    monitor reading OPC UA) files the software and its version from it: it said "FreeOpcUa
    Python Server" 1.0pre (asyncua's placeholder) and a client-and-server application."""
    from asyncua import Client, ua

    import diffqc

    url = f"opc.tcp://127.0.0.1:{_free_port()}"
    server = OpcUaServer(url, ["edge"])
    server.start()

    async def read() -> tuple[Any, list[Any]]:
        async with Client(url) as client:
            info = await client.get_node(ua.ObjectIds.Server_ServerStatus_BuildInfo).read_value()
            return info, await client.find_servers()

    try:
        info, servers = asyncio.run(read())
    finally:
        server.stop()
    assert (info.ProductName, info.ManufacturerName, info.SoftwareVersion, info.BuildNumber) == (
        "diffqc inspection service", "diffqc", diffqc.__version__, diffqc.__version__)
    assert info.ProductUri == "urn:diffqc" and info.BuildDate.timestamp() <= time.time()
    assert [(s.ProductUri, s.ApplicationType, s.ApplicationUri) for s in servers] == [
        ("urn:diffqc", ua.ApplicationType.Server, "urn:diffqc:server")]


def test_an_ipv6_endpoint_serves() -> None:
    """``--opcua opc.tcp://[::1]:4840`` (or ``[::]``, every address) passed the check at start and
    then failed to start: the endpoint was given to asyncua as ``opc.tcp://::1:4840``."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    port = _free_port()
    check_opcua_url(f"opc.tcp://[::1]:{port}")
    server = OpcUaServer(f"opc.tcp://[::1]:{port}", ["edge"], model_version="m-6")
    server.start()
    try:
        got = asyncio.run(_read(f"opc.tcp://[::1]:{port}", ["diffqc.ModelVersion"]))
    finally:
        server.stop()
    assert got == {"diffqc.ModelVersion": "m-6"}
