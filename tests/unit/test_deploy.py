"""Offline checks of what deploys the trainer: the Dockerfiles (structure, pins, hadolint's
ignores explained), the Kubernetes manifests in launch/k8s (a PyTorchJob schema, what each must
have), and every training command line they and their docs carry, parsed by our own config
parser and torchrun's so that none can drift from the CLI. No Docker engine and no cluster are
used: nothing is built or applied.

The third-party linters run through their own tools, in ``make lint``: hadolint on the
Dockerfiles, and kubernetes-validate against the schemas of a pinned Kubernetes version
(``python -m launch.lint_k8s``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ftrain.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "launch" / "k8s"
DOCKER = ROOT / "docker"
FIXTURES = ROOT / "tests" / "fixtures" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
# Documents whose command lines we own; each must show at least one training command.
COMMAND_DOCS = [DOCKER / "README.md", ROOT / "docs" / "operations" / "kubernetes.md"]

LAUNCHER = ["ftrain-run"]
TRAIN_MODULES = ("ftrain.train", "src.train")
HEARTBEAT_AGE = re.compile(r"-lt (\d+)")
# Seconds between one step + --preemption-deadline, torchrun's --shutdown-timeout and the pod's
# terminationGracePeriodSeconds (docs/operations/preemption.md, "Time budget").
MARGIN_S = 10


# ------------------------------------------------------------------ helpers: commands
def split_training_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's arguments, the trainer's arguments) of a command that runs a training
    module: ``ftrain-run A... -m ftrain.train B...``, ``torchrun A... -m src.train
    B...`` or ``python -m ftrain.train B...`` (no torchrun: A is empty)."""
    for i in range(len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] in TRAIN_MODULES:
            head, train = argv[:i], argv[i + 2:]
            break
    else:
        raise AssertionError(f"no '-m ftrain.train' in {argv}")
    for launcher in (LAUNCHER, ["python", "-m", "torch.distributed.run"], ["torchrun"]):
        for start in range(len(head)):
            if head[start:start + len(launcher)] == launcher:
                return head[start + len(launcher):], train
    assert Path(head[-1]).name.startswith("python"), f"what runs {argv}?"
    return [], train


def parse_torchrun(args: list[str]) -> Any:
    """torchrun's own parser over ``args`` (each manifest's launcher arguments)."""
    from torch.distributed.run import get_args_parser

    try:
        return get_args_parser().parse_args([*args, "-m", "ftrain.train"])
    except SystemExit:
        pytest.fail(f"torchrun rejects {args}")


def parse_training(args: list[str], environ: dict[str, str] | None = None) -> Config:
    """Our config parser over ``args``: the same Config the trainer would build."""
    try:
        return load_config(args, environ or {})
    except SystemExit:  # argparse: an unknown flag, or a missing value
        pytest.fail(f"ftrain.train rejects the flags {args} (see the error above)")
    except ConfigError as e:
        pytest.fail(f"ftrain.train rejects {args}: {e}")


def option(args: list[str], name: str) -> str | None:
    """The value of ``--name`` in ``args`` (``--name=V`` or ``--name V``), else None."""
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None


def replace_option(args: list[str], name: str, value: str) -> list[str]:
    out = []
    skip = False
    for a in args:
        if skip:
            skip = False
            out.append(value)
        elif a.startswith(name + "="):
            out.append(f"{name}={value}")
        else:
            out.append(a)
            skip = a == name
    return out


# ------------------------------------------------------------------ helpers: manifests
def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def pod_specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod template in a workload document."""
    if doc["kind"] == "Job":
        return [(f"job/{doc['metadata']['name']}", doc["spec"]["template"]["spec"])]
    if doc["kind"] == "PyTorchJob":
        return [(f"pytorchjob/{doc['metadata']['name']}/{role}", spec["template"]["spec"])
                for role, spec in doc["spec"]["pytorchReplicaSpecs"].items()]
    return []


def workloads() -> list[tuple[Path, dict[str, Any]]]:
    found = [(p, d) for p in MANIFESTS for d in documents(p) if pod_specs(d)]
    kinds = {d["kind"] for _, d in found}
    assert {"Job", "PyTorchJob"} <= kinds, f"missing workloads; found {kinds}"
    return found


def one_container(where: str, spec: dict[str, Any]) -> dict[str, Any]:
    assert len(spec["containers"]) == 1, f"{where}: one training container expected"
    return spec["containers"][0]


def container_config(path: Path, spec: dict[str, Any], container: dict[str, Any],
                     tmp_path: Path) -> tuple[Any, Config]:
    """(torchrun's parsed arguments, the trainer's Config) of a manifest's container, with the
    ConfigMap that its --config names written to ``tmp_path`` and read from there."""
    assert container["command"] == LAUNCHER, f"{path.name}: PID 1 must be ftrain-run, exec form"
    torchrun_args, train_args = split_training_command(container["command"] + container["args"])
    config_path = option(train_args, "--config")
    assert config_path, f"{path.name}: no --config: the options belong in the ConfigMap"
    mount = next((m for m in container.get("volumeMounts", [])
                  if config_path.startswith(m["mountPath"].rstrip("/") + "/")), None)
    assert mount, f"{path.name}: --config {config_path} is on no mounted volume"
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert "configMap" in volume, f"{path.name}: --config must come from a ConfigMap"
    key = config_path[len(mount["mountPath"].rstrip("/")) + 1:]
    maps = {d["metadata"]["name"]: d for d in documents(path) if d["kind"] == "ConfigMap"}
    cm_name = volume["configMap"]["name"]
    assert cm_name in maps, f"{path.name}: ConfigMap {cm_name} is not in this file"
    assert key in maps[cm_name]["data"], f"{path.name}: ConfigMap {cm_name} has no key {key}"
    local = tmp_path / f"{cm_name}-{key}"
    local.write_text(maps[cm_name]["data"][key])
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    cfg = parse_training(replace_option(train_args, "--config", str(local)), env)
    return parse_torchrun(torchrun_args), cfg


def world_sizes(doc: dict[str, Any], torchrun: Any) -> list[int]:
    """Every world size the workload may run with (nodes x processes per node)."""
    if doc["kind"] == "PyTorchJob":
        elastic = doc["spec"]["elasticPolicy"]
        nodes = range(elastic["minReplicas"], elastic["maxReplicas"] + 1)
        nproc = int(doc["spec"]["nprocPerNode"])
    else:
        low, _, high = str(torchrun.nnodes).partition(":")
        nodes = range(int(low), int(high or low) + 1)
        nproc = int(torchrun.nproc_per_node)
    return [n * nproc for n in nodes]


# ------------------------------------------------------------------ helpers: Dockerfiles
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        word, _, rest = text.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def shell_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at ``&&``, ``||``, ``;`` and ``|``)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def build_args(path: Path) -> dict[str, str]:
    """The defaults of a Dockerfile's ARGs: what a plain ``docker build`` uses. Every ARG has
    one (a build that must name its base or its torch is not one a user can run as is)."""
    out: dict[str, str] = {}
    for word, args in instructions(path):
        if word == "ARG":
            name, sep, default = args.partition("=")
            assert sep and default, f"{path.name}: ARG {name} has no default"
            out[name] = shlex.split(default)[0]
    return out


def expand(text: str, args: dict[str, str]) -> str:
    """``text`` with ``$NAME`` and ``${NAME}`` of the build arguments replaced by their
    defaults."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                  lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def base_images(path: Path) -> list[str]:
    """The images a default build of ``path`` starts FROM."""
    args = build_args(path)
    return [expand(a.split()[0], args) for word, a in instructions(path) if word == "FROM"]


def entrypoint(path: Path) -> list[str]:
    found = [json.loads(args) for word, args in instructions(path) if word == "ENTRYPOINT"]
    assert len(found) == 1, f"{path.name}: one ENTRYPOINT, in exec (JSON) form"
    return found[0]


# ------------------------------------------------------------------ Dockerfiles
def test_dockerfiles_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


def test_hadolint_ignores_say_why():
    """A hadolint rule (``make lint`` fails on its warnings) may be ignored only inline, with
    its reason."""
    for path in DOCKERFILES:
        for line in path.read_text().splitlines():
            if "hadolint ignore" in line:
                assert re.search(r"hadolint ignore=\S+\s+\S", line), \
                    f"{path.name}: say why the rule is ignored: {line.strip()}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(path):
    steps = instructions(path)
    bases = base_images(path)
    assert bases, f"{path.name}: no FROM"
    for base in bases:
        assert "$" not in base, f"{path.name}: FROM {base}: give its build argument a default"
        name, _, tag = base.partition("@")[0].rpartition(":")
        assert name and tag and tag != "latest", f"{path.name}: {base} is not pinned to a tag"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{path.name}: {base}: pin a full version"
    users = [args for word, args in steps if word == "USER"]
    assert users, f"{path.name}: no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{path.name}: USER {users[-1]}"
    assert entrypoint(path)[:1] == LAUNCHER, f"{path.name}: PID 1 must be ftrain-run"
    # Dependencies before sources: a source change must not reinstall the dependencies.
    order = [(word, args) for word, args in steps if word in ("COPY", "RUN")]
    first_src = next(i for i, (w, a) in enumerate(order) if w == "COPY" and a.startswith("src"))
    deps = next(i for i, (w, a) in enumerate(order)
                if w == "RUN" and "-r docker/requirements.txt" in a)
    assert deps < first_src, f"{path.name}: install the pinned dependencies before COPY src"
    # Every pip install is pinned: the requirements file, the project itself, or name==version
    # (with the build arguments' defaults, as a plain build runs it).
    defaults = build_args(path)
    for word, args in steps:
        if word != "RUN":
            continue
        for tokens in shell_commands(expand(args, defaults)):
            if tokens[:2] != ["pip", "install"]:
                continue
            packages = [t for t in tokens[2:] if not t.startswith("-")
                        and t not in ("docker/requirements.txt",
                                      "https://download.pytorch.org/whl/cpu")]
            for package in packages:
                assert package == "." or re.fullmatch(r"[\w.-]+==[\w.+-]+", package), \
                    f"{path.name}: pip install {package} is not pinned"


def test_images_pin_the_same_torch():
    """Both images run the same torch and torchvision (a checkpoint moves between them); the
    CPU image's are CPU-only builds from the PyTorch CPU index, which its build checks (the
    build arguments that change them are for builders that cannot reach that index)."""
    cpu, cuda = DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.cuda"
    [cuda_base] = base_images(cuda)
    m = re.fullmatch(r"docker\.io/pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime",
                     cuda_base)
    assert m, f"Dockerfile.cuda: {cuda_base} is not an official PyTorch runtime image"
    args = build_args(cpu)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["CUDA_BUILT"] == "False", "the CPU image's default build must refuse CUDA"
    run = " ".join(a for w, a in instructions(cpu) if w == "RUN")
    assert '--index-url "$TORCH_INDEX_URL" $TORCH_PACKAGES' in run
    assert "torch.backends.cuda.is_built() is $CUDA_BUILT" in run
    torch_pin = re.search(r"\btorch==(\S+)\+cpu", args["TORCH_PACKAGES"])
    assert torch_pin and torch_pin.group(1) == m.group(1), "the images pin different torch"
    vision_cpu = re.search(r"\btorchvision==(\S+)\+cpu", args["TORCH_PACKAGES"]).group(1)
    cuda_run = " ".join(a for w, a in instructions(cuda) if w == "RUN")
    assert f"'{vision_cpu}'" in cuda_run and f"'{m.group(1)}'" in cuda_run, \
        "Dockerfile.cuda must check the base image's torch/torchvision versions"
    assert "nvidia" not in expand(run, args).lower()
    assert base_images(cpu)[0].startswith("docker.io/library/python:3.11.")


def test_requirements_are_pinned():
    lines = [line.split("#")[0].strip() for line in
             (DOCKER / "requirements.txt").read_text().splitlines()]
    pins = [line for line in lines if line]
    assert pins
    for pin in pins:
        assert re.fullmatch(r"[\w.-]+==[\w.+-]+", pin), f"docker/requirements.txt: {pin}"
    names = {p.split("==")[0].lower().replace("_", "-") for p in pins}
    assert not names & {"torch", "torchvision"}, "torch comes from the CPU index or the base"
    # Whatever pyproject asks for at run time is pinned here (torch aside).
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in wanted:
        name = re.match(r"[\w.-]+", requirement).group(0).lower().replace("_", "-")
        assert name in names | {"torch", "torchvision"}, f"{name} is not pinned"


def test_dockerignore_keeps_only_what_the_images_copy():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert patterns[0] == "*", ".dockerignore: leave everything out, then let in what is copied"
    kept = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for path in DOCKERFILES:
        for word, args in instructions(path):
            if word == "COPY":
                for source in shlex.split(args)[:-1]:
                    if not source.startswith("--"):
                        assert source.rstrip("/") in kept, \
                            f"{path.name} copies {source}, which .dockerignore leaves out"
    assert not kept & {".venv", ".git", "checkpoints", "data", "tests", "runs"}


# ------------------------------------------------------------------ Kubernetes: schemas
def strict(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema where every object that lists its properties allows no
    others (a CRD's schema lets the API server prune unknown fields silently)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def pytorchjobs() -> list[dict[str, Any]]:
    return [d for _, d in workloads() if d["kind"] == "PyTorchJob"]


def test_pytorchjob_matches_its_schema():
    schema = json.loads((FIXTURES / "pytorchjob-v1.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for doc in pytorchjobs():
        jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)
        broken = json.loads(json.dumps(doc))
        broken["spec"]["elasticPolicy"]["minReplica"] = 1  # misspelt: must fail
        with pytest.raises(jsonschema.ValidationError, match="minReplica"):
            jsonschema.validate(broken, schema, cls=jsonschema.Draft202012Validator)


def test_pytorchjob_matches_the_crd():
    """Optional: against the CRD's own schema, made strict, when FTT_PYTORCHJOB_CRD names the
    CRD file (tests/fixtures/k8s/README.md says where it comes from)."""
    crd_file = os.environ.get("FTT_PYTORCHJOB_CRD")
    if not crd_file:
        pytest.skip("set FTT_PYTORCHJOB_CRD to the PyTorchJob CRD file to run this")
    crd = next(d for d in yaml.safe_load_all(Path(crd_file).read_text())
               if d and d.get("kind") == "CustomResourceDefinition")
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strict(version["schema"]["openAPIV3Schema"])
    for doc in pytorchjobs():
        jsonschema.validate(doc, schema, cls=jsonschema.Draft7Validator)


# ------------------------------------------------------------------ Kubernetes: contents
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_training_command_parses(path, tmp_path):
    """The container's arguments (torchrun's and the trainer's) and its ConfigMap pass our
    parsers; the time budget and the global batch fit the manifest."""
    for doc in documents(path):
        for where, spec in pod_specs(doc):
            container = one_container(where, spec)
            torchrun, cfg = container_config(path, spec, container, tmp_path)
            # one step + --preemption-deadline < --shutdown-timeout < terminationGracePeriod
            grace = spec["terminationGracePeriodSeconds"]
            assert torchrun.shutdown_timeout is not None, f"{where}: set --shutdown-timeout"
            assert cfg.preemption_deadline + MARGIN_S <= torchrun.shutdown_timeout, where
            assert torchrun.shutdown_timeout + MARGIN_S <= grace, where
            for world in world_sizes(doc, torchrun):
                assert cfg.batch_size % world == 0, \
                    f"{where}: --batch-size {cfg.batch_size} does not divide by world {world}"
            # The probes watch the file the trainer touches; the metrics port is exposed.
            assert cfg.heartbeat_file, f"{where}: pass --heartbeat-file"
            for probe in ("startupProbe", "livenessProbe"):
                command = " ".join(container[probe]["exec"]["command"])
                assert cfg.heartbeat_file in command, f"{where}: {probe} watches another file"
            startup = container["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, \
                f"{where}: give start-up at least 10 minutes"
            max_age = int(HEARTBEAT_AGE.search(
                " ".join(container["livenessProbe"]["exec"]["command"])).group(1))
            assert max_age > cfg.dist_timeout + cfg.preemption_deadline, \
                f"{where}: a {max_age} s heartbeat would kill a pod the trainer still handles"
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            assert cfg.metrics_port and ports.get("metrics") == cfg.metrics_port, \
                f"{where}: expose --metrics-port as the container port named 'metrics'"


def test_training_parse_rejects_bad_input(tmp_path):
    """The parse above has teeth: a misspelt flag, or a misspelt key or a bad value in the
    ConfigMap's file, fails."""
    config = tmp_path / "train.yaml"
    config.write_text("epochs: 3\n")
    with pytest.raises(SystemExit):
        load_config([f"--config={config}", "--epocs=3"], {})
    for text in ("epoch: 3\n", "batch_size: many\n"):
        config.write_text(text)
        with pytest.raises(ConfigError):
            load_config([f"--config={config}"], {})


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_has_what_it_must(path):
    docs = documents(path)
    for doc in docs:
        for where, spec in pod_specs(doc):
            container = one_container(where, spec)
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), \
                f"{where}: pin the image tag"
            assert spec["securityContext"]["runAsNonRoot"] is True, where
            assert isinstance(spec.get("terminationGracePeriodSeconds"), int), where
            # /dev/shm in memory, for the DataLoader workers.
            shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
            volume = next(v for v in spec["volumes"] if v["name"] == shm["name"])
            assert volume["emptyDir"]["medium"] == "Memory", where
            # S3 credentials from a Secret, never inline.
            refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
                    if "secretKeyRef" in e.get("valueFrom", {})}
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(refs), where
            assert not [e for e in container["env"]
                        if "SECRET" in e["name"] and "value" in e], where
            for probe in ("startupProbe", "livenessProbe"):
                assert "exec" in container[probe], f"{where}: {probe} must be an exec probe"
        if doc["kind"] == "Job":
            check_job(path, doc, docs)
        if doc["kind"] == "PyTorchJob":
            check_pytorchjob(doc)


def check_job(path: Path, job: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    spec = job["spec"]
    pod = spec["template"]["spec"]
    container = one_container(path.name, pod)
    assert pod["restartPolicy"] == "Never", "podFailurePolicy requires restartPolicy Never"
    rules = spec["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob" and "onExitCodes" in r]
    assert fail and fail[0]["onExitCodes"]["operator"] == "In"
    assert sorted(fail[0]["onExitCodes"]["values"]) == [1, 2]
    assert fail[0]["onExitCodes"]["containerName"] == container["name"]
    ignore = [c for r in rules if r["action"] == "Ignore" for c in r.get("onPodConditions", [])]
    assert {"type": "DisruptionTarget", "status": "True"} in ignore
    if spec.get("completionMode") != "Indexed":
        return
    # Several nodes: a headless Service gives pod 0 the name the rendezvous uses.
    name = job["metadata"]["name"]
    assert spec["completions"] == spec["parallelism"] >= 2
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    service = services[pod["subdomain"]]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    torchrun_args, _ = split_training_command(container["command"] + container["args"])
    torchrun = parse_torchrun(torchrun_args)
    assert torchrun.rdzv_backend == "c10d"
    assert torchrun.rdzv_endpoint.startswith(f"{name}-0.{service['metadata']['name']}.")
    assert str(torchrun.nnodes).rpartition(":")[2] == str(spec["completions"])
    port = int(torchrun.rdzv_endpoint.rpartition(":")[2])
    assert port in [p["port"] for p in service["spec"]["ports"]]


def check_pytorchjob(job: dict[str, Any]) -> None:
    elastic = job["spec"]["elasticPolicy"]
    assert elastic["rdzvBackend"] == "c10d"
    assert 1 <= elastic["minReplicas"] <= elastic["maxReplicas"]
    assert elastic["maxRestarts"] >= 1
    for role, replica in job["spec"]["pytorchReplicaSpecs"].items():
        assert replica["restartPolicy"] == "ExitCode", role
        assert elastic["minReplicas"] <= replica["replicas"] <= elastic["maxReplicas"], role
        # The operator reads this container's exit code and gives it the PET_* settings.
        assert one_container(role, replica["template"]["spec"])["name"] == "pytorch", role


# ------------------------------------------------------------------ commands in the docs
def doc_commands(path: Path) -> list[list[str]]:
    """The training command lines in ``path``'s fenced code blocks (continuations joined)."""
    commands, block, joined = [], False, ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            block, joined = not block, ""
            continue
        if not block:
            continue
        text = joined + line.strip()
        if text.endswith("\\"):
            joined = text[:-1] + " "
            continue
        joined = ""
        text = text.removeprefix("$ ")
        if re.search(r"-m (ftrain|src)\.train\b", text) or text.startswith("docker run "):
            commands.append(shlex.split(text, comments=True))
    return commands


@pytest.mark.parametrize("path", COMMAND_DOCS, ids=lambda p: p.name)
def test_documented_commands_parse(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    commands = doc_commands(path)
    assert commands, f"{path}: no training command found"
    for tokens in commands:
        if tokens[:2] == ["docker", "run"]:
            image = next(i for i, t in enumerate(tokens) if re.search(r"ftrain:[\w.-]+$", t))
            flavour = "cuda" if "cuda" in tokens[image] else "cpu"
            tokens = entrypoint(DOCKER / f"Dockerfile.{flavour}") + tokens[image + 1:]
        torchrun_args, train_args = split_training_command(tokens)
        if torchrun_args:
            parse_torchrun(torchrun_args)
        parse_training(train_args)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_entrypoint_parses(path):
    torchrun_args, train_args = split_training_command(entrypoint(path))
    torchrun = parse_torchrun(torchrun_args)
    assert torchrun.shutdown_timeout is not None
    parse_training(train_args)
