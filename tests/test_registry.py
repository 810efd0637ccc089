"""Every built-in cell is in the one list the tests read (`reference_cells`), so none skips the oracles."""

from __future__ import annotations

import inspect

from reference_cells import REFERENCES

import rnnjax as rj
import rnnjax.cells


def exported_factories() -> set:
    """The functions exported by `rnnjax.cells` that make a `Cell`."""
    found = set()
    for name in rnnjax.cells.__all__:
        obj = getattr(rnnjax.cells, name)
        if inspect.isfunction(obj) and inspect.signature(obj).return_annotation in (rj.Cell, "Cell"):
            found.add(obj)
    return found


def test_every_exported_cell_has_a_reference():
    factories = exported_factories()
    assert rj.lstm in factories and len(factories) >= 11
    missing = sorted(f.__name__ for f in factories - {ref.factory for ref in REFERENCES.values()})
    assert not missing, f"cells exported without an entry in tests/reference_cells.py: {missing}"


def test_every_cell_is_exported_from_rnnjax():
    for ref in REFERENCES.values():
        assert getattr(rj, ref.factory.__name__) is ref.factory
        assert ref.factory.__name__ in rj.__all__
