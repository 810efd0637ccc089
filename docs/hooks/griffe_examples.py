"""A griffe extension for the API reference: a docstring's ``Example:`` section renders as code.

Griffe's Google parser reads ``Examples:`` as doctest examples but a singular ``Example:`` as a plain
admonition, whose ``>>>`` lines Markdown would turn into block quotes. This extension renames the section
before the docstring is parsed; the source is unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
