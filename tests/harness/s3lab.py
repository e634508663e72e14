"""A real S3 endpoint on loopback for tests and the chaos tool: moto's server, and an HTTP proxy
in front of it that injects faults (503/500 answers, connection resets before and after S3
handled a request, answers held back) on a schedule.

    server = MotoServer.start()                     # moto's server on a free 127.0.0.1 port
    proxy = FaultProxy(server.port, [Fault("503", every=7)]).start()
    env = s3_env(proxy.url)                         # AWS_* variables for a subprocess
    ...
    proxy.stop(); server.stop()

tests/harness/s3.py wraps these in pytest fixtures; ``python -m launch.chaos --storage s3`` runs
them in its own process. moto is a test dependency (``pip install -e '.[test]'``); this module
imports it only in ``MotoServer.start``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import struct
import threading
import time
import urllib.request
from dataclasses import dataclass

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
# Short storage retries: tests inject faults on purpose and must not wait on real back-offs.
FAST_RETRIES = {"FTT_STORAGE_RETRY_ATTEMPTS": "5", "FTT_STORAGE_RETRY_BASE_DELAY": "0.02",
                "FTT_STORAGE_RETRY_DEADLINE": "20"}
INSTALL_HINT = "pip install -e '.[test]'"


class MotoMissing(RuntimeError):
    """moto (a test dependency) is not installed."""


# ---------------------------------------------------------------------------- moto server
@dataclass
class MotoServer:
    host: str
    port: int
    _client: object = None
    _server: object = None  # the ThreadedMotoServer, when this process started it

    @classmethod
    def start(cls, timeout: float = 30.0) -> MotoServer:
        """Start moto's server in this process on a free 127.0.0.1 port and wait until it
        answers. Raises MotoMissing (naming the install command) when moto is not installed."""
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as e:
            raise MotoMissing(f"moto's S3 server is not installed ({e}); it is a test "
                              f"dependency: {INSTALL_HINT}") from None

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = cls(host, port, _server=server)
        deadline = time.monotonic() + timeout
        while True:
            try:
                endpoint.reset()
                return endpoint
            except OSError:
                if time.monotonic() > deadline:
                    server.stop()
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def client(self):
        """A boto3 client over HTTP for raw access that bypasses the code under test (one per
        server: cheap)."""
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                                        aws_access_key_id="testing",
                                        aws_secret_access_key="testing")
        return self._client

    def reset(self) -> None:
        """Forget every bucket and object (moto's own reset API, over HTTP)."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST", data=b"")
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no HTTP_PROXY
        with direct.open(req, timeout=10) as resp:
            assert resp.status == 200


def s3_env(endpoint: str, retries: dict[str, str] | None = None) -> dict[str, str]:
    """What a subprocess needs to reach the endpoint through the standard AWS variables, with
    ``retries`` (default FAST_RETRIES) as its storage retry policy."""
    return {"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS, **(retries or FAST_RETRIES),
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            # Never read the developer's own ~/.aws while testing.
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


# ---------------------------------------------------------------------------- fault proxy
ERROR_BODIES = {
    "503": (b"503 Slow Down", b"<Error><Code>SlowDown</Code><Message>Please reduce your request "
            b"rate.</Message></Error>"),
    "500": (b"500 Internal Server Error", b"<Error><Code>InternalError</Code><Message>We "
            b"encountered an internal error. Please try again.</Message></Error>"),
    # What S3 answers for wrong or insufficient credentials (a HEAD gets the status alone).
    "403": (b"403 Forbidden", b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied'
            b"</Code><Message>Access Denied</Message><RequestId>4442587FB7D0A2F9</RequestId>"
            b"<HostId>nHN4fJZ3vXzWqGm1sL0pQd8yT2aBcEe5rKoUiY7wVjA=</HostId></Error>"),
}
# The transient faults: what random faults and chaos runs draw from. "403" (permanent: wrong
# credentials) is injected by name only.
ACTIONS = ("503", "500", "reset", "reset_after", "slow")
ALL_ACTIONS = (*ACTIONS, "403")


@dataclass
class Fault:
    """Inject ``action`` into matching requests.

    action: "503" (SlowDown), "500" (InternalError) or "403" (AccessDenied: wrong credentials)
    answered by the proxy itself; "reset": the connection is reset before the request reaches S3; "reset_after": S3 handles the request and
    the answer is lost (connection reset); "slow": the answer is held back ``delay`` seconds.
    Matching: ``method`` (exact) and ``path`` (a regex searched in the request target, query
    included); then every ``every``-th matching request, at most ``times`` times (None: always).
    """

    action: str
    method: str | None = None
    path: str | None = None
    every: int = 1
    times: int | None = None
    delay: float = 1.0
    seen: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        assert self.action in ALL_ACTIONS, self.action

    def fires(self, method: str, target: str) -> bool:
        if not _matches(self.method, self.path, method, target):
            return False
        self.seen += 1
        if self.seen % self.every or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True

    def decide(self, method: str, target: str) -> tuple[str, float] | None:
        """(action, delay) for this request, None to let it through."""
        return (self.action, self.delay) if self.fires(method, target) else None


@dataclass
class RandomFaults:
    """Inject a fault into a share ``rate`` of matching requests, the action drawn from
    ``actions`` (equally likely), "slow" holding the answer back ``delay`` seconds.

    The draws come from ``random.Random(seed)``, one per matching request in the order the
    proxy receives them: the same seed gives the same sequence of decisions. (Which request
    meets which decision still depends on the order requests arrive in.) Matching as in Fault.
    """

    rate: float
    actions: tuple[str, ...] = ACTIONS
    seed: int = 0
    delay: float = 0.2
    method: str | None = None
    path: str | None = None
    seen: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], got {self.rate}")
        bad = [a for a in self.actions if a not in ACTIONS]
        if bad or not self.actions:
            raise ValueError(f"actions must be some of {', '.join(ACTIONS)}; got {self.actions}")
        self._rng = random.Random(self.seed)

    def decide(self, method: str, target: str) -> tuple[str, float] | None:
        if not _matches(self.method, self.path, method, target):
            return None
        self.seen += 1
        if self._rng.random() >= self.rate:
            return None
        self.fired += 1
        return self._rng.choice(self.actions), self.delay


def _matches(want_method: str | None, want_path: str | None, method: str, target: str) -> bool:
    return (not want_method or method == want_method) and \
        (not want_path or re.search(want_path, target) is not None)


@dataclass
class Seen:
    method: str
    target: str
    action: str
    body: bytes = b""
    range: str = ""  # the Range header of a ranged GET
    started: float = 0.0  # monotonic: the request's head arrived
    ended: float = 0.0  # monotonic: the answer was sent (0: never)


def most_in_flight(requests: list[Seen]) -> int:
    """The largest number of these requests that the proxy held at the same moment (answered
    ones only)."""
    requests = [r for r in requests if r.ended]
    events = sorted([(r.started, 1) for r in requests] + [(r.ended, -1) for r in requests],
                    key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most


class FaultProxy:
    """An HTTP/1.1 proxy on loopback in front of the S3 server that injects faults on a schedule.

    One request per connection (the proxy answers ``Connection: close``), so the schedule applies
    per request. Request bytes are forwarded untouched (signatures, aws-chunked bodies).
    ``requests`` records every request with the action taken.
    """

    def __init__(self, upstream_port: int, faults: list[Fault | RandomFaults] | None = None,
                 keep_bodies: bool = True) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.faults: list[Fault | RandomFaults] = list(faults or [])
        self.keep_bodies = keep_bodies  # off for long runs: Seen.body holds up to 64 KiB each
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    def set_faults(self, *faults: Fault | RandomFaults) -> None:
        with self._lock:
            self.faults = list(faults)

    def injected(self) -> dict[str, int]:
        """How many times each action was injected so far."""
        with self._lock:
            out: dict[str, int] = {}
            for r in self.requests:
                if r.action != "ok":
                    out[r.action] = out.get(r.action, 0) + 1
            return out

    # ------------------------------------------------------------------ serving
    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _decide(self, method: str, target: str) -> tuple[str, float]:
        """(action, delay) of the first rule that fires, ("ok", 0) when none does."""
        with self._lock:
            for f in self.faults:
                if (decision := f.decide(method, target)) is not None:
                    return decision
        return "ok", 0.0

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(30)
            reader = conn.makefile("rb")
            request = _read_head(reader)
            if request is None:
                return
            method, target, head, headers = request
            started = time.monotonic()
            action, delay = self._decide(method, target)
            expect = b"100-continue" in headers.get(b"expect", b"").lower()
            if expect and action in ("reset", *ERROR_BODIES):
                body = b""  # refused before the client sent the body
            else:
                if expect:
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = _read_body(reader, headers)
            seen = Seen(method, target, action, body[:65536] if self.keep_bodies else b"",
                        headers.get(b"range", b"").decode(), started)
            with self._lock:
                self.requests.append(seen)
            if action == "reset":
                _reset(conn)
                return
            if action in ERROR_BODIES:
                status, payload = ERROR_BODIES[action]
                if method == "HEAD":
                    # An answer to HEAD has no body (S3 sends none): a client reading one would
                    # fail to parse the answer instead of seeing the status.
                    payload = b""
                conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/xml\r\n"
                             b"Content-Length: " + str(len(payload)).encode() +
                             b"\r\nConnection: close\r\n\r\n" + payload)
                return
            response = self._forward(head + body)
            if action == "reset_after":
                _reset(conn)
                return
            if action == "slow":
                time.sleep(delay)
            conn.sendall(response)
            seen.ended = time.monotonic()
        except OSError:
            pass
        finally:
            conn.close()

    def _forward(self, raw: bytes) -> bytes:
        with socket.create_connection(self.upstream, timeout=30) as up:
            up.sendall(raw)
            chunks = []
            while chunk := up.recv(65536):
                chunks.append(chunk)
        head, sep, rest = b"".join(chunks).partition(b"\r\n\r\n")
        return _with_connection_close(head) + sep + rest


def _with_connection_close(head: bytes) -> bytes:
    lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"])


def _read_head(reader) -> tuple[str, str, bytes, dict[bytes, bytes]] | None:
    """(method, target, head to forward, headers) of one HTTP/1.1 request. The forwarded head
    asks for ``Connection: close`` and drops ``Expect`` (the proxy answers 100-continue)."""
    first = reader.readline()
    if not first.strip():
        return None
    lines = [first.rstrip(b"\r\n")]
    while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
        lines.append(line.rstrip(b"\r\n"))
    headers = {ln.split(b":", 1)[0].strip().lower(): ln.split(b":", 1)[1].strip()
               for ln in lines[1:] if b":" in ln}
    method, target = first.decode("latin-1").split()[:2]
    kept = [ln for ln in lines if not ln.lower().startswith(b"expect:")]
    return method, target, _with_connection_close(b"\r\n".join(kept)) + b"\r\n\r\n", headers


def _read_body(reader, headers: dict[bytes, bytes]) -> bytes:
    """The raw body bytes (chunked framing kept as it is: it is forwarded untouched)."""
    if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
        return reader.read(int(headers.get(b"content-length", b"0")))
    body = b""
    while True:
        size_line = reader.readline()
        body += size_line
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while (trailer := reader.readline()) not in (b"\r\n", b"\n", b""):
                body += trailer
            return body + b"\r\n"
        body += reader.read(size + 2)


def _reset(conn: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
