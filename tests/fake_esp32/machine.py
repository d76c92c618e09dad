# A stand-in for the ESP32 port's `machine` module, for running firmware/board/esp32s3.py
# under the MicroPython unix port: it records what the board layer builds and drives.
PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5

made = []  # ("pin", id, mode, pull) / ("spi", ...) / ("wdt", timeout), in order
cause = [PWRON_RESET]  # what reset_cause() reports


def reset_cause():
    return cause[0]


class Pin:
    IN = 1
    OUT = 3
    PULL_DOWN = 1
    PULL_UP = 2
    levels = {}  # pin number -> input level; released keys read 1 (pull-up)
    by_id = {}

    def __init__(self, id, mode=-1, pull=-1, value=None):
        self.id = id
        self.mode = mode
        self.pull = pull
        self.written = [] if value is None else [value]
        made.append(("pin", id, mode, pull))
        Pin.by_id[id] = self

    def value(self, level=None):
        if level is None:
            return Pin.levels.get(self.id, 1)
        self.written.append(level)
        return None

    def __call__(self, level=None):
        return self.value(level)


class SPI:
    def __init__(self, id, baudrate=1000000, polarity=0, phase=0, sck=None, mosi=None):
        made.append(("spi", id, baudrate, sck.id, mosi.id))
        self.out = bytearray()

    def write(self, buf):
        self.out.extend(buf)


class WDT:
    last = None

    def __init__(self, id=0, timeout=5000):
        made.append(("wdt", timeout))
        self.feeds = 0
        WDT.last = self

    def feed(self):
        self.feeds += 1
