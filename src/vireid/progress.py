"""Progress bars: one rule for every long loop of the library.

* stderr (or the stream given) is a terminal: a tqdm bar, redrawn in place.
* Anything else (a log file, a pipe, a captured stream): no carriage returns and no redraws; one
  plain line when the work starts, at most one every :data:`LINE_INTERVAL_S` seconds, and one
  when it ends, so a redirected log stays readable.
* No output at all when the caller passes ``enabled=False`` or after ``set_progress_bars(False)``
  (``vireid -q``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm import tqdm

LINE_INTERVAL_S = 30.0
"""Shortest time between two progress lines on a stream that is not a terminal."""

_bars_enabled = True


def set_progress_bars(enabled: bool) -> None:
    """Switch every progress bar of the process on or off (``vireid -q`` switches them off)."""
    global _bars_enabled
    _bars_enabled = enabled


def progress_bars_enabled() -> bool:
    return _bars_enabled


def live_bars(stream: IO[str] | None = None) -> bool:
    """Whether bars are on and ``stream`` (default: stderr) is a terminal: the test for progress
    output this module cannot route, such as torch.hub's download bar."""
    return _bars_enabled and _is_terminal(stream if stream is not None else sys.stderr)


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str | None = None, total: float | None = None,
                 initial: float = 0, unit: str = "it", leave: bool = True, enabled: bool = True,
                 file: IO[str] | None = None) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one with ``total``) on ``file`` (default: stderr),
    following the rule of this module; ``leave``: keep the finished bar on a terminal."""
    stream = file if file is not None else sys.stderr
    if not (enabled and _bars_enabled):
        return tqdm(iterable, total=total, disable=True)
    if _is_terminal(stream):
        return tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit, leave=leave, file=stream,
                    dynamic_ncols=True)
    return tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit, leave=True, file=_LineStream(stream),
                mininterval=LINE_INTERVAL_S, maxinterval=LINE_INTERVAL_S, ncols=100, ascii=True)


@contextlib.contextmanager
def log_above_bars(logger: logging.Logger) -> Iterator[None]:
    """``logger``'s console records are written above the live bars instead of through them (on a
    terminal, with bars on); each console handler keeps its level (``-q`` still hides INFO)."""
    if not live_bars():
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    before = list(logger.handlers)
    level = next((h.level for h in before if isinstance(h, logging.StreamHandler)
                  and not isinstance(h, logging.FileHandler)), logging.NOTSET)
    with logging_redirect_tqdm(loggers=[logger]):
        for handler in logger.handlers:
            if handler not in before:
                handler.setLevel(level)
        yield


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed, or an object without isatty
        return False


class _LineStream:
    """What tqdm writes, as whole lines: each redraw (``\\r`` + status) becomes one line; the blank
    redraws that clear a bar, and a repeat of the previous line, are dropped."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._last = ""

    def write(self, text: str) -> int:
        for segment in text.replace("\r", "\n").split("\n"):
            line = segment.rstrip()
            if line and line != self._last:
                self._stream.write(line + "\n")
                self._last = line
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            self._stream.flush()

    def isatty(self) -> bool:
        return False
