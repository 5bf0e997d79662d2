"""An S3 endpoint that goes away on cue: a TCP relay on 127.0.0.1 in front of the tests' moto
server. Clients are pointed at the relay (BRAINMRI_S3_ENDPOINT); `arm()` makes the first
request whose line matches cut every open connection (that request included: an upload or a
read interrupted half-way) and close the listening socket, so for `seconds` every new
connection is refused, as from an endpoint that is down; then the relay listens again on the
same port and the same server answers, its objects intact (moto's state survives: only the
path to it was cut). The relay parses nothing but request lines (HTTP/1.1, plain text on
loopback)."""

from __future__ import annotations

import re
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

_REQUEST = re.compile(rb"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/1\.[01]")


@dataclass
class Outage:
    method: str
    path: re.Pattern
    seconds: float
    started: float | None = None  # when it began (time.time()), None until a request matched
    ended: float | None = None
    request: str = ""  # the request line that set it off


@dataclass
class OutageRelay:
    upstream: str  # http://host:port of the real server
    port: int = 0
    outages: list[Outage] = field(default_factory=list)

    def __post_init__(self):
        u = urlparse(self.upstream)
        self._up = (u.hostname, u.port)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stop = threading.Event()
        self._armed: list[Outage] = []
        self._listener = self._listen(self.port)
        self.port = self._listener.getsockname()[1]
        self._accepting = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepting.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(self, method: str, path_regex: str, seconds: float) -> Outage:
        """The next request `method` on a path matching `path_regex` starts an outage."""
        o = Outage(method, re.compile(path_regex.encode()), seconds)
        with self._lock:
            self._armed.append(o)
            self.outages.append(o)
        return o

    def wait(self, outage: Outage, timeout: float) -> bool:
        """Until `outage` has begun and ended (True) or `timeout` passed (False)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if outage.ended is not None:
                return True
            time.sleep(0.1)
        return False

    def close(self) -> None:
        self._stop.set()
        self._cut()
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None

    def __enter__(self) -> OutageRelay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the relay -----------------------------------------------------------------------------
    @staticmethod
    def _listen(port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(64)
        s.settimeout(0.2)
        return s

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                listener = self._listener
            if listener is None:  # down: nothing listens, connections are refused
                time.sleep(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(self._up, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peer = {client: upstream, upstream: client}
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([client, upstream], [], [], 0.2)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is client and self._trips(data):
                        return  # this request never reaches the server; _down cut the rest
                    peer[s].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for s in (client, upstream):
                self._drop(s)

    def _trips(self, data: bytes) -> bool:
        m = _REQUEST.search(data)
        if not m:
            return False
        with self._lock:
            hit = next((o for o in self._armed
                        if o.method.encode() == m.group(1) and o.path.search(m.group(2))), None)
            if hit is None:
                return False
            self._armed.remove(hit)
            hit.started, hit.request = time.time(), m.group(0).decode(errors="replace")
        threading.Thread(target=self._down, args=(hit,), daemon=True).start()
        return True

    def _down(self, o: Outage) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self._cut()
        time.sleep(max(0.0, o.started + o.seconds - time.time()))
        with self._lock:
            if not self._stop.is_set():
                self._listener = self._listen(self.port)
        o.ended = time.time()

    def _cut(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            self._conns.discard(s)
        try:
            s.close()
        except OSError:
            pass
