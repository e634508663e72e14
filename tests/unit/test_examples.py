"""The examples of examples/ in-process: the language model's data fingerprint, and imports of
the public API alone (trained as a user would: tests/integration/test_examples.py)."""

from __future__ import annotations

from examples.charlm import CharLM
from tests.harness.processes import ROOT

TINY_LM = {"context": 32, "d_model": 64, "layers": 1, "heads": 2, "max_train_chars": 65600,
           "max_eval_chars": 16400}
WINDOWS = (TINY_LM["max_train_chars"] - 1) // TINY_LM["context"]  # 2049 -> 32 batches of 64


def test_lm_data_fingerprint_is_recorded():
    ctx_args = dict(TINY_LM)
    task = CharLM(**ctx_args)
    from ftrain.data.fingerprint import fingerprint
    from ftrain.tasks import TaskContext

    train, _ = task.datasets(TaskContext(0, "./data", False, 0, 1, 0))
    fp = fingerprint(train, 0)
    assert fp["len"] == WINDOWS and fp == fingerprint(train, 0)
    bigger = CharLM(**{**ctx_args, "max_train_chars": 70000}).datasets(
        TaskContext(0, "./data", False, 0, 1, 0))[0]
    assert fingerprint(bigger, 0) != fp


def test_examples_import_only_the_public_api():
    for name in ("charlm.py", "image_classifier.py"):
        text = (ROOT / "examples" / name).read_text()
        imports = [ln for ln in text.splitlines() if ln.startswith(("import ftrain", "from ftrain"))]
        assert imports == ["from ftrain import Config, Task, TaskContext"] or imports == [
            "from ftrain import Task, TaskContext"], imports
