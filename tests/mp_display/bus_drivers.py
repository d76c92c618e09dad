# The panel drivers against fake buses, under the MicroPython unix port.
# Usage (from the repo root): micropython tests/mp_display/bus_drivers.py [MODULE_DIR]
# Prints one JSON object of observations; tests/test_display.py makes the assertions.
import gc
import json
import sys

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else "firmware")

import display  # noqa: E402
import panels  # noqa: E402


class Pins:
    """dc, res, cs as callables that remember their level."""

    def __init__(self):
        self.level = {"dc": None, "res": None, "cs": None}

    def pin(self, name):
        def set_level(v):
            self.level[name] = v
        return set_level


class RecordingSPI:
    """Each write() becomes [dc, cs, hex bytes] at the moment it was sent."""

    def __init__(self, pins):
        self.pins = pins
        self.log = []
        self.fail = False

    def write(self, buf):
        if self.fail:
            raise OSError(5)
        self.log.append([self.pins.level["dc"], self.pins.level["cs"], bytes(buf).hex()])


class NullSPI:
    def write(self, buf):
        pass


class RecordingI2C:
    def __init__(self):
        self.log = []

    def writeto(self, addr, buf):
        self.log.append([addr, bytes(buf).hex()])

    def writevto(self, addr, bufs):
        self.log.append([addr, b"".join(bytes(b) for b in bufs).hex()])


def ssd1322():
    pins = Pins()
    spi = RecordingSPI(pins)
    d = panels.SSD1322(spi, pins.pin("dc"), pins.pin("res"), pins.pin("cs"))
    out = {"buffer_len": len(d.buffer), "res_after_init": None}
    d.init_display()
    out["res_after_init"] = pins.level["res"]
    out["init"] = spi.log
    spi.log = []
    # A known pattern: row 0 has pixels 0, 3 and 255 lit; row 1 fully lit.
    d.fill(0)
    d.pixel(0, 0, 1)
    d.pixel(3, 0, 1)
    d.pixel(255, 0, 1)
    d.hline(0, 1, 256, 1)
    d.pixel(9, 63, 1)
    out["show_ok"] = d.show()
    out["show"] = spi.log
    spi.log = []
    d.set_level(8)
    d.show()
    out["show_level8"] = spi.log
    spi.log = []
    out["cs_idle"] = pins.level["cs"]
    d.poweroff()
    out["poweroff"] = spi.log
    spi.log = []
    # A bus error is counted, not raised; the next good frame clears `ok`.
    spi.fail = True
    out["fail_show"] = d.show()
    out["fail_errors"] = d.errors
    out["fail_ok"] = d.ok
    spi.fail = False
    out["recover_show"] = d.show()
    out["recover_ok"] = d.ok
    out["frames"] = d.frames
    # Heap: a show() expands row by row into its one row buffer.
    quiet = panels.SSD1322(NullSPI(), pins.pin("dc"), pins.pin("res"), pins.pin("cs"))
    quiet.fill(1)
    gc.collect()
    gc.disable()
    before = gc.mem_alloc()
    quiet.show()
    out["show_alloc"] = gc.mem_alloc() - before
    gc.enable()
    return out


def ssd1306():
    i2c = RecordingI2C()
    d = panels.SSD1306(i2c)
    d.init_display()
    out = {"init": i2c.log}
    i2c.log = []
    d.fill(0)
    d.pixel(0, 0, 1)
    d.pixel(127, 63, 1)
    d.show()
    out["show"] = i2c.log
    return out


def bitmaps():
    # A 10x2 wire bitmap: row 0 = pixel 0 and 9 lit, row 1 = pixel 1 lit.
    # bytes 80 40 | 40 00 -> base64 "gEBAAA=="
    bm = display.bitmap({"w": 10, "h": 2, "b": "gEBAAA=="})
    form = [list(bm), display.width(bm)]
    fb = display.Display(16, 4)
    gc.collect()
    gc.disable()
    before = gc.mem_alloc()
    display.blit(fb, bm, 1, 1)
    blit_alloc = gc.mem_alloc() - before
    gc.enable()
    plain = [[fb.pixel(x, y) for x in range(16)] for y in range(4)]
    fb.fill(0)
    display.blit(fb, bm, 1, 1, True)
    inverted = [[fb.pixel(x, y) for x in range(16)] for y in range(4)]
    bad = []
    for broken in ({"w": 10, "h": 2, "b": "gEBA"}, {"w": 10, "h": 2, "b": "!!!!!!!!"},
                   {"w": 10, "h": 2}, {"w": 5000, "h": 2, "b": ""}, {"w": 8, "h": 300, "b": ""},
                   {"w": "10", "h": 2, "b": "gEBAAA=="}, [10, 2], "gEBAAA==",
                   # rows that match the size but exceed the 2048-byte limit:
                   {"w": 1024, "h": 64, "b": "A" * 10920 + "AAA="}):
        try:
            display.bitmap(broken)
            bad.append("accepted")
        except ValueError:
            bad.append("ValueError")
    return {"form": form, "none": display.bitmap(None), "blit_alloc": blit_alloc,
            "plain": plain, "inverted": inverted, "bad": bad}


print(json.dumps({"ssd1322": ssd1322(), "ssd1306": ssd1306(), "bitmaps": bitmaps()}))
