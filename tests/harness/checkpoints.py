"""Checkpoints as the tests see them from outside: which steps are committed (a step counts once
its manifest exists) or half-written, the newest one loaded, two runs' weights and histories
compared, and a run cut at a step and resumed against an uninterrupted one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ftrain.checkpoint import MANIFEST, CheckpointStore, Loaded
from ftrain.storage import Storage
from tests.harness.processes import run_train

TIMING_FIELDS = ("samples_per_s", "seconds", "saves_dropped")  # differ between runs


def committed_of(names: list[str]) -> list[int]:
    """Steps among "step_N/file" names whose manifest exists (the commit), oldest first."""
    return sorted(int(n[5:].split("/", 1)[0]) for n in names
                  if n.startswith("step_") and n.endswith("/" + MANIFEST))


def half_written_of(names: list[str]) -> set[str]:
    """State files among "step_N/file" names whose folder has no manifest yet."""
    committed = {n.split("/", 1)[0] for n in names if n.endswith("/" + MANIFEST)}
    return {n for n in names if n.startswith("step_") and n.split("/", 1)[0] not in committed
            and n.rsplit("/", 1)[-1].startswith("state-")
            and n.endswith((".pt", ".bin"))}


def local_names(ckpt_dir: Path | str) -> list[str]:
    """The "step_N/file" names below a local checkpoint folder."""
    return [f"{p.parent.name}/{p.name}" for p in Path(ckpt_dir).glob("step_*/*")]


def committed_steps(ckpt_dir: Path | str) -> list[int]:
    """Steps whose manifest exists (the commit), oldest first."""
    return committed_of(local_names(ckpt_dir))


def latest_committed(ckpt_dir: Path | str) -> int:
    """The newest committed step, 0 when none is."""
    steps = committed_steps(ckpt_dir)
    return steps[-1] if steps else 0


def half_written(ckpt_dir: Path | str) -> set[str]:
    """Data files of step folders that have no manifest yet: a save in progress (or the
    leftovers of a writer that died)."""
    return half_written_of(local_names(ckpt_dir))


def latest(ckpt_dir: Path | str) -> Loaded:
    """The newest valid checkpoint, verified and loaded in this process (faster than a
    ``python -m src.ckpt`` subprocess)."""
    loaded = CheckpointStore(Storage(str(ckpt_dir))).latest()
    assert loaded is not None, f"no valid checkpoint in {ckpt_dir}"
    return loaded


def strip_timing(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The metric history without wall-clock fields (those legitimately differ)."""
    return [{k: v for k, v in h.items() if k not in TIMING_FIELDS} for h in history]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k} differs (max abs diff {(a[k].double() - b[k].double()).abs().max()})"


def cut_and_resume(args: list[str], tmp_path: Path, cut_at: int, nproc: int = 2,
                   ref_args: tuple[str, ...] = (), resume_args: tuple[str, ...] = ()):
    """Train ``args`` uninterrupted into ``tmp_path/ref``; train them again into
    ``tmp_path/cut`` stopped at step ``cut_at``, then rerun the same command. Asserts that every
    run succeeded, that the rerun resumed, and that both end with bitwise-equal weights.
    Returns (the reference's newest checkpoint, the resumed run's, the rerun's stderr)."""
    from ftrain.checkpoint import load_uri

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    for folder, extra in ((ref, [*ref_args]), (cut, ["--max-steps", str(cut_at)]),
                          (cut, [*resume_args])):
        r = run_train([*args, *extra, "--checkpoint-dir", str(folder)], nproc=nproc)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr, r.stderr[-3000:]
    a, b = load_uri(str(ref)), load_uri(str(cut))
    assert_bitwise_equal(a.model_state(), b.model_state())
    return a, b, r.stderr
