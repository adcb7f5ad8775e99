"""Small helpers every plot of the repository shares (no matplotlib import here)."""

from __future__ import annotations

import re

# Where a long word (an env id such as ``my_package.envs.module:LongClassName``) may break.
_BREAK_AFTER = re.compile(r"(?<=[.:/_\-])")


def _chunks(word: str, width: int) -> list[str]:
    """``word`` cut into pieces of at most ``width`` characters, after . : / _ - where it
    can, anywhere where it must."""
    pieces: list[str] = []
    for part in filter(None, _BREAK_AFTER.split(word)):
        while len(part) > width:
            pieces.append(part[:width])
            part = part[width:]
        if pieces and len(pieces[-1]) + len(part) <= width:
            pieces[-1] += part
        else:
            pieces.append(part)
    return pieces


def fit_title(text: str, width_inches: float, fontsize: float = 12.0) -> str:
    """``text`` broken into lines that fit ``width_inches`` at ``fontsize`` points: at spaces,
    and inside words too long for a line. A line holds about width·72 / (0.6·fontsize)
    characters (DejaVu Sans averages 0.6 em). Call ``fig.tight_layout()`` (or use the
    constrained layout) afterwards so that the figure makes room for the extra lines."""
    width = max(12, int(width_inches * 72 / (0.6 * fontsize)))
    lines: list[str] = []
    line = ""
    for word in text.split():
        for k, piece in enumerate(_chunks(word, width)):
            sep = " " if k == 0 and line else ""
            if len(line) + len(sep) + len(piece) <= width:
                line += sep + piece
            else:
                lines.append(line)
                line = piece
    lines.append(line)
    return "\n".join(ln for ln in lines if ln)
