"""The line's decisions as an OPC UA server (``serve --opcua opc.tcp://0.0.0.0:4840``).

PLCs and SCADA systems read a machine's state over OPC UA (IEC 62541), not HTTP: a reject gate's
PLC subscribes to the latest decision, an HMI shows each type's counts and drift alarm. The
service runs an OPC UA server (asyncua, ``pip install 'diffqc[opcua]'``) in a thread of its own,
fed after each decision is committed, so a slow client never delays inspection. Its address
space, in the namespace :data:`NAMESPACE`, with string node ids a PLC program can name
(``ns=2;s=diffqc.Last.Decision``)::

    Objects/diffqc                      ModelVersion, TypeNames (the types the model knows)
    Objects/diffqc/Last                 the latest decision of any type: RecordId, PartId,
                                        FeatureType, Decision, Score, PValue, Time, Line,
                                        Station, Camera
    Objects/diffqc/Types/<type>         the latest decision of that type (the same fields but
                                        FeatureType), Inspected, Pass, Review, Reject,
                                        NotInspected (counts since the server started: with
                                        the service, or a model with other types) and
                                        DriftAlarm
    Objects/diffqc/Part                 the verdict of the part of the latest decision with a
                                        part id (diffqc.service.parts): PartId, Decision,
                                        Images (its types counted so far), Types ("dots=PASS
                                        edge1=REVIEW"), Complete and Missing (the model's types,
                                        or --part-types', without an image yet), RecordId (the
                                        latest image's);
                                        from the images since the server started
    Objects/diffqc/GetPart(PartId)      a method: any stored part's verdict by its id (a reject
                                        gate's PLC asking for the part now at the gate, other
                                        parts inspected since): Decision, Images, Types,
                                        Complete, Missing, RecordId, as GET /v1/parts/{id}

Every variable is read-only; ``GetPart`` reads only. ``RecordId`` is written last, so a client
that triggers on its change reads the other fields of the same decision (unless the next one
came in between: a subscription's publish carries the values of one moment). By default the server offers no
encryption and takes anonymous clients, as it holds no image and takes no command: keep it on
the line's network. With users (``--opcua-users``) a client logs in over an encrypted channel;
with a trust list (``--opcua-trust``, :class:`TrustList`) only clients whose certificates it
holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import logging
import math
import os
import socket
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from diffqc import __version__
from diffqc.data import MAX_NAME_LEN, unprintable
from diffqc.errors import ConfigError
from diffqc.service.logs import Outage
from diffqc.service.parts import PART_WINDOW_S, PartVerdict, RecentParts, part_types, stored_part
from diffqc.service.security import read_secret_file, url_host
from diffqc.service.store import NOT_INSPECTED, ResultRecord, ResultStore, StoreError, split_url

log = logging.getLogger("diffqc.service.opcua")

# connections the server takes (asyncua's 1000, left idle, took the file descriptors of a service
# run under systemd's default 1024: the store and the model's files could not be opened); a line's
# PLC, SCADA and historian are a few. More are closed as they come.
MAX_CONNECTIONS = 64

NAMESPACE = "urn:diffqc"
APPLICATION_URI = "urn:diffqc:server"
PRODUCT_URI = "urn:diffqc"
SERVER_NAME = "diffqc inspection service"
DEFAULT_PORT = 4840  # IANA's port for OPC UA over TCP
# (browse name, OPC UA type) of a decision's variables; RecordId last: written last
DECISION_FIELDS = (("PartId", "String"), ("FeatureType", "String"), ("Decision", "String"),
                   ("Score", "Double"), ("PValue", "Double"), ("Time", "DateTime"), ("Line", "String"),
                   ("Station", "String"), ("Camera", "String"), ("RecordId", "Int64"))
# a part's verdict (diffqc.service.parts), RecordId last
PART_FIELDS = (("PartId", "String"), ("Decision", "String"), ("Images", "UInt32"), ("Types", "String"),
               ("Complete", "Boolean"), ("Missing", "String"), ("RecordId", "Int64"))
# what each of them means, GetPart's arguments' descriptions (a client's call dialog shows them)
PART_FIELD_TEXT = {
    "PartId": "the part's id, as its images were sent with",
    "Decision": "the part's verdict: the worst of its types' latest decisions (\"\" for a part never stored)",
    "Images": "its images counted, one per type",
    "Types": "each counted type's decision, such as \"dots=PASS edge1=REVIEW\"",
    "Complete": "every type the line's parts have has an image",
    "Missing": "the types without an image yet, separated by spaces",
    "RecordId": "the id of its latest image's record",
}
COUNTS = (("Inspected", None), ("Pass", "PASS"), ("Review", "REVIEW"), ("Reject", "REJECT"),
          ("NotInspected", NOT_INSPECTED))


_OTHER_SCHEMES = ("tcp", "opcua", "opc-tcp", "opc_tcp")  # what a user may write for opc.tcp://


def _opcua_url_meant(url: str) -> str:
    """The endpoint a refused one likely meant: a bare port (``4840``) as every address's, a bare
    ``host:port`` as ``opc.tcp://host:port``, ``tcp://``/``opcua://`` as ``opc.tcp://``; else ``""``."""
    scheme, sep, rest = url.strip().partition("://")
    if sep and scheme.lower() in _OTHER_SCHEMES and rest:
        return f": an OPC UA endpoint's scheme is opc.tcp://: opc.tcp://{rest}"
    if url.isdigit():
        return f": a port alone is every address's: opc.tcp://0.0.0.0:{url}"
    if not sep and url and "/" not in url and not any(c.isspace() for c in url):
        return f": write it as a URL: opc.tcp://{url}"
    return ""


def parse_opcua_url(url: str) -> tuple[str, int]:
    """``opc.tcp://HOST[:PORT][/path]``: the address and port the server listens on (the port
    4840 by default); anything else is a :class:`ConfigError`."""
    parts = split_url(url, "OPC UA endpoint")
    if parts.scheme != "opc.tcp" or not parts.hostname:
        raise ConfigError(f"OPC UA endpoint {url!r} must look like opc.tcp://0.0.0.0:4840 (the address "
                          f"and port this service listens on){_opcua_url_meant(url)}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"OPC UA endpoint {url!r} has a bad port") from None
    return parts.hostname, port if port is not None else DEFAULT_PORT


def check_opcua_url(url: str) -> None:
    """The endpoint as given, before the model loads: its form, asyncua installed, and its port
    free (a second service, or another OPC UA server, on it is one line, not a failed start)."""
    host, port = parse_opcua_url(url)
    _asyncua()
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:  # UnicodeError: a name IDNA refuses (192.168..10)
        raise ConfigError(f"cannot serve OPC UA on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") \
            from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot serve OPC UA on {host}:{port}: {exc.strerror or exc} (is another "
                              "OPC UA server, or diffqc serve, on that port?)") from None


def check_opcua_options(url: str | None, users: str | Path | None,
                        trust: str | Path | None = None) -> None:
    """``--opcua``, ``--opcua-users`` and ``--opcua-trust`` as given to `serve` or `watch`, before
    the model loads: users need an endpoint, the endpoint :func:`check_opcua_url`, the users file
    :func:`read_users`; a trust list needs users (only the encrypted channel they log in over
    carries a client's certificate) and a folder."""
    if users is not None and not url:
        raise ConfigError("--opcua-users needs --opcua opc.tcp://HOST:PORT (the server they log in to)")
    if trust is not None and users is None:
        raise ConfigError("--opcua-trust needs --opcua-users: a client's certificate comes with the "
                          "encrypted channel its users log in over")
    if url:
        check_opcua_url(url)
        if users is not None:
            read_users(users)
    if trust is not None and not Path(trust).is_dir():
        raise ConfigError(f"--opcua-trust {trust} is not a folder (of the trusted clients' certificates)")


CERTIFICATE_SUFFIXES = (".der", ".cer", ".crt", ".pem")
REJECTED_KEPT = 64  # refused clients' certificates kept for an administrator, at most


class TrustList:
    """``--opcua-trust DIR``: the OPC UA clients a server with users lets in, by their
    application instance certificates (self-signed, as PLCs and SCADA make them) held in DIR as
    DER or PEM files (``.der``, ``.cer``, ``.crt``, ``.pem``). A certificate is trusted when DIR
    holds that very certificate (not one signed by a CA in DIR) and it is within its validity
    period. DIR is read again when its files change, so a certificate moved in (or out) counts
    from the next login without a restart. A refused client's certificate is written once to
    ``rejected`` as ``<SHA-1 thumbprint>.der`` (at most :data:`REJECTED_KEPT` files) and named in
    the log once per process: an administrator who checks its thumbprint moves it into DIR, as
    OPC UA's trust lists are kept (a "rejected" folder beside the "trusted")."""

    def __init__(self, folder: Path, rejected: Path) -> None:
        self.folder = Path(folder)
        self.rejected = Path(rejected)
        self._listing: tuple[tuple[str, int, int], ...] | None = None
        self._trusted: set[bytes] = set()
        self._named: set[str] = set()  # files that are no certificate, and refused thumbprints, logged
        self._lock = threading.Lock()

    def _files(self) -> tuple[tuple[str, int, int], ...]:
        out = []
        with contextlib.suppress(OSError), os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name.lower().endswith(CERTIFICATE_SUFFIXES) and not entry.name.startswith("."):
                    with contextlib.suppress(OSError):
                        st = entry.stat()
                        out.append((entry.name, st.st_mtime_ns, st.st_size))
        return tuple(sorted(out))

    def _reload(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        listing = self._files()
        if listing == self._listing:
            return
        trusted: set[bytes] = set()
        for name, _, _ in listing:
            try:
                data = (self.folder / name).read_bytes()
                certs = (x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data
                         else [x509.load_der_x509_certificate(data)])
            except (OSError, ValueError) as exc:
                if name not in self._named:
                    self._named.add(name)
                    log.warning("--opcua-trust %s: %s is not a certificate, skipped (%s)", self.folder, name,
                                " ".join(str(exc).split()) or type(exc).__name__)
                continue
            trusted.update(hashlib.sha256(c.public_bytes(Encoding.DER)).digest() for c in certs)
        self._listing, self._trusted = listing, trusted

    def count(self) -> int:
        """The certificates DIR holds now."""
        with self._lock:
            self._reload()
            return len(self._trusted)

    def check(self, der: bytes | None) -> bool:
        """True when the client's certificate (DER, from its channel) is trusted."""
        from cryptography import x509

        if not der:
            return False
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return False
        with self._lock:
            self._reload()
            known = hashlib.sha256(der).digest() in self._trusted
        now = dt.datetime.now(dt.UTC)
        if known and cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return True
        self._refused(der, cert, "it expired or is not yet valid" if known else "")
        return False

    def _refused(self, der: bytes, cert: Any, why: str) -> None:
        from cryptography.x509.oid import NameOID

        thumb = hashlib.sha1(der).hexdigest()  # OPC UA's thumbprint is SHA-1
        kept = self.rejected / f"{thumb}.der"
        with self._lock:
            if thumb in self._named:
                return
            self._named.add(thumb)
        with contextlib.suppress(OSError):
            self.rejected.mkdir(parents=True, exist_ok=True)
            if not kept.exists() and sum(1 for _ in self.rejected.iterdir()) < REJECTED_KEPT:
                tmp = kept.with_name(f".{kept.name}.tmp")
                tmp.write_bytes(der)
                os.replace(tmp, kept)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        name = str(names[0].value) if names else "(no common name)"
        hint = (why if why else
                f"not in --opcua-trust {self.folder}; to trust it, move {kept} into {self.folder}"
                if kept.exists() else f"not in --opcua-trust {self.folder}")
        log.warning("refused the OPC UA client certificate CN=%s (SHA-1 %s): %s", name, thumb, hint)


def _asyncua() -> Any:
    try:
        import asyncua
    except ImportError as exc:  # depends on the install
        raise ConfigError("OPC UA needs asyncua: pip install 'diffqc[opcua]'") from exc
    return asyncua


def _value(rec: ResultRecord, name: str) -> Any:
    """A decision's variable's value: a missing text is "", a missing number NaN."""
    if name == "Time":
        return dt.datetime.fromtimestamp(rec.created_at, dt.UTC)
    if name == "RecordId":
        return int(rec.id or 0)
    if name in ("Score", "PValue"):
        value = rec.score if name == "Score" else rec.p_value
        return float(value) if value is not None and math.isfinite(value) else math.nan
    attr = {"PartId": "part_id", "FeatureType": "feature_type", "Decision": "decision", "Line": "line",
            "Station": "station", "Camera": "camera"}[name]
    return str(getattr(rec, attr) or "")


def _part_value(verdict: PartVerdict, name: str) -> Any:
    """A part's variable's value (:data:`PART_FIELDS`)."""
    if name == "RecordId":
        return int(verdict.counted[-1].id or 0) if verdict.counted else 0
    if name == "Images":
        return len(verdict.counted)
    if name == "Types":
        return " ".join(f"{t}={d}" for t, d in verdict.types.items())
    if name == "Complete":
        return bool(verdict.complete)
    if name == "Missing":
        return " ".join(verdict.missing or ())
    return verdict.part_id if name == "PartId" else verdict.decision


def _installed_at() -> dt.datetime:
    """The BuildInfo's BuildDate: when this diffqc was installed (its package's files written),
    the nearest to a build time an installed package knows."""
    return dt.datetime.fromtimestamp(Path(__file__).stat().st_mtime, dt.UTC)


def _argument(ua: Any, name: str, vtype: str, description: str) -> Any:
    """A method's argument as a client shows and imports it: named, described, a scalar."""
    arg = ua.Argument()
    arg.Name = name
    arg.DataType = ua.NodeId(getattr(ua.ObjectIds, vtype))
    arg.ValueRank = -1
    arg.Description = ua.LocalizedText(description)
    return arg


class _Readers:
    """asyncua's user manager for this server: every session it lets in is a plain user (it
    reads, browses and subscribes; writes and node management are refused). Without ``users``
    only anonymous sessions; with them, only a user name and its password (compared in constant
    time). asyncua's default gives a session logged in as "admin", with any password, the
    administrator's role: it could write PASS into a decision a PLC reads."""

    def __init__(self, users: dict[str, str] | None, trust: TrustList | None = None) -> None:
        self.users = users
        self.trust = trust

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> Any:
        """``certificate``: the client's, from the encrypted channel it opened (asyncua passes the
        channel's peer certificate for a user name login), checked against the trust list first."""
        from asyncua import ua
        from asyncua.common.utils import ServiceError
        from asyncua.crypto.permission_rules import User, UserRole

        if self.trust is not None and not self.trust.check(certificate):
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)
        if self.users is None:
            return User(role=UserRole.User) if username is None else None
        known = self.users.get(username or "")
        if known is None or not hmac.compare_digest(known.encode(), (password or "").encode()):
            return None
        return User(role=UserRole.User, name=username)


def read_users(path: str | Path) -> dict[str, str]:
    """``--opcua-users FILE``: a ``name:password`` a line (a Docker secret; blank lines and
    lines starting with ``#`` skipped). A malformed line is a :class:`ConfigError` naming its
    number, never its text."""
    users: dict[str, str] = {}
    text = read_secret_file(path, f"--opcua-users {path}")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, colon, password = line.strip().partition(":")
        if not colon or not name or not password:
            raise ConfigError(f"line {n} of --opcua-users {path} is not name:password")
        users[name] = password
    if not users:
        raise ConfigError(f"--opcua-users {path} holds no name:password line")
    return users


class OpcUaServer:
    """The OPC UA server of one service: :meth:`start`, then :meth:`publish` each committed
    decision and :meth:`alarm` each drift alarm (from any thread), :meth:`stop`."""

    def __init__(self, url: str, types: list[str], *, model_version: str = "",
                 users: dict[str, str] | None = None, certificate_dir: Path | None = None,
                 trust_dir: Path | None = None, chosen_part_types: tuple[str, ...] = (),
                 store: ResultStore | None = None, part_window_s: float = PART_WINDOW_S) -> None:
        """``chosen_part_types``: those a part of this line has, when fewer than ``types``
        (:func:`~diffqc.service.parts.part_types`); ``part_window_s``: as
        :func:`~diffqc.service.parts.part_verdict`'s ``window_s``. ``store``: the result store, whose parts
        ``diffqc.GetPart`` judges (:meth:`_get_part`). ``users``: name -> password; with them a
        session must log in, over an encrypted channel, with the server's own certificate, kept
        in ``certificate_dir`` (made there, self-signed, on the first start:
        :meth:`_certificate`). ``trust_dir``: with users, only clients whose certificates it
        holds (:class:`TrustList`; those refused are kept in ``certificate_dir/rejected``)."""
        if users is not None and certificate_dir is None:
            raise ConfigError("OPC UA users need a folder for the server's certificate")
        if trust_dir is not None and users is None:
            raise ConfigError("an OPC UA trust list needs users (their encrypted channel)")
        self.users = users
        self.certificate_dir = certificate_dir
        self.trust_dir = trust_dir
        self._trust = (TrustList(trust_dir, certificate_dir / "rejected")
                       if trust_dir is not None and certificate_dir is not None else None)
        self.thumbprint: str | None = None
        self.url = url
        self.host, self.port = parse_opcua_url(url)
        self.types = list(types)
        self.model_version = model_version
        self.published_total = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[str, Any]] | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._counts: Counter[tuple[str, str]] = Counter()
        self._version_node: Any = None
        self.chosen_part_types = chosen_part_types
        self.store = store
        # GetPart could not read the store: said once, and once when it can
        self._store_outage = Outage(
            log, "OPC UA GetPart cannot read the result store",
            "OPC UA GetPart reads the result store again; calls refused meanwhile: %d, over %.0f s",
            level=logging.WARNING)
        self._parts = RecentParts(types=part_types(self.types, chosen_part_types), window_s=part_window_s)
        self._part_nodes: dict[str, Any] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30.0) -> None:
        """Listen on the endpoint; returns once clients can connect (or raises why not)."""
        self._thread = threading.Thread(target=self._run, name="diffqc-opcua", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise ConfigError(f"the OPC UA server on {self.url} did not start within {timeout:.0f} s")
        if self._error is not None:
            raise ConfigError(f"cannot serve OPC UA on {self.url}: {self._error}") from self._error
        log.info("OPC UA server on %s (namespace %s): the latest decision under diffqc/Last, each "
                 "type's under diffqc/Types, the latest part's under diffqc/Part; %s", self.url, NAMESPACE,
                 self._security_text())

    def _security_text(self) -> str:
        """Who may read, as the start's log line says it."""
        if self.users is None:
            return "anonymous readers, unencrypted"
        n = len(self.users)
        text = (f"{n} user{'s' if n != 1 else ''}, encrypted (Basic256Sha256 and newer, sign and "
                f"encrypt), its certificate {self.certificate_dir}/server-cert.der, SHA-1 thumbprint "
                f"{self.thumbprint}")
        if self._trust is None:
            return text
        return (f"{text}; only clients whose certificates {self.trust_dir} holds ({self._trust.count()} "
                f"now), those refused kept in {self._trust.rejected}")

    def stop(self) -> None:
        self._put("stop", None)  # nothing to do when its loop already ended (a failed server)
        if self._thread is not None:
            self._thread.join(10)

    def publish(self, rec: ResultRecord) -> None:
        """A committed decision (thread-safe; never blocks the caller)."""
        self._put("record", rec)

    def alarm(self, feature_type: str, alarm: bool) -> None:
        """A type's drift alarm raised (True) or cleared."""
        self._put("alarm", (feature_type, alarm))

    def use_model(self, types: list[str], model_version: str) -> OpcUaServer:
        """A retrained model is served: its version written; with other types the address space
        is made again (the server restarts: clients reconnect). Returns the server now serving."""
        if types == self.types:
            self.model_version = model_version
            self._put("model", model_version)
            return self
        self.stop()
        server = OpcUaServer(self.url, types, model_version=model_version, users=self.users,
                             certificate_dir=self.certificate_dir, trust_dir=self.trust_dir,
                             chosen_part_types=self.chosen_part_types, store=self.store,
                             part_window_s=self._parts.window_s)
        server.start()
        return server

    def _put(self, kind: str, item: Any) -> None:
        loop, queue = self._loop, self._queue
        if loop is not None and queue is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # stopping: its loop is closed
                loop.call_soon_threadsafe(queue.put_nowait, (kind, item))

    def status(self) -> dict[str, Any]:
        return {"endpoint": self.url, "namespace": NAMESPACE, "published_total": self.published_total,
                "running": (self._started.is_set() and self._error is None and self._thread is not None
                            and self._thread.is_alive()),
                "security": "none" if self.users is None else "sign_and_encrypt",
                "certificate_sha1": self.thumbprint,
                "trusted_clients": None if self._trust is None else self._trust.count()}

    # ------------------------------------------------------------------ the server's thread
    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # a failed start: said by start(); later ones: logged
            if not self._started.is_set():
                self._error = exc
                self._started.set()
            else:
                log.exception("the OPC UA server stopped")
        finally:
            loop.close()

    async def _serve(self) -> None:
        asyncua = _asyncua()
        ua = asyncua.ua
        # its INFO lines are per request, and it warns of user certificates and passwords,
        # which an anonymous server without encryption takes none of
        logging.getLogger("asyncua").setLevel(logging.ERROR)
        server = asyncua.Server(user_manager=_Readers(self.users, self._trust))
        await server.init()
        server.iserver.max_connections = MAX_CONNECTIONS
        server.set_endpoint(f"opc.tcp://{url_host(self.host)}:{self.port}")
        server.set_server_name(SERVER_NAME)
        await server.set_application_uri(APPLICATION_URI)
        # who it is, as a client shows it and an asset inventory files it (asyncua's placeholder
        # said "FreeOpcUa Python Server" 1.0pre); a server, not a client too
        server.product_uri = PRODUCT_URI
        server.application_type = ua.ApplicationType.Server
        await server.set_build_info(PRODUCT_URI, "diffqc", SERVER_NAME, __version__, __version__,
                                    _installed_at())
        if self.users is None:  # anonymous readers, no user name login: there are no users
            server.set_identity_tokens([ua.AnonymousIdentityToken])
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        else:  # users: their passwords, and the decisions, cross the network encrypted
            await self._certificate(server)
            server.set_identity_tokens([ua.UserNameIdentityToken])
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                                        ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
                                        ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt])
        nodes = await self._address_space(server, ua, await server.register_namespace(NAMESPACE))
        self._queue = asyncio.Queue()
        async with server:
            self._started.set()
            while True:
                batch = [await self._queue.get()]
                while not self._queue.empty():  # a burst: counts for each, values of the latest
                    batch.append(self._queue.get_nowait())
                if await self._write(server, batch, nodes, ua):
                    return

    async def _certificate(self, server: Any) -> None:
        """The server's application instance certificate (DER) and key (PEM, readable by this
        user only) in ``certificate_dir``: made self-signed on the first start (and again when
        expired, a year on), for the application URI and this host; its SHA-1 thumbprint is
        logged, for a client's administrator to check when trusting it."""
        from asyncua.crypto.cert_gen import setup_self_signed_certificate
        from cryptography.x509.oid import ExtendedKeyUsageOID

        assert self.certificate_dir is not None
        folder = self.certificate_dir
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = folder / "server-cert.der", folder / "server-key.pem"
        uses = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        await setup_self_signed_certificate(key, cert, APPLICATION_URI, socket.gethostname(), uses,
                                            {"commonName": SERVER_NAME})
        os.chmod(key, 0o600)
        await server.load_certificate(str(cert))
        await server.load_private_key(str(key))
        self.thumbprint = hashlib.sha1(cert.read_bytes()).hexdigest()  # OPC UA's thumbprint is SHA-1

    async def _address_space(self, server: Any, ua: Any, idx: int) -> dict[str, dict[str, Any]]:
        """The module's nodes under Objects; the variables of the latest decision (key "") and
        of each type's, by browse name."""

        def node_id(path: str) -> Any:
            return ua.NodeId(path, idx)

        def name(text: str) -> Any:
            return ua.QualifiedName(text, idx)

        async def variable(parent: Any, path: str, bname: str, value: Any, vtype: str) -> Any:
            return await parent.add_variable(node_id(f"{path}.{bname}"), name(bname),
                                             ua.Variant(value, getattr(ua.VariantType, vtype)))

        empty = ResultRecord(created_at=0.0, source="", decision="")
        root = await server.nodes.objects.add_object(node_id("diffqc"), name("diffqc"))
        self._version_node = await variable(root, "diffqc", "ModelVersion", self.model_version, "String")
        names = await variable(root, "diffqc", "TypeNames", self.types, "String")
        await names.write_value_rank(1)  # one dimension of any length (asyncua says "one or more")
        await names.write_array_dimensions([0])
        last = await root.add_object(node_id("diffqc.Last"), name("Last"))
        nodes = {"": {n: await variable(last, "diffqc.Last", n, _value(empty, n), t)
                      for n, t in DECISION_FIELDS}}
        part = await root.add_object(node_id("diffqc.Part"), name("Part"))
        nobody = PartVerdict("", "", None, 0, {}, [], 0)
        self._part_nodes = {n: await variable(part, "diffqc.Part", n, _part_value(nobody, n), t)
                            for n, t in PART_FIELDS}
        if self.store is not None:  # a part's verdict by its id: PART_FIELDS but PartId, out
            arguments = [_argument(ua, n, t, PART_FIELD_TEXT[n]) for n, t in PART_FIELDS]
            await root.add_method(node_id("diffqc.GetPart"), name("GetPart"), self._get_part,
                                  arguments[:1], arguments[1:])
        folder = await root.add_folder(node_id("diffqc.Types"), name("Types"))
        for ftype in self.types:
            path = f"diffqc.Types.{ftype}"
            obj = await folder.add_object(node_id(path), name(ftype))
            nodes[ftype] = {n: await variable(obj, path, n, _value(empty, n), t)
                            for n, t in DECISION_FIELDS if n != "FeatureType"}
            for count, _ in COUNTS:
                nodes[ftype][count] = await variable(obj, path, count, 0, "UInt64")
            nodes[ftype]["DriftAlarm"] = await variable(obj, path, "DriftAlarm", False, "Boolean")
        return nodes

    def _get_part(self, parent: Any, *args: Any) -> Any:
        """``diffqc.GetPart(PartId)``, in asyncua's worker threads: the part's verdict from the
        store, as ``GET /v1/parts/{part_id}`` judges it: Decision, Images, Types, Complete,
        Missing, RecordId (``""`` and zeros for a part never stored); the store down is
        ``BadResourceUnavailable``. A call set up wrongly is answered its status (asyncua checks
        no argument): none or two arguments, ``BadArgumentsMissing`` or ``BadTooManyArguments``;
        not a string, or one no part id is (the API's rule: over :data:`MAX_NAME_LEN` characters,
        a control character; PostgreSQL refuses a NUL, read as the store down),
        ``BadInvalidArgument``."""
        from asyncua import ua

        if len(args) != 1:
            code = ua.StatusCodes.BadArgumentsMissing if not args else ua.StatusCodes.BadTooManyArguments
            return ua.StatusCode(ua.UInt32(code))
        pid = args[0].Value if isinstance(args[0], ua.Variant) else None
        if not isinstance(pid, str) or len(pid) > MAX_NAME_LEN or any(unprintable(c) for c in pid):
            return ua.StatusCode(ua.UInt32(ua.StatusCodes.BadInvalidArgument))
        assert self.store is not None
        try:  # judged as the latest part is: the line's types, its window
            found = (stored_part(self.store, pid, self._parts.types, window_s=self._parts.window_s)
                     if pid else None)
        except StoreError as exc:
            self._store_outage.failed(f"{exc} (answering BadResourceUnavailable until it can)")
            return ua.StatusCode(ua.UInt32(ua.StatusCodes.BadResourceUnavailable))
        self._store_outage.worked()
        verdict = found[0] if found is not None else PartVerdict(pid, "", None, 0, {}, [], 0)
        return [ua.Variant(_part_value(verdict, n), getattr(ua.VariantType, t))
                for n, t in PART_FIELDS if n != "PartId"]

    async def _write(self, server: Any, batch: list[tuple[str, Any]], nodes: dict[str, dict[str, Any]],
                     ua: Any) -> bool:
        """Write a batch's values; True when it asked to stop."""

        now = dt.datetime.now(dt.UTC)

        async def write(node: Any, value: Any, vtype: str, at: float | None = None) -> None:
            """The server's own path (5x a client's), which stamps no time: a value carries the
            time of the decision it comes from (``at``), else of its writing, as its
            SourceTimestamp, and the time of its writing as its ServerTimestamp (a historian files
            a value under them)."""
            variant = ua.Variant(value, getattr(ua.VariantType, vtype))
            source = now if at is None else dt.datetime.fromtimestamp(at, dt.UTC)
            await server.write_attribute_value(
                node.nodeid, ua.DataValue(variant, SourceTimestamp=source, ServerTimestamp=now))

        latest: dict[str, ResultRecord] = {}
        part: PartVerdict | None = None
        stop = False
        for kind, item in batch:
            if kind == "stop":
                stop = True
            elif kind == "model":
                await write(self._version_node, str(item), "String")
            elif kind == "alarm" and item[0] in nodes:
                await write(nodes[item[0]]["DriftAlarm"], bool(item[1]), "Boolean")
            elif kind == "record":
                rec: ResultRecord = item
                self.published_total += 1
                latest[""] = rec
                part = self._parts.add(rec) or part
                if rec.feature_type in nodes:
                    latest[rec.feature_type] = rec
                    self._counts[(rec.feature_type, "Inspected")] += 1
                    for count, decision in COUNTS[1:]:
                        self._counts[(rec.feature_type, count)] += int(rec.decision == decision)
        for key, rec in latest.items():
            for field, vtype in DECISION_FIELDS:  # RecordId last
                if field in nodes[key]:
                    await write(nodes[key][field], _value(rec, field), vtype, rec.created_at)
            if key:
                for count, _ in COUNTS:
                    await write(nodes[key][count], self._counts[(key, count)], "UInt64", rec.created_at)
        if part is not None:
            at = part.counted[-1].created_at if part.counted else None
            for field, vtype in PART_FIELDS:  # RecordId last
                await write(self._part_nodes[field], _part_value(part, field), vtype, at)
        return stop
