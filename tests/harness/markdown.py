"""Reading the documentation's Markdown as the tests check it: fenced blocks (with the
``<!-- marker -->`` on the line before each) and their logical lines."""

from __future__ import annotations

import re
from pathlib import Path

MARKER = re.compile(r"^<!--\s*(\S+?)\s*-->$")
ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
# Where commands, code and config files are the reader's to copy.
HOW_TO = [ROOT / "README.md", ROOT / "docs" / "getting-started.md",
          *sorted((ROOT / "docs" / "guide").glob("*.md"))]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def blocks(path: Path) -> list[tuple[str, int, list[str], str]]:
    """(language, first line number, lines, marker of the line before) of every fenced block."""
    out, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang, start = lines[i][3:].strip(), i + 1
            marker = MARKER.match(lines[i - 1].strip()) if i else None
            end = next(j for j in range(start, len(lines)) if lines[j].startswith("```"))
            out.append((lang, start + 1, lines[start:end], marker.group(1) if marker else ""))
            i = end
        i += 1
    return out


def logical_lines(lines: list[str], first: int) -> list[tuple[int, str]]:
    """(line number, text) of a block's lines with ``\\``-continued lines joined."""
    out, joined, start = [], "", first
    for n, line in enumerate(lines, first):
        if not joined:
            start = n
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        out.append((start, joined + line))
        joined = ""
    return out


def save_modules(path: Path, folder: Path) -> list[str]:
    """Write the blocks marked ``<!-- NAME.py -->`` into ``folder``; their module names."""
    names = []
    for lang, _first, lines, marker in blocks(path):
        if lang == "python" and marker.endswith(".py"):
            (folder / marker).write_text("\n".join(lines) + "\n")
            names.append(marker[:-3])
    return names
