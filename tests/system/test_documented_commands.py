"""Every command of the README and the guides, run as a reader runs it (``pytest -m docs``;
``.ci/run`` runs it after the default suite, ``make test-docs`` alone).

Each document's ```bash blocks run in order, line by line, in one fresh folder (what the
reader's checkout holds is linked in: ``.venv``, ``src``, ``examples``, ``Makefile``,
``pyproject.toml``), with the ``<!-- NAME.py -->`` modules of the same document saved there. So
``ckpt inspect ./checkpoints`` reads what the training command above it wrote. The commands are
the documents' own; the environment makes them short and local:

- ``FTT_MAX_STEPS=3``: every run stops (with its final checkpoint) after 3 steps, unless the
  command says ``--max-steps`` itself;
- ``s3://bucket/...`` is a bucket of that name on moto's S3 server (AWS_ENDPOINT_URL);
- ``torchrun`` and ``python`` are the checkout's.

A command that shows an error on purpose (``# fails on purpose``) must exit non-zero. What is
not run says why, in ``SKIPPED`` below; the README's quick start is run whole by
tests/integration/test_docs.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.markdown import HOW_TO, ROOT, blocks, logical_lines, rel, save_modules
from tests.harness.processes import base_env
from tests.harness.s3lab import s3_env

pytestmark = pytest.mark.docs

# (text in the command, why it is not run here)
SKIPPED = [
    ("make test", "it is the suite this runs in"),
    ("pip install", "CI installs the checkout with `make test`; a second install adds nothing"),
    ("--download", "CI has no internet: the download is the dataset's own code"),
]
LINKED = (".venv", "src", "examples", "Makefile", "pyproject.toml")
STEPS = "3"


def runnable(path: Path) -> list[tuple[int, str, bool]]:
    """(line, command, fails on purpose) of a document's bash blocks, the quick start's
    block left out."""
    out = []
    for lang, first, lines, marker in blocks(path):
        if lang != "bash" or marker == "quickstart":
            continue
        for line, text in logical_lines(lines, first):
            command = text.strip()
            if command and not command.startswith("#"):
                out.append((line, command, "# fails on purpose" in command))
    return out


def skip_reason(command: str) -> str | None:
    return next((why for text, why in SKIPPED if text in command), None)


@pytest.fixture
def workspace(tmp_path, moto_server) -> tuple[Path, dict[str, str]]:
    """A reader's folder with the checkout's pieces linked in, and the environment."""
    venv = Path(sys.prefix)
    for name in LINKED:
        source = venv if name == ".venv" else ROOT / name
        (tmp_path / name).symlink_to(source)
    moto_server.reset()
    s3 = s3_env(moto_server.url)
    moto_server.client.create_bucket(Bucket="bucket")
    env = base_env({**s3, "FTT_MAX_STEPS": STEPS, "WANDB_DIR": str(tmp_path),
                    "MPLBACKEND": "Agg",
                    "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"})
    env.pop("AWS_PROFILE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    return tmp_path, env


@pytest.mark.parametrize("path", HOW_TO, ids=rel)
def test_documented_commands_run(path, workspace):
    folder, env = workspace
    save_modules(path, folder)
    ran, skipped = [], []
    for line, command, fails in runnable(path):
        why = skip_reason(command)
        if why is not None:
            skipped.append(f"{rel(path)}:{line}: {command} ({why})")
            continue
        r = subprocess.run(["bash", "-c", command], cwd=folder, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        where = f"{rel(path)}:{line}: {command}\nexit {r.returncode}\n{r.stdout[-4000:]}"
        if fails:
            assert r.returncode != 0, where
        else:
            assert r.returncode == 0, where
        ran.append(command)
    print(f"{rel(path)}: ran {len(ran)} commands; not run: {skipped or 'none'}")
    assert ran or not runnable(path) or skipped
