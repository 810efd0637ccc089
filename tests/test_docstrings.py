"""Every public name has a complete docstring: the API reference is generated from them.

The public names are ``rnnjax.__all__`` and the public names of the submodules in `SUBMODULES`. A function
needs a summary line, ``Args:`` when it takes parameters, ``Returns:`` unless it returns None, ``Raises:``
when its body raises, and an ``Examples:`` section with a doctest (``make test`` runs the doctests). A class
needs the same summary and example, with ``Args:`` or ``Attributes:`` for its constructor (in the class's
docstring or its ``__init__``'s); a NamedTuple, a Protocol or an exception needs a summary. A constant needs
an attribute docstring (a string right after its assignment), which is what mkdocstrings shows.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import itertools
import textwrap
from pathlib import Path
from typing import Any

import pytest

import rnnjax

SUBMODULES = ("decode", "losses", "seq2seq", "diagnostics", "linen", "equinox", "nnx", "launch", "data")


def _public(module: Any) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == module.__name__
    ]


def _names() -> list[tuple[str, Any]]:
    found = [
        (f"rnnjax.{name}", getattr(rnnjax, name))
        for name in rnnjax.__all__
        if not inspect.ismodule(getattr(rnnjax, name))
    ]
    for sub in SUBMODULES:
        module = importlib.import_module(f"rnnjax.{sub}")
        found += [(f"rnnjax.{sub}.{name}", getattr(module, name)) for name in _public(module)]
    return found


NAMES = _names()
CALLABLES = [(name, obj) for name, obj in NAMES if inspect.isfunction(obj) or inspect.isclass(obj)]
CONSTANTS = [name for name, obj in NAMES if not (inspect.isfunction(obj) or inspect.isclass(obj))]


def _section(doc: str, title: str) -> str | None:
    """The text of section ``title`` (e.g. ``"Args:"``) of a Google-style docstring, or None."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == title:
            body = []
            for rest in lines[i + 1 :]:
                if rest.strip() and not rest.startswith((" ", "\t")):
                    break
                body.append(rest)
            return "\n".join(body)
    return None


def _raises(func: Any) -> bool:
    """Whether ``func``'s own body (not the functions nested in it) holds a ``raise``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    stack = list(tree.body[0].body)  # type: ignore[attr-defined]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Raise):
            return True
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))
    return False


def _takes_arguments(obj: Any) -> bool:
    try:
        signature = inspect.signature(obj)
    except ValueError:
        return False
    return any(name not in ("self", "cls") for name in signature.parameters)


def _summary_only(cls: type) -> bool:
    """NamedTuples, Protocols and exceptions: their fields or their name say what they hold."""
    return (
        (issubclass(cls, tuple) and hasattr(cls, "_fields"))
        or getattr(cls, "_is_protocol", False)
        or issubclass(cls, Exception)
    )


def missing_sections(obj: Any) -> list[str]:
    """The parts of ``obj``'s docstring that these rules ask for and it lacks (empty: complete)."""
    doc = obj.__doc__ or ""
    if inspect.isclass(obj) and doc == inspect.getdoc(type):
        doc = ""
    doc = inspect.cleandoc(doc)
    if not doc.strip() or not doc.splitlines()[0].strip():
        return ["summary line"]
    init = vars(obj).get("__init__") if inspect.isclass(obj) else None
    if init is not None and init.__doc__:
        # a class may document its constructor in __init__ (mkdocstrings' merge_init_into_class shows both)
        doc += "\n" + inspect.cleandoc(init.__doc__)
    missing = []
    if inspect.isclass(obj) and _summary_only(obj):
        return missing
    if _takes_arguments(obj):
        if _section(doc, "Args:") is None and not (inspect.isclass(obj) and _section(doc, "Attributes:")):
            missing.append("Args:")
    if inspect.isfunction(obj):
        if (
            inspect.signature(obj).return_annotation not in (None, "None")
            and _section(doc, "Returns:") is None
        ):
            missing.append("Returns:")
        if _raises(obj) and _section(doc, "Raises:") is None:
            missing.append("Raises:")
    examples = _section(doc, "Examples:")
    if examples is None or ">>>" not in examples:
        missing.append("Examples: with >>>")
    return missing


@pytest.mark.parametrize(("name", "obj"), CALLABLES, ids=[name for name, _ in CALLABLES])
def test_docstring_complete(name: str, obj: Any) -> None:
    assert not missing_sections(obj), f"{name}'s docstring lacks {missing_sections(obj)}"


def _assignment_docstrings(path: Path) -> dict[str, str]:
    """The attribute docstrings of a module's top-level assignments: ``NAME = ...`` then a string."""
    body = ast.parse(path.read_text()).body
    found = {}
    for node, after in itertools.pairwise(body):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if (
            isinstance(node, (ast.Assign, ast.AnnAssign))
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            for target in targets:
                if isinstance(target, ast.Name):
                    found[target.id] = after.value.value
    return found


def _defining_module(module: str, name: str) -> tuple[Path, str]:
    """Follows ``from X import a as b`` re-exports from ``module`` to the file that assigns ``name``."""
    path = Path(importlib.import_module(module).__file__ or "")
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                star = alias.name == "*" and name in getattr(
                    importlib.import_module(node.module), "__all__", ()
                )
                if star or (alias.asname or alias.name) == name:
                    return _defining_module(node.module, name if star else alias.name)
    return path, name


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_documented(name: str) -> None:
    module, _, attr = name.rpartition(".")
    path, attr = _defining_module(module, attr)
    assert _assignment_docstrings(path).get(attr, "").strip(), f"{name} ({path.name}) has no docstring"


CELL_FACTORIES = [
    name
    for name in rnnjax.cells.__all__
    if inspect.isfunction(getattr(rnnjax.cells, name))
    and inspect.signature(getattr(rnnjax.cells, name)).return_annotation == "Cell"
]


@pytest.mark.parametrize("name", CELL_FACTORIES)
def test_cell_carries_its_equations(name: str) -> None:
    # the API reference shows a cell's factory, not its module: the equations belong in the factory's docs
    doc = inspect.getdoc(getattr(rnnjax.cells, name)) or ""
    assert "Equations" in doc and "h_t" in doc and "::" in doc, f"rj.{name}'s docstring has no equations"


def test_names_found() -> None:
    # the walk itself: it sees the cells, the layers, the submodules and the framework modules
    names = {name for name, _ in NAMES}
    for expected in (
        "rnnjax.lstm",
        "rnnjax.unroll",
        "rnnjax.decode.greedy",
        "rnnjax.nnx.RNN",
        "rnnjax.MERGES",
    ):
        assert expected in names


def test_missing_section_is_caught() -> None:
    def documented(x: int) -> int:
        """Doubles ``x``.

        Args:
          x: a number.

        Returns:
          ``2 x``.

        Raises:
          ValueError: never.

        Examples:
          >>> 2 * 2
          4
        """
        if x is None:
            raise ValueError("x")
        return 2 * x

    complete = documented.__doc__ or ""
    assert missing_sections(documented) == []
    for section in ("Args:", "Returns:", "Raises:", "Examples:"):
        documented.__doc__ = complete.replace(section, "Notes:")
        assert missing_sections(documented) == [f"{section} with >>>" if section == "Examples:" else section]
