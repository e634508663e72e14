"""exitcodes.exit_now: the commands end without the interpreter's teardown, but with what of a
normal exit matters (other threads finished, atexit handlers run, output flushed)."""

from __future__ import annotations

import subprocess

from tests.harness.processes import PY, ROOT, base_env

SCRIPT = """
import atexit, sys, threading, time
from ftrain.runtime.exitcodes import exit_now

atexit.register(lambda: print("atexit ran", flush=False))
def late():
    time.sleep(0.3)
    sys.stdout.write("thread finished\\n")
threading.Thread(target=late).start()
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # not waited for
sys.stdout.write("buffered, no newline")
sys.stderr.write("to stderr")
exit_now(143)
"""


def test_exit_now_waits_for_threads_runs_atexit_and_flushes():
    r = subprocess.run([PY, "-c", SCRIPT], cwd=ROOT, env=base_env({"PYTHONUNBUFFERED": ""}),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 143, r.stderr
    assert r.stdout == "buffered, no newlinethread finished\natexit ran\n", r.stdout
    assert r.stderr == "to stderr"


def test_exit_now_keeps_its_code_when_the_reader_of_stdout_is_gone():
    # `ftrain-ckpt ls URI | head -c 0`: the reader leaves before the final flush, which then
    # meets a closed pipe; the exit code is still the command's, with no traceback.
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {PY} -c \"$SCRIPT\" | head -c 0"],
                       cwd=ROOT, env=base_env({"PYTHONUNBUFFERED": "", "SCRIPT": SCRIPT}),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 143, r.stderr
    assert r.stderr == "to stderr", r.stderr


def test_a_run_past_its_timeout_fails_with_every_workers_stacks(tmp_path):
    """tests/harness/processes.run_train on a run that cannot finish in time (its saves held for a
    minute): each worker prints its threads' stacks (SIGUSR1, faulthandler; training goes on
    meanwhile), then the run is killed, workers included, and the test fails with the stacks."""
    import pytest

    from tests.harness.processes import SMALL, processes_matching, run_train
    from tests.harness.stores import slow_store_env

    d = tmp_path / "ckpt"
    with pytest.raises(AssertionError) as failed:
        run_train([*SMALL, "--save-every-steps", "2", "--checkpoint-dir", str(d)], nproc=2,
                  timeout=20, env=slow_store_env(60, {}))
    text = str(failed.value)
    assert text.startswith("still running after 20s, killed: "), text[:300]
    assert text.count("Current thread 0x") == 2, text[-6000:]  # each worker's main thread
    assert "in _work" in text, text[-6000:]  # rank 0's persister, holding the save
    assert not processes_matching(str(d))


def test_every_command_answers_help_with_exit_0():
    # torch's @record (on train's main) turns argparse's SystemExit(0) into a return of None;
    # that once reached exit_now and became a TypeError and exit 1.
    for module in ("src.train", "src.predict", "src.ckpt"):
        r = subprocess.run([PY, "-m", module, "--help"], cwd=ROOT, env=base_env(),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (module, r.stderr[-2000:])
        assert r.stdout.startswith("usage: "), (module, r.stdout[:300])
        assert "Traceback" not in r.stderr, (module, r.stderr[-2000:])


def test_a_bug_exits_1_with_its_traceback_on_every_worker(tmp_path):
    """An exception nobody expects (here a task's loss that raises) is a bug: each worker prints
    the traceback and exits 1, recorded for the launcher (exit 1: do not retry)."""
    from tests.harness.processes import run_train

    codes = tmp_path / "codes"
    r = run_train(["--task", "tests.harness.tasks:BuggyTask", "--batch-size", "16",
                   "--checkpoint-dir", str(tmp_path / "ckpt")], nproc=2, timeout=120,
                  env={"FTT_EXIT_CODE_DIR": str(codes)})
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.count("ZeroDivisionError: a bug in the task's loss") >= 2, r.stderr[-3000:]
    assert "Traceback (most recent call last)" in r.stderr
    assert sorted(p.read_text() for p in codes.iterdir()) == ["1\n", "1\n"]
