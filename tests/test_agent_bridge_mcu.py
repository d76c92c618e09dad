# The MicroPython firmware itself over the serial bridge: firmware/app.py's App, unchanged,
# with firmware/serial_link.py's SerialClient in place of its MQTT client, compiled with
# mpy-cross and run by the MicroPython unix port on one end of a pseudo-terminal pair. The
# bridge (agent/bridge.py) on the other end relays it to the real hub and the reference
# province. A vote goes up, the bridge is restarted with a vote waiting in the journal,
# and both arrive exactly once with the device's own MAC.
import json
import os
import subprocess
import threading
import time

import pytest

from agent.bridge import Bridge, BridgeConfig
from agent.serialport import ReopeningPort
from conftest import ROOT
from simulator.build import mpy_cross_cmd
from test_agent_bridge import Cable
from test_agent_pi import Hall, wait_for

DEVICE = "MCU001"

# The serial board: a UART (here the pty, read through select.poll so it never blocks),
# keys read from files the test creates (active low, as on the reference board), no panel.
DEVICE_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import asyncio
import json
import os
import select

from app import App
from evaluator.config import load
from evaluator.journal import Journal
from evaluator.rating import Rating
from serial_link import SerialClient

CONFIG, TTY, KEYS, JOURNAL = sys.argv[2:6]


class Uart:
    def __init__(self, path):
        self.f = open(path, "r+b")
        self.poll = select.poll()
        self.poll.register(self.f, select.POLLIN)
        self.one = bytearray(1)

    def read(self, n):
        out = None
        while (out is None or len(out) < n) and self.poll.poll(0):
            self.f.readinto(self.one)
            if out is None:
                out = bytearray()
            out.extend(self.one)
        return out

    def write(self, buf):
        return self.f.write(buf)


def key(stars):
    path = KEYS + "/key%d" % stars

    def read():
        try:
            os.stat(path)
            return 0
        except OSError:
            return 1
    return read


class Board:
    name = "mcu-serial"
    key_active = 0
    display = None

    def __init__(self):
        self.keys_pins = {s: key(s) for s in range(1, 6)}

    def reset_cause(self):
        return "power"

    def rssi(self):
        return None  # no Wi-Fi on a serial board

    def event(self, obj):
        print(json.dumps(obj))


uart = Uart(TTY)
app = App(Board(), load(CONFIG), Rating(), Journal(JOURNAL),
          client_factory=lambda **kw: SerialClient(uart, ping_ms=300, timeout_ms=1500, **kw),
          draw=None, resend_ms=3000)
asyncio.run(app.run())
"""


@pytest.fixture(scope="module")
def firmware(tmp_path_factory):
    """firmware/ compiled with mpy-cross, as a device runs it."""
    out = tmp_path_factory.mktemp("mcu-lib")
    fw = os.path.join(ROOT, "firmware")
    sources = [os.path.join(fw, n) for n in ("app.py", "serial_link.py")]
    sources += [os.path.join(fw, "evaluator", n) for n in os.listdir(os.path.join(fw, "evaluator"))
                if n.endswith(".py")]
    for src in sources:
        rel = os.path.relpath(src, fw)
        dst = os.path.join(str(out), rel[:-3] + ".mpy")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        subprocess.run([mpy_cross_cmd(), "-o", dst, src], check=True)
    return str(out)


class McuDevice:
    def __init__(self, micropython, lib, config_path, tty_path, folder):
        self.keys = os.path.join(folder, "keys")
        os.makedirs(self.keys, exist_ok=True)
        script = os.path.join(folder, "device.py")
        with open(script, "w") as f:
            f.write(DEVICE_SCRIPT)
        self.log = open(os.path.join(folder, "device.err"), "ab")
        # 64 K words: the simulator's heap (64 KB on a 32-bit board; docs/simulator.md).
        self.proc = subprocess.Popen(
            [micropython, "-X", "heapsize=64wK", script, lib, config_path, tty_path, self.keys,
             os.path.join(folder, "journal")],
            stdout=subprocess.PIPE, stderr=self.log, cwd=folder)
        self.events = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                self.events.append(event)

    def state(self):
        with self.lock:
            states = [e["st"] for e in self.events if e.get("e") == "state"]
        return states[-1] if states else None

    def saved(self):
        with self.lock:
            return [json.loads(e["p"]) for e in self.events if e.get("e") == "saved"]

    def press(self, stars):
        path = os.path.join(self.keys, "key%d" % stars)
        open(path, "w").close()
        time.sleep(0.15)
        os.unlink(path)
        time.sleep(0.4)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


class BridgeThread:
    def __init__(self, path, config):
        self.stop = threading.Event()
        self.bridge = Bridge(ReopeningPort(path, timeout=0.05), config, link_timeout_s=2)
        self.thread = threading.Thread(target=self.bridge.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.thread.join(10)


def test_the_micropython_firmware_votes_through_the_serial_bridge(tmp_path, micropython,
                                                                    firmware):
    hall = Hall(str(tmp_path), [(DEVICE, "W08")])
    config_path = str(tmp_path / "config.json")
    with open(config_path, "w") as f:
        json.dump(hall.config(DEVICE), f)
    bridge_config = BridgeConfig({"hub_host": "127.0.0.1",
                                  "hub_port": hall.settings.broker.port})
    cable = Cable(str(tmp_path))
    device = bridge = None
    try:
        hall.start_hub()
        hall.sign_in("W08", "30003", "王芳")
        device = McuDevice(micropython, firmware, config_path, cable.device_path, str(tmp_path))
        bridge = BridgeThread(cable.bridge_path, bridge_config)
        wait_for(lambda: device.state() == "IDLE", timeout=30, what="the staff on the MCU")
        hall.prompt("W08", "M1", "医保登记")
        wait_for(lambda: device.state() == "PROMPT", what="the prompt on the MCU")
        device.press(5)
        wait_for(lambda: hall.province_ids() == ["MCU001:1"], timeout=30, what="vote 1")
        wait_for(lambda: device.state() == "IDLE", what="rest")

        # The bridge goes away with a prompt on screen; the vote waits in the journal.
        hall.prompt("W08", "M2", "医保登记")
        wait_for(lambda: device.state() == "PROMPT", what="the second prompt")
        bridge.close()
        device.press(4)
        time.sleep(2.0)
        assert hall.province_ids() == ["MCU001:1"]
        bridge = BridgeThread(cable.bridge_path, bridge_config)
        wait_for(lambda: hall.province_ids() == ["MCU001:1", "MCU001:2"], timeout=30,
                 what="vote 2 after the bridge came back")
        rows = hall.hub_rows("SELECT seq, mac FROM votes WHERE device_id = ? ORDER BY seq",
                             (DEVICE,))
        saved = {v["s"]: v["mac"] for v in device.saved()}
        assert rows == [(1, saved[1]), (2, saved[2])]
        assert device.proc.poll() is None, "the firmware stopped"
        # Births and heartbeats through the bridge were accepted too (no Wi-Fi: rssi null).
        assert hall.hub_rows("SELECT reason, count FROM rejections") == []
        assert hall.online(DEVICE)
    finally:
        if bridge is not None:
            bridge.close()
        if device is not None:
            device.close()
        cable.close()
        hall.close()
