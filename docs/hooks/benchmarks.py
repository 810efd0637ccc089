"""An mkdocs hook: benchmark tables generated from ``benchmarks/results/*.json`` when the site is built.

A page asks for a table with a comment on a line of its own, ``<!-- benchmark: rnn_step_cpu.json -->`` (the
path relative to ``benchmarks/results/``). The hook replaces it with the machine and date recorded in the
JSON and the tables that ``benchmarks.rnn_step``, ``benchmarks.scaling``, ``benchmarks.profile_step`` or
``benchmarks.padding`` write for it, so the page and the recorded numbers cannot disagree.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from typing import Any

ROOT = pathlib.Path(__file__).parents[2]
RESULTS = ROOT / "benchmarks" / "results"
_MARKER = re.compile(r"^<!-- benchmark: (\S+) -->$", re.MULTILINE)


def machine(record: dict[str, Any]) -> str:
    """The machine a record was measured on, in words."""
    from benchmarks.rnn_step import device_label

    device = record["device"]
    return device if isinstance(device, str) else device_label(device)


def date(record: dict[str, Any]) -> str:
    """The day a record was measured on."""
    device = record["device"]
    return record.get("date") or (device.get("date") if isinstance(device, dict) else None) or "not recorded"


def tables(name: str) -> str:
    """The markdown for one results file: a line naming its machine and date, then its tables."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import padding, profile_step, rnn_step, scaling

    path = RESULTS / name
    if not path.is_file():
        raise FileNotFoundError(f"benchmark marker names {name}, but {path} does not exist")
    record = json.loads(path.read_text())
    stem = path.stem
    if stem.startswith("rnn_step"):
        body = rnn_step.markdown(record)
    elif stem.startswith("scaling"):
        body = scaling.markdown(record)
    elif stem.startswith("profile"):
        body = profile_step.markdown(record, top=5)
    elif stem.startswith("padding"):
        body = padding.markdown(record)
    else:
        raise ValueError(f"no table writer for {name}: expected rnn_step*, scaling*, profile* or padding*")
    head = f"*Measured on {machine(record)}, {date(record)}; from `benchmarks/results/{name}`.*"
    return head + "\n\n" + body


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return _MARKER.sub(lambda m: tables(m.group(1)), markdown)
