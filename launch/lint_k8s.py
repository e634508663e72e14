"""``python -m launch.lint_k8s``: validate launch/k8s/*.yaml offline against the schemas of a
pinned Kubernetes version, with kubernetes-validate --strict (unknown fields fail). ``make lint``
runs it; no cluster is used.

kubernetes-validate knows no custom resources: it only warns that it has no schema for the
PyTorchJob. So each PyTorchJob replica's pod template is validated as a core/v1 PodTemplate of
its own, and the PyTorchJob's own fields against its schema by tests/unit/test_deploy.py. Any
other warning (a kind or an apiVersion it does not know: a typo) fails, as an error does.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "launch" / "k8s").glob("*.yaml"))
# 1.31: podFailurePolicy is GA there. The installed kubernetes-validate (the test extra) ships
# this version's schemas.
KUBERNETES_VERSION = "1.31.0"
TOOL = Path(sys.executable).parent / "kubernetes-validate"


def pod_templates(manifests: list[Path], folder: Path) -> list[Path]:
    """Each PyTorchJob replica's pod template, written to ``folder`` as a PodTemplate."""
    out = []
    for path in manifests:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "PyTorchJob":
                continue
            for role, spec in doc["spec"]["pytorchReplicaSpecs"].items():
                name = f"{doc['metadata']['name']}-{role.lower()}"
                f = folder / f"{name}.yaml"
                f.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "PodTemplate",
                                             "metadata": {"name": name},
                                             "template": spec["template"]}))
                out.append(f)
    return out


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        paths = [*MANIFESTS, *pod_templates(MANIFESTS, Path(tmp))]
        result = subprocess.run([str(TOOL), "--strict", "-k", KUBERNETES_VERSION,
                                 *map(str, paths)], capture_output=True, text=True)
    output = result.stdout + result.stderr
    print(output, end="")
    unexpected = [line for line in output.splitlines() if line.startswith(("WARN", "ERROR"))
                  and "kind PyTorchJob" not in line]
    if result.returncode or unexpected:
        print(f"kubernetes-validate: {len(unexpected)} unexpected warnings or errors",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
