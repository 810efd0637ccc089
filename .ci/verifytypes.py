"""Fails unless every public symbol of rnnjax has a known type, as `pyright --verifytypes` reads them.

Reads pyright's JSON report on stdin. The framework modules' classes (`rnnjax.linen`, `rnnjax.equinox`,
`rnnjax.nnx`) derive from Flax's and Equinox's module classes, whose metaclasses pyright cannot type:
those diagnostics (an unknown metaclass, a base class unknown or partially unknown through theirs), on
those modules' classes only, are the external packages' and are allowed.
"""

from __future__ import annotations

import json
import sys

EXTERNAL_BASES = ("Type of metaclass unknown", "Type of base class")  # message prefixes
FRAMEWORK_MODULES = ("rnnjax.linen.", "rnnjax.equinox.", "rnnjax.nnx.")


def main() -> int:
    report = json.load(sys.stdin)["typeCompleteness"]
    errors = [
        f"{symbol['name']}: {diagnostic['message']}"
        for symbol in report["symbols"]
        for diagnostic in symbol.get("diagnostics", [])
        if diagnostic["severity"] == "error"
        and not (
            diagnostic["message"].startswith(EXTERNAL_BASES) and symbol["name"].startswith(FRAMEWORK_MODULES)
        )
    ]
    score = report["completenessScore"]
    print(f"pyright --verifytypes rnnjax: completeness {score:.1%}, {len(errors)} errors")
    print("\n".join(errors))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
