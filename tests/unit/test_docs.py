"""The documentation is checked like code: every relative link resolves (anchors included),
every training and ckpt command line in a ```bash block is accepted by our own parsers, every
```python block compiles and the tasks it defines build a model and compute a loss, every
```yaml block of the README and the guides is a valid --config file, and the options reference is
the schema's (the README's quick start runs for real: tests/integration/test_docs.py).

Conventions the documents follow for this:
- ``<!-- quickstart -->`` on the line before the README's quick-start block;
- ``<!-- NAME.py -->`` on the line before a ```python block that a command in the same file
  imports (``--task NAME:Class``): the test saves the block as NAME.py on the import path;
- a command that shows an error on purpose ends with the comment ``# fails on purpose``.
"""

from __future__ import annotations

import ast
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import default_collate

from ftrain.config import ConfigError, load_config
from ftrain.config.reference import markdown
from ftrain.tasks import Task, TaskContext
from tests.harness.markdown import DOCS, HOW_TO, ROOT, blocks, logical_lines, rel, save_modules

TRAIN = re.compile(r"^(ftrain|src)\.train$")
CKPT = re.compile(r"^(ftrain|src)\.ckpt$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


# ------------------------------------------------------------------ reading Markdown


def prose(path: Path) -> str:
    """The text outside fenced blocks and inline code."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces
    to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a document's headings (inline code in a heading counts: its backticks
    are dropped, not its text)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    found: set[str] = set()
    for line in text.splitlines():
        if line.startswith("#"):
            base = slug(line.lstrip("#").replace("`", ""))
            name, n = base, 0
            while name in found:  # a repeated heading gets -1, -2, ...
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def commands(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, tokens) of every simple command in the ```bash blocks, continuation lines
    joined, comments dropped, split at ``&&``, ``||``, ``;``, ``|`` and ``&``."""
    out = []
    for lang, first, lines, _marker in blocks(path):
        if lang != "bash":
            continue
        for start, text in logical_lines(lines, first):
            if not text.strip() or text.lstrip().startswith("#") or "# fails on purpose" in text:
                continue
            lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            current: list[str] = []
            for token in lexer:
                if set(token) <= set("();<>|&"):
                    if current:
                        out.append((start, current))
                    current = []
                else:
                    current.append(token)
            if current:
                out.append((start, current))
    return out


def args_after(tokens: list[str], module: re.Pattern[str], script: str) -> list[str] | None:
    """The arguments a command gives ``-m <module>`` (or the console script), else None."""
    for i, token in enumerate(tokens):
        if token == "-m" and i + 1 < len(tokens) and module.match(tokens[i + 1]):
            return tokens[i + 2:]
        if Path(token).name == script:
            return tokens[i + 1:]
    return None


# ------------------------------------------------------------------ links
@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_links_resolve(path):
    assert path.exists(), f"{rel(path)} is missing"
    broken = []
    for target in LINK.findall(prose(path)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {rel(dest)}")
    assert not broken, f"{rel(path)}: " + "; ".join(broken)


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert lines[2:4] and lines[2] == "```bash", "the README starts with the set-up commands"
    assert lines[3].startswith("make run ") and lines[4].startswith("make test "), lines[3:5]
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; move the detail into docs/"
    for name in ("PERFORMANCE.md", "DESIGN.md"):
        assert name not in text, f"README.md points to {name}, which is not in the project"


@pytest.mark.parametrize("path", HOW_TO, ids=rel)
def test_guides_carry_no_dated_history(path):
    dated = [line for line in prose(path).splitlines() if re.search(r"\b20\d\d-\d\d-\d\d\b", line)]
    assert not dated, f"{rel(path)}: dated text belongs in CHANGELOG.md or the benchmarks: {dated}"


# ------------------------------------------------------------------ code and commands
@pytest.fixture
def doc_modules(tmp_path, monkeypatch):
    """Make a document's marked modules importable, and forget them afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    saved: list[str] = []

    def load(path: Path) -> list[str]:
        names = save_modules(path, tmp_path)
        saved.extend(names)
        return names

    yield load
    for name in saved:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_python_blocks_compile(path):
    for lang, first, lines, _marker in blocks(path):
        if lang == "python":
            try:
                ast.parse("\n".join(lines))
            except SyntaxError as e:
                pytest.fail(f"{rel(path)}:{first + (e.lineno or 1) - 1}: {e.msg}")


@pytest.mark.parametrize("path", HOW_TO, ids=rel)
def test_documented_tasks_build_and_compute_a_loss(path, doc_modules):
    import importlib

    ctx = TaskContext(seed=0, data_dir=str(ROOT / "data"), download=False, rank=0,
                      world_size=1, local_rank=0)
    names = doc_modules(path)
    tasks = [v for name in names for v in vars(importlib.import_module(name)).values()
             if isinstance(v, type) and issubclass(v, Task) and v.__module__ == name]
    assert tasks or not names, f"{rel(path)}: {', '.join(names)} define no Task"
    for cls in tasks:
        task = cls()
        torch.manual_seed(0)
        model = task.build_model()
        train, _eval = task.datasets(ctx)
        inputs, targets = default_collate([train[i] for i in range(4)])
        loss, sums = task.loss(task.forward(model, inputs), targets)
        assert loss.ndim == 0 and sums, f"{rel(path)}: {cls.__name__}.loss"


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_training_commands_parse(path, doc_modules, monkeypatch):
    monkeypatch.chdir(ROOT)  # --config examples/charlm.yaml
    doc_modules(path)
    problems = []
    for line, tokens in commands(path):
        args = args_after(tokens, TRAIN, "ftrain-train")
        if args is None:
            continue
        try:
            load_config(args, environ={})
        except ConfigError as e:
            problems.append(f"{rel(path)}:{line}: {e}")
        except SystemExit:
            problems.append(f"{rel(path)}:{line}: ftrain.train rejects {args} (see above)")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_ckpt_commands_parse(path, capsys):
    from ftrain.ckpt import build_parser

    for line, tokens in commands(path):
        args = args_after(tokens, CKPT, "ftrain-ckpt")
        if args is not None:
            try:
                build_parser().parse_args(args)
            except SystemExit:
                pytest.fail(f"{rel(path)}:{line}: ftrain.ckpt rejects {args}: "
                            f"{capsys.readouterr().err}")


@pytest.mark.parametrize("path", HOW_TO, ids=rel)
def test_yaml_blocks_are_config_files(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    for lang, first, lines, _marker in blocks(path):
        if lang == "yaml":
            file = tmp_path / "job.yaml"
            file.write_text("\n".join(lines) + "\n")
            assert isinstance(yaml.safe_load(file.read_text()), dict), f"{rel(path)}:{first}"
            try:
                load_config(["--config", str(file)], environ={})
            except (ConfigError, SystemExit) as e:
                pytest.fail(f"{rel(path)}:{first}: not a valid --config file: {e}")


def test_options_reference_is_generated_from_the_schema():
    page = (ROOT / "docs" / "reference" / "options.md").read_text()
    assert page == markdown(), ("docs/reference/options.md is stale; regenerate it with: "
                                "python -m ftrain.config.reference > docs/reference/options.md")


def test_the_module_map_names_every_module():
    """docs/development/architecture.md's map of src/ftrain/ names every module."""
    text = (ROOT / "docs" / "development" / "architecture.md").read_text()
    missing = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "src" / "ftrain").rglob("*.py"))
               if p.name != "__init__.py" and not re.search(rf"\b{re.escape(p.name)}\b", text)]
    assert not missing, f"add them to the module map: {missing}"
