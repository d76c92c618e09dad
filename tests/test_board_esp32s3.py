# The ESP32-S3 board layer, run under the MicroPython unix port against fake machine/network
# modules (tests/fake_esp32/): pins from the reference board file, the SSD1322 on SPI, Wi-Fi
# with a timeout, reset cause, watchdog, and its key pins driving the portable key scanner.
import json
import subprocess

from conftest import ROOT


def _check(micropython, tmp_path, *args):
    cmd = [micropython, "tests/fake_esp32/board_check.py", str(tmp_path)] + list(args)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_board_builds_keys_display_and_radio_from_the_board_file(micropython, tmp_path):
    with open(ROOT + "/hardware/boards/esp32s3-evaluator.json") as f:
        spec = json.load(f)
    out = _check(micropython, tmp_path)
    assert out["name"] == spec["board"]
    # Every key an input with a pull-up (fake Pin.IN = 1, PULL_UP = 2), on its pin.
    assert out["keys"] == sorted([k["stars"], k["pin"], 1, 2] for k in spec["keys"])
    assert out["key_active"] == 0
    d = spec["display"]
    assert out["display"] == ["SSD1322", d["width"], d["height"]]
    assert out["spi"] == [["spi", d["spi"], d["baud"], d["sck"], d["mosi"]]]
    assert out["spi_first"] == [0xFD, 0x12]  # the panel was initialised: unlock comes first
    assert out["res"][-2:] == [0, 1]  # and reset was pulsed
    assert out["pressed"] == [4]


def test_reset_cause_watchdog_and_wifi(micropython, tmp_path):
    out = _check(micropython, tmp_path)
    assert out["rst"] == "wdt"
    assert out["causes"] == ["power", "hard", "wdt", "deep", "soft", "other"]
    assert out["rssi_before"] is None
    assert out["joined"] is True and out["wifi_up"] is True and out["rssi"] == -61
    assert out["wdt"] == [["wdt", 8000]] and out["feeds"] == 3  # one per poll before joining
    assert out["heap"] and out["ticks"]
    assert (tmp_path / "sync.tmp").read_text() == "x"


def test_wifi_that_never_joins_gives_up_after_the_timeout(micropython, tmp_path):
    out = _check(micropython, tmp_path, "no-wifi")
    assert out["joined"] is False and out["wifi_up"] is False and out["rssi"] is None
    # The watchdog was fed while waiting, so a slow access point does not reset the device.
    assert out["feeds"] >= 1
