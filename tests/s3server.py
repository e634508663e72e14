"""pytest plugin: a real S3 endpoint (moto's server over HTTP on loopback) and a fault-injecting
HTTP proxy in front of it.

Fixtures:
    moto_server   session: a ThreadedMotoServer on a free 127.0.0.1 port
    s3            per test: moto state reset, a fresh bucket, AWS_* variables set in this process
                  (``s3.env`` holds them for subprocesses), raw object access for corruption
    fault_proxy   per test: a FaultProxy in front of the moto server (no faults until told)
    backend       per test, parametrized: the same raw-access API over a local folder and S3

Helpers: CORRUPTIONS (the kinds of damage a checkpoint suffers, applied to the raw bytes) and
save_checkpoint (commits a real checkpoint through the production Checkpointer).

Nothing here mocks boto in-process: every S3 call the code under test makes is a real HTTP
request to the moto server, possibly through the proxy.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import free_port

BUCKET = "ftt-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
# Short storage retries: tests inject faults on purpose and must not wait on real back-offs.
FAST_RETRIES = {"FTT_STORAGE_RETRY_ATTEMPTS": "5", "FTT_STORAGE_RETRY_BASE_DELAY": "0.02",
                "FTT_STORAGE_RETRY_DEADLINE": "20"}


# ---------------------------------------------------------------------------- moto server
@dataclass
class MotoServer:
    host: str
    port: int
    _client: object = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def client(self):
        """A boto3 client over HTTP for the tests' own raw access (one per session: cheap)."""
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


@pytest.fixture(scope="session")
def moto_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = MotoServer("127.0.0.1", port)
    deadline = time.monotonic() + 30
    while True:
        try:
            endpoint.reset()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield endpoint
    server.stop()


class S3Bucket:
    """One bucket on the moto server, with raw access (boto3 over HTTP) that bypasses the code
    under test: tests corrupt and inspect objects through it."""

    def __init__(self, server: MotoServer, bucket: str, env: dict[str, str]) -> None:
        self.server, self.bucket, self.env = server, bucket, env
        self.client = server.client

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def committed(self, prefix: str) -> list[int]:
        """Steps below ``prefix`` whose manifest exists (the commit), oldest first."""
        return sorted(int(m.group(1)) for k in self.keys(prefix.rstrip("/") + "/")
                      if (m := re.search(r"step_(\d{10})/manifest\.json$", k)))

    def multipart_uploads(self) -> list[str]:
        return [u["Key"] for u in
                self.client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])]


def s3_env(endpoint: str) -> dict[str, str]:
    """What a subprocess needs to reach the test endpoint through the standard AWS variables."""
    return {"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS, **FAST_RETRIES,
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            # Never read the developer's own ~/.aws while testing.
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@pytest.fixture
def s3(moto_server, monkeypatch) -> S3Bucket:
    moto_server.reset()
    env = s3_env(moto_server.url)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = S3Bucket(moto_server, BUCKET, env)
    bucket.client.create_bucket(Bucket=BUCKET)
    return bucket


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
ACTIONS = ("503", "500", "403", "reset", "reset_after", "slow")


@dataclass
class Fault:
    """Inject ``action`` into matching requests.

    action: "503" (SlowDown), "500" (InternalError) or "403" (AccessDenied: wrong credentials)
    answered by the proxy itself; "reset": the
    connection is reset before the request reaches S3; "reset_after": S3 handles the request and
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
        assert self.action in ACTIONS, self.action

    def fires(self, method: str, target: str) -> bool:
        if self.method and method != self.method:
            return False
        if self.path and not re.search(self.path, target):
            return False
        self.seen += 1
        if self.seen % self.every or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True


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

    def __init__(self, upstream_port: int, faults: list[Fault] | None = None) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.faults: list[Fault] = list(faults or [])
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

    def set_faults(self, *faults: Fault) -> None:
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

    def _decide(self, method: str, target: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.fires(method, target):
                    return f
        return None

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(30)
            reader = conn.makefile("rb")
            request = _read_head(reader)
            if request is None:
                return
            method, target, head, headers = request
            started = time.monotonic()
            fault = self._decide(method, target)
            action = fault.action if fault else "ok"
            expect = b"100-continue" in headers.get(b"expect", b"").lower()
            if expect and action in ("reset", *ERROR_BODIES):
                body = b""  # refused before the client sent the body
            else:
                if expect:
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = _read_body(reader, headers)
            seen = Seen(method, target, action, body[:65536],
                        headers.get(b"range", b"").decode(), started)
            with self._lock:
                self.requests.append(seen)
            if action == "reset":
                _reset(conn)
                return
            if action in ERROR_BODIES:
                status, payload = ERROR_BODIES[action]
                if method == "HEAD":  # S3 answers a HEAD with the status alone
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
                time.sleep(fault.delay)
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


@pytest.fixture
def fault_proxy(moto_server):
    proxy = FaultProxy(moto_server.port).start()
    yield proxy
    proxy.stop()


# ---------------------------------------------------------------------------- both backends
class LocalBackend:
    """The raw-access API of S3Bucket over a local folder (keys are paths below it)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env: dict[str, str] = dict(FAST_RETRIES)

    def uri(self, prefix: str = "") -> str:
        return str(self.root / prefix).rstrip("/")

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*")
                      if p.is_file() and str(p.relative_to(self.root)).startswith(prefix))

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def write(self, key: str, data: bytes) -> None:
        (self.root / key).parent.mkdir(parents=True, exist_ok=True)
        (self.root / key).write_bytes(data)

    def delete(self, key: str) -> None:
        (self.root / key).unlink()


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path, monkeypatch):
    """A LocalBackend or an S3Bucket: store tests run against both."""
    for k, v in FAST_RETRIES.items():
        monkeypatch.setenv(k, v)
    if request.param == "local":
        return LocalBackend(tmp_path / "store")
    return request.getfixturevalue("s3")


@dataclass
class Corruption:
    """One way a checkpoint gets damaged, applied through raw access (not the code under test)."""

    name: str
    expect: str  # a fragment of the reason the store gives
    target: str = "state"  # "state" (the .pt file) or "manifest"

    def apply(self, backend, folder: str) -> None:
        keys = backend.keys(folder + "/")
        key = next(k for k in keys if (k.endswith("manifest.json") if self.target == "manifest"
                                       else k.rsplit("/", 1)[-1].startswith("state-")))
        data = backend.read(key)
        if self.name == "truncate":
            backend.write(key, data[: len(data) // 2])
        elif self.name == "flip":
            pos = len(data) - 200  # inside tensor data: torch.load alone would not notice
            backend.write(key, data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1:])
        elif self.name in ("delete_file", "delete_manifest"):
            backend.delete(key)
        elif self.name == "garbage_manifest":
            backend.write(key, b'{"files": {"state.pt": [1, 2,,, not json')
        else:
            raise AssertionError(self.name)


CORRUPTIONS = [
    Corruption("truncate", "truncated"),
    Corruption("flip", "XXH3-128"),
    Corruption("delete_file", "missing"),
    Corruption("delete_manifest", "no manifest", target="manifest"),
    Corruption("garbage_manifest", "not valid JSON", target="manifest"),
]


# ---------------------------------------------------------------------------- checkpoints
def history_rows(epochs: int, steps_per_epoch: int = 32) -> list[dict]:
    """A metric history shaped as the trainer writes it."""
    return [{"epoch": e, "step": e * steps_per_epoch, "train_loss": 2.0 / e,
             "train_acc": 0.3 + 0.1 * e, "eval_loss": 2.1 / e, "eval_acc": 0.28 + 0.1 * e,
             "lr": 0.05 / e, "samples_per_s": 1000.0, "seconds": 2.0}
            for e in range(1, epochs + 1)]


_STORAGES: dict = {}


def save_checkpoint(uri: str, step: int, epochs_done: int = 0) -> dict:
    """Commit one checkpoint at ``step`` below ``uri`` through the production Checkpointer
    (snapshot, serialize, create-only commit) and return its model weights."""
    import torch

    from ftrain.checkpoint import Checkpointer, CheckpointStore
    from ftrain.storage import Storage
    from tests.toytask import ToyTask

    torch.manual_seed(step)
    model = ToyTask().build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():  # an optimizer step gives it momentum buffers to save
        p.grad = torch.randn_like(p)
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 10)
    meta = {"epoch": epochs_done, "batch_in_epoch": 0, "world_size": 1, "global_batch_size": 32,
            "seed": 0, "config_digest": "0" * 64,
            "task": {"import": "tests.toytask:ToyTask", "args": {}}}
    train_state = {**meta, "step": step, "history": history_rows(epochs_done),
                   "epoch_progress": {"loss_steps": [], "correct": 0, "seen": 0, "elapsed": 0.0}}
    # One Storage per root and endpoint: a new s3fs client costs up to a second on a busy box.
    key = (uri, os.environ.get("AWS_ENDPOINT_URL"))
    storage = _STORAGES.get(key) or _STORAGES.setdefault(key, Storage(uri))
    saver = Checkpointer(CheckpointStore(storage), keep_last=100, orphan_grace_s=3600)
    try:
        ok = saver.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict()}, train_state,
                        dict(meta, reason="test"), blocking=True)
    finally:
        saver.close()
    assert ok, f"saving step {step} to {uri} failed"
    return {k: v.clone() for k, v in model.state_dict().items()}
