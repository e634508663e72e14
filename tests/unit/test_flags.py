"""Every training flag passes through torchrun's own parser unchanged. torchrun reads the whole
command line, the worker's arguments too, and takes any prefix of its own options as an
abbreviation: a worker flag that is a prefix of one of them (``--monitor`` of
``--monitor-interval``) would be refused, or taken by torchrun, before the worker ever runs."""

from __future__ import annotations

import argparse

import pytest
from torch.distributed.run import get_args_parser

from ftrain.config import build_parser


def _flags() -> list[str]:
    out = []
    for action in build_parser()._actions:  # the default task's own options included
        out += [s for s in action.option_strings if s.startswith("--") and s != "--help"]
    return out


FLAGS = _flags()


def test_the_list_covers_the_service_and_the_default_task():
    for flag in ("--epochs", "--checkpoint-dir", "--log-level", "--storage-retry-attempts",
                 "--s3-part-mb", "--model", "--dataset", "--no-deterministic",
                 "--keep-best", "--best-metric", "--best-mode", "--early-stop-patience",
                 "--tracker", "--tracker-uri", "--tracker-project", "--tracker-run-name"):
        assert flag in FLAGS


@pytest.mark.parametrize("flag", FLAGS)
def test_torchrun_passes_the_flag_to_the_worker(flag):
    takes_value = not any(a.option_strings and flag in a.option_strings
                          and isinstance(a, argparse.BooleanOptionalAction)
                          for a in build_parser()._actions)
    worker = [flag, "1"] if takes_value else [flag]
    for form in (worker, [f"{flag}=1"] if takes_value else worker):
        try:
            args = get_args_parser().parse_args(["--nproc_per_node=2", "-m", "ftrain.train",
                                                 *form])
        except SystemExit:
            pytest.fail(f"torchrun refuses {' '.join(form)} after -m ftrain.train")
        assert args.training_script == "ftrain.train" and args.module
        assert args.training_script_args == form, (flag, args.training_script_args)


def test_every_behaviour_knob_is_an_option_with_its_variable():
    """The FTT_* knobs are options like any other: a flag, a YAML key and their variable."""
    from ftrain.config import load_config

    cfg = load_config(["--storage-retry-attempts", "2", "--s3-part-mb", "8"],
                      environ={"FTT_LOG_LEVEL": "debug", "FTT_DATA_CACHE": "/tmp/c",
                               "FTT_PROGRESS": "off", "FTT_STORAGE_RETRY_DEADLINE": "5"})
    assert (cfg.log_level, cfg.data_cache, cfg.progress) == ("DEBUG", "/tmp/c", "off")
    tuning = cfg.storage_tuning()
    assert (tuning.retry.attempts, tuning.retry.deadline, tuning.s3_part_size) == (
        2, 5.0, 8 * 2**20)
    text = build_parser().format_help()
    for flag in ("--log-level", "--progress", "--data-cache", "--storage-retry-attempts",
                 "--storage-retry-deadline", "--storage-retry-base-delay", "--s3-part-mb",
                 "--s3-concurrency"):
        assert flag in text
    assert "storage options" in text
