"""systemd's notify protocol, the few lines of it the agent needs (no libsystemd).

With Type=notify the unit is "started" only once the agent says READY=1, and with
WatchdogSec= systemd restarts an agent whose loop stopped turning (a hung bus, a wedged
driver): the loop calls watchdog() every pass, and a ping goes out at half the interval.
Outside systemd (no NOTIFY_SOCKET) every call does nothing.
"""
import os
import socket
import time


class Notifier:
    def __init__(self, environ=None, clock=time.monotonic):
        env = os.environ if environ is None else environ
        self._address = env.get("NOTIFY_SOCKET") or None
        if self._address and self._address.startswith("@"):
            self._address = "\0" + self._address[1:]  # an abstract socket
        try:
            usec = int(env.get("WATCHDOG_USEC") or 0)
        except ValueError:
            usec = 0
        self._every = usec / 2e6 if usec else 0.0
        self._clock = clock
        self._last = 0.0
        self.sent = 0

    @property
    def active(self):
        return self._address is not None

    def notify(self, state):
        if self._address is None:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(state.encode(), self._address)
            except OSError:
                return False
        self.sent += 1
        return True

    def ready(self, status=None):
        return self.notify("READY=1" + ("\nSTATUS=" + status if status else ""))

    def stopping(self):
        return self.notify("STOPPING=1")

    def watchdog(self):
        if not self._every:
            return
        now = self._clock()
        if now - self._last >= self._every:
            self._last = now
            self.notify("WATCHDOG=1")
