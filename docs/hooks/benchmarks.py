"""An mkdocs hook: benchmark tables generated from ``benchmarks/results/*.json`` when the site is built.

A page asks for a table with a comment on a line of its own, ``<!-- benchmark: rnn_step_cpu.json -->`` (the
path relative to ``benchmarks/results/``). The hook replaces it with the machine and date recorded in the
JSON and the tables that the benchmark's own ``markdown`` function writes for it (`_writers`), so the page
and the recorded numbers cannot disagree.
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

    device = record.get("device", record.get("machine"))
    return device if isinstance(device, str) else device_label(device)


def date(record: dict[str, Any]) -> str:
    """The day a record was measured on."""
    device = record.get("device")
    return record.get("date") or (device.get("date") if isinstance(device, dict) else None) or "not recorded"


def char_lm_runs(record: dict[str, Any]) -> str:
    """A table of the character language model's runs recorded side by side: each run's flags, its last
    validation bits per character and when it was reached; then the record's observation."""
    lines = [
        "| run | flags | steps | time (s) | validation bits/char |",
        "|---|---|---|---|---|",
    ]
    for name, run in record["runs"].items():
        flags = " ".join(run["flags"]) or "none"
        step, seconds, bits = run["val_step"][-1], run["val_time"][-1], run["val_bits"][-1]
        lines.append(f"| {name} | `{flags}` | {step} | {seconds:.0f} | {bits:.3f} |")
    return "\n".join(lines) + f"\n\n`{record['command']}`. {record['observation']}\n"


def _writers() -> dict[str, Any]:
    """The table writer of each kind of record, by the prefix of its file name (the longest prefix wins)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import (
        padding,
        parallel_time,
        profile_step,
        rnn_step,
        scaling,
        scaling_devices,
        sequence_split,
    )

    return {
        "rnn_step": rnn_step.markdown,
        "scaling_devices": scaling_devices.markdown,
        "scaling": scaling.markdown,
        "profile": lambda record: profile_step.markdown(record, top=5),
        "parallel_time": parallel_time.markdown,
        "char_lm_": char_lm_runs,
        "padding": padding.markdown,
        "sequence_split": sequence_split.markdown,
    }


def tables(name: str) -> str:
    """The markdown for one results file: a line naming its machine and date, then its tables."""
    path = RESULTS / name
    if not path.is_file():
        raise FileNotFoundError(f"benchmark marker names {name}, but {path} does not exist")
    record = json.loads(path.read_text())
    writers = _writers()
    prefixes = sorted((p for p in writers if path.stem.startswith(p)), key=len, reverse=True)
    if not prefixes:
        raise ValueError(
            f"no table writer for {name}: expected a name starting with one of {sorted(writers)}"
        )
    body = writers[prefixes[0]](record)
    head = f"*Measured on {machine(record)}, {date(record)}; from `benchmarks/results/{name}`.*"
    return head + "\n\n" + body


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return _MARKER.sub(lambda m: tables(m.group(1)), markdown)
