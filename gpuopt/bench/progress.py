"""The benchmark's progress display on stderr."""

from __future__ import annotations

import shutil
import sys
from typing import Any


class Progress:
    """One updating line on a terminal; plain lines otherwise (logs, CI). Writes to stderr."""

    def __init__(self, stream: Any = None, enabled: bool = True):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
        self._width = 0

    def __call__(self, message: str, minor: bool = False) -> None:
        """Show ``message``; a ``minor`` one (a phase within a step) only on a terminal."""
        if not self.enabled or (minor and not self.tty):
            return
        if self.tty:
            columns = shutil.get_terminal_size((100, 20)).columns - 1
            line = message[:columns]
            self.stream.write("\r" + line + " " * max(0, self._width - len(line)))
            self._width = len(line)
        else:
            self.stream.write(message + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line that stays (a skipped size, a failed baseline)."""
        if not self.enabled:
            return
        self.close()
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

