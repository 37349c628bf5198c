"""Folders nested deeper than Python's recursion limit, with paths that may outgrow PATH_MAX, as a script makes."""

from __future__ import annotations

import os
from pathlib import Path

_FOLDER = os.O_RDONLY | os.O_DIRECTORY


def nest(root: Path, name: str, depth: int) -> tuple[int, list[os.stat_result]]:
    """Folders `name` nested `depth` deep in `root`, each made relative to its parent; returns a descriptor of the
    bottom one (the caller's to close) and what each is."""
    folder = os.open(root, _FOLDER)
    made = []
    for _ in range(depth):
        os.mkdir(name, dir_fd=folder)
        inner = os.open(name, _FOLDER, dir_fd=folder)
        os.close(folder)
        folder = inner
        made.append(os.fstat(folder))
    return folder, made
