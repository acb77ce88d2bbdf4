"""Progress on long work: a live bar on a terminal, nothing in between in a log file.

Rich's bars redraw in place; written to a file or pipe they leave a blank line per bar. Loops use
`track` (a bar only when the output is a terminal); training prints one line per epoch instead
(engine/loop.py) when `interactive()` is False.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def interactive() -> bool:
    """True when progress bars can redraw: standard output is a terminal (rich writes bars there)."""
    return sys.stdout.isatty()


def track(items: Iterable[T], *, total: int | None = None, description: str) -> Iterable[T]:
    """`items`, with a transient progress bar on a terminal; as they are otherwise."""
    if not interactive():
        return items
    from rich.progress import track as rich_track

    return rich_track(items, total=total, description=description, transient=True)
