"""Errors a user can cause, rendered as `file:line:col: error: message`.

Anything raised as NetdslError is the user's to fix: the CLI prints it and exits 2.
Anything else escaping the CLI is a bug in netdsl.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pos:
    """A span of source text; lines and columns are 1-based, end is exclusive."""
    file: str
    line: int
    col: int
    end_line: int = 0
    end_col: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass
class Note:
    message: str
    pos: Pos | None = None


class NetdslError(Exception):
    """A diagnostic: message, optional source position, hint and notes."""

    def __init__(self, message: str, pos: Pos | None = None, hint: str | None = None,
                 notes: list[Note] | None = None):
        super().__init__(message)
        self.message = message
        self.pos = pos
        self.hint = hint
        self.notes = list(notes or [])

    def render(self, sources: dict[str, str] | None = None) -> str:
        return "\n".join(_render_one("error", self.message, self.pos, sources)
                         + [l for n in self.notes for l in _render_one("note", n.message, n.pos, sources)]
                         + ([f"hint: {self.hint}"] if self.hint else []))

    def __str__(self) -> str:
        return f"{self.pos}: error: {self.message}" if self.pos else f"error: {self.message}"


def _render_one(kind: str, message: str, pos: Pos | None, sources: dict[str, str] | None) -> list[str]:
    if pos is None:
        return [f"{kind}: {message}"]
    out = [f"{pos}: {kind}: {message}"]
    text = _source_text(pos.file, sources)
    if text is not None:
        lines = text.splitlines()
        if 1 <= pos.line <= len(lines):
            src = lines[pos.line - 1]
            width = 1
            if pos.end_line == pos.line and pos.end_col > pos.col:
                width = pos.end_col - pos.col
            out.append(f"  {pos.line:>4} | {src}")
            out.append(f"       | {' ' * (pos.col - 1)}^{'~' * (width - 1)}")
    return out


def _source_text(path: str, sources: dict[str, str] | None) -> str | None:
    if sources and path in sources:
        return sources[path]
    import os
    import stat
    try:   # only a regular file of a sane size: never wait on a FIFO or read /dev/zero
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 64 << 20:
            return None
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, ValueError):   # unreadable, or not UTF-8: show no source line
        return None


def did_you_mean(name: str, candidates) -> str | None:
    """A hint naming the closest candidates, or None when nothing is close."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=3, cutoff=0.6)
    if not close:
        return None
    return "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
