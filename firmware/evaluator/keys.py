# The five star keys: debounce, press edges, stuck-key detection. Portable core.
# A "pin" is any callable returning the raw level 0/1: a machine.Pin is one (calling it reads
# its value), and tests pass plain functions. Polled, not interrupt driven: a scan every
# 10-20 ms costs nothing next to the display and keeps all timing in one place.
try:
    from time import ticks_diff as _ticks_diff  # MicroPython: `now` is time.ticks_ms(), which wraps
except ImportError:  # CPython: a monotonic millisecond count never wraps
    def _ticks_diff(a, b):  # type: ignore[no-redef]
        return a - b


class Keys:
    """Debounced star keys. poll(now) -> stars pressed since the last poll."""

    def __init__(self, pins_by_stars, active=0, debounce_ms=30, stuck_ms=10000, diff=None):
        self._stars = sorted(pins_by_stars)
        self._pins = [pins_by_stars[s] for s in self._stars]
        self.active = active  # raw level of a pressed key (0: to ground against a pull-up)
        self.debounce_ms = debounce_ms
        self.stuck_ms = stuck_ms
        self._diff = diff or _ticks_diff
        n = len(self._stars)
        self._raw = bytearray(n)  # last raw reading, 1 = pressed
        self._down = bytearray(n)  # debounced state, 1 = pressed
        self._stuck = bytearray(n)
        self._changed = [0] * n  # when the raw reading last changed
        self._held = [0] * n  # when the debounced press began
        self._primed = False
        self._out = []  # poll()'s result, reused: fixed memory
        self.stuck = []  # stars of keys held down longer than stuck_ms (for heartbeats)
        self.chords = 0  # polls where several keys went down together: none reported
        self.stuck_events = 0  # times a key became stuck

    def poll(self, now: int) -> list:
        """Stars whose key went down (debounced) since the last poll.

        The list is reused by the next poll. Several keys going down in the same poll (a palm
        on the keys) are ambiguous: none is reported and self.chords counts it. The first
        poll only learns the levels: a key already down at boot makes no press, and if it
        stays down it is reported stuck.
        """
        out = self._out
        out.clear()  # (del out[:] would allocate a slice object on the device)
        diff = self._diff
        changed_stuck = False
        for i in range(len(self._pins)):
            raw = 1 if self._pins[i]() == self.active else 0
            if not self._primed:
                self._raw[i] = raw
                self._down[i] = raw
                self._changed[i] = now
                self._held[i] = now
                continue
            if raw != self._raw[i]:
                self._raw[i] = raw
                self._changed[i] = now
            if raw != self._down[i] and diff(now, self._changed[i]) >= self.debounce_ms:
                self._down[i] = raw
                if raw:
                    self._held[i] = now
                    out.append(self._stars[i])
                elif self._stuck[i]:
                    self._stuck[i] = 0  # released: the key works again
                    changed_stuck = True
            if self._down[i] and not self._stuck[i] and diff(now, self._held[i]) >= self.stuck_ms:
                self._stuck[i] = 1
                self.stuck_events += 1
                changed_stuck = True
        self._primed = True
        if changed_stuck:
            stuck = self.stuck
            stuck.clear()
            for i in range(len(self._stars)):
                if self._stuck[i]:
                    stuck.append(self._stars[i])
        if len(out) > 1:
            self.chords += 1
            out.clear()
        return out
