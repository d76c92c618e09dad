"""The live view of a simulated hall: one status line redrawn in place on the terminal.

Shown only on a terminal and never with --json (the summary must stay the last line of
stdout, and a log file must not fill with carriage returns). It writes to stderr.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

BAR_WIDTH = 24
FAULT_LETTERS = (("power", "P"), ("network", "N"), ("broker", "B"), ("hub", "H"),
                 ("province", "V"))


@dataclass
class Progress:
    """What the line shows; the run fills it in before each redraw."""

    phase: str = "starting"
    visits_done: int = 0
    visits_total: int | None = None  # None: open-ended (the demo)
    cast: int = 0
    unrated: int = 0
    at_province: int = 0
    misuse: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    faults_active: int = 0
    cut_presses: int = 0
    devices_down: int = 0


class LiveView:
    def __init__(self, enabled: bool, stream=None, clock=time.monotonic):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.started = clock()
        self._drawn = False

    def line(self, p: Progress) -> str:
        """The status line for `p` (without the carriage return), also for tests."""
        parts = []
        if p.visits_total:
            filled = int(BAR_WIDTH * min(p.visits_done, p.visits_total) / p.visits_total)
            parts.append("[%s%s] %d/%d visits" % ("#" * filled, "." * (BAR_WIDTH - filled),
                                                  p.visits_done, p.visits_total))
        else:
            parts.append("%d visits" % p.visits_done)
        parts.append("votes %d" % p.cast)
        parts.append("unrated %d" % p.unrated)
        parts.append("province %d" % p.at_province)
        parts.append("misuse %d" % p.misuse)
        if p.faults or p.faults_active:
            counted = " ".join("%s%d" % (letter, p.faults.get(kind, 0))
                               for kind, letter in FAULT_LETTERS if kind in p.faults)
            parts.append("faults %s (%d active)" % (counted, p.faults_active))
            parts.append("cut presses %d" % p.cut_presses)
        if p.devices_down:
            parts.append("down %d" % p.devices_down)
        parts.append("%s %.0fs" % (p.phase, self.clock() - self.started))
        return " | ".join(parts)

    def show(self, p: Progress) -> None:
        if not self.enabled:
            return
        # \x1b[K clears what a longer earlier line left to the right.
        self.stream.write("\r" + self.line(p) + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def end(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
