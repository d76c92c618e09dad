# The device app's key scan allocates nothing (MicroPython unix port): the app runs it every
# 20 ms for ever, so any garbage there would keep the collector busy and fragment the 64 KB
# heap. Builds the simulated board and the app (no network), brings the rating to IDLE and
# to PROMPT, and measures what scans allocate with the collector off. Then prints the
# port's table of interned names (micropython.qstr_info()) and one JSON line.
# Usage: micropython scan_alloc.py BUILD_DIR WORK_DIR   (BUILD_DIR: simulator/build.py's)
import gc
import json
import micropython
import sys
import time

sys.path.insert(0, sys.argv[1])
work = sys.argv[2]

from app import App  # noqa: E402
from evaluator.journal import Journal  # noqa: E402
from evaluator.rating import Rating  # noqa: E402
from simboard import SimBoard  # noqa: E402

board = SimBoard({"board": "sim-v1"}, "D0001", 0, work)
journal = Journal(board.journal_dir, 4, 4096, sync=board.fs_sync)
rating = Rating()
app = App(board, {"device_id": "D0001", "key": "00" * 32, "hub_host": "127.0.0.1",
                  "hub_port": 1}, rating, journal)
out = {}


def scans(first, count):
    # What `count` scans allocate once the view on screen is drawn (a scan that must draw
    # a changed view builds it: that is the draw's cost, not the scan's).
    for n in range(first, first + 3):
        app.step(n)
    gc.collect()
    gc.disable()
    before = gc.mem_alloc()
    for n in range(first + 3, first + 3 + count):
        app.step(n)
    used = gc.mem_alloc() - before
    gc.enable()
    return used


rating.set_context({"w": "W1", "sn": "10234", "name": None, "win": None})
app.step(0)
out["idle_state"] = rating.state
out["idle"] = scans(1, 600)  # 12 s of scans: keys, timeouts, journal room, the screen
rating.offer({"pid": "P1", "case": "C1", "kind": "ji", "n": 1, "item": None, "ttl": 60},
             time.ticks_ms())
out["prompt_state"] = rating.state
# In PROMPT the countdown redraws four times a second; between frames a scan is as quiet.
out["prompt"] = scans(700, 5)
import catalogue  # noqa: E402,F401 -- loaded once a catalogue arrives
import screens  # noqa: E402,F401
micropython.qstr_info()
print(json.dumps(out))
