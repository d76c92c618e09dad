# End to end: `pingjia hub run` as a real process with its supervised mosquitto (per-device
# passwords and ACL), simulated devices that journal and resend until acked, and the
# reference provincial receiver. The hub is SIGKILLed mid-stream and the province goes
# away; every vote must still reach the province exactly once.
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

import paho.mqtt.client as mqtt
import pytest

from firmware.evaluator import codec
from firmware.evaluator.rating import Rating
from hub import broker as brokerlib
from hub import keys, provision
from hub.settings import write_default
from simulator.province import ProvinceStore, ThreadedReceiver, verify_store

PINGJIA = os.path.join(os.path.dirname(sys.executable), "pingjia")
RESEND_S = 1.0   # the firmware waits 10 s without ack progress; tests need not


def free_port():
    # Local, not from conftest: with tests/core/ collected too, "conftest" is ambiguous.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



class SimDevice:
    """A device as the hub sees it: persistent MQTT session, a journal of unacked votes,
    birth with lo/next on every connect, resend from the oldest unacked record when the
    ack does not move."""

    def __init__(self, provisioned, port):
        self.id = provisioned.device_id
        self.key = bytes.fromhex(provisioned.key_hex)
        self.journal = {}
        self.next_seq = 1
        self.acked = 0
        self.downlinks = []
        self.lock = threading.Lock()
        self.progress_at = time.monotonic()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.id,
                             clean_session=False)
        client.username_pw_set(self.id, provisioned.mqtt_password)
        client.will_set("pj/%s/up/will" % self.id,
                        json.dumps({"v": 1, "d": self.id, "online": False}), qos=1)
        client.reconnect_delay_set(0.2, 1)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        self.client = client
        client.connect_async("127.0.0.1", port, keepalive=10)
        client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        client.subscribe("pj/%s/dn/#" % self.id, qos=1)
        with self.lock:
            lo = min(self.journal) if self.journal else self.next_seq
            birth = {"v": 1, "d": self.id, "fw": "test", "board": "sim", "up": 1,
                     "rst": "power", "heap": 1, "jd": len(self.journal), "old": 0, "rc": 0,
                     "rssi": -40, "stuck": [], "disp": 0, "mis": 0, "clk": 0,
                     "lo": lo, "next": self.next_seq}
        client.publish("pj/%s/up/birth" % self.id, json.dumps(birth), qos=1)

    def _on_message(self, client, userdata, message):
        kind = message.topic.rsplit("/", 1)[1]
        if kind != "ack":
            body = json.loads(message.payload)
            with self.lock:
                self.downlinks.append((kind, body))
            if kind == "prompt":
                # As the firmware does: tell the hub the prompt is on screen.
                client.publish("pj/%s/up/evt" % self.id,
                               json.dumps({"pid": body.get("pid"), "st": "shown"}), qos=1)
            return
        seq = codec.decode_ack(message.payload)
        with self.lock:
            for s in [s for s in self.journal if s <= seq]:
                del self.journal[s]
            if seq > self.acked:
                self.acked = seq
                self.progress_at = time.monotonic()

    def vote(self, stars=5, pid=None, key=None):
        """Journal and publish the next vote; with `key`, a forgery of the next sequence
        number (published, never journaled, the device's own vote keeps that number)."""
        with self.lock:
            seq = self.next_seq
            if key is None:
                self.next_seq += 1
            vote = codec.make_vote(key or self.key, self.id, seq, int(time.time()), "v",
                                   pid or "P-%s-%d" % (self.id, seq), "C-%d" % seq, stars,
                                   ["S01"] if stars <= 2 else [], "nat-2024.1", "W01", "10234")
            payload = codec.encode_vote(vote)
            if key is None:
                self.journal[seq] = payload
        self.client.publish("pj/%s/up/vote" % self.id, payload, qos=1)
        return seq

    def resend_if_stuck(self):
        with self.lock:
            if not self.journal or time.monotonic() - self.progress_at < RESEND_S:
                return
            self.progress_at = time.monotonic()
            pending = [self.journal[s] for s in sorted(self.journal)]
        for payload in pending:
            self.client.publish("pj/%s/up/vote" % self.id, payload, qos=1)

    def latest(self, kind):
        with self.lock:
            found = [body for k, body in self.downlinks if k == kind]
        return found[-1] if found else None

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


class Hall:
    """A hub folder, the hub process, devices and the reference province."""

    def __init__(self, folder, n_devices=3):
        self.folder = folder
        self.province_port = free_port()
        self.settings = write_default(
            os.path.join(folder, "hub.toml"),
            broker={"port": free_port()}, http={"port": free_port()},
            province={"endpoint": "http://127.0.0.1:%d/api/v1" % self.province_port,
                      "batch_interval_ms": 100, "batch_max": 50, "retry_max_s": 0.5,
                      "timeout_s": 3.0})
        self.signing_key = keys.ensure_signing_key(self.settings.signing_key_path)
        self.provisioned = [provision.add_device(self.settings, "D%04d" % (i + 1),
                                                 window="W%02d" % (i + 1))
                            for i in range(n_devices)]
        self.proc = None
        self.log = open(os.path.join(folder, "hub.log"), "ab")
        self.province = None
        self.province_store = None
        self.devices = []
        self._ticking = threading.Event()
        self._ticker = None

    # -- the province --------------------------------------------------------------------
    def start_province(self, fault=None):
        self.province_store = ProvinceStore(os.path.join(self.folder, "province.db"))
        self.province = ThreadedReceiver(self.province_store, [self.signing_key.public_key()],
                                         port=self.province_port, faults=True).start()
        if fault:
            self.province_fault(**fault)

    def stop_province(self):
        if self.province is not None:
            self.province.stop()
            self.province_store.close()
            self.province = None

    def province_fault(self, **spec):
        request = urllib.request.Request("http://127.0.0.1:%d/_control/faults" % self.province_port,
                                         data=json.dumps(spec).encode(), method="POST")
        urllib.request.urlopen(request, timeout=5).read()

    def province_ids(self):
        conn = sqlite3.connect(os.path.join(self.folder, "province.db"))
        try:
            return [r[0] for r in conn.execute("SELECT vote_id FROM records")]
        finally:
            conn.close()

    def province_stats(self):
        return self.province_store and json.loads(urllib.request.urlopen(
            "http://127.0.0.1:%d/api/v1/stats" % self.province_port, timeout=5).read())

    # -- the hub process -----------------------------------------------------------------
    def start_hub(self):
        self.proc = subprocess.Popen([PINGJIA, "hub", "run", "--config", self.settings.source],
                                     stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "hub exited with %s" % self.proc.returncode
            try:
                if self.http("GET", "/healthz")[1].get("ok"):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise AssertionError("hub did not become healthy")

    def kill_hub(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop_hub(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(30)
        return None

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

    def status(self):
        out = subprocess.run([PINGJIA, "hub", "status", "--json", "--config",
                              self.settings.source], capture_output=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def stored(self):
        conn = sqlite3.connect(self.settings.db_path)
        try:
            return conn.execute("SELECT count(*) FROM votes").fetchone()[0]
        finally:
            conn.close()

    # -- devices -------------------------------------------------------------------------
    def start_devices(self):
        self.devices = [SimDevice(p, self.settings.broker.port) for p in self.provisioned]
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def _tick(self):
        while not self._ticking.wait(0.2):
            for device in self.devices:
                device.resend_if_stuck()

    def all_acked(self):
        return all(not d.journal for d in self.devices)

    def wait(self, what, timeout=60):
        deadline = time.monotonic() + timeout
        while not what():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting; hub log:\n" + self.log_tail())
            time.sleep(0.1)

    def log_tail(self):
        self.log.flush()
        with open(os.path.join(self.folder, "hub.log"), "rb") as f:
            return f.read()[-3000:].decode("utf-8", "replace")

    def close(self):
        self._ticking.set()
        for device in self.devices:
            device.close()
        try:
            self.stop_hub()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        # A hub killed last leaves its broker (own session) running: end it by its pid.
        pid = brokerlib.running_pid(self.settings)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
        self.stop_province()
        self.log.close()


@pytest.fixture
def hall(tmp_path):
    h = Hall(str(tmp_path))
    yield h
    h.close()


def _expected(hall, per_device):
    return sorted("%s:%d" % (p.device_id, s) for p in hall.provisioned
                  for s in range(1, per_device + 1))


def test_sigkill_mid_stream_loses_and_doubles_nothing(hall):
    per_device = 120
    hall.start_province()
    hall.start_hub()
    hall.start_devices()
    # Rounds of votes after which the hub is killed, and restarted five rounds later; the
    # votes in between go to the orphaned broker. At the last kill the broker dies with the
    # hub (a power cut of the hub machine): what it held in memory is gone, and only the
    # devices' resend-until-acked brings those votes back.
    kills = {30: 35, 60: 65, 90: 95}
    power_cut = 90
    stored_at_kill = []
    for i in range(per_device):
        if i in kills:
            broker_pid = brokerlib.running_pid(hall.settings)
            hall.kill_hub()             # no goodbye: mid-transaction, mid-batch, mid-send
            if i == power_cut:
                os.kill(broker_pid, signal.SIGKILL)
            stored_at_kill.append(hall.stored())
        if i in kills.values():
            hall.start_hub()
        for device in hall.devices:
            device.vote(stars=1 + (i % 5))
        time.sleep(0.005)
    assert all(0 < n < 3 * per_device for n in stored_at_kill)
    hall.wait(hall.all_acked, 90)
    hall.wait(lambda: len(hall.province_ids()) >= 3 * per_device, 60)
    hall.wait(lambda: hall.status()["backlog"]["unaccepted_batches"] == 0, 30)
    ids = hall.province_ids()
    assert sorted(ids) == _expected(hall, per_device)          # every vote, exactly once
    stats = hall.province_stats()
    assert stats["duplicates"] == 0 and stats["chain_errors"] == 0
    report = verify_store(hall.province_store)
    assert report["ok"], report["problems"]
    status = hall.status()
    assert status["votes"] == {"stored": 3 * per_device, "forwarded": 3 * per_device}
    assert status["backlog"] == {"unacked": 0, "unforwarded": 0, "unbatched": 0,
                                 "unaccepted_batches": 0}
    assert status["rejections"] == {}
    assert status["gap_events"] == 0
    assert hall.stop_hub() == 0                                  # SIGTERM: a clean exit
    assert brokerlib.running_pid(hall.settings) is None          # and the broker went with it


def test_province_outage_backlog_grows_then_drains_by_itself(hall):
    hall.start_province(fault={"mode": "error", "status": 503})
    hall.start_hub()
    hall.start_devices()
    for i in range(20):
        for device in hall.devices:
            device.vote(stars=5 - i % 3)
    hall.wait(hall.all_acked, 30)       # the hub acks on commit, province or not
    # A forged vote (not the device's key) is counted and never goes anywhere.
    hall.devices[1].vote(key=bytes(32))
    hall.wait(lambda: hall.status()["rejections"].get("bad_mac") == 1, 30)
    status = hall.status()
    assert status["backlog"]["unforwarded"] == 60
    assert status["backlog"]["unaccepted_batches"] == 1
    assert "503" in (status["province"]["last_error"] or "")
    hall.stop_province()                # from errors to nothing listening at all
    for device in hall.devices:
        device.vote()
    hall.wait(lambda: hall.status()["province"]["pending_attempts"] >= 3
              and "unreachable" in (hall.status()["province"]["last_error"] or ""), 30)
    assert hall.status()["backlog"]["unforwarded"] == 63
    hall.start_province()               # the path returns
    hall.wait(lambda: hall.status()["backlog"]["unforwarded"] == 0, 60)
    ids = hall.province_ids()
    assert sorted(ids) == _expected(hall, 21)
    assert hall.province_stats()["duplicates"] == 0
    assert verify_store(hall.province_store)["ok"]
    status = hall.status()
    assert status["province"]["last_success"] and status["province"]["chain_error"] is None
    assert status["rejections"] == {"bad_mac": 1}


def test_sign_in_prompt_vote_and_outcome_round_trip(hall):
    hall.start_province()
    hall.start_hub()
    hall.start_devices()
    device = hall.devices[0]
    hall.wait(lambda: device.latest("cat") is not None and device.latest("time") is not None)
    # The device's own checks take every downlink the hub sent.
    cat = device.latest("cat")
    assert Rating().set_catalogue(cat)
    assert {"S01", "I01"} <= {r["c"] for r in cat["rs"]}
    assert all(r["bm"] for r in cat["rs"])
    status, answer = hall.http("POST", "/api/v1/windows/W01/staff",
                               {"staff_no": "10234", "name": "张三"})
    assert status == 200 and answer["devices"] == ["D0001"]
    hall.wait(lambda: (device.latest("ctx") or {}).get("sn") == "10234")
    ctx = device.latest("ctx")
    assert Rating().set_context(ctx)
    assert ctx["w"] == "W01" and ctx["name"]["h"] == 16
    status, answer = hall.http("POST", "/api/v1/prompts", {
        "window": "W01", "case_no": "GD2026-0001", "task_code": "T-11",
        "task_name": "营业执照变更登记",
        "dept_code": "11440100MB2C93384X", "kind": "ji", "n": 1})
    assert status == 201
    pid = answer["pid"]
    hall.wait(lambda: device.latest("prompt") is not None)
    prompt = device.latest("prompt")
    assert Rating().offer(prompt, 0) == "shown"
    assert prompt["pid"] == pid and prompt["case"] == "GD2026-0001" and prompt["item"]
    assert hall.http("GET", "/api/v1/prompts/" + pid)[1]["status"] == "pending"
    device.vote(stars=2, pid=pid)
    hall.wait(lambda: hall.http("GET", "/api/v1/prompts/" + pid)[1].get("forwarded"), 30)
    outcome = hall.http("GET", "/api/v1/prompts/" + pid)[1]
    assert outcome["status"] == "voted" and outcome["stars"] == 2 and outcome["reasons"] == ["S01"]
    record = json.loads(urllib.request.urlopen(
        "http://127.0.0.1:%d/api/v1/records" % hall.province_port).read())["records"][0]
    assert record["taskName"] == "营业执照变更登记" and record["proManager"] == "张三"
    assert record["proManagerNo"] == "10234" and record["satisfaction"] == "2"
    assert record["deptCode"] == "11440100MB2C93384X" and record["evalDetail"] == "S01"
    # Bad requests are refused with a reason, unknown things are 404.
    assert hall.http("POST", "/api/v1/prompts", {"window": "W01", "kind": "zz"})[0] == 400
    assert hall.http("POST", "/api/v1/prompts", {"window": "W99"})[0] == 404
    assert hall.http("GET", "/api/v1/prompts/P999")[0] == 404
    assert hall.http("POST", "/api/v1/windows/W01/staff",
                     {"staff_no": "1|2", "name": "x"})[0] == 400
    # Signing out clears the name on the device.
    assert hall.http("DELETE", "/api/v1/windows/W01/staff")[0] == 200
    hall.wait(lambda: device.latest("ctx")["sn"] == "")
    assert device.latest("ctx")["name"] is None
    status = hall.http("GET", "/api/v1/status")[1]
    assert status["hub"] == "hall-1" and status["devices"]["online"] == 3
