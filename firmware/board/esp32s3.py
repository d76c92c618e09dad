# The ESP32-S3 counter evaluator (hardware/boards/esp32s3-evaluator.json): star keys, the
# SSD1322 panel on SPI, Wi-Fi, watchdog, reset cause, flash sync. The only module that
# imports machine/network for this board; everything it builds is handed to the app.
import gc
import json
import os
import time

import machine
import network
import vfs

try:
    import asyncio
except ImportError:  # very old ports
    import uasyncio as asyncio  # type: ignore

BOARD_FILE = "/board.json"

_CAUSES = (
    (machine.PWRON_RESET, "power"),
    (machine.WDT_RESET, "wdt"),
    (machine.SOFT_RESET, "soft"),
    (machine.DEEPSLEEP_RESET, "deep"),
    (machine.HARD_RESET, "hard"),
)


class BoardError(ValueError):
    """The board file does not describe a board this module can build."""


def load_spec(path=BOARD_FILE):
    with open(path) as f:
        return json.load(f)


def cause_name(code):
    """machine.reset_cause() as the heartbeat's `rst` word; "other" for codes not listed."""
    for value, name in _CAUSES:
        if code == value:
            return name
    return "other"


class Board:
    """Pins, display and radio of one evaluator, built from its board spec (a dict)."""

    def __init__(self, spec, with_display=True):
        self.spec = spec
        self.name = spec.get("board", "esp32s3")
        self.keys_pins, self.key_active = _keys(spec.get("keys") or [])
        self.files = "/"  # the device's own files on flash (the catalogue: app.py)
        self.display = None
        if with_display and spec.get("display"):
            self.display = _display(spec["display"])
        self._wlan = network.WLAN(network.STA_IF)
        self._wdt = None
        self._cause = cause_name(machine.reset_cause())  # read once: it is for this boot

    # ---- what the app uses ----------------------------------------------------------------
    def fs_sync(self, f):
        """Make a written journal file durable: flush it (littlefs commits on flush), then
        ask the port to sync its filesystems where it can."""
        f.flush()
        sync = getattr(os, "sync", None)
        if sync is not None:
            sync()

    def rssi(self):
        """Signal strength in dBm, or None while not associated."""
        if not self._wlan.isconnected():
            return None
        try:
            return self._wlan.status("rssi")
        except (OSError, ValueError):
            return None

    def reset_cause(self):
        return self._cause

    def wifi_up(self):
        return self._wlan.isconnected()

    def ticks_ms(self):
        return time.ticks_ms()

    def free_heap(self):
        return gc.mem_free()

    # ---- start-up -------------------------------------------------------------------------
    async def connect_wifi(self, ssid, password, timeout_ms=15000):
        """Join the hall's Wi-Fi; True when associated within timeout_ms. The ESP-IDF station
        reconnects by itself after a drop, so this runs once at boot."""
        wlan = self._wlan
        wlan.active(True)
        if wlan.isconnected():
            return True
        try:
            wlan.connect(ssid, password)
        except OSError:
            return False
        start = time.ticks_ms()
        while time.ticks_diff(time.ticks_ms(), start) < timeout_ms:
            if wlan.isconnected():
                return True
            self.feed()
            await asyncio.sleep(0.2)
        return wlan.isconnected()

    # ---- app slots (firmware/ota.py): ROMFS segments 0 and 1 ----------------------------
    # vfs.rom_ioctl(2, n) gives segment n: on the ESP32 port a partition object (block
    # device: readblocks/writeblocks with a byte offset, ioctl 4/5 block count and size,
    # ioctl 6 erases a block), elsewhere a memoryview of memory-mapped flash, written with
    # rom_ioctl 3 (prepare: erase), 4 (write) and 5 (complete). Both are handled. The stock
    # ESP32 build exposes one segment (the "romfs" partition); two slots need a partition
    # table and build with two (docs/firmware.md, "Updates over the air").
    def _segment(self, n):
        seg = vfs.rom_ioctl(2, n)
        if isinstance(seg, int):
            raise OSError(-seg)  # no such segment on this build
        return seg

    def slot_size(self, n):
        seg = self._segment(n)
        if hasattr(seg, "ioctl"):
            return seg.ioctl(4, 0) * seg.ioctl(5, 0)
        return len(seg)

    def slot_begin(self, n, size):
        """Erase slot n for an image of size bytes (ValueError: it does not fit)."""
        seg = self._segment(n)
        if size > self.slot_size(n):
            raise ValueError("size")
        if hasattr(seg, "ioctl"):
            block = seg.ioctl(5, 0)
            for b in range((size + block - 1) // block):
                self.feed()  # erasing a 4 KB block takes tens of ms
                if seg.ioctl(6, b):
                    raise OSError(5)
        else:
            ret = vfs.rom_ioctl(3, n, size)
            if ret < 0:
                raise OSError(-ret)

    def slot_write(self, n, off, buf):
        """Write buf at off in slot n: on NOR flash a write is durable when it returns."""
        seg = self._segment(n)
        if hasattr(seg, "ioctl"):
            block = seg.ioctl(5, 0)
            seg.writeblocks(off // block, buf, off % block)
        else:
            ret = vfs.rom_ioctl(4, n, off, buf)
            if ret < 0:
                raise OSError(-ret)
            vfs.rom_ioctl(5, n)

    def slot_read(self, n, off, buf):
        """Read len(buf) bytes of slot n at off into buf; returns how many."""
        seg = self._segment(n)
        if hasattr(seg, "ioctl"):
            block = seg.ioctl(5, 0)
            k = max(0, min(len(buf), seg.ioctl(4, 0) * block - off))
            if k:
                seg.readblocks(off // block, memoryview(buf)[:k], off % block)
            return k
        k = max(0, min(len(buf), len(seg) - off))
        buf[:k] = seg[off:off + k]
        return k

    def reset(self):
        machine.reset()

    def start_watchdog(self, timeout_ms=30000):
        """From now on feed() must run at least every timeout_ms or the chip resets ("wdt")."""
        self._wdt = machine.WDT(timeout=timeout_ms)

    def feed(self):
        if self._wdt is not None:
            self._wdt.feed()


def _keys(keys):
    pins = {}
    active = None
    for key in keys:
        stars = key.get("stars")
        if stars not in (1, 2, 3, 4, 5) or stars in pins:
            raise BoardError("keys: stars must be 1..5, each once")
        level = key.get("active", 0)
        if active is not None and level != active:
            raise BoardError("keys: all keys must share one active level")
        active = level
        pull = key.get("pull")
        if pull == "up":
            pin = machine.Pin(key["pin"], machine.Pin.IN, machine.Pin.PULL_UP)
        elif pull == "down":
            pin = machine.Pin(key["pin"], machine.Pin.IN, machine.Pin.PULL_DOWN)
        else:  # an external resistor
            pin = machine.Pin(key["pin"], machine.Pin.IN)
        pins[stars] = pin
    return pins, 0 if active is None else active


def _display(spec):
    if spec.get("driver") != "ssd1322" or spec.get("bus") != "spi":
        raise BoardError("display: only ssd1322 on spi is built here")
    from panels import SSD1322  # firmware/panels.py; imported here so a board without
    # a panel never loads the driver

    spi = machine.SPI(spec["spi"], baudrate=spec.get("baud", 10000000), polarity=0, phase=0,
                      sck=machine.Pin(spec["sck"]), mosi=machine.Pin(spec["mosi"]))
    dc = machine.Pin(spec["dc"], machine.Pin.OUT, value=0)
    res = machine.Pin(spec["res"], machine.Pin.OUT, value=1)
    cs = machine.Pin(spec["cs"], machine.Pin.OUT, value=1)
    panel = SSD1322(spi, dc, res, cs, width=spec.get("width", 256), height=spec.get("height", 64))
    # A panel that fails to start still gets its Display object: the app counts the bus
    # errors and reports disp=1 in the heartbeat, and the votes keep working.
    panel.init_display(time.sleep_ms)
    return panel
