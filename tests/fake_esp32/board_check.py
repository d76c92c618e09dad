# Builds the ESP32-S3 board layer from the reference board file against the fake machine
# and network modules beside this script, drives it, and prints one JSON line of what
# happened. Run from the repo root:
#     micropython tests/fake_esp32/board_check.py SCRATCH_DIR [no-wifi]
import json
import sys

sys.path.insert(0, "firmware")
sys.path.insert(0, "tests/fake_esp32")

import asyncio  # noqa: E402

import machine  # noqa: E402  (the fake)
import network  # noqa: E402  (the fake)
from board import esp32s3  # noqa: E402
from evaluator.keys import Keys  # noqa: E402

if "no-wifi" in sys.argv:
    network.join_after[0] = None
machine.cause[0] = machine.WDT_RESET

spec = esp32s3.load_spec("hardware/boards/esp32s3-evaluator.json")
board = esp32s3.Board(spec)
out = {"name": board.name, "key_active": board.key_active}
out["keys"] = sorted([[stars, pin.id, pin.mode, pin.pull]
                      for stars, pin in board.keys_pins.items()])
disp = board.display
out["display"] = [type(disp).__name__, disp.width, disp.height]
out["spi"] = [m for m in machine.made if m[0] == "spi"]
out["spi_first"] = list(disp.spi.out[:2])
out["spi_bytes"] = len(disp.spi.out)
out["res"] = machine.Pin.by_id[spec["display"]["res"]].written
out["rst"] = board.reset_cause()
out["causes"] = [esp32s3.cause_name(c) for c in (1, 2, 3, 4, 5, 99)]
out["rssi_before"] = board.rssi()
board.start_watchdog(8000)
out["joined"] = asyncio.run(board.connect_wifi("hall", "password1", timeout_ms=1500))
out["wifi_up"] = board.wifi_up()
out["rssi"] = board.rssi()
out["wdt"] = [m for m in machine.made if m[0] == "wdt"]
out["feeds"] = machine.WDT.last.feeds

# The pins the board built drive the portable key scanner directly.
keys = Keys(board.keys_pins, active=board.key_active)
keys.poll(0)
machine.Pin.levels[spec["keys"][1]["pin"]] = 0  # the 满意 (4 stars) key goes down
keys.poll(10)
out["pressed"] = list(keys.poll(50))

with open(sys.argv[1] + "/sync.tmp", "w") as f:
    f.write("x")
    board.fs_sync(f)
out["heap"] = board.free_heap() > 0
out["ticks"] = board.ticks_ms() >= 0
print(json.dumps(out))
