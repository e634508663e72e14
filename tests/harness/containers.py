"""The CPU image built and run with podman, for tests/integration/test_container.py: the base
image made locally when no registry can be reached (launch/container_base.sh), this machine's
pip settings lent to the build as read-only mounts (never copied into the image), the torch the
build can reach, and containers run the way the Kubernetes manifests run them."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from tests.harness.processes import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile.cpu"
IMAGE = "localhost/ftrain:cpu-test"
# Made by launch/container_base.sh when missing: Debian 12 and its Python 3.11, the Python of
# the Dockerfile's default base. FTT_CONTAINER_BASE names another (one with python, pip,
# groupadd and useradd), such as the default python:3.11.14-slim-trixie where a registry is
# reachable.
LOCAL_BASE = "localhost/ftrain-base:bookworm-py311"
# The image's user (the manifests' runAsUser).
UID = 10001
# The CPU wheels of the Dockerfile's default TORCH_INDEX_URL.
CPU_INDEX = "https://download.pytorch.org/whl/cpu/"


def podman() -> list[str]:
    """podman and its global options: ``$FTT_PODMAN`` (for instance ``podman --storage-driver
    vfs`` where overlay cannot be mounted), else plain podman."""
    return shlex.split(os.environ.get("FTT_PODMAN", "podman"))


def run_options() -> list[str]:
    """Options every ``podman run`` here needs. runc: crun refuses a hybrid (v1) cgroup layout.
    The ulimits: podman's defaults lie above a hard limit of this machine (nofile 20000), and
    runc then cannot start the container; 1024 is plenty for 2 workers."""
    runtime = ["--runtime", "runc"] if shutil.which("runc") else []
    return [*runtime, "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def missing() -> str | None:
    """Why the container tests cannot run here, None when they can."""
    if shutil.which(podman()[0]) is None:
        return (f"{podman()[0]} is not installed (apt-get install podman runc; "
                f"$FTT_PODMAN names another)")
    if os.geteuid() != 0:
        return "the container tests run podman as root (the base image needs debootstrap)"
    return None


def call(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """``podman args...``; fails the test with podman's output when it fails and ``check``."""
    r = subprocess.run([*podman(), *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {r.returncode}:\n"
                             f"{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return r


def image_exists(name: str) -> bool:
    return call("image", "exists", name, check=False).returncode == 0


def ensure_base() -> tuple[str, bool]:
    """(the base image to build from, whether it was made now). Makes the local one with
    launch/container_base.sh when it is missing (debootstrap from Debian's mirror: about a
    minute here)."""
    chosen = os.environ.get("FTT_CONTAINER_BASE")
    if chosen:
        return chosen, False
    if image_exists(LOCAL_BASE):
        return LOCAL_BASE, False
    assert shutil.which("debootstrap"), (
        f"no base image {LOCAL_BASE} and no debootstrap to make it (apt-get install "
        f"debootstrap), or give one with FTT_CONTAINER_BASE")
    r = subprocess.run(["bash", str(ROOT / "launch" / "container_base.sh"), LOCAL_BASE],
                       env={**os.environ, "PODMAN": shlex.join(podman())},
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"launch/container_base.sh failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
    return LOCAL_BASE, True


# ------------------------------------------------------------------ pip settings for the build
def pip_settings() -> dict[str, str]:
    """This machine's pip settings as pip merges them (files, then PIP_* variables): key ->
    value, without the section."""
    r = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                       text=True, timeout=60, check=True)
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in r.stdout.splitlines():
        m = re.fullmatch(r"([^=]+)=(['\"])(.*)\2", line.strip())
        if not m:
            continue
        where, _, key = m.group(1).rpartition(".")
        (env if where.startswith(":env:") else files)[key] = m.group(3)
    return {**files, **env}


def local_paths(settings: dict[str, str]) -> list[Path]:
    """The files and folders of this machine that the settings name: a certificate bundle, a
    constraints file, find-links folders, file:// indexes (mounted whole: a local index keeps
    its files next to its ``simple/``)."""
    out: set[Path] = set()
    for value in settings.values():
        for token in value.split():
            if token.startswith("file://"):
                path = Path(urllib.parse.urlparse(token).path)
                out.add(path.parent if path.name == "simple" else path)
            elif token.startswith("/"):
                out.add(Path(token))
    return sorted(p for p in out if p.exists())


def pip_mounts(folder: Path) -> list[str]:
    """``-v`` options that lend this machine's pip settings to the build's RUN steps: the
    merged settings as /etc/pip.conf and every local path they name at its own place, all
    read-only. A build mount is not part of any layer (only its empty mount point is)."""
    settings = pip_settings()
    conf = folder / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    mounts = [f"{conf}:/etc/pip.conf:ro"]
    mounts += [f"{p}:{p}:ro" for p in local_paths(settings)]
    return [arg for m in mounts for arg in ("-v", m)]


# ------------------------------------------------------------------ which torch
def cpu_index_reachable() -> bool:
    try:
        with urllib.request.urlopen(CPU_INDEX + "torch/", timeout=15):
            return True
    except OSError:
        return False


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def torch_closure() -> list[str]:
    """``name==version`` of this environment's torch and torchvision and of everything they
    need that docker/requirements.txt does not pin (the CUDA libraries of PyPI's torch, triton):
    the image installs with --no-deps, so the whole set is named."""
    from packaging.requirements import Requirement

    pinned = {_name(line.split("==")[0]) for line in
              (ROOT / "docker" / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    found: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [("torch", frozenset()), ("torchvision", frozenset())]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in done:
            continue
        done.add((name, extras))
        dist = importlib.metadata.distribution(name)
        found[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e})
                                      for e in (extras or {""})):
                continue
            if _name(req.name) not in pinned:
                todo.append((_name(req.name), frozenset(req.extras)))
    return [f"{n}=={v}" for n, v in sorted(found.items())]


def torch_build_args() -> tuple[list[str], str]:
    """(the --build-arg options for torch, what they chose and why). The Dockerfile's own
    CPU-only wheels when their index answers; else this environment's torch and torchvision
    (the same versions) from the package index pip is configured with, a CUDA build that
    also runs on CPU, with its CUDA libraries."""
    if cpu_index_reachable():
        return [], f"the Dockerfile's default: CPU-only torch from {CPU_INDEX}"
    index = pip_settings().get("index-url", "https://pypi.org/simple")
    packages = torch_closure()
    args = ["--build-arg", f"TORCH_INDEX_URL={index}",
            "--build-arg", f"TORCH_PACKAGES={' '.join(packages)}",
            "--build-arg", "CUDA_BUILT=True"]
    torches = [p for p in packages if p.startswith(("torch==", "torchvision=="))]
    return args, (f"{CPU_INDEX} is unreachable here: {' and '.join(torches)} with their "
                  f"{len(packages) - 2} dependencies from {index} (PyPI's torch, a CUDA build)")


# ------------------------------------------------------------------ the image
def entrypoint(nproc: int) -> list[str]:
    """The Dockerfile's ENTRYPOINT with ``--nproc_per_node`` set to ``nproc``."""
    line = next(line for line in DOCKERFILE.read_text().splitlines()
                if line.startswith("ENTRYPOINT "))
    argv = json.loads(line.split(" ", 1)[1])
    out = [re.sub(r"^--nproc_per_node=.*", f"--nproc_per_node={nproc}", a) for a in argv]
    assert out != argv, f"{DOCKERFILE.name}: no --nproc_per_node= in {argv}"
    return out


def build(tmp: Path, base: str) -> tuple[str, str]:
    """Build the CPU image as ``IMAGE`` from the repository root. Returns (what torch it
    carries and why, podman's output)."""
    torch_args, why = torch_build_args()
    before = image_id(IMAGE)
    cmd = ["build", "--isolation", "chroot", "-f", str(DOCKERFILE), "-t", IMAGE,
           "--build-arg", f"BASE_IMAGE={base}", *torch_args, *pip_mounts(tmp), str(ROOT)]
    r = call(*cmd, timeout=3600)
    if before and before != image_id(IMAGE):
        # The previous build, now untagged: several GB that nothing uses (its layers shared
        # with the new one stay).
        call("rmi", before, check=False)
    return why, r.stdout + r.stderr


def image_id(name: str) -> str | None:
    r = call("image", "inspect", "--format", "{{.Id}}", name, check=False)
    return r.stdout.strip() if r.returncode == 0 else None


def image_size(name: str) -> int:
    return int(call("image", "inspect", "--format", "{{.Size}}", name).stdout)


def image_user(name: str) -> str:
    return call("image", "inspect", "--format", "{{.Config.User}}", name).stdout.strip()


# ------------------------------------------------------------------ containers
def exit_code(name: str) -> int:
    """The exit code of a container that has stopped (waits for it)."""
    return int(call("wait", name, timeout=600).stdout.strip())


def logs(name: str) -> str:
    """Everything the container printed, over all its starts."""
    r = call("logs", name)
    return r.stdout + r.stderr


def remove(name: str) -> None:
    call("rm", "--force", "--ignore", name, check=False)
