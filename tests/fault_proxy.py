"""A TCP proxy on 127.0.0.1 that breaks connections part-way through a response, for tests.

:class:`FaultProxy` forwards bytes between clients and one upstream (the moto S3 server). On the
first ``times`` connections whose server-to-client bytes reach ``after``, it forwards exactly
``after`` bytes and then either resets the connection (``mode="reset"``: an RST to the client, as
a dropped NAT entry or a restarted load balancer gives) or stops forwarding while keeping the
connection open (``mode="stall"``: the client sees no byte and no end). Other connections are
forwarded untouched. Point ``AWS_ENDPOINT_URL`` at :attr:`FaultProxy.endpoint`.

:meth:`FaultProxy.arm` sets a new fault plan on a running proxy (mode, ``after``, a fresh budget of
``times`` faults), so one proxy that long-lived processes (a Ray cluster's workers) were pointed at
can break the reads of one command after another; ``times=0`` forwards everything.

One thread accepts, one thread per connection pumps both directions with ``select`` (0.1 s
ticks), so :meth:`FaultProxy.close` stops everything within a bounded time.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from typing import Literal
from urllib.parse import urlparse

_TICK = 0.1
_CHUNK = 64 * 1024


class FaultProxy:
    """Proxy ``upstream`` (``http://host:port``); see the module docstring for the faults."""

    def __init__(
        self, upstream: str, *, mode: Literal["reset", "stall"], after: int, times: int = 1
    ) -> None:
        url = urlparse(upstream)
        self._upstream = (url.hostname or "127.0.0.1", int(url.port or 80))
        self.mode, self.after, self.times = mode, int(after), int(times)
        self.faults = 0  # connections broken so far
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_TICK)
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def arm(self, mode: Literal["reset", "stall"], after: int, times: int = 1) -> None:
        """From now on, break the next ``times`` connections whose server-to-client bytes reach
        ``after`` (counted from each connection's start), in ``mode``; :attr:`faults` restarts at 0."""
        with self._lock:
            self.mode, self.after, self.times = mode, int(after), int(times)
            self.faults = 0

    def __enter__(self) -> FaultProxy:
        thread = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting and forwarding; every thread ends within a few ticks."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            thread = threading.Thread(target=self._pump, args=(client,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _claim_fault(self) -> bool:
        with self._lock:
            if self.faults >= self.times:
                return False
            self.faults += 1
            return True

    def _pump(self, client: socket.socket) -> None:
        server = socket.create_connection(self._upstream, timeout=5)
        sent_down = 0
        stalled = False
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select(
                    [client] + ([] if stalled else [server]), [], [], _TICK
                )
                for sock in readable:
                    data = sock.recv(_CHUNK)
                    if not data:
                        return
                    if sock is client:
                        server.sendall(data)
                        continue
                    after = self.after
                    if sent_down + len(data) >= after > sent_down and self._claim_fault():
                        client.sendall(data[: after - sent_down])
                        sent_down = after
                        if self.mode == "reset":
                            client.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                            return
                        stalled = True
                        break
                    client.sendall(data)
                    sent_down += len(data)
        except OSError:
            return
        finally:
            client.close()
            server.close()
