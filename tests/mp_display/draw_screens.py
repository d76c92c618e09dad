# Draws screens under the MicroPython unix port and dumps the raw framebuffers.
# Usage (from the repo root):
#   micropython -X heapsize=64K tests/mp_display/draw_screens.py CASES OUT [MODULE_DIR]
# CASES holds one JSON file per case: {"name", "driver": "plain"|"ssd1306", "w", "h",
# "view": rating view, "nows": [ms, ...]}. For each case OUT/<name>.bin gets one raw
# framebuffer per `now`, and one JSON line goes to stdout with the frame count, the
# format, the draw() results and heap figures: "alloc" the bytes each draw() allocated,
# "held" what stays allocated after a collection once the case is done, "peak"
# micropython.mem_peak() (which over-counts under a GC: it never sees what the collector
# frees). The view's wire bitmaps are decoded first into the device form, as the app does
# when their downlink arrives; "decoded" is what that allocated.
import gc
import json
import os
import sys

# The compiled firmware modules (argv[3]) as a device has them; the sources otherwise.
sys.path.insert(0, sys.argv[3] if len(sys.argv) > 3 else "firmware")

import framebuf  # noqa: E402
import micropython  # noqa: E402

import display  # noqa: E402
import screens  # noqa: E402


class _NullI2C:
    def writeto(self, addr, buf):
        pass

    def writevto(self, addr, bufs):
        pass


_displays = {}


def _display(driver, w, h):
    # One framebuffer per panel kind, allocated once and reused, as on the device.
    key = (driver, w, h)
    if key not in _displays:
        if driver == "ssd1306":
            import panels

            _displays[key] = panels.SSD1306(_NullI2C(), width=w, height=h)
        else:
            _displays[key] = display.Display(w, h)
    return _displays[key]


def _decode(view):
    # The app decodes ctx, prompt and catalogue bitmaps as they arrive, and the QR code at
    # boot; the screens only ever see the device form.
    for holder, key in ((view.get("ctx"), "name"), (view.get("ctx"), "win"),
                        (view.get("prompt"), "item"), (view, "qr")):
        if holder:
            holder[key] = display.bitmap(holder.get(key))
    for entry in view.get("reasons") or ():
        entry["bm"] = display.bitmap(entry.get("bm"))


def main():
    cases, out = sys.argv[1], sys.argv[2]
    for fname in sorted(os.listdir(cases)):
        if not fname.endswith(".json"):
            continue
        with open(cases + "/" + fname) as f:
            case = json.load(f)
        fb = _display(case.get("driver", "plain"), case["w"], case["h"])
        gc.collect()
        before = gc.mem_alloc()
        _decode(case["view"])
        decoded = gc.mem_alloc() - before
        moving = []
        alloc = []
        with open(out + "/" + case["name"] + ".bin", "wb") as f:
            for now in case["nows"]:
                gc.collect()
                before = gc.mem_alloc()
                gc.disable()
                scrolling = screens.draw(fb, case["view"], now)
                used = gc.mem_alloc() - before
                gc.enable()
                moving.append(scrolling)  # outside the measured window: lists grow
                alloc.append(used)
                fb.show()
                f.write(fb.buffer)
        fmt = "MONO_VLSB" if fb.fmt == framebuf.MONO_VLSB else "MONO_HLSB"
        case = None
        gc.collect()
        print(json.dumps({"name": fname[:-5], "frames": len(moving), "fmt": fmt,
                          "moving": moving, "alloc": alloc, "decoded": decoded,
                          "held": gc.mem_alloc(),
                          "peak": micropython.mem_peak(), "free": gc.mem_free()}))


main()
