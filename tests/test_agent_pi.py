# A Raspberry Pi evaluator (agent/runtime.py with paho-mqtt) voting through the real hub --
# supervised mosquitto with per-device passwords and ACL, ingest, acks, signed batches --
# to the reference provincial receiver. Keys are gpiozero mock pins, the panel is
# luma.emulator's capture device (PNG frames; PINGJIA_WRITE_SCREENS=1 refreshes
# docs/agent/pi-*.png). Votes made while the hub is away survive an agent restart and
# arrive exactly once. `pingjia agent run` itself starts under a fake systemd and stops
# cleanly on SIGTERM.
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import pytest
from gpiozero.pins.mock import MockFactory
from luma.emulator.device import capture
from PIL import Image

from agent import board as boardlib
from agent.runtime import Evaluator
from agent.transport import MqttTransport, client_cert_files, tls_context
from conftest import ROOT, free_port
from firmware.evaluator import codec
from firmware.evaluator.config import Config
from firmware.evaluator.journal import Journal
from hub import keys, provision
from hub.app import Hub
from hub.settings import write_default
from simulator.province import ProvinceStore, ThreadedReceiver

BOARD_FILE = os.path.join(ROOT, "hardware", "boards", "rpi-evaluator.json")
DOCS_AGENT = os.path.join(ROOT, "docs", "agent")


class Hall:
    """A hub (in this process, with its supervised broker) and the reference province."""

    def __init__(self, folder, devices, broker=None, client_cert=False):
        self.folder = folder
        self.province_port = free_port()
        self.settings = write_default(
            os.path.join(folder, "hub.toml"),
            broker=dict(broker or {}, port=free_port()), http={"port": free_port()},
            province={"endpoint": "http://127.0.0.1:%d/api/v1" % self.province_port,
                      "batch_interval_ms": 100, "retry_max_s": 0.5, "timeout_s": 3.0})
        self.signing_key = keys.ensure_signing_key(self.settings.signing_key_path)
        if self.settings.broker.tls_port:
            keys.ensure_hall_tls(self.settings)
        self.provisioned = {d: provision.add_device(self.settings, d, window=w,
                                                    client_cert=client_cert)
                            for d, w in devices}
        self.hub = None
        self.province_store = ProvinceStore(os.path.join(folder, "province.db"))
        self.province = ThreadedReceiver(self.province_store, [self.signing_key.public_key()],
                                         port=self.province_port).start()

    def config(self, device_id):
        """The provisioning file the technician copies to the device (`--export`)."""
        return provision.export_provisioning(self.settings, device_id,
                                             provisioned=self.provisioned[device_id])

    def start_hub(self):
        self.hub = Hub(self.settings)
        self.hub.start()
        assert self.hub.ingest.wait_connected(20)

    def stop_hub(self):
        if self.hub is not None:
            self.hub.stop()
            self.hub = None

    def http(self, method, path, body=None):
        request = urllib.request.Request(
            "http://127.0.0.1:%d%s" % (self.settings.http.port, path), method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def sign_in(self, window, staff_no, name):
        status, body = self.http("POST", "/api/v1/windows/%s/staff" % window,
                                 {"staff_no": staff_no, "name": name})
        assert status == 200, body

    def prompt(self, window, case_no, task_name, kind="ji", expect=(201,)):
        """POST a prompt; 201 = on screen, 202 = sent but not confirmed, 503 = offline."""
        status, body = self.http("POST", "/api/v1/prompts", {
            "window": window, "case_no": case_no, "task_name": task_name, "kind": kind})
        assert status in expect, (status, body)
        return body.get("pid")

    def province_ids(self):
        conn = sqlite3.connect(os.path.join(self.folder, "province.db"))
        try:
            return sorted(r[0] for r in conn.execute("SELECT vote_id FROM records"))
        finally:
            conn.close()

    def province_record(self, vote_id):
        conn = sqlite3.connect(os.path.join(self.folder, "province.db"))
        try:
            row = conn.execute("SELECT fields FROM records WHERE vote_id = ?",
                               (vote_id,)).fetchone()
            return json.loads(row[0]) if row else None
        finally:
            conn.close()

    def hub_rows(self, sql, args=()):
        conn = sqlite3.connect(self.settings.db_path)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def online(self, device_id):
        rows = self.hub_rows("SELECT online FROM device_health WHERE device_id = ?", (device_id,))
        return bool(rows and rows[0][0])

    def close(self):
        self.stop_hub()
        self.province.stop()
        self.province_store.close()


def wait_for(check, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.05)


class PiEvaluator:
    """agent/runtime.py in a thread, as `pingjia agent run` runs it, on mock hardware."""

    def __init__(self, config, journal_dir, frames_dir, factory, tls=None):
        self.factory = factory
        spec = boardlib.load_spec(BOARD_FILE)
        self.frames = frames_dir
        os.makedirs(frames_dir, exist_ok=True)
        self.panel = capture(width=256, height=64, mode="RGB", transform="none", scale=1,
                             file_template=os.path.join(frames_dir, "f{0:05}.png"))
        self.board = boardlib.open_board(spec, pin_factory=factory, display=self.panel,
                                         reset_cause="power")
        self.pins = {k["stars"]: factory.pin(k["pin"]) for k in spec["keys"]}
        self.journal = Journal(journal_dir, segments=16, segment_bytes=4096)
        self.events = []
        self.transport = MqttTransport(Config(config), reconnect_max_s=1, tls=tls)
        self.ev = Evaluator(Config(config), self.board, self.journal, self.transport,
                            on_event=self.events.append)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.ev.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def state(self):
        return self.ev.rating.state

    def press(self, stars):
        self.pins[stars].drive_low()
        time.sleep(0.15)
        self.pins[stars].drive_high()
        time.sleep(0.4)  # past the rating's rapid-press guard

    def last_frame(self):
        names = sorted(n for n in os.listdir(self.frames) if n.endswith(".png"))
        return os.path.join(self.frames, names[-1])

    def close(self):
        self.stop.set()
        self.thread.join(10)
        self.board.close()


@pytest.fixture
def hall(tmp_path):
    h = Hall(str(tmp_path), [("PI0001", "W05")])
    yield h
    h.close()


def _keep_picture(path, name):
    if os.environ.get("PINGJIA_WRITE_SCREENS") == "1":
        os.makedirs(DOCS_AGENT, exist_ok=True)
        Image.open(path).convert("RGB").resize((256 * 3, 64 * 3), Image.NEAREST).save(
            os.path.join(DOCS_AGENT, name), optimize=True)


def test_a_pi_evaluator_votes_through_the_hub_to_the_province(hall, tmp_path):
    hall.start_hub()
    hall.sign_in("W05", "10234", "张伟")
    pi = PiEvaluator(hall.config("PI0001"), str(tmp_path / "journal"), str(tmp_path / "frames"),
                     MockFactory())
    try:
        wait_for(lambda: hall.online("PI0001"), what="the Pi's birth at the hub")
        wait_for(lambda: pi.state() == "IDLE", what="the signed-in staff on screen")
        time.sleep(0.3)  # the screen follows the state within a few scans
        idle = pi.last_frame()
        # A good rating.
        pid1 = hall.prompt("W05", "GD2026-0001", "不动产登记")
        wait_for(lambda: pi.state() == "PROMPT", what="the prompt on screen")
        time.sleep(0.3)
        prompt_frame = pi.last_frame()
        pi.press(5)
        wait_for(lambda: pi.state() == "THANKS", what="thanks")
        time.sleep(0.3)
        thanks_frame = pi.last_frame()
        # A bad rating with a reason from the hub's catalogue (选择 then 提交).
        wait_for(lambda: pi.state() == "IDLE", what="back to idle")
        pid2 = hall.prompt("W05", "GD2026-0002", "户籍迁移")
        wait_for(lambda: pi.state() == "PROMPT", what="the second prompt")
        pi.press(2)
        wait_for(lambda: pi.state() == "REASONS", what="the reasons screen")
        pi.press(4)  # 下
        pi.press(3)  # 选择
        time.sleep(0.2)
        reasons_frame = pi.last_frame()
        pi.press(1)  # 提交
        wait_for(lambda: hall.province_ids() == ["PI0001:1", "PI0001:2"], timeout=30,
                 what="both votes at the province")
        wait_for(lambda: pi.journal.depth == 0, what="the hub's ack trimming the journal")
        for pid, stars in ((pid1, 5), (pid2, 2)):
            status, answer = hall.http("GET", "/api/v1/prompts/%s" % pid)
            assert status == 200 and answer["status"] == "voted" and answer["stars"] == stars
        assert answer["reasons"] == ["I02"]
        good = hall.province_record("PI0001:1")
        bad = hall.province_record("PI0001:2")
        assert str(good["satisfaction"]) == "5" and good["proManagerNo"] == "10234"
        assert str(bad["satisfaction"]) == "2" and bad["evalDetail"]
        # The hub stored the device's own MAC: nobody re-signed on the way.
        (mac,), = hall.hub_rows("SELECT mac FROM votes WHERE device_id='PI0001' AND seq=1")
        saved = [json.loads(e["p"]) for e in pi.events if e["e"] == "saved"]
        assert mac == saved[0]["mac"]
        assert codec.verify_vote(bytes.fromhex(hall.provisioned["PI0001"].key_hex), saved[0])
        assert hall.hub_rows("SELECT count(*) FROM rejections")[0][0] == 0
        # The panel showed it all: the frames are real PNGs with something lit.
        for path in (idle, prompt_frame, reasons_frame, thanks_frame):
            image = Image.open(path)
            assert image.size == (256, 64) and image.convert("L").getbbox() is not None
        pictures = [Image.open(p).tobytes() for p in (idle, prompt_frame, reasons_frame,
                                                       thanks_frame)]
        assert len(set(pictures)) == 4  # four different screens
        for path, name in ((idle, "pi-idle.png"), (prompt_frame, "pi-prompt.png"),
                           (reasons_frame, "pi-reasons.png"), (thanks_frame, "pi-thanks.png")):
            _keep_picture(path, name)
    finally:
        pi.close()


def test_a_vote_made_while_the_hub_is_away_survives_an_agent_restart(hall, tmp_path):
    hall.start_hub()
    hall.sign_in("W05", "10234", "张伟")
    journal_dir = str(tmp_path / "journal")
    pi = PiEvaluator(hall.config("PI0001"), journal_dir, str(tmp_path / "f1"), MockFactory())
    try:
        wait_for(lambda: pi.state() == "IDLE", what="idle")
        # The retained ctx can reach the Pi before its birth reaches the hub's store.
        wait_for(lambda: hall.online("PI0001"), what="the Pi online at the hub")
        hall.prompt("W05", "C-1", "社保卡补办")
        wait_for(lambda: pi.state() == "PROMPT", what="the prompt")
        hall.stop_hub()  # the hub and its broker go away with the prompt on screen
        wait_for(lambda: not pi.transport.connected, what="the link down")
        pi.press(4)
        wait_for(lambda: pi.state() == "THANKS", what="thanks, offline")
        assert pi.journal.depth == 1
    finally:
        pi.close()  # the Pi loses power with the vote in its journal only
    hall.start_hub()
    again = PiEvaluator(hall.config("PI0001"), journal_dir, str(tmp_path / "f2"), MockFactory())
    try:
        # Broker restart, reconnect backoff and the journal's resend: seconds when quiet,
        # much longer beside a chaos run on a 2-core machine.
        wait_for(lambda: hall.province_ids() == ["PI0001:1"], timeout=120,
                 what="the offline vote at the province")
        wait_for(lambda: again.state() == "IDLE", what="idle after the restart")
        hall.prompt("W05", "C-2", "社保卡补办")
        wait_for(lambda: again.state() == "PROMPT", what="the next prompt")
        again.press(5)
        wait_for(lambda: hall.province_ids() == ["PI0001:1", "PI0001:2"], timeout=30,
                 what="the next vote at the province")
        wait_for(lambda: again.journal.depth == 0, what="journal trimmed")
        # Exactly once: two records, two hub rows, no conflicts.
        assert hall.hub_rows("SELECT count(*) FROM votes")[0][0] == 2
        rejected = dict(hall.hub_rows("SELECT reason, count FROM rejections"))
        assert "conflict" not in rejected and "bad_mac" not in rejected
    finally:
        again.close()


def test_a_pi_evaluator_reaches_a_tls_broker_with_the_hall_ca_and_its_client_certificate(
        tmp_path):
    hall = Hall(str(tmp_path), [("PI0002", "W06")],
                broker={"tls_port": free_port(), "require_client_cert": True}, client_cert=True)
    pi = None
    try:
        hall.start_hub()
        config = hall.config("PI0002")
        assert config["tls"] and config["hub_port"] == hall.settings.broker.tls_port
        cert, key = client_cert_files(Config(config), str(tmp_path))
        assert oct(os.stat(key).st_mode & 0o777) == "0o600"
        pi = PiEvaluator(config, str(tmp_path / "journal"), str(tmp_path / "frames"),
                         MockFactory(), tls=tls_context(config["ca"], cert, key))
        wait_for(lambda: hall.online("PI0002"), what="the birth over TLS")
        hall.prompt("W06", "T-1", "出入境证件")
        wait_for(lambda: pi.state() == "PROMPT", what="the prompt over TLS")
        pi.press(5)
        wait_for(lambda: hall.province_ids() == ["PI0002:1"], timeout=90,
                 what="the vote over TLS")
    finally:
        if pi is not None:
            pi.close()
        hall.close()


def test_pingjia_agent_run_starts_under_systemd_and_stops_on_sigterm(hall, tmp_path):
    hall.start_hub()
    config_path = tmp_path / "agent.json"
    config_path.write_text(json.dumps(hall.config("PI0001")))
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(30)
    env = dict(os.environ, GPIOZERO_PIN_FACTORY="mock", NOTIFY_SOCKET=notify_path,
               WATCHDOG_USEC="2000000", STATE_DIRECTORY=str(tmp_path / "state"),
               PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from hub.cli import main; main()", "agent", "run",
         "--config", str(config_path), "--board", BOARD_FILE, "--json"],
        cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        messages = []
        while not any(m.startswith(b"READY=1") for m in messages):
            messages.append(notify.recv(4096))
        wait_for(lambda: hall.online("PI0001"), what="the agent's birth")
        # The SPI panel does not exist here: the agent runs on and says so in its health.
        while b"WATCHDOG=1" not in messages:
            messages.append(notify.recv(4096))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        notify.close()
    assert proc.returncode == 0, err.decode()
    stats = json.loads(out)
    assert stats["device"] == "PI0001" and stats["sessions"] >= 1
    assert os.path.isdir(tmp_path / "state" / "journal")
    (birth,), = hall.hub_rows("SELECT birth FROM device_health WHERE device_id='PI0001'")
    assert json.loads(birth)["disp"] == 1  # no SPI panel here: the health says so


def test_a_second_agent_on_the_same_journal_is_refused(tmp_path):
    from agent.cli import _lock
    from hub import PingjiaError

    held = _lock(str(tmp_path))
    try:
        with pytest.raises(PingjiaError, match="another agent"):
            _lock(str(tmp_path))
    finally:
        os.close(held)


def test_a_bad_config_is_one_line_not_a_traceback(tmp_path):
    bad = tmp_path / "agent.json"
    bad.write_text('{"device_id": "PI0001"}')
    proc = subprocess.run(
        [sys.executable, "-c", "from hub.cli import main; main()", "agent", "run",
         "--config", str(bad), "--board", BOARD_FILE], cwd=ROOT, capture_output=True,
        text=True, timeout=60, env=dict(os.environ, GPIOZERO_PIN_FACTORY="mock"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: %s: key: missing" % bad]
