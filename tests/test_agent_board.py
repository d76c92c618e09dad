# The Pi's board file and hardware layer (agent/board.py), the systemd unit and notify
# protocol (hardware/pingjia-agent.service, agent/systemd.py), and the provisioning file
# from the hub working as the agent's and the bridge's config unchanged.
import configparser
import copy
import json
import os
import shlex
import socket
import subprocess
import sys

import pytest
from gpiozero.pins.mock import MockFactory

from agent import board as B
from agent.bridge import BridgeConfig
from agent.systemd import Notifier
from conftest import ROOT, free_port
from firmware.evaluator.config import Config
from hub import provision
from hub.settings import write_default

BOARD_FILE = os.path.join(ROOT, "hardware", "boards", "rpi-evaluator.json")
UNIT = os.path.join(ROOT, "hardware", "pingjia-agent.service")


def spec():
    return B.load_spec(BOARD_FILE)


def test_the_reference_board_file_is_valid_and_avoids_the_bus_pins():
    s = spec()
    pins = {k["pin"] for k in s["keys"]}
    assert sorted(k["stars"] for k in s["keys"]) == [1, 2, 3, 4, 5]
    # SPI0 (7-11), I2C1 (2, 3), UART (14, 15) and the panel's DC/RST stay free for their jobs.
    panel = s["displays"]["ssd1322"]
    assert not pins & {2, 3, 7, 8, 9, 10, 11, 14, 15, panel["dc"], panel["res"]}
    assert set(s["displays"]) == {"ssd1322", "ssd1306", "sh1106"}
    assert B.display_spec(s)["driver"] == "ssd1322"
    assert B.display_spec(s, "sh1106")["bus"] == "i2c"
    folder, segments, size = B.journal_geometry(s, "/state")
    assert folder == os.path.join("/state", "journal") and segments * size >= 1 << 20


@pytest.mark.parametrize("change,message", [
    (lambda s: s["keys"].pop(), "five"),
    (lambda s: s["keys"][0].update(pin=40), "BCM GPIO"),
    (lambda s: s["keys"][1].update(pin=s["keys"][0]["pin"]), "differ"),
    (lambda s: s["keys"][0].update(active=1), "same active level"),
    (lambda s: s.update(display="oled9000"), "display"),
    (lambda s: s["displays"]["ssd1306"].update(driver="st7735"), "driver"),
    (lambda s: s["displays"]["ssd1322"].pop("dc"), "dc and res"),
    (lambda s: s.update(uplink={"kind": "serial"}), "port"),
    (lambda s: s.update(flash={"journal_segments": 1}), "journal_segments"),
])
def test_a_wrong_board_file_is_one_clear_error(tmp_path, change, message):
    s = copy.deepcopy(spec())
    change(s)
    path = tmp_path / "board.json"
    path.write_text(json.dumps(s))
    with pytest.raises(B.BoardError, match=message) as info:
        B.load_spec(str(path))
    assert "\n" not in str(info.value)
    with pytest.raises(B.BoardError, match="no such board file"):
        B.load_spec(str(tmp_path / "missing.json"))


def test_keys_read_pressed_as_1_whatever_the_wiring():
    s = copy.deepcopy(spec())
    s["keys"][0].update(pull="down", active=1)
    for key in s["keys"][1:]:
        key.update(pull="down", active=1)
    factory = MockFactory()
    board = B.open_board(s, pin_factory=factory, display=object(), reset_cause="soft")
    try:
        assert board.key_active == 1
        pin = factory.pin(s["keys"][0]["pin"])
        read = board.keys_pins[s["keys"][0]["stars"]]
        assert read() == 0
        pin.drive_high()  # pulled down: pressed means high
        assert read() == 1
        assert board.reset_cause() == "soft"
    finally:
        board.close()


def test_rpi_gpio_off_a_pi_says_what_to_do_instead():
    with pytest.raises(B.BoardError, match="RPi.GPIO.*gpiozero"):
        B.open_board(spec(), gpio="rpi", display=object())


def test_a_panel_that_does_not_start_leaves_a_board_without_display(caplog):
    board = B.open_board(spec(), pin_factory=MockFactory(), reset_cause="power",
                         log=__import__("logging").getLogger("test"))
    try:
        assert board.display is None  # no SPI bus here; the votes still work
        assert "did not start" in caplog.text
    finally:
        board.close()


def test_health_readers_parse_proc_files():
    wireless = ("Inter-| sta-|   Quality        |   Discarded packets\n"
                " face | tus | link level noise |  nwid  crypt\n"
                " wlan0: 0000   58.  -52.  -256        0      0\n")
    assert B._wireless_level(wireless) == -52
    assert B._wireless_level(wireless.split("\n", 2)[0] + "\nx\n") is None
    assert B._meminfo_available("MemTotal: 100 kB\nMemAvailable:  2048 kB\n") == 2 * 1024 * 1024
    assert B.boot_reset_cause(30.0) == "power" and B.boot_reset_cause(4000.0) == "soft"
    assert 0 <= B.PiBoard(spec(), {}, 0, reset_cause="power").free_memory() <= 0xFFFFFFFF


def test_the_systemd_unit_runs_the_agent_as_a_notify_service_with_a_watchdog():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(UNIT, encoding="utf-8")
    service = unit["Service"]
    assert service["Type"] == "notify" and int(service["WatchdogSec"]) >= 10
    assert service["Restart"] == "always" and service["StateDirectory"] == "pingjia-agent"
    assert "network-online" not in unit["Unit"].get("After", "")  # votes do not wait for a LAN
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/pingjia") and argv[1:3] == ["agent", "run"]
    # Every option the unit passes is one the command takes.
    help_text = subprocess.run([sys.executable, "-c", "from hub.cli import main; main()",
                                "agent", "run", "--help"], capture_output=True, text=True,
                               cwd=ROOT, timeout=60).stdout
    for option in (a for a in argv[3:] if a.startswith("--")):
        assert option in help_text, option


def test_notifier_speaks_the_sd_notify_protocol(tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    clock = [0.0]
    try:
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000"}, clock=lambda: clock[0])
        assert n.active and n.ready("up")
        assert sock.recv(100) == b"READY=1\nSTATUS=up"
        n.watchdog()  # not yet: half the interval has not passed since the start
        clock[0] = 5.0
        n.watchdog()
        n.watchdog()  # rate-limited
        assert sock.recv(100) == b"WATCHDOG=1"
        assert n.sent == 2
    finally:
        sock.close()
    quiet = Notifier({})
    assert not quiet.active and not quiet.ready() and quiet.watchdog() is None


def test_the_hubs_provisioning_file_is_the_agents_config_and_the_bridges(tmp_path):
    settings = write_default(str(tmp_path / "hub.toml"), broker={"port": free_port()})
    added = provision.add_device(settings, "PI0009", window="W09")
    document = provision.export_provisioning(settings, "PI0009", provisioned=added)
    config = Config(json.loads(json.dumps(document)))
    assert config.device_id == "PI0009" and config.key.hex() == added.key_hex
    assert config.mqtt_password == added.mqtt_password
    bridge = BridgeConfig(document)
    assert (bridge.hub_host, bridge.hub_port) == (document["hub_host"], document["hub_port"])
    assert added.key_hex not in repr(bridge) and added.mqtt_password not in repr(bridge)
