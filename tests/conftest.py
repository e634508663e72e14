from pathlib import Path

import pytest

pytest_plugins = ["tests.harness.s3"]

TESTS = Path(__file__).resolve().parent
# The tiers, by folder: unit runs in-process, integration starts real torchrun and CLI
# processes, system holds the chaos runs, elastic node loss and peak memory.
TIERS = ("unit", "integration", "system")


@pytest.hookimpl(tryfirst=True)  # before -m deselects: ``pytest -m unit`` sees the marks
def pytest_collection_modifyitems(items):
    """Mark every test with its tier, taken from the folder it is in."""
    for item in items:
        parts = Path(item.path).resolve().relative_to(TESTS).parts
        if parts[0] in TIERS:
            item.add_marker(parts[0])


@pytest.fixture
def ckdir(tmp_path):
    d = tmp_path / "ckpt"
    return d
