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

The server and the proxy live in tests/harness/s3lab.py (launch.chaos runs them too).
Nothing here mocks boto in-process: every S3 call the code under test makes is a real HTTP
request to the moto server, possibly through the proxy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.checkpoints import committed_of

# Re-exported: the tests import these from here.
from tests.harness.s3lab import (  # noqa: F401
    ACTIONS,
    CREDENTIALS,
    ERROR_BODIES,
    FAST_RETRIES,
    Fault,
    FaultProxy,
    MotoServer,
    Seen,
    most_in_flight,
    s3_env,
)

BUCKET = "ftt-test"


# ---------------------------------------------------------------------------- moto server
@pytest.fixture(scope="session")
def moto_server():
    endpoint = MotoServer.start()
    yield endpoint
    endpoint.stop()


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
        prefix = prefix.rstrip("/") + "/"
        return committed_of([k[len(prefix):] for k in self.keys(prefix)])

    def multipart_uploads(self) -> list[str]:
        return [u["Key"] for u in
                self.client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])]


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
    from tests.harness.tasks import ToyTask

    torch.manual_seed(step)
    model = ToyTask().build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():  # an optimizer step gives it momentum buffers to save
        p.grad = torch.randn_like(p)
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 10)
    meta = {"epoch": epochs_done, "batch_in_epoch": 0, "world_size": 1, "global_batch_size": 32,
            "seed": 0, "config_digest": "0" * 64,
            "task": {"import": "tests.harness.tasks:ToyTask", "args": {}}}
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
