"""Refuse to time the pure-torch fallback by accident: benchmark scripts import the checkout first, and a
checkout without its compiled extension (not built in place) silently runs ~10x slower code."""
from __future__ import annotations

import os
import sys


def require_native(script: str) -> None:
    import rankme_fast
    from rankme_fast.backends import cpu

    if cpu.load() is None:
        sys.exit(f"{os.path.basename(script)}: rankme_fast at {os.path.dirname(rankme_fast.__file__)} has no compiled "
                 "extension (it would time the pure-torch fallback); build it in place (cmake -S . -B build/dev "
                 "&& cmake --build build/dev && cmake --install build/dev --prefix .) or run with the installed "
                 "package first on sys.path")
