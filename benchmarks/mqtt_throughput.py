"""How many messages a second the MQTT sink delivers to a broker some milliseconds away.

The sink publishes with QoS 1 and counts a message delivered on the broker's acknowledgement.
Waiting for each one's acknowledgement before sending the next makes one message per round
trip; sending a window of them (up to the broker's Receive Maximum, less one) and waiting as
they come back does not. This fills a SQLite outbox with ``--messages`` decisions and times the
delivery thread (``Dispatcher``) draining it through a TCP proxy that delays each direction by
half of each ``--rtt-ms``, beside the same drained one message at a time (the delivery thread's
path for a sink without ``send_many``, the MQTT sink's before) in the same run: median messages
a second of ``--repeat`` runs each.

Needs a broker: ``export DIFFQC_TEST_MQTT_URL=$(scripts/start_mosquitto.sh)``.

    python benchmarks/mqtt_throughput.py [--rtt-ms 0,50,100] [--messages 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from diffqc.service.sinks import Dispatcher, MqttSink, Outbox, parse_mqtt_url
from diffqc.service.store import ResultRecord, ResultStore


def _delay_proxy(target: tuple[str, int], one_way_s: float, *, handshake: bool = False) -> int:
    """A TCP proxy on loopback that holds every chunk ``one_way_s`` in each direction (in order);
    returns its port. Runs in a daemon thread for the rest of the process. ``handshake``: a new
    connection's bytes pass only a round trip after it is made, as TCP's handshake costs one (a
    connection to the proxy itself is made at once, on loopback)."""
    ready: list[int] = []
    started = threading.Event()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            while True:
                data = await reader.read(65536)
                await queue.put((loop.time() + one_way_s, data))
                if not data:
                    return

        async def write() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        await asyncio.gather(read(), write())

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if handshake:
            await asyncio.sleep(2 * one_way_s)
        broker_r, broker_w = await asyncio.open_connection(*target)
        await asyncio.gather(pipe(client_r, broker_w), pipe(broker_r, client_w), return_exceptions=True)

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ready.append(server.sockets[0].getsockname()[1])
        started.set()
        async with server:
            await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    started.wait(10)
    return ready[0]


def _records(n: int) -> list[ResultRecord]:
    now = time.time()
    return [ResultRecord(created_at=now, source="bench", decision="PASS", part_id=f"p{i}",
                         feature_type="dots", score=1.0, p_value=0.5) for i in range(n)]


class _OneAtATime:
    """The MQTT sink without ``send_many``: the delivery thread sends it one message at a time."""

    def __init__(self, sink: MqttSink) -> None:
        self.sink, self.name, self.max_attempts = sink, sink.name, sink.max_attempts
        self.ready, self.send, self.start, self.stop = sink.ready, sink.send, sink.start, sink.stop
        self.backoff = sink.backoff


def _drain_rate(sink: Any, n: int, folder: Path) -> float:
    """Messages a second the delivery thread (``Dispatcher``) drains to ``sink`` from an outbox
    of ``n`` decisions."""
    with ResultStore(str(folder / f"outbox-{time.monotonic_ns()}.db")) as store:
        box = Outbox(store, [sink.name])
        store.insert_hooks.append(box.enqueue_records)
        store.insert_many(_records(n))
        disp = Dispatcher(box, [sink], poll_s=0.02)
        start = time.perf_counter()
        disp.start()
        try:
            while box.pending(sink.name) and time.perf_counter() - start < 300:
                time.sleep(0.01)
            elapsed = time.perf_counter() - start
            if box.pending(sink.name):
                raise RuntimeError(f"{box.pending(sink.name)} messages left after 300 s")
        finally:
            disp.stop()
    return n / elapsed


def _dispatcher_rate(url: str, n: int, folder: Path, *, window: bool) -> float:
    """Messages a second the delivery thread drains to the broker at ``url``; without ``window``,
    through the sink's one-at-a-time ``send`` (each waits for its acknowledgement), the delivery
    thread's path for a sink that has no ``send_many``, as MQTT's was."""
    sink = MqttSink(url)
    return _drain_rate(sink if window else _OneAtATime(sink), n, folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtt-ms", default="0,50,100", help="round trips to the broker, comma-separated")
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    broker = os.environ.get("DIFFQC_TEST_MQTT_URL")
    if not broker:
        print("set DIFFQC_TEST_MQTT_URL (scripts/start_mosquitto.sh starts a broker)", file=sys.stderr)
        return 2
    target = parse_mqtt_url(broker)
    print(f"{args.messages} decisions, median of {args.repeat} runs, messages a second")
    print(f"{'round trip':>12} {'one at a time':>15} {'a window':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for rtt in (float(x) for x in args.rtt_ms.split(",")):
            port = target.port if rtt == 0 else _delay_proxy((target.host, target.port), rtt / 2000)
            url = f"mqtt://{target.host if rtt == 0 else '127.0.0.1'}:{port}/bench-{os.getpid()}"
            single, window = ([_dispatcher_rate(url, args.messages, Path(tmp), window=w)
                               for _ in range(args.repeat)] for w in (False, True))
            print(f"{rtt:>9.0f} ms {statistics.median(single):>15.1f} {statistics.median(window):>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
