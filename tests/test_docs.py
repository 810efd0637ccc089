"""Every ```python block of the documentation (docs/**/*.md) and of README.md runs, so the pages cannot rot.

One test per page: its blocks run in order, in one namespace, in a fresh temporary directory, under this
suite's conftest (float64, strict dtype promotion, ``rank_promotion="raise"``, warnings as errors).
Tracebacks point at the page's own line numbers. A block may be left out only with a marker on the line
before its fence that says why, ``<!-- skip: needs several processes; tests/test_multiprocess.py covers it
-->``; a marker without a reason fails ``test_every_skip_marker_gives_a_reason``. The API reference must
name every public name: ``test_api_reference_covers_every_public_name``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest

import rnnjax as rj

ROOT = pathlib.Path(__file__).parents[1]
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]

_SKIP = re.compile(r"^<!--\s*skip\b(.*?)-->\s*$")
_REASON = re.compile(r"^:\s*\S.{9,}$")  # ": " and a reason of at least ten characters


@dataclasses.dataclass(frozen=True)
class Block:
    """A ```python block: ``line`` is the page line of its first line of code; ``skip`` the marker's reason."""

    line: int
    source: str
    skip: str | None


def python_blocks(page: pathlib.Path) -> list[Block]:
    blocks: list[Block] = []
    lines = page.read_text().splitlines(keepends=True)
    start, skip = None, None
    for i, text in enumerate(lines, start=1):
        stripped = text.strip()
        if start is None and stripped == "```python":
            previous = next((t.strip() for t in reversed(lines[: i - 1]) if t.strip()), "")
            m = _SKIP.match(previous)
            start, skip = i + 1, (m.group(1).strip() if m else None)
        elif start is not None and stripped == "```":
            blocks.append(Block(start, "".join(lines[start - 1 : i - 1]), skip))
            start = None
    return blocks


def name(page: pathlib.Path) -> str:
    return str(page.relative_to(ROOT))


RUNNABLE = [p for p in PAGES if any(b.skip is None for b in python_blocks(p))]


@pytest.mark.parametrize("page", RUNNABLE, ids=name)
def test_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": "__main__"}
    for block in python_blocks(page):
        if block.skip is None:
            code = compile("\n" * (block.line - 1) + block.source, name(page), "exec")
            exec(code, namespace)


def test_every_skip_marker_gives_a_reason():
    for page in PAGES:
        for i, text in enumerate(page.read_text().splitlines(), start=1):
            if m := _SKIP.match(text.strip()):
                assert _REASON.match(m.group(1)), f"{name(page)}:{i}: a skip marker must say why: {text!r}"
        for block in python_blocks(page):
            assert block.skip is None or _REASON.match(block.skip), f"{name(page)}:{block.line}"


def test_the_pages_have_blocks():
    assert len(RUNNABLE) >= 15, [name(p) for p in RUNNABLE]
    assert ROOT / "README.md" in RUNNABLE


def test_api_reference_covers_every_public_name():
    """Every name in ``rnnjax.__all__`` has a mkdocstrings entry on an API page: ``::: rnnjax.NAME``, or the
    path where it is defined (``::: rnnjax.cells.lstm.lstm``, where a module of the same name would shadow
    the function for the documentation's static analysis) with ``heading: rnnjax.NAME``."""
    text = "\n".join(p.read_text() for p in sorted((DOCS / "api").glob("*.md")))
    documented = set(re.findall(r"^::: rnnjax\.(\w+)\s*$", text, re.MULTILINE))
    documented |= set(
        re.findall(r"^::: rnnjax(?:\.\w+)+\n    options:\n      heading: rnnjax\.(\w+)$", text, re.MULTILINE)
    )
    missing = sorted(set(rj.__all__) - documented)
    assert not missing, f"names of rnnjax.__all__ missing from docs/api/: {missing}"
    for module in ("decode", "losses", "seq2seq", "diagnostics", "linen", "equinox", "nnx", "launch"):
        assert module in documented, module
