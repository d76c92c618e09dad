# flash.sh against a stand-in board: a MicroPython unix-port REPL on a pseudo-terminal
# (socat), whose working directory is the board's flash. mpremote, the port checks, the
# copy and the sha256 read-back all run for real; esptool is a stand-in script that logs
# how it was called. Covers: a full flash from a provisioning file and from the hub's
# registry (with the first birth watched), reflash and --replace, tampering caught by
# verification, no / several / busy ports, wrong board, the base image step, and the
# journal of another identity. The two-slot layout for updates over the air: the firmware
# image in app slot 0 (slot0.img on the simulated board, for real; ROMFS segment 0 with a
# stand-in mpremote that records its arguments), the boot selector as main.py, the flashed
# folder booting under the simulator's launcher, a unit flashed before slots cleaned up,
# a reflash clearing ota.json and slot 1.
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, free_port
from firmware.evaluator import config as device_config
from hub.flashing import (EXIT_CODES, BaseImageFailed, DeviceBusy, FlashError, FlashRequest,
                          NoDevice, NoHeartbeat, OtherIdentity, SeveralDevices, Tools,
                          VerifyMismatch, WrongBoard, build_firmware, check_image,
                          check_port_free, choose_port, flash, load_board, wait_first_birth)
from hub.images import build_image, image_modules
from hub.provision import add_device, export_provisioning, list_devices
from hub.settings import write_default
from hub.store import Store

FLASH_SH = os.path.join(ROOT, "flash.sh")
SIM_BOARD = os.path.join(ROOT, "hardware", "boards", "sim.json")
BOOTSEL = os.path.join(ROOT, "firmware", "bootsel.py")


def _socat():
    found = shutil.which("socat")
    if not found:
        pytest.fail("socat is not installed (apt-get install socat): it gives the stand-in "
                    "board its serial port")
    return found


class FakeBoard:
    """A unix-port MicroPython REPL behind a pty: mpremote talks to it as to a board."""

    def __init__(self, folder, name, micropython):
        self.flash = os.path.join(folder, "flash-" + name)
        os.makedirs(self.flash, exist_ok=True)
        self.port = os.path.join(folder, name)
        self.proc = subprocess.Popen(
            [_socat(), "PTY,link=%s,raw,echo=0" % self.port,
             "EXEC:%s -i,pty,raw,echo=0" % micropython],
            cwd=self.flash, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.port):
            assert self.proc.poll() is None, "socat exited"
            assert time.monotonic() < deadline, "socat made no pty"
            time.sleep(0.02)

    def seed(self, build_dir):
        """Put this build's firmware on the flash already (a spare unit flashed earlier),
        so mpremote finds those files up to date and a test copies only what differs."""
        for f in build_firmware("sim", build_dir).files:
            target = os.path.join(self.flash, f.path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(f.local, target)

    def read(self, path):
        with open(os.path.join(self.flash, path), "rb") as f:
            return f.read()

    def listing(self):
        found = set()
        for dirpath, _, names in os.walk(self.flash):
            for name in names:
                found.add(os.path.relpath(os.path.join(dirpath, name), self.flash))
        return found

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.fixture
def boards(tmp_path, micropython):
    made = []

    def make(name="ttyFAKE0"):
        board = FakeBoard(str(tmp_path), name, micropython)
        made.append(board)
        return board

    yield make
    for board in made:
        board.close()


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("device-mpy"))
    build_firmware("sim", path)  # once per module: every flash below finds it up to date
    return path


@pytest.fixture
def hub(tmp_path):
    return write_default(str(tmp_path / "hub" / "hub.toml"),
                         broker={"port": free_port()}, http={"port": free_port()})


def exported(settings, tmp_path, device_id, window=None):
    provisioned = add_device(settings, device_id, window=window)
    path = str(tmp_path / (device_id + ".json"))
    export_provisioning(settings, device_id, path=path, provisioned=provisioned)
    return provisioned, path


def registry_key(settings, device_id):
    store = Store(settings.db_path)
    try:
        return store.conn.execute("SELECT key_hex FROM devices WHERE device_id = ?",
                                  (device_id,)).fetchone()[0]
    finally:
        store.close()


def run_flash_sh(args, env=None):
    full = dict(os.environ, PINGJIA_PYTHON=sys.executable)
    full.update(env or {})
    return subprocess.run(["bash", FLASH_SH] + list(args), env=full, capture_output=True,
                          text=True, timeout=180)


def in_process(request_kwargs, build_dir, echo=None, **kwargs):
    lines = []
    request = FlashRequest(build_dir=build_dir, **request_kwargs)
    result = flash(request, tools=Tools(),
                   echo=echo or lines.append, **kwargs)
    return result, lines


def assert_firmware_installed(board, build_dir):
    """The unit is in the two-slot layout: this build's image in slot0.img, the boot
    selector as main.py, no update state, no loose modules; every file of its manifest is
    there with the manifest's sha256."""
    manifest = json.loads(board.read("firmware.json"))
    for path, digest in manifest["files"].items():
        assert hashlib.sha256(board.read(path)).hexdigest() == digest, path
    assert set(manifest["files"]) == {"main.py", "slot0.img", "board.json"}
    image = build_image("sim", build_dir)
    assert board.read("slot0.img") == open(image.path, "rb").read()
    assert manifest["slot0"] == {"version": image.version, "sha256": image.sha256,
                                 "size": image.size}
    assert manifest["fw"] == image.version and manifest["slots"] == "files"
    with open(BOOTSEL, "rb") as f:
        assert board.read("main.py") == f.read()
    listing = board.listing()
    assert not {"ota.json", "slot1.img", "dl.json"} & listing
    assert not [p for p in listing if p.endswith(".mpy")], listing


# -- full flashes ---------------------------------------------------------------------------

def test_flash_sh_installs_verified_firmware_from_a_provisioning_file(tmp_path, boards, hub,
                                                                        build_dir):
    board = boards()
    provisioned, path = exported(hub, tmp_path, "D0007", window="W07")
    proc = run_flash_sh(
        ["--device-id", "D0007", "--window", "W07", "--board", "sim", "--provisioning", path,
         "--build-dir", build_dir, "--wifi-ssid", "hall-net"],
        env={"PINGJIA_FLASH_PORTS": str(tmp_path / "ttyFAKE*"),
             "PINGJIA_WIFI_PASSWORD": "wifi-secret-123"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "[1/8] port" in out and board.port in out and "only one found" in out
    assert "[7/8] verify" in out and "sha256 all match" in out
    assert "[8/8] heartbeat   skipped: no --hub-config" in out
    assert_firmware_installed(board, build_dir)
    with open(SIM_BOARD, "rb") as f:
        assert board.read("board.json") == f.read()
    config = device_config.loads(board.read("config.json"))
    assert config.device_id == "D0007" and config.window == "W07"
    assert config.key.hex() == provisioned.key_hex == registry_key(hub, "D0007")
    assert config.mqtt_password == provisioned.mqtt_password
    assert (config.wifi_ssid, config.wifi_password) == ("hall-net", "wifi-secret-123")
    assert config.board == "board.json"
    for secret in (provisioned.key_hex, provisioned.mqtt_password, "wifi-secret-123"):
        assert secret not in proc.stdout and secret not in proc.stderr


def test_flash_from_the_hub_registry_waits_for_the_first_birth(tmp_path, boards, hub, build_dir):
    board = boards()
    board.seed(build_dir)
    # A birth recorded before this flash (an old unit's) must not count as this one's.
    store = Store(hub.db_path)
    store.add_event("D0008", "birth", {"fw": "old"})
    stale_id = store.conn.execute("SELECT max(id) FROM events").fetchone()[0]
    store.close()
    # Stand-ins: something listening on the hub's HTTP port (the hub is running), and the
    # hub's ingest recording the unit's birth once its files are on flash.
    listener = socket.socket()
    listener.bind(("127.0.0.1", hub.http.port))
    listener.listen(8)
    stop = threading.Event()

    def device_boots():
        while not stop.is_set():
            if os.path.exists(os.path.join(board.flash, "firmware.json")):
                s = Store(hub.db_path)
                s.add_event("D0008", "birth", {"fw": "0.1.0", "rst": "power", "lo": 1, "next": 1})
                s.close()
                return
            time.sleep(0.05)

    booter = threading.Thread(target=device_boots)
    booter.start()
    try:
        result, lines = in_process(dict(device_id="D0008", window="W08", board="sim",
                                        port=board.port, hub_config=hub.source, wait_s=30),
                                   build_dir)
    finally:
        stop.set()
        booter.join()
        listener.close()
    assert result.heartbeat == "seen" and result.birth["id"] > stale_id
    assert result.birth["detail"]["fw"] == "0.1.0"
    assert any("first heartbeat" in line for line in lines)
    [record] = [d for d in list_devices(hub) if d.device_id == "D0008"]
    assert record.window == "W08" and record.broker_login
    config = json.loads(board.read("config.json"))
    assert config["key"] == registry_key(hub, "D0008") and config["window"] == "W08"
    assert_firmware_installed(board, build_dir)


def test_reflash_keeps_the_key_and_another_unit_needs_replace(tmp_path, boards, hub, build_dir):
    first = boards("ttyFAKE0")
    first.seed(build_dir)
    base = dict(device_id="D0009", window="W09", board="sim", hub_config=hub.source, wait_s=5)
    in_process(dict(base, port=first.port), build_dir)
    before = json.loads(first.read("config.json"))
    # The same unit again: same MAC key (its journal stays valid), a new broker password.
    result, lines = in_process(dict(base, port=first.port), build_dir)
    again = json.loads(first.read("config.json"))
    assert again["key"] == before["key"] == registry_key(hub, "D0009")
    assert again["mqtt_password"] != before["mqtt_password"]
    assert result.heartbeat == "skipped" and "hub unreachable" in result.heartbeat_detail
    # Only config.json changed: every other file was already there with the same sha256.
    assert (result.copied, result.up_to_date) == (1, result.files - 1)

    # A blank unit under a known id is refused unless it replaces the old one.
    second = boards("ttyFAKE1")
    second.seed(build_dir)
    seeded = second.listing()
    with pytest.raises(FlashError, match="already provisioned and this unit is not it"):
        in_process(dict(base, port=second.port), build_dir)
    assert second.listing() == seeded  # nothing written
    store = Store(hub.db_path)
    with store.transaction():
        store.insert_vote({"d": "D0009", "s": 5, "t": 1700000005, "k": "v", "pid": "P5",
                           "case": "", "stars": 5, "rs": [], "cv": "", "w": "W09", "sn": "",
                           "mac": "%064x" % 5})
    store.close()
    result, _ = in_process(dict(base, port=second.port, replace=True), build_dir)
    replaced = json.loads(second.read("config.json"))
    assert replaced["key"] != before["key"] and replaced["key"] == registry_key(hub, "D0009")
    assert replaced["seq_floor"] == 5 == result.seq_floor
    # A hub that must be watched but is not running is an error, not a skip.
    with pytest.raises(FlashError) as caught:
        in_process(dict(base, port=second.port, replace=True, require_heartbeat=True), build_dir)
    assert caught.value.exit_code == 8 and "hub unreachable" in str(caught.value)


# -- verification ---------------------------------------------------------------------------

def test_a_file_changed_between_copy_and_verify_is_a_mismatch(tmp_path, boards, hub, build_dir):
    board = boards()
    board.seed(build_dir)
    _, path = exported(hub, tmp_path, "D0010")

    def tamper(link):
        # One bit of the slot image flipped (a flash error), board.json gone.
        with open(os.path.join(board.flash, "slot0.img"), "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 1]))
        os.remove(os.path.join(board.flash, "board.json"))

    with pytest.raises(VerifyMismatch) as caught:
        in_process(dict(device_id="D0010", board="sim", port=board.port, provisioning=path),
                   build_dir, after_copy=tamper)
    assert caught.value.exit_code == 7
    assert caught.value.files == ["board.json (missing)", "slot0.img"]
    assert "verification mismatch: 2 of" in str(caught.value)


# -- ports ----------------------------------------------------------------------------------

def test_no_port_and_several_ports_are_clear_errors(tmp_path, boards, hub, build_dir):
    _, path = exported(hub, tmp_path, "D0011")
    args = ["--device-id", "D0011", "--board", "sim", "--provisioning", path,
            "--build-dir", build_dir]
    env = {"PINGJIA_FLASH_PORTS": str(tmp_path / "ttyFAKE*")}
    proc = run_flash_sh(args, env)
    assert proc.returncode == NoDevice.exit_code == 3
    assert proc.stderr.startswith("error: no device:") and proc.stderr.count("\n") == 1
    proc = run_flash_sh(args + ["--port", str(tmp_path / "ttyACM9")], env)
    assert proc.returncode == 3 and "no device at" in proc.stderr

    one, two = boards("ttyFAKE0"), boards("ttyFAKE1")
    proc = run_flash_sh(args, env)
    assert proc.returncode == SeveralDevices.exit_code == 4
    assert "several devices" in proc.stderr and one.port in proc.stderr and two.port in proc.stderr
    assert one.listing() == set() and two.listing() == set()
    # Naming one of them is enough.
    with pytest.raises(SeveralDevices):
        choose_port(None, [str(tmp_path / "ttyFAKE*")])
    assert choose_port(two.port).device == two.port


def test_a_port_open_in_another_program_is_busy(tmp_path, boards, hub, build_dir):
    board = boards()
    _, path = exported(hub, tmp_path, "D0012")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nf = open(sys.argv[1], 'rb', buffering=0)\n"
         "print('open', flush=True)\ntime.sleep(60)", board.port],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        proc = run_flash_sh(["--device-id", "D0012", "--board", "sim", "--provisioning", path,
                             "--port", board.port, "--build-dir", build_dir])
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == DeviceBusy.exit_code == 5
    assert "device busy" in proc.stderr and "pid %d" % holder.pid in proc.stderr
    assert board.listing() == set()

    # A lock (what mpremote and esptool take) is busy too; once released the port is free.
    import fcntl
    fd = os.open(board.port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DeviceBusy, match="locked by another program"):
            check_port_free(board.port)
    finally:
        os.close(fd)
    check_port_free(board.port)


# -- board and base image -------------------------------------------------------------------

def test_wrong_board_is_refused_before_anything_is_written(tmp_path, boards, hub, build_dir):
    board = boards()
    _, path = exported(hub, tmp_path, "D0013")
    with pytest.raises(WrongBoard) as caught:
        in_process(dict(device_id="D0013", board="esp32s3-evaluator", port=board.port,
                        provisioning=path), build_dir)
    assert caught.value.exit_code == 6
    assert "wrong board" in str(caught.value) and "ESP32-S3" in str(caught.value)
    assert board.listing() == set()


def esp_image(path, chip_id):
    header = bytearray(64)
    header[0] = 0xE9
    header[12] = chip_id
    with open(path, "wb") as f:
        f.write(bytes(header))
    return str(path)


STANDIN = """import json, os, sys
with open(os.environ["ESPTOOL_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
sys.exit(int(os.environ.get("ESPTOOL_EXIT", "0")))
"""


def test_base_image_goes_through_esptool_before_the_firmware(tmp_path, boards, hub, build_dir):
    board = boards()
    board.seed(build_dir)
    _, path = exported(hub, tmp_path, "D0014")
    standin = tmp_path / "esptool_standin.py"
    standin.write_text(STANDIN)
    log = tmp_path / "esptool.log"
    image = esp_image(tmp_path / "micropython-esp32s3.bin", 9)
    env = {"PINGJIA_ESPTOOL": "%s %s" % (sys.executable, standin), "ESPTOOL_LOG": str(log)}
    args = ["--device-id", "D0014", "--board", "sim", "--provisioning", path, "--port",
            board.port, "--build-dir", build_dir, "--base-image", image, "--chip", "esp32s3"]
    proc = run_flash_sh(args + ["--erase"], env)
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 2
    erase, write = calls
    assert erase[:4] == ["--chip", "esp32s3", "--port", board.port]
    assert erase[-1] in ("erase-flash", "erase_flash")
    assert write[:4] == erase[:4] and write[-3:][1:] == ["0x0", image]
    assert write[-3] in ("write-flash", "write_flash")
    assert "[2/8] base image" in proc.stdout and "[7/8] verify" in proc.stdout
    assert "board.json" in board.listing()

    # esptool failing stops the flash; nothing more is written.
    os.remove(os.path.join(board.flash, "board.json"))
    proc = run_flash_sh(args, dict(env, ESPTOOL_EXIT="2"))
    assert proc.returncode == BaseImageFailed.exit_code == 10
    assert "esptool failed (exit 2)" in proc.stderr
    assert "board.json" not in board.listing()

    # An image for another chip never reaches esptool.
    log.unlink()
    other = esp_image(tmp_path / "micropython-esp32.bin", 0)
    proc = run_flash_sh(args[:-4] + ["--base-image", other, "--chip", "esp32s3"], env)
    assert proc.returncode == WrongBoard.exit_code
    assert "is for esp32, not esp32s3" in proc.stderr and not log.exists()


def test_image_checks():
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        good = esp_image(os.path.join(folder, "s3.bin"), 9)
        assert check_image(good, "esp32s3") == 0x0
        assert check_image(esp_image(os.path.join(folder, "e.bin"), 0), "esp32") == 0x1000
        html = os.path.join(folder, "page.bin")
        with open(html, "wb") as f:
            f.write(b"<html>not found</html>" * 4)
        with pytest.raises(BaseImageFailed, match="not an ESP firmware image"):
            check_image(html, "esp32s3")
        with pytest.raises(FlashError, match="--chip esp99"):
            check_image(good, "esp99")


# -- identity and journal -------------------------------------------------------------------

def test_a_unit_holding_another_identitys_journal_needs_force(tmp_path, boards, hub, build_dir):
    board = boards()
    board.seed(build_dir)
    _, path = exported(hub, tmp_path, "D0015")
    # A used unit: D0003's identity, two journal segments, an old manifest naming a module
    # this firmware no longer has, and a stray source module that would shadow app.mpy.
    with open(os.path.join(board.flash, "config.json"), "w") as f:
        json.dump({"device_id": "D0003", "key": "ab" * 32}, f)
    os.makedirs(os.path.join(board.flash, "journal"))
    for name in ("seg000", "seg001"):
        with open(os.path.join(board.flash, "journal", name), "wb") as f:
            f.write(b"votes")
    for name in ("retired_module.mpy", "app.py"):
        with open(os.path.join(board.flash, name), "wb") as f:
            f.write(b"old")
    with open(os.path.join(board.flash, "firmware.json"), "w") as f:
        json.dump({"format": "pingjia-firmware/1", "files": {"retired_module.mpy": "00",
                                                             "journal/seg000": "00"}}, f)
    request = dict(device_id="D0015", board="sim", port=board.port, provisioning=path)
    with pytest.raises(OtherIdentity) as caught:
        in_process(request, build_dir)
    assert caught.value.exit_code == 12 and "journal of D0003 (2 files)" in str(caught.value)
    assert json.loads(board.read("config.json"))["device_id"] == "D0003"

    result, _ = in_process(dict(request, force=True), build_dir)
    assert result.previous_id == "D0003" and result.journal_wiped == 2
    assert os.listdir(os.path.join(board.flash, "journal")) == []
    listing = board.listing()
    assert "retired_module.mpy" not in listing and "app.py" not in listing
    assert json.loads(board.read("config.json"))["device_id"] == "D0015"
    assert_firmware_installed(board, build_dir)


def test_first_birth_wait_times_out_with_a_clear_error(hub):
    with pytest.raises(NoHeartbeat) as caught:
        wait_first_birth(hub, "D0016", 0, timeout_s=0.2, poll_s=0.05)
    assert caught.value.exit_code == 9 and "D0016 did not reach hub hall-1" in str(caught.value)
    store = Store(hub.db_path)
    store.add_event("D0016", "birth", {"fw": "0.1.0"})
    store.close()
    assert wait_first_birth(hub, "D0016", 0, timeout_s=0.2, poll_s=0.05)["detail"]["fw"] == "0.1.0"


# -- documentation --------------------------------------------------------------------------

def test_every_exit_code_and_option_is_documented():
    with open(os.path.join(ROOT, "docs", "technician.md"), encoding="utf-8") as f:
        doc = f.read()
    codes = {cls.exit_code for cls in EXIT_CODES}
    assert len(codes) == len(EXIT_CODES)
    for cls in EXIT_CODES:
        assert "| %d |" % cls.exit_code in doc, cls.__name__
    from click.testing import CliRunner

    from hub.cli import cli
    from hub.cli_flash import flash_command, image_command
    shown = CliRunner().invoke(cli, ["device", "flash", "--help"])
    assert shown.exit_code == 0 and "--device-id" in shown.output
    for param in flash_command.params + image_command.params:
        for opt in param.opts:
            if opt.startswith("--"):
                assert "`%s" % opt in doc, opt
    assert "pingjia device image --board" in doc


def test_a_unit_without_a_micropython_repl_is_a_clear_error(tmp_path, boards, hub, build_dir):
    # What mpremote says when the far end is not MicroPython (a factory-fresh board, another
    # firmware); a real mpremote takes ten seconds to give up, a stand-in says it at once.
    board = boards()
    _, path = exported(hub, tmp_path, "D0017")
    standin = tmp_path / "mpremote_standin.py"
    standin.write_text("import sys\nprint('mpremote: could not enter raw repl')\nsys.exit(1)\n")
    proc = run_flash_sh(["--device-id", "D0017", "--board", "sim", "--provisioning", path,
                         "--port", board.port, "--build-dir", build_dir],
                        {"PINGJIA_MPREMOTE": "%s %s" % (sys.executable, standin)})
    assert proc.returncode == 11
    assert proc.stderr.strip() == ("error: no MicroPython REPL answers on %s: a new board needs "
                                   "--base-image; a running app may need a RESET" % board.port)


# -- the two-slot layout (updates over the air) ----------------------------------------------

def _old_layout(board, build_dir, device_id, key_hex):
    """A unit flashed before slots: every module loose in its root (with an old manifest
    listing them), the app's entry as main.py, its own identity and two journal segments."""
    from simulator import build as fwbuild

    manifest = {}
    for rel in image_modules("sim-v1", build_dir):
        if rel in ("simboard.mpy", "simdevice.mpy"):
            continue
        target = os.path.join(board.flash, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(build_dir, rel), target)
        manifest[rel] = "00"
    with open(os.path.join(board.flash, "main.py"), "w") as f:
        f.write("import app  # the old entry\n")
    manifest["main.py"] = "00"
    with open(os.path.join(board.flash, "firmware.json"), "w") as f:
        json.dump({"format": "pingjia-firmware/1", "fw": "0.0.9", "board": "sim-v1",
                   "files": manifest}, f)
    with open(os.path.join(board.flash, "config.json"), "w") as f:
        json.dump({"device_id": device_id, "key": key_hex}, f)
    os.makedirs(os.path.join(board.flash, "journal"))
    for name in ("seg000", "seg001"):
        with open(os.path.join(board.flash, "journal", name), "wb") as f:
            f.write(b"votes of " + name.encode())
    assert fwbuild.SIM_MODULES  # the simulator's modules were never put on a unit


def test_a_unit_flashed_before_slots_gets_slot_0_and_keeps_its_journal(tmp_path, boards, hub,
                                                                        build_dir):
    board = boards()
    provisioned, path = exported(hub, tmp_path, "D0018", window="W18")
    _old_layout(board, build_dir, "D0018", provisioned.key_hex)
    journal = {n: board.read("journal/" + n) for n in ("seg000", "seg001")}
    request = dict(device_id="D0018", window="W18", board="sim", port=board.port,
                   provisioning=path)
    result, lines = in_process(request, build_dir)
    assert result.previous_id == "D0018" and result.journal_wiped == 0
    assert result.removed >= 12  # the loose modules
    assert_firmware_installed(board, build_dir)  # slot0.img, bootsel as main.py, no .mpy
    assert not os.path.exists(os.path.join(board.flash, "evaluator"))  # emptied, removed
    assert not os.path.exists(os.path.join(board.flash, "board"))
    assert {n: board.read("journal/" + n) for n in journal} == journal
    assert any("app slot 0 (slot0.img)" in line for line in lines)
    assert any(line.startswith("[7/8] verify") for line in lines)

    # Later the unit took an update to slot 1 and has it on trial, with a download state:
    # a reflash is the known-good state again -- slot 0 confirmed, slot 1 and the rest gone.
    with open(os.path.join(board.flash, "ota.json"), "w") as f:
        json.dump({"a": 0, "t": 1, "n": 1, "tv": "0.2.0", "rb": None}, f)
    with open(os.path.join(board.flash, "slot1.img"), "wb") as f:
        f.write(b"an image on trial")
    with open(os.path.join(board.flash, "dl.json"), "w") as f:
        json.dump({"ver": "0.2.0", "sha": "00", "size": 9, "got": 4}, f)
    with open(os.path.join(board.flash, "slot0.img"), "r+b") as f:
        f.write(b"\x00\x00")  # and slot 0 damaged
    result, _ = in_process(request, build_dir)
    assert_firmware_installed(board, build_dir)
    assert result.removed == 3 and result.copied == 1  # ota.json, slot1.img, dl.json; slot 0
    assert {n: board.read("journal/" + n) for n in journal} == journal
    assert json.loads(board.read("config.json"))["device_id"] == "D0018"


def test_the_flashed_unit_boots_from_slot_0_under_the_simulators_launcher(tmp_path, boards, hub,
                                                                          build_dir):
    # The simulator's launcher runs firmware/bootsel.py (the flashed main.py) on the unit's
    # folder, which mounts slot0.img and imports the simulated board's entry from it. The
    # build's own ROMFS is out of reach (a path that does not exist), and no module is
    # loose in the folder: the hello can only come from the flashed image.
    import asyncio

    from evaluator import VERSION
    from simulator.fleet import Device, Fleet

    board = boards()
    _, path = exported(hub, tmp_path, "D0019")
    in_process(dict(device_id="D0019", board="sim", port=board.port, provisioning=path),
               build_dir)
    board.close()  # the stand-in REPL is done; the folder is the unit's flash now
    with open(BOOTSEL, "rb") as f:
        assert board.read("main.py") == f.read()

    async def boot():
        fleet = Fleet(str(tmp_path / "fleet"), build_dir=build_dir)
        await fleet.start()
        fleet.romfs = str(tmp_path / "no-such-build.romfs")
        dev = fleet.devices["D0019"] = Device("D0019", board.flash)
        try:
            await fleet.spawn("D0019")
            await fleet.wait_for(lambda: dev.fw is not None or not dev.alive, 60, "hello")
            return dev.fw, fleet.log_tail("D0019")
        finally:
            await fleet.close()

    fw, log = asyncio.run(boot())
    assert fw == VERSION, log
    assert not os.path.exists(os.path.join(board.flash, "ota.json"))  # slot 0 stays confirmed


def test_the_real_boards_image_holds_start_and_its_modules_not_the_simulators(tmp_path,
                                                                               micropython):
    image = build_image("esp32s3-evaluator", str(tmp_path / "mpy"))
    assert image.path.endswith("-esp32s3-v1.romfs") and image.size == os.path.getsize(image.path)
    with open(image.path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == image.sha256
    # Mounted as bootsel.py mounts a slot (VfsRom at /rom, first on the path), with the
    # fake machine/network modules standing in for the ESP32's: start's imports all load.
    script = (
        "import sys, vfs, os\n"
        "vfs.mount(vfs.VfsRom(open(sys.argv[1], 'rb').read()), '/rom')\n"
        "sys.path.insert(0, '/rom')\n"
        "sys.path.append(sys.argv[2])\n"
        "import evaluator, app, board.esp32s3, evaluator.config, evaluator.journal\n"
        "import evaluator.rating, bootsel, ota\n"
        "print('ok', evaluator.VERSION, sorted(os.listdir('/rom')))\n")
    proc = subprocess.run([micropython, "-c", script, image.path,
                           os.path.join(ROOT, "tests", "fake_esp32")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok %s " % image.version)
    listed = proc.stdout
    assert "'start.mpy'" in listed and "'app.mpy'" in listed and "'board'" in listed
    assert "simboard" not in listed and "simdevice" not in listed
    # The same build for the simulated board carries the simulator's entry instead.
    sim = build_image("sim", str(tmp_path / "mpy"))
    assert sim.sha256 != image.sha256 and sim.version == image.version


# A stand-in for mpremote against an ESP32-S3 whose app slots are ROMFS segments. It logs
# every call's arguments, keeps the unit's flash in a folder (UNIT_DIR) with the two
# segments as rom0.bin / rom1.bin, and runs the code flash.sh sends with `exec` under
# CPython there, with `sys` answering as an ESP32-S3 and `vfs.rom_ioctl` served from the
# segment files. `romfs -p N deploy FILE` writes FILE into segment N.
ROMFS_STANDIN = r'''import builtins, hashlib, json, os, shutil, sys, types
unit, seg_bytes = os.environ["UNIT_DIR"], 256 * 1024
with open(os.environ["MPREMOTE_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
def seg(n):
    p = os.path.join(unit, "rom%d.bin" % n)
    with open(p, "rb") as f:
        return f.read()
def put(n, off, data):
    p = os.path.join(unit, "rom%d.bin" % n)
    body = bytearray(seg(n))
    body[off:off + len(data)] = data
    with open(p, "wb") as f:
        f.write(bytes(body))
def rom_ioctl(op, n=0, *args):
    if op == 2:
        return seg(n) if n < 2 else -19
    if op == 3:
        put(n, 0, b"\xff" * args[0])
        return 16
    return 0
fake_vfs = types.SimpleNamespace(rom_ioctl=rom_ioctl, umount=lambda p: None)
fake_sys = types.SimpleNamespace(platform="esp32", implementation=types.SimpleNamespace(
    _machine="Generic ESP32S3 module with ESP32S3", _mpy=int(os.environ["UNIT_MPY"]),
    version=(1, 25, 0)))
real_import = builtins.__import__
def fake_import(name, *a, **k):
    return {"sys": fake_sys, "vfs": fake_vfs}.get(name) or real_import(name, *a, **k)
args = sys.argv[sys.argv.index("resume") + 1:]
os.chdir(unit)
while args:
    cmd = args[:args.index("+")] if "+" in args else args
    args = args[len(cmd) + 1:]
    if cmd[0] == "exec":
        exec(cmd[1], {"__builtins__": dict(vars(builtins), __import__=fake_import)})
    elif cmd[0] == "romfs":
        if os.environ.get("UNIT_NO_ROMFS"):
            print("mpremote: ROMFS0 partition not found on device")
            sys.exit(1)
        with open(cmd[-1], "rb") as f:
            image = f.read()
        put(int(cmd[cmd.index("-p") + 1]), 0, image + b"\xff" * (seg_bytes - len(image)))
        print("Image size is %d bytes" % len(image))
        print("ROMFS image deployed")
    elif cmd[:2] == ["fs", "cp"]:
        shutil.copyfile(cmd[2], os.path.join(unit, cmd[3].lstrip(":")))
        print("cp %s %s" % (cmd[2], cmd[3]))
'''


def test_a_romfs_board_gets_the_image_in_rom_segment_0(tmp_path, boards, hub, build_dir,
                                                        monkeypatch):
    board = boards()  # only its port is used: the stand-in mpremote is the unit
    unit = tmp_path / "esp32s3-unit"
    unit.mkdir()
    (unit / "rom0.bin").write_bytes(b"\xff" * 256 * 1024)
    (unit / "rom1.bin").write_bytes(b"an old image in slot 1".ljust(256 * 1024, b"\x00"))
    (unit / "ota.json").write_text(json.dumps({"a": 1, "t": None, "n": 0}))
    standin = tmp_path / "mpremote_romfs.py"
    standin.write_text(ROMFS_STANDIN)
    log = tmp_path / "mpremote.log"
    firmware = build_firmware("esp32s3-evaluator", build_dir)
    env = {"PINGJIA_MPREMOTE": "%s %s" % (sys.executable, standin), "MPREMOTE_LOG": str(log),
           "UNIT_DIR": str(unit), "UNIT_MPY": str(firmware.mpy_version)}
    _, path = exported(hub, tmp_path, "D0020")
    args = ["--device-id", "D0020", "--board", "esp32s3-evaluator", "--provisioning", path,
            "--port", board.port, "--build-dir", build_dir, "--json"]
    proc = run_flash_sh(args, env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    image = firmware.image
    assert (summary["slots"], summary["image_sha256"]) == ("romfs", image.sha256)
    assert "sha256 all match" in proc.stderr and "app slot 0 written" in proc.stderr

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    for call in calls:
        assert call[:3] == ["connect", board.port, "resume"]
    [copy] = [c for c in calls if "romfs" in c]
    deploy = copy.index("romfs")
    assert copy[3] == "exec" and copy[deploy:deploy + 5] == ["romfs", "-p", "0", "deploy",
                                                             image.path]
    assert copy.index(":main.py") > deploy  # the slot first, then the boot selector
    assert calls[-1][3:] == ["reset"]  # an ESP32 restarts into bootsel.py
    with open(image.path, "rb") as f:
        assert (unit / "rom0.bin").read_bytes()[:image.size] == f.read()
    assert (unit / "rom1.bin").read_bytes()[:4096] == b"\xff" * 4096  # slot 1 erased
    with open(BOOTSEL, "rb") as f:
        assert (unit / "main.py").read_bytes() == f.read()
    assert not (unit / "ota.json").exists() and not (unit / "slot0.img").exists()
    manifest = json.loads((unit / "firmware.json").read_text())
    assert manifest["slots"] == "romfs" and set(manifest["files"]) == {"main.py", "board.json"}
    assert manifest["slot0"]["sha256"] == image.sha256

    # A reflash finds slot 0 already holding the image (hashed on the unit): not rewritten.
    log.unlink()
    proc = run_flash_sh(args, env)
    assert proc.returncode == 0, proc.stderr
    assert "already holds this image" in proc.stderr
    assert not [c for c in map(json.loads, log.read_text().splitlines()) if "romfs" in c]

    # A segment that does not read back as the image is a mismatch that names the slot.
    def corrupt(link):
        body = bytearray((unit / "rom0.bin").read_bytes())
        body[100] ^= 1
        (unit / "rom0.bin").write_bytes(bytes(body))

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(VerifyMismatch) as caught:
        flash(FlashRequest(device_id="D0020", board="esp32s3-evaluator", port=board.port,
                           provisioning=path, build_dir=build_dir),
              tools=Tools.from_env(), echo=lambda line: None, after_copy=corrupt)
    assert caught.value.files == ["slot 0 (ROMFS segment 0)"]

    # A MicroPython without ROMFS segments cannot hold app slots: a wrong base image.
    (unit / "rom0.bin").write_bytes(b"\xff" * 256 * 1024)
    proc = run_flash_sh(args, dict(env, UNIT_NO_ROMFS="1"))
    assert proc.returncode == WrongBoard.exit_code
    assert "no ROMFS segment for app slot 0" in proc.stderr


def test_device_image_makes_the_release_file_the_hub_takes(tmp_path, hub, build_dir):
    from click.testing import CliRunner

    from hub.cli import cli

    out = tmp_path / "pingjia-esp32s3.romfs"
    runner = CliRunner()
    shown = runner.invoke(cli, ["device", "image", "--board", "esp32s3-evaluator", "--out",
                                str(out), "--build-dir", build_dir, "--json"])
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.output)
    data = out.read_bytes()
    assert summary["sha256"] == hashlib.sha256(data).hexdigest() and summary["size"] == len(data)
    assert summary["board"] == "esp32s3-v1" == load_board("esp32s3-evaluator").name
    assert data == open(build_image("esp32s3-evaluator", build_dir).path, "rb").read()
    # The file is what `pingjia hub release add` stores as a release for that board.
    added = runner.invoke(cli, ["hub", "release", "add", str(out), "--version",
                                summary["version"], "--board", summary["board"],
                                "--config", hub.source])
    assert added.exit_code == 0, added.output
    assert summary["sha256"] in added.output
    bad = runner.invoke(cli, ["device", "image", "--board", "no-such-board", "--out", str(out)])
    assert bad.exit_code == 1 and "no such board file" in bad.output
