#!/usr/bin/env python3
"""Write the "Built-in types" reference into README.md (between the config-types markers).

Usage: ``python scripts/gen_config_docs.py`` to rewrite, ``--check`` to exit 1 when README.md
is stale (a test runs the same check).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from castore_di.composition.docs import render_types, replace_section

README = Path(__file__).resolve().parents[1] / "README.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = parser.parse_args(argv)
    current = README.read_text(encoding="utf-8")
    wanted = replace_section(current, render_types())
    if current == wanted:
        return 0
    if args.check:
        print(f"{README.name} is stale: run python scripts/gen_config_docs.py", file=sys.stderr)
        return 1
    README.write_text(wanted, encoding="utf-8")
    print(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
