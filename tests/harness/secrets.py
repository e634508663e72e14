"""A known secret looked for everywhere it must not be: texts, files, blobs, exceptions."""

from __future__ import annotations

import json
import traceback
import urllib.parse
from pathlib import Path


def _exception_texts(exc: BaseException) -> list[str]:
    """str, repr and the formatted traceback of ``exc`` and of every exception in its
    cause/context chain (what a log line or a crash report could show)."""
    out, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out += [str(e), repr(e), *(repr(a) for a in e.args)]
        e = e.__cause__ or e.__context__
    out.append("".join(traceback.format_exception(exc)))
    return out


def assert_secret_absent(secret: str, texts=(), paths=(), blobs=None, exceptions=()) -> int:
    """Fail if ``secret`` appears anywhere it must not: in ``texts`` (log output, messages), in
    any file below ``paths`` (files, or folders walked recursively; read as bytes, so binary
    files such as checkpoints and event files count), in ``blobs`` ({name: bytes}, e.g. the
    objects of a bucket) or in the text of ``exceptions`` (with their cause chains).

    The secret is also looked for as it would appear JSON-escaped and percent-encoded. Returns
    how many texts, files, blobs and exceptions were searched, so that a caller can check it
    searched what it meant to."""
    assert secret, "an empty secret is found everywhere"
    forms = {secret, json.dumps(secret)[1:-1], urllib.parse.quote(secret, safe=""),
             urllib.parse.quote_plus(secret)}
    needles = [f.encode() for f in forms]
    searched = 0

    def check(where: str, data: bytes) -> None:
        for needle in needles:
            assert needle not in data, f"secret found in {where}"

    for i, text in enumerate(texts):
        check(f"text #{i} ({text[:80]!r}...)", text.encode(errors="surrogateescape"))
        searched += 1
    for root in paths:
        root = Path(root)
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            check(f"file {path}", path.read_bytes())
            searched += 1
    for name, data in (blobs or {}).items():
        check(f"blob {name}", bytes(data))
        searched += 1
    for exc in exceptions:
        for text in _exception_texts(exc):
            check(f"exception {type(exc).__name__}: {text[:200]!r}", text.encode(
                errors="surrogateescape"))
        searched += 1
    return searched
