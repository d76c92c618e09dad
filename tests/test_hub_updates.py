# Over-the-air updates, the hub's side, end to end: `pingjia hub run` as a real process with
# its supervised mosquitto (per-device logins and ACL), and paho clients that speak the
# device's side of the contract (docs/protocol.md, "Updates over the air"): they take the
# retained offer, ask for chunks one at a time, check the sha256, report installed, come
# back on the new version and report ok (or bad / rolledback when told to fail).
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from hub import broker as brokerlib
from hub import keys, provision, updates
from hub.settings import write_default
from hub.store import Store

pytestmark = pytest.mark.xdist_group("hub_updates")

PINGJIA = os.path.join(os.path.dirname(sys.executable), "pingjia")
BOARD = "sim-v1"
OLD, NEW = "0.1.0", "0.2.0"
ASK_AGAIN_S = 1.0   # the firmware waits 5 s for a chunk; tests need not


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_bytes(seed, size):
    return random.Random(seed).randbytes(size)


def wait_for(what, timeout=30, message="condition", log=None):
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s%s" % (
                message, "\nhub log:\n" + log() if log else ""))
        time.sleep(0.05)


class OtaDevice:
    """A device's update behaviour over a real MQTT session.

    hold_at: stop asking for chunks at this offset until release();
    hold_install: downloaded, but wait for release() before installing;
    fail: ("bad", "hash") reported instead of installing; rollback: after `installed`,
    come back on the old version and report `rolledback`."""

    def __init__(self, provisioned, port, fw=OLD, board=BOARD):
        self.id = provisioned.device_id
        self.fw = fw
        self.board = board
        self.offers = []          # every dn/ota payload: a dict, or None for a withdrawal
        self.chunk_offsets = []   # every dn/fw chunk's offset, in arrival order
        self.reports = []         # every up/ota report sent
        self.image = bytearray()
        self.offer = None
        self.want = None
        self.asked_at = 0.0
        self.hold_at = None
        self.hold_install = False
        self.fail = None
        self.rollback = False
        self.installed_images = {}
        self.lock = threading.RLock()
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

    # -- MQTT -------------------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        client.subscribe("pj/%s/dn/#" % self.id, qos=1)
        self.birth()

    def birth(self):
        body = {"v": 1, "d": self.id, "fw": self.fw, "board": self.board, "up": 1,
                "rst": "power", "heap": 30000, "jd": 0, "old": 0, "rc": 0, "rssi": -40,
                "stuck": [], "disp": 0, "mis": 0, "clk": 0, "lo": 1, "next": 1}
        self.client.publish("pj/%s/up/birth" % self.id, json.dumps(body), qos=1)

    def report(self, st, **fields):
        body = dict(fields, st=st)
        with self.lock:
            self.reports.append(body)
        self.client.publish("pj/%s/up/ota" % self.id, json.dumps(body), qos=1)

    def _on_message(self, client, userdata, message):
        kind = message.topic.rsplit("/", 1)[1]
        if kind == "ota":
            self._offered(json.loads(message.payload) if message.payload else None)
        elif kind == "fw":
            self._chunk(bytes(message.payload))

    # -- the updater ------------------------------------------------------------------------
    def _offered(self, offer):
        with self.lock:
            self.offers.append(offer)
            if offer is None:
                self.offer, self.want = None, None   # withdrawn: stop asking
                return
            if self.offer is None or offer["sha"] != self.offer["sha"]:
                self.image = bytearray()
            self.offer = offer
            if offer["ver"] == self.fw:
                self.report("ok", ver=offer["ver"])
                return
            self._next()

    def _chunk(self, payload):
        off = struct.unpack(">I", payload[:4])[0]
        with self.lock:
            self.chunk_offsets.append(off)
            if self.want is None or off != self.want:
                return   # not the chunk asked for: ignored, as the contract says
            self.image[off:] = payload[4:]
            self.want = None
            self._next()

    def _next(self):
        if self.offer is None:
            return
        if len(self.image) < self.offer["size"]:
            if self.hold_at is not None and len(self.image) >= self.hold_at:
                return
            self._ask(len(self.image))
        elif not self.hold_install:
            self._install()

    def _ask(self, off):
        self.want = off
        self.asked_at = time.monotonic()
        self.report("get", ver=self.offer["ver"], off=off)

    def _install(self):
        ver = self.offer["ver"]
        if self.fail:
            self.report(self.fail[0], ver=ver, why=self.fail[1])
            self.offer = None
            return
        if hashlib.sha256(self.image).hexdigest() != self.offer["sha"]:
            self.report("bad", ver=ver, why="hash")
            self.offer = None
            return
        self.installed_images[ver] = bytes(self.image)
        self.report("installed", ver=ver)
        self.offer = None
        # The reboot into the trial slot: a new birth, then the outcome.
        if self.rollback:
            self.birth()
            self.report("rolledback", ver=ver)
        else:
            self.fw = ver
            self.birth()
            self.report("ok", ver=ver)

    def poll(self):
        with self.lock:
            if self.want is not None and time.monotonic() - self.asked_at > ASK_AGAIN_S:
                self._ask(self.want)

    def release(self):
        with self.lock:
            self.hold_at = None
            self.hold_install = False
            if self.want is None:
                self._next()

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


class Hall:
    """A hub folder, `pingjia hub run`, and update-speaking devices."""

    def __init__(self, folder, n_devices):
        self.folder = folder
        self.settings = write_default(os.path.join(folder, "hub.toml"),
                                      broker={"port": free_port()}, http={"port": free_port()},
                                      province={"endpoint": "http://127.0.0.1:9/api/v1"})
        keys.ensure_signing_key(self.settings.signing_key_path)
        self.provisioned = [provision.add_device(self.settings, "D%04d" % (i + 1),
                                                 window="W%02d" % (i + 1))
                            for i in range(n_devices)]
        self.proc = None
        self.log = open(os.path.join(folder, "hub.log"), "ab")
        self.devices = {}
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def start_hub(self):
        self.proc = subprocess.Popen([PINGJIA, "hub", "run", "--config", self.settings.source],
                                     stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "hub exited with %s" % self.proc.returncode
            try:
                with socket.create_connection(("127.0.0.1", self.settings.http.port), 0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("hub did not start")

    def kill_hub(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def start_devices(self, fw=None):
        fw = fw or {}
        for p in self.provisioned:
            self.devices[p.device_id] = OtaDevice(p, self.settings.broker.port,
                                                  fw=fw.get(p.device_id, OLD))
        self.wait(lambda: len(self.online()) == len(self.devices), "every device online")

    def _tick(self):
        while not self._stop.wait(0.2):
            for device in list(self.devices.values()):
                device.poll()

    # -- reading the store and running the CLI ----------------------------------------------
    def query(self, sql, params=()):
        conn = sqlite3.connect(self.settings.db_path, timeout=30)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def online(self):
        return [r[0] for r in self.query("SELECT device_id FROM device_health WHERE online")]

    def states(self, rid):
        return dict(self.query("SELECT device_id, state FROM rollout_devices WHERE rid = ?",
                               (rid,)))

    def rollout_state(self, rid):
        return self.query("SELECT state, stage FROM rollouts WHERE rid = ?", (rid,))[0]

    def cli(self, *args, ok=True):
        out = subprocess.run([PINGJIA, "hub"] + list(args) + ["--config", self.settings.source],
                             capture_output=True, timeout=60, text=True)
        if ok:
            assert out.returncode == 0, out.stderr
        return out

    def store(self):
        return Store(self.settings.db_path)

    def add_release(self, image, version=NEW):
        store = self.store()
        try:
            return updates.add_release(store, image, version, BOARD)
        finally:
            store.close()

    def start_rollout(self, version=NEW, **options):
        store = self.store()
        try:
            return updates.start_rollout(store, version, **options)["rid"]
        finally:
            store.close()

    def rejections(self):
        return dict(self.query("SELECT reason, count FROM rejections"))

    def wait(self, what, message="condition", timeout=30):
        wait_for(what, timeout, message, self.log_tail)

    def log_tail(self):
        self.log.flush()
        with open(os.path.join(self.folder, "hub.log"), "rb") as f:
            return f.read()[-4000:].decode("utf-8", "replace")

    def close(self):
        self._stop.set()
        for device in self.devices.values():
            device.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # A hub killed hard leaves its broker (own session) running: end it by its pid.
        pid = brokerlib.running_pid(self.settings)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
        self.log.close()


@pytest.fixture
def make_hall(tmp_path):
    halls = []

    def make(n_devices):
        hall = Hall(str(tmp_path), n_devices)
        halls.append(hall)
        return hall

    yield make
    for hall in halls:
        hall.close()


def offered(device):
    return [o for o in device.offers if o is not None]


# -- releases ------------------------------------------------------------------------------------

def test_release_add_and_list_keep_the_image_with_its_sha256_and_size(make_hall, tmp_path):
    hall = make_hall(0)
    image = image_bytes(1, 3000)
    path = tmp_path / "app.romfs"
    path.write_bytes(image)
    out = hall.cli("release", "add", str(path), "--version", NEW, "--board", BOARD,
                   "--notes", "fixes the reasons screen", "--json")
    made = json.loads(out.stdout)
    assert (made["version"], made["board"], made["size"], made["sha256"]) == \
        (NEW, BOARD, 3000, hashlib.sha256(image).hexdigest())
    # The same image again is a no-op; another image under the same name is refused.
    hall.cli("release", "add", str(path), "--version", NEW, "--board", BOARD)
    other = tmp_path / "other.romfs"
    other.write_bytes(image_bytes(2, 3000))
    refused = hall.cli("release", "add", str(other), "--version", NEW, "--board", BOARD,
                       ok=False)
    assert refused.returncode == 1
    assert "already exists with another image" in refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    listing = json.loads(hall.cli("release", "list", "--json").stdout)["releases"]
    assert [(r["version"], r["board"], r["sha256"], r["size"], r["notes"]) for r in listing] == \
        [(NEW, BOARD, hashlib.sha256(image).hexdigest(), 3000, "fixes the reasons screen")]
    text = hall.cli("release", "list").stdout
    assert NEW in text and hashlib.sha256(image).hexdigest() in text
    # The image itself is in the store, byte for byte.
    assert hall.query("SELECT image FROM releases")[0][0] == image
    # Starting a rollout of a version that has no release is a clear error.
    missing = hall.cli("updates", "start", "9.9.9", ok=False)
    assert missing.returncode == 1 and "no release 9.9.9" in missing.stderr


# -- staged rollouts -------------------------------------------------------------------------------

def test_canary_first_then_the_rest_in_batches_skipping_devices_on_the_version(make_hall):
    hall = make_hall(6)
    image = image_bytes(3, 5 * 1024 + 300)   # five whole chunks and a short one
    hall.add_release(image)
    hall.start_hub()
    hall.start_devices(fw={"D0006": NEW})
    for device in hall.devices.values():
        device.hold_install = True   # each waits, downloaded, until the test lets it go
    rid = hall.start_rollout(canary=1, batch=2)

    # Canary stage: one device (the first online one) and nobody else.
    hall.wait(lambda: hall.states(rid).get("D0001") == "downloading", "the canary downloading")
    canary = hall.devices["D0001"]
    hall.wait(lambda: len(canary.image) == len(image), "the canary's download")
    assert bytes(canary.image) == image
    hall.wait(lambda: hall.states(rid).get("D0006") == "skipped", "D0006 skipped")
    time.sleep(1.5)   # three engine ticks: nobody else may be offered while the canary runs
    assert [d for d, dev in hall.devices.items() if offered(dev)] == ["D0001"]
    assert hall.rollout_state(rid) == ("running", "canary")
    shown = json.loads(hall.cli("updates", "show", rid, "--json").stdout)
    by_id = {d["device_id"]: d for d in shown["device_list"]}
    assert by_id["D0001"]["canary"] and by_id["D0001"]["state"] == "downloading"
    assert by_id["D0001"]["off"] == 5 * 1024 and by_id["D0006"]["state"] == "skipped"
    assert {by_id[d]["state"] for d in ("D0002", "D0003", "D0004", "D0005")} == {"pending"}

    canary.release()
    hall.wait(lambda: hall.states(rid)["D0001"] == "done", "the canary done")
    # The rest, at most two in flight at a time.
    hall.wait(lambda: sum(1 for dev in hall.devices.values() if offered(dev)) == 3,
              "the first batch offered")
    time.sleep(1.5)
    first_batch = sorted(d for d, dev in hall.devices.items() if offered(dev) and d != "D0001")
    assert first_batch == ["D0002", "D0003"]
    assert hall.rollout_state(rid) == ("running", "rest")
    for device_id in first_batch:
        hall.wait(lambda: len(hall.devices[device_id].image) == len(image), "batch download")
        hall.devices[device_id].release()
    hall.wait(lambda: all(hall.states(rid)[d] == "done" for d in first_batch), "first batch")
    for device_id in ("D0004", "D0005"):
        hall.wait(lambda: offered(hall.devices[device_id]), "the second batch offered")
        hall.devices[device_id].release()
    hall.wait(lambda: hall.rollout_state(rid)[0] == "done", "the rollout done")

    assert hall.states(rid) == {"D0001": "done", "D0002": "done", "D0003": "done",
                                "D0004": "done", "D0005": "done", "D0006": "skipped"}
    for device_id in ("D0001", "D0002", "D0003", "D0004", "D0005"):
        device = hall.devices[device_id]
        assert device.installed_images[NEW] == image and device.fw == NEW
        # Done: the retained offer is withdrawn (an empty retained message).
        hall.wait(lambda: device.offers[-1] is None, "offer withdrawn for %s" % device_id)
        assert offered(device)[0] == {"ver": NEW, "size": len(image),
                                      "sha": hashlib.sha256(image).hexdigest(), "rid": rid}
    assert not offered(hall.devices["D0006"])
    # Chunks went to the device that asked, at the offsets it asked for (an ask repeated
    # on a slow machine is answered twice).
    assert set(hall.devices["D0002"].chunk_offsets) == {0, 1024, 2048, 3072, 4096, 5120}
    listing = json.loads(hall.cli("updates", "--json").stdout)["rollouts"]
    assert listing[0]["rid"] == rid and listing[0]["state"] == "done"
    assert listing[0]["counts"]["done"] == 5 and listing[0]["counts"]["skipped"] == 1
    text = hall.cli("updates").stdout
    assert rid in text and "done 5, skipped 1" in text


def test_failing_canaries_halt_the_rollout_and_pending_devices_are_never_offered(make_hall):
    hall = make_hall(4)
    image = image_bytes(4, 2500)
    hall.add_release(image)
    hall.start_hub()
    hall.start_devices()
    hall.devices["D0001"].fail = ("bad", "hash")
    second = hall.devices["D0002"]
    second.hold_install = True
    second.rollback = True
    rid = hall.start_rollout(canary=2, batch=5, max_failures=1)

    hall.wait(lambda: hall.states(rid).get("D0001") == "failed", "the first canary failed")
    hall.wait(lambda: len(second.image) == len(image), "the second canary's download")
    # One failure is allowed: still running, still at the canaries.
    assert hall.rollout_state(rid) == ("running", "canary")
    second.release()   # installs, comes back on the old slot and reports rolledback
    hall.wait(lambda: hall.rollout_state(rid)[0] == "halted", "the rollout halted")
    assert hall.states(rid) == {"D0001": "failed", "D0002": "failed", "D0003": "pending",
                                "D0004": "pending"}
    shown = json.loads(hall.cli("updates", "show", rid, "--json").stdout)
    why = {d["device_id"]: d["why"] for d in shown["device_list"]}
    assert why["D0001"] == "hash" and why["D0002"] == "rolled back"
    assert "2 failed" in shown["why"]
    time.sleep(1.5)
    for device_id in ("D0003", "D0004"):
        assert hall.devices[device_id].offers == []
        assert hall.devices[device_id].chunk_offsets == []
    for device_id in ("D0001", "D0002"):
        hall.wait(lambda: hall.devices[device_id].offers[-1] is None, "offer withdrawn")
    text = hall.cli("updates", "show", rid).stdout
    assert "halted" in text and "rolled back" in text and "hash" in text
    # A halted rollout is not resumed; a new one must be started.
    refused = hall.cli("updates", "resume", rid, ok=False)
    assert refused.returncode == 1 and "halted" in refused.stderr


def test_a_rollout_carries_on_after_the_hub_is_killed(make_hall):
    hall = make_hall(3)
    image = image_bytes(5, 6 * 1024)
    hall.add_release(image)
    hall.start_hub()
    hall.start_devices()
    for device in hall.devices.values():
        device.hold_at = 3 * 1024
    rid = hall.start_rollout(canary=1, batch=5)
    canary = hall.devices["D0001"]
    hall.wait(lambda: len(canary.image) == 3 * 1024, "half the canary's download")

    hall.kill_hub()   # SIGKILL mid-download
    canary.release()
    hall.start_hub()
    hall.wait(lambda: hall.states(rid)["D0001"] == "done", "the canary done after the restart")
    assert canary.installed_images[NEW] == image
    for device_id in ("D0002", "D0003"):
        device = hall.devices[device_id]
        hall.wait(lambda: len(device.image) == 3 * 1024, "half of %s" % device_id)
    hall.kill_hub()   # again, with two devices half-way
    hall.start_hub()
    for device_id in ("D0002", "D0003"):
        hall.devices[device_id].release()
    hall.wait(lambda: hall.rollout_state(rid)[0] == "done", "the rollout done")
    assert set(hall.states(rid).values()) == {"done"}
    for device in hall.devices.values():
        assert device.installed_images[NEW] == image


def test_pause_resume_and_cancel_from_the_command_line(make_hall):
    hall = make_hall(4)
    image = image_bytes(6, 2048)
    hall.add_release(image)
    hall.start_hub()
    hall.start_devices()
    for device in hall.devices.values():
        device.hold_install = True
    rid = json.loads(hall.cli("updates", "start", NEW, "--canary", "1", "--batch", "1",
                              "--json").stdout)["rid"]
    canary = hall.devices["D0001"]
    hall.wait(lambda: len(canary.image) == len(image), "the canary's download")
    assert "paused" in hall.cli("updates", "pause", rid).stdout
    canary.release()   # a paused rollout lets the devices already updating finish
    hall.wait(lambda: hall.states(rid)["D0001"] == "done", "the canary done while paused")
    time.sleep(1.5)
    assert hall.states(rid)["D0002"] == "pending" and not hall.devices["D0002"].offers
    assert hall.rollout_state(rid)[0] == "paused"

    hall.cli("updates", "resume", rid)
    second = hall.devices["D0002"]
    hall.wait(lambda: len(second.image) == len(image), "D0002 downloading after resume")
    assert not hall.devices["D0003"].offers   # batch of one
    out = hall.cli("updates", "cancel", rid, "--json")
    assert json.loads(out.stdout)["state"] == "cancelled"
    hall.wait(lambda: second.offers[-1] is None, "D0002's offer withdrawn")
    assert hall.states(rid) == {"D0001": "done", "D0002": "withdrawn", "D0003": "pending",
                                "D0004": "pending"}
    # A cancelled rollout serves no more chunks. A request that was on its way when the
    # offer ended is counted as stray, not as a rejection (the device did nothing wrong).
    before = len(second.chunk_offsets)
    second.report("get", ver=NEW, off=0)
    hall.wait(lambda: dict(hall.query("SELECT name, count FROM counters")).get("ota_stray"),
              "the stray request counted")
    time.sleep(0.5)
    assert len(second.chunk_offsets) == before
    assert "ota_not_offered" not in hall.rejections()
    assert not hall.devices["D0003"].offers and not hall.devices["D0004"].offers
    again = hall.cli("updates", "pause", rid, ok=False)
    assert again.returncode == 1 and "cancelled" in again.stderr


def test_malformed_reports_are_rejections_and_chunks_go_only_to_the_offered_device(make_hall):
    hall = make_hall(2)
    image = image_bytes(7, 4096)
    hall.add_release(image)
    hall.start_hub()
    hall.start_devices()
    owner, other = hall.devices["D0001"], hall.devices["D0002"]
    owner.hold_at = 1024   # one chunk, then it waits (a canary of one: D0002 stays pending)
    rid = hall.start_rollout(canary=1)
    hall.wait(lambda: len(owner.image) == 1024, "the first chunk")
    assert hall.states(rid)["D0002"] == "pending"

    # D0002 tries to listen to D0001's chunks and to ask on its topic: the broker's ACL
    # refuses both, so nothing reaches either.
    spy = []
    other.client.message_callback_add("pj/D0001/dn/fw", lambda c, u, m: spy.append(m.topic))
    other.client.subscribe("pj/D0001/dn/fw", qos=1)
    other.client.publish("pj/D0001/up/ota", json.dumps({"st": "get", "ver": NEW, "off": 0}),
                         qos=1)
    # D0002 asks on its own topic for a release never offered to it.
    other.report("get", ver=NEW, off=0)
    raw = other.client.publish
    for payload in (b"{not json", json.dumps({"st": "gimme", "ver": NEW}),
                    json.dumps({"st": "get", "ver": NEW, "off": -1}),
                    json.dumps({"st": "get", "ver": NEW, "off": "0"}),
                    json.dumps({"st": "bad", "ver": NEW, "why": "sunspots"}),
                    json.dumps(["get"])):
        raw("pj/D0001/up/ota", payload, qos=1)          # refused by the broker's ACL
    for payload in (b"{not json", json.dumps({"st": "gimme", "ver": NEW}),
                    json.dumps({"st": "get", "ver": NEW, "off": -1}),
                    json.dumps({"st": "get", "ver": NEW, "off": "0"}),
                    json.dumps({"st": "bad", "ver": NEW, "why": "sunspots"}),
                    json.dumps(["get"])):
        owner.client.publish("pj/D0001/up/ota", payload, qos=1)
    owner.client.publish("pj/D0001/up/ota", json.dumps({"st": "get", "ver": NEW,
                                                        "off": 4096}), qos=1)
    owner.client.publish("pj/D0001/up/ota", json.dumps({"st": "get", "ver": "0.9.9",
                                                        "off": 0}), qos=1)

    def counted():
        r = hall.rejections()
        return (r.get("bad_json", 0), r.get("schema", 0), r.get("ota_offset", 0),
                r.get("ota_not_offered", 0))

    # A JSON list is no report object (bad_json); the other four break the schema.
    hall.wait(lambda: counted() == (2, 4, 1, 2), "the rejections counted")
    time.sleep(1.0)
    assert counted() == (2, 4, 1, 2)   # the ACL kept D0002's attempts on D0001's topic out
    assert other.chunk_offsets == [] and spy == []
    assert set(owner.chunk_offsets) == {0}
    # The malformed reports changed nothing; the download goes on.
    assert hall.states(rid)["D0001"] == "downloading"
    owner.release()
    hall.wait(lambda: hall.states(rid)["D0001"] == "done", "D0001 done")
    assert owner.installed_images[NEW] == image
    status = json.loads(subprocess.run(
        [PINGJIA, "hub", "status", "--json", "--config", hall.settings.source],
        capture_output=True, timeout=30).stdout)
    assert status["rejections"]["ota_not_offered"] == 2


# -- the dashboard ---------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_dashboard_shows_each_rollout_with_device_states_in_chromium(make_hall, tmp_path):
    import asyncio

    from playwright.async_api import async_playwright

    from hub.dashboard import add_manager

    if CHROMIUM is None:
        pytest.fail("chromium is not installed: run `make test`, which installs it")
    hall = make_hall(3)
    store = hall.store()
    add_manager(store, "zhang", "hall-manager-1", hall.settings.hub.id, "张主任")
    store.close()
    image = image_bytes(8, 3 * 1024)
    hall.add_release(image)
    hall.start_hub()
    hall.start_devices()
    hall.devices["D0002"].fail = ("bad", "hash")
    hall.devices["D0003"].hold_at = 2048   # its last ask: the chunk at 1024 of 3072
    rid = hall.start_rollout(canary=1, batch=2, max_failures=1)
    hall.wait(lambda: hall.states(rid) == {"D0001": "done", "D0002": "failed",
                                           "D0003": "downloading"}, "the rollout under way")
    base = "http://127.0.0.1:%d" % hall.settings.http.port
    shots = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                         "dashboard") if os.environ.get("PINGJIA_DOC_SHOTS") == "1" \
        else str(tmp_path)

    async def main():
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                "--disable-background-networking",
                                                "--disable-component-update", "--no-first-run"])
            try:
                context = await browser.new_context(viewport={"width": 1280, "height": 800},
                                                    locale="zh-CN", timezone_id="Asia/Shanghai")
                page = await context.new_page()
                errors = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                await page.goto(base + "/dashboard/")
                await page.fill("#login-form input[name=name]", "zhang")
                await page.fill("#login-form input[name=password]", "hall-manager-1")
                await page.click("#login-form button")
                await page.wait_for_selector("#live.on")
                await page.click('.links a[href="#/updates"]')
                card = page.locator('#updates [data-rollout="%s"]' % rid)
                await card.wait_for()
                assert await card.get_attribute("data-state") == "running"
                assert await card.get_attribute("data-stage") == "rest"
                text = await card.text_content()
                assert "固件 %s" % NEW in text and "已更新 1" in text and "失败 1" in text
                failed = card.locator('tr[data-device="D0002"]')
                assert await failed.get_attribute("data-update-state") == "failed"
                assert "校验值不符" in await failed.text_content()
                going = card.locator('tr[data-device="D0003"][data-update-state="downloading"]')
                assert "33%" in await going.text_content()
                await page.screenshot(path=os.path.join(shots, "updates.png"), full_page=True)
                # Progress without reloading: the page looks again while it is open.
                hall.devices["D0003"].release()
                await page.wait_for_selector('#updates [data-rollout="%s"][data-state="done"]'
                                             % rid, timeout=20000)
                await page.wait_for_selector('tr[data-device="D0003"][data-update-state="done"]')
                assert errors == []
            finally:
                await browser.close()

    asyncio.run(main())


# -- the engine on its own: a clock in the test's hand -------------------------------------------

class FakeClock:
    def __init__(self):
        self.t = 1_800_000_000.0

    def __call__(self):
        return self.t


class Sent:
    """What paho's publish returns, for a broker that always takes the message."""

    def wait_for_publish(self, timeout=None):
        pass

    def is_published(self):
        return True


def test_engine_offers_again_to_a_silent_device_and_fails_an_unconfirmed_install(tmp_path):
    clock = FakeClock()
    store = Store(str(tmp_path / "hub.db"), clock=clock)
    with store.transaction():
        for device_id in ("D0001", "D0002"):
            store.conn.execute("INSERT INTO devices (device_id, key_hex) VALUES (?, ?)",
                               (device_id, "00" * 32))
            store.note_health(device_id, online=True,
                              birth={"fw": OLD, "board": BOARD, "up": 1})
    image = image_bytes(9, 2000)
    updates.add_release(store, image, NEW, BOARD)
    rid = updates.start_rollout(store, NEW, canary=1, max_failures=0)["rid"]
    published = []

    def publish(topic, payload, qos, retain):
        published.append((topic, payload, qos, retain))
        return Sent()

    engine = updates.RolloutEngine(store.path, publish, clock=clock)
    engine.store = store
    engine.tick()
    offer = json.dumps({"ver": NEW, "size": 2000, "sha": hashlib.sha256(image).hexdigest(),
                        "rid": rid}, separators=(",", ":"))
    assert published == [("pj/D0001/dn/ota", offer, 1, True)]

    # Silent for a while: offered once more (the device still heartbeats, so it is online).
    clock.t += 10
    store.note_health("D0001", online=True)
    engine.tick()
    assert len(published) == 1
    clock.t += updates.OFFER_AGAIN_S
    store.note_health("D0001", online=True)
    engine.tick()
    assert published[1:] == [("pj/D0001/dn/ota", offer, 1, True)]

    # It asks, downloads and installs, then never says ok: failed after ten minutes, which
    # halts the rollout (no failure allowed) and withdraws the offer.
    reports = updates.Reports(store)
    with store.transaction():
        chunk = reports.handle("D0001", {"st": "get", "ver": NEW, "off": 1024})
        reports.handle("D0001", {"st": "installed", "ver": NEW})
    assert chunk == [("pj/D0001/dn/fw", struct.pack(">I", 1024) + image[1024:2048], 1, False)]
    clock.t += updates.CONFIRM_TIMEOUT_S - 1
    engine.tick()
    assert updates.rollout(store, rid)["state"] == "running"
    clock.t += 2
    engine.tick()
    shown = updates.rollout(store, rid)
    assert shown["state"] == "halted"
    devices = {d["device_id"]: d for d in shown["device_list"]}
    assert (devices["D0001"]["state"], devices["D0001"]["why"]) == \
        ("failed", "no confirmation in 10 min")
    assert devices["D0002"]["state"] == "pending"
    assert published[-1] == ("pj/D0001/dn/ota", b"", 1, True)
    assert not [p for p in published if p[0] == "pj/D0002/dn/ota"]
    store.close()
