"""How many messages a second the webhook sink delivers to an endpoint some milliseconds away.

Until the sink kept its connection, each push opened one of its own: a TCP handshake (one round
trip), for ``https://`` a TLS handshake (one more with TLS 1.3), then the request and its answer.
This fills a SQLite outbox with ``--messages`` decisions and times the delivery thread
(``Dispatcher``) draining it to a local HTTP/1.1 endpoint (HTTPS with a throw-away CA's
certificate) through a TCP proxy that delays each direction by half of each ``--rtt-ms`` and a
new connection by a round trip, beside the same sink with its connection closed after each push
(the sink's way before) and with four kept connections at once (``--webhook-connections 4``) in
the same run: median messages a second of ``--repeat`` runs each.

    python benchmarks/webhook_throughput.py [--rtt-ms 0,50,100] [--messages 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import ssl
import statistics
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from mqtt_throughput import _delay_proxy, _drain_rate  # a sibling script: run as python benchmarks/...

from diffqc.service.sinks import Message, WebhookSink


class _Endpoint(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keeps a connection, as nginx, uvicorn and IIS do

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _endpoint(context: ssl.SSLContext | None) -> int:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    server.daemon_threads = True
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return int(server.server_address[1])


class _ConnectionEachPush(WebhookSink):
    """The sink with its connection closed after each push: a connection (and TLS handshake) per
    push, the sink's way before it kept one."""

    def send(self, message: Message) -> None:
        try:
            super().send(message)
        finally:
            self.stop()


def _four_connections(url: str) -> WebhookSink:
    return WebhookSink(url, connections=4)


def main(argv: list[str] | None = None) -> int:
    import trustme

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtt-ms", default="0,50,100", help="round trips to the endpoint, comma-separated")
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    ca = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    print(f"{args.messages} decisions, median of {args.repeat} runs, messages a second")
    print(f"{'endpoint':>9} {'round trip':>12} {'a connection each':>18} {'one kept':>9} {'4 kept':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        ca.cert_pem.write_to_path(os.path.join(tmp, "ca.pem"))
        os.environ["SSL_CERT_FILE"] = os.path.join(tmp, "ca.pem")  # the sink trusts the throw-away CA
        for scheme, port in (("http", _endpoint(None)), ("https", _endpoint(context))):
            for rtt in (float(x) for x in args.rtt_ms.split(",")):
                via = port if rtt == 0 else _delay_proxy(("127.0.0.1", port), rtt / 2000, handshake=True)
                url = f"{scheme}://127.0.0.1:{via}/hook"
                each, kept, four = ([_drain_rate(make(url), args.messages, Path(tmp))
                                     for _ in range(args.repeat)]
                                    for make in (_ConnectionEachPush, WebhookSink, _four_connections))
                print(f"{scheme:>9} {rtt:>9.0f} ms {statistics.median(each):>18.1f} "
                      f"{statistics.median(kept):>9.1f} {statistics.median(four):>7.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
