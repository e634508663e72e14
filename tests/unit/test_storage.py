"""src/storage.py against a real S3 endpoint (moto's server) and local disk.

Faults come from the loopback proxy in tests/harness/s3.py: real 503s and 500s, connection resets
before and after S3 handled the request, and answers held back past the read timeout.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os

import pytest
import torch
import xxhash

from ftrain.data.items import DataError
from ftrain.data.remote import fetch_remote_data_dir
from ftrain.storage import Storage, StorageAccessError, StorageError, is_transient, redact
from tests.harness.s3 import Fault

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRET"


@pytest.fixture
def via_proxy(s3, fault_proxy, monkeypatch):
    """S3 reached through the fault proxy by the standard variable alone."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    return Storage(s3.uri("run"))


@pytest.mark.parametrize("action", ["503", "500", "reset", "reset_after", "slow"])
def test_transient_faults_are_retried(s3, fault_proxy, via_proxy, action, caplog):
    # A 1 s read timeout makes "slow" (answer held 2 s) a timeout the client must retry.
    st = Storage(s3.uri("run"), {"config_kwargs": {"read_timeout": 1}}) if action == "slow" \
        else via_proxy
    fault_proxy.set_faults(Fault(action, times=2, delay=2.0))
    with caplog.at_level(logging.WARNING, logger="ftrain.storage"):
        st.write("a/blob", b"x" * 1000)
        assert st.read("a/blob") == b"x" * 1000
        assert st.listdir() == ["a"]
    assert fault_proxy.injected() == {action: 2}
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    # aiohttp itself may resend an idempotent request once on a reset connection.
    want = (1, 2) if action.startswith("reset") else (2,)
    if action == "slow":
        # On a loaded machine a request the proxy did not hold may also pass the 1 s timeout:
        # one more retry of the same kind, not a failure of the retry logic.
        assert len(retries) >= 2 and all("Timeout" in r.getMessage() for r in retries), \
            [r.getMessage() for r in retries]
        return
    assert len(retries) in want, [r.getMessage() for r in retries]
    assert s3.read("run/a/blob") == b"x" * 1000


def test_retries_are_bounded_and_the_error_names_the_file(s3, fault_proxy, via_proxy):
    fault_proxy.set_faults(Fault("503"))  # S3 down for good
    with pytest.raises(StorageError, match=r"upload s3://ftt-test/run/f: still failing after 5 "
                                           r"attempts"):
        via_proxy.write("f", b"data")
    assert [r.action for r in fault_proxy.requests] == ["503"] * 5  # FTT_STORAGE_RETRY_ATTEMPTS


def test_permanent_errors_are_not_retried(s3, fault_proxy, via_proxy):
    # A missing bucket is bad input, not a missing file (tests/integration/test_bad_input.py).
    for st, rel, error in ((via_proxy, "missing", FileNotFoundError),
                           (Storage("s3://no-such-bucket/x"), "f", StorageAccessError)):
        fault_proxy.requests.clear()
        with pytest.raises(error):
            st.read(rel)
        asked = [(r.method, r.target) for r in fault_proxy.requests]
        assert asked and len(set(asked)) == len(asked), asked  # nothing asked twice


def test_create_only_never_overwrites_but_is_idempotent(backend):
    st = Storage(backend.uri("run"))
    st.write("step/manifest.json", b"first", create_only=True)
    with pytest.raises(FileExistsError):
        st.write("step/manifest.json", b"second", create_only=True)
    st.write("step/manifest.json", b"first", create_only=True)  # the same bytes: already done
    assert backend.read("run/step/manifest.json") == b"first"


def test_write_stream_hashes_what_it_publishes(backend):
    # torch.save writes its file through write_stream in many chunks: the size and checksum
    # returned must be those of the bytes that landed, on local disk and on S3 alike.
    st = Storage(backend.uri("run"))
    state = {"w": torch.arange(300_000, dtype=torch.float32), "step": 7}
    size, digest = st.write_stream("step/state.pt", lambda fh: torch.save(state, fh),
                                   create_only=True)
    landed = backend.read("run/step/state.pt")
    assert (size, digest) == (len(landed), xxhash.xxh3_128(landed).hexdigest())
    assert size > 1_200_000
    back = torch.load(io.BytesIO(landed), weights_only=True)
    assert torch.equal(back["w"], state["w"]) and back["step"] == 7
    # Create-only: the same bytes again count as written, other bytes are refused.
    assert st.write_stream("step/state.pt", lambda fh: torch.save(state, fh),
                           create_only=True) == (size, digest)
    with pytest.raises(FileExistsError):
        st.write_stream("step/state.pt", lambda fh: fh.write(b"other"), create_only=True)
    assert backend.read("run/step/state.pt") == landed


def test_write_stream_that_fails_half_way_publishes_nothing(backend):
    st = Storage(backend.uri("run"))

    def produce(fh):
        fh.write(b"x" * 100_000)
        raise RuntimeError("serialisation failed half-way")

    with pytest.raises(StorageError, match="serialisation failed half-way"):
        st.write_stream("step/state.pt", produce, create_only=True)
    assert not st.exists("step/state.pt")
    if st.is_local:  # no temp file left behind either
        assert os.listdir(st.full("step")) == []


def test_create_only_whose_answer_was_lost_still_succeeds(s3, fault_proxy, via_proxy):
    # The PUT lands, the answer is lost; the retry meets 412 Precondition Failed on its own
    # object. That is a success, not "another writer won".
    fault_proxy.set_faults(Fault("reset_after", method="PUT", times=1))
    via_proxy.write("step/manifest.json", b"ours", create_only=True)
    assert [r.action for r in fault_proxy.requests if r.method == "PUT"] == ["reset_after", "ok"]
    assert s3.read("run/step/manifest.json") == b"ours"


def test_create_only_uses_if_none_match_on_s3(s3, fault_proxy, via_proxy):
    via_proxy.write("m.json", b"1", create_only=True)
    put = next(r for r in fault_proxy.requests if r.method == "PUT")
    assert put.target.endswith("/run/m.json")
    # moto answered 412 to a second create: the condition travelled with the request.
    with pytest.raises(FileExistsError):
        via_proxy.write("m.json", b"2", create_only=True)
    assert s3.read("run/m.json") == b"1"


def test_listing_is_fresh_across_instances(backend):
    reader, writer = Storage(backend.uri("run")), Storage(backend.uri("run"))
    assert reader.listdir() == []
    writer.write("step_1/a", b"1")
    assert reader.listdir() == ["step_1"]
    writer.write("step_2/a", b"2")
    writer.remove_tree("step_1")
    assert reader.listdir() == ["step_2"]
    assert reader.listdir("step_2") == ["a"]
    assert reader.exists("step_2/a") and not reader.exists("step_1/a")


def test_remove_tree_on_s3_takes_only_that_prefix(s3):
    st = Storage(s3.uri("run"))
    for key in ("step_1/a", "step_1/b", "step_10/a", "step_1x"):
        s3.write(f"run/{key}", b"x")
    st.remove_tree("step_1")
    assert s3.keys("run/") == ["run/step_10/a", "run/step_1x"]


def test_aws_endpoint_url_is_honoured(s3, fault_proxy, via_proxy):
    via_proxy.write("x", b"1")
    assert [r.method for r in fault_proxy.requests] == ["PUT"]


def test_storage_options_override_the_environment(s3, fault_proxy):
    # The environment points at moto directly; the options send it through the proxy.
    st = Storage(s3.uri("run"), {"client_kwargs": {"endpoint_url": fault_proxy.url}})
    st.write("x", b"1")
    assert [r.method for r in fault_proxy.requests] == ["PUT"]


def test_no_secret_in_errors_or_logs(s3, fault_proxy, monkeypatch, caplog):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    st = Storage(s3.uri("run"), {"key": "AKIDTESTING", "secret": SECRET,
                                 "endpoint_url": fault_proxy.url})
    st.write("ok", b"1")  # the credentials from the options work
    fault_proxy.set_faults(Fault("500"))
    with caplog.at_level(logging.DEBUG), pytest.raises(StorageError) as err:
        st.read("ok")
    assert caplog.records and SECRET not in caplog.text
    assert SECRET not in str(err.value) and SECRET not in repr(err.value.__cause__)
    assert redact(f"secret={SECRET}&X-Amz-Signature=abc") == "secret=***&X-Amz-Signature=***"


def _child_lists(st: Storage, q) -> None:
    st.write("from_child", b"c")
    q.put(st.listdir())


def test_instance_is_not_reused_across_fork(s3):
    st = Storage(s3.uri("run"))
    st.write("from_parent", b"p")
    parent_fs = st.fs
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_lists, args=(st, q))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert q.get(timeout=5) == ["from_child", "from_parent"]
    assert st.fs is parent_fs  # the parent keeps its own; the child made a new one


def test_classification_of_real_errors(s3, fault_proxy, monkeypatch):
    """is_transient on the exceptions s3fs really raises, with its own retries switched off."""
    monkeypatch.setenv("FTT_STORAGE_RETRY_ATTEMPTS", "1")
    st = Storage(s3.uri("run"), {"endpoint_url": fault_proxy.url})
    for action, transient in (("503", True), ("500", True), ("reset", True)):
        fault_proxy.set_faults(Fault(action, times=2))  # 2: aiohttp may resend after a reset
        with pytest.raises(StorageError) as err:
            st.read("anything")
        assert is_transient(err.value.__cause__) is transient, (action, err.value.__cause__)
    fault_proxy.set_faults()
    with pytest.raises(FileNotFoundError) as missing:
        st.read("anything")
    assert not is_transient(missing.value)
    assert not is_transient(FileExistsError("step_0000000500/manifest.json"))
    assert not is_transient(OSError(5, "Access Denied for step_0000000503"))


# ---------------------------------------------------------------------------- --data-dir s3://
def test_fetch_remote_data_dir_once_per_node(s3, fault_proxy, tmp_path, monkeypatch):
    files = {"MNIST/raw/train-images-idx3-ubyte": os.urandom(5000),
             "MNIST/raw/t10k-labels-idx1-ubyte": b"labels", "README": b"hello"}
    for key, data in files.items():
        s3.write(f"datasets/{key}", data)
    s3.write("datasets-other/x", b"not ours")
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    fault_proxy.set_faults(Fault("reset", method="GET", every=2, times=2))  # a flaky network
    local = fetch_remote_data_dir(s3.uri("datasets"), str(tmp_path / "cache"), {})
    for key, data in files.items():
        assert open(os.path.join(local, *key.split("/")), "rb").read() == data
    assert sorted(os.listdir(local)) == [".complete", "MNIST", "README"]
    assert fault_proxy.injected() == {"reset": 2}
    fault_proxy.requests.clear()
    assert fetch_remote_data_dir(s3.uri("datasets"), str(tmp_path / "cache"), {}) == local
    assert fault_proxy.requests == []  # cached: S3 is not asked again
    with pytest.raises(DataError, match="--data-dir s3://ftt-test/nothing"):
        fetch_remote_data_dir(s3.uri("nothing"), str(tmp_path / "cache"), {})


def test_interrupted_fetch_is_redone(s3, tmp_path):
    s3.write("datasets/a", b"A")
    local = fetch_remote_data_dir(s3.uri("datasets"), str(tmp_path / "cache"), {})
    os.unlink(os.path.join(local, ".complete"))  # as if the copy had died before its marker
    os.unlink(os.path.join(local, "a"))
    s3.write("datasets/b", b"B")
    assert fetch_remote_data_dir(s3.uri("datasets"), str(tmp_path / "cache"), {}) == local
    assert sorted(os.listdir(local)) == [".complete", "a", "b"]



def test_endpoint_and_credentials_from_an_aws_profile(s3, fault_proxy, tmp_path, monkeypatch):
    config = tmp_path / "config"
    config.write_text(f"[profile ftt]\nregion = us-east-1\nendpoint_url = {fault_proxy.url}\n")
    creds = tmp_path / "credentials"
    creds.write_text("[ftt]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = "
                     f"{SECRET}\n")
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "ftt")
    Storage(s3.uri("run")).write("x", b"1")
    put = fault_proxy.requests[-1]
    assert (put.method, put.target) == ("PUT", "/ftt-test/run/x")
    assert s3.read("run/x") == b"1"
