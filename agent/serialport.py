"""A serial port that survives the cable: opened again after it vanished or failed.

Both ends use it: the bridge on the window PC (a USB-serial adapter that is unplugged
disappears from the system, and its open handle fails) and a Pi evaluator whose uplink is
a UART. read() never raises: a dead port reads as nothing and is reopened every retry_s;
write() raises OSError while the port is down, which the link counts.
"""
import logging
import time

log = logging.getLogger("pingjia.agent.serial")


def _pyserial(name, baud, timeout):
    import serial

    port = serial.Serial(name, baud, timeout=timeout, write_timeout=2)
    try:
        # Bytes the OS kept from before we (re)opened belong to a conversation that is over.
        port.reset_input_buffer()
    except Exception:  # noqa: BLE001 - a pty or an odd driver may not support it
        pass
    return port


class ReopeningPort:
    """read(n) -> bytes (b"" when nothing or when down), write(buf); see the module doc.

    `timeout` is the read wait in seconds (0: never block). `generation` goes up at every
    successful open, so a caller can tell that the port went away and came back."""

    def __init__(self, name, baud=115200, timeout=0.0, retry_s=1.0, opener=None,
                 clock=time.monotonic):
        self.name = name
        self.baud = baud
        self.timeout = timeout
        self.retry_s = retry_s
        self._opener = opener or _pyserial
        self._clock = clock
        self._port = None
        self._next_try = 0.0
        self.generation = 0
        self.failures = 0  # opens that failed, and reads/writes that killed an open port
        self._logged_down = False

    @property
    def is_open(self):
        return self._port is not None

    def _ensure(self):
        if self._port is not None:
            return True
        now = self._clock()
        if now < self._next_try:
            return False
        self._next_try = now + self.retry_s
        try:
            self._port = self._opener(self.name, self.baud, self.timeout)
        except (OSError, ValueError) as exc:  # serial.SerialException is an OSError
            self.failures += 1
            if not self._logged_down:
                log.warning("serial port %s: cannot open: %s (retrying every %.0f s)",
                            self.name, exc, self.retry_s)
                self._logged_down = True
            return False
        self.generation += 1
        self._logged_down = False
        log.info("serial port %s open at %d baud", self.name, self.baud)
        return True

    def _lost(self, exc):
        self.failures += 1
        log.warning("serial port %s lost: %s", self.name, exc)
        self.close()
        self._next_try = self._clock() + self.retry_s

    def read(self, n=4096):
        if not self._ensure():
            if self.timeout:
                time.sleep(self.timeout)  # keep a blocking caller's pace while down
            return b""
        port = self._port
        try:
            data = port.read(1) if self.timeout else b""
            waiting = port.in_waiting
            if waiting:
                data += port.read(min(n, waiting))
            return data
        except (OSError, ValueError) as exc:
            self._lost(exc)
            return b""

    def write(self, buf):
        if not self._ensure():
            raise OSError(5, "serial port %s is down" % self.name)
        try:
            self._port.write(bytes(buf))
        except (OSError, ValueError) as exc:
            self._lost(exc)
            raise OSError(5, "serial port %s: %s" % (self.name, exc)) from None

    def close(self):
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except Exception:  # noqa: BLE001 - it is already gone
                pass
