"""exitcodes.exit_now: the commands end without the interpreter's teardown, but with what of a
normal exit matters (other threads finished, atexit handlers run, output flushed)."""

from __future__ import annotations

import subprocess

from tests.helpers import PY, ROOT, base_env

SCRIPT = """
import atexit, sys, threading, time
from ftrain.exitcodes import exit_now

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
