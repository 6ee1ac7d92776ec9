"""Progress bars that read well on a terminal and in a log file.

Long work (preprocessing volumes, writing phantoms, ``igconda detect``, training epochs, tuning
trials, inference slices) shows one tqdm bar with a count, rate and ETA. On a terminal it redraws
in place; where the output is not a terminal (CI, ``ray job submit`` logs, a redirect) tqdm's
carriage-return redraws would become thousands of fragments in one "line", so there the bar
writes one plain line every :data:`LINE_INTERVAL_S` seconds and one when closed.

Pure Python (no Ray): the library, the command line and the Ray jobs all draw through
:func:`progress`.
"""

from __future__ import annotations

import sys
from typing import IO

from tqdm import tqdm

#: Seconds between two progress lines when the output is not a terminal.
LINE_INTERVAL_S = 30.0


def progress(total: int | None, desc: str, unit: str, *, initial: int = 0,
             file: IO[str] | None = None, disable: bool = False) -> tqdm:
    """A progress bar (tqdm: count, rate, elapsed and ETA) on ``file`` (default stderr).

    On a terminal it redraws in place; elsewhere it writes one plain line every
    :data:`LINE_INTERVAL_S` seconds and one when closed, so a log holds a handful of lines, not
    thousands of carriage returns. ``disable`` draws nothing (the bar still counts).
    """
    stream = file or sys.stderr
    if _isatty(stream):
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream,
                    dynamic_ncols=True, disable=disable)
    return _LineBar(total=total, desc=desc, unit=unit, initial=initial, file=_Lines(stream),
                    mininterval=LINE_INTERVAL_S, maxinterval=LINE_INTERVAL_S, miniters=1,
                    ncols=100, ascii=True, disable=disable)


class _LineBar(tqdm):
    """tqdm off a terminal: a state already written is not written again (closing the bar
    right after its last update writes one line, not two)."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        state = (self.n, self.total, str(self.postfix))
        if state == getattr(self, "_written", None):
            return True
        self._written = state
        return super().display(msg, pos)


class _Lines:
    """A file for tqdm off a terminal: each redraw (``"\\r" + bar``) becomes one line."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
