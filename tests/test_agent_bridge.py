# The serial bridge (agent/bridge.py). First its rules against a scripted device and a fake
# paho client: the device's identity and bytes go up unchanged, PUBACKs come back, a
# downlink is acked to the broker only after the device's DACK, a silent device or a
# vanished port ends the session with the device's will. Then the real thing: a device
# process (the portable core with agent/runtime.py on a serial transport) on one end of a
# pseudo-terminal pair, `pingjia agent bridge` on the other, the real hub and the
# reference province -- with the cable pulled, the USB adapter unplugged and the bridge
# SIGKILLed mid-run, every vote arrives exactly once and prompts still reach the device.
#
# Run as a script (`python tests/test_agent_bridge.py device CONFIG PORT JOURNAL`), this
# file is that device process: it reads "press N" lines on stdin and prints its events as
# JSON lines.
import json
import os
import random
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import tty

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from agent import bridge as bridgelib  # noqa: E402
from firmware import serial_link as S  # noqa: E402

DEVICE = "SER001"


# ---- the rules, with fakes ------------------------------------------------------------------

class RC:
    def __init__(self, failure=False):
        self.is_failure = failure

    def __str__(self):
        return "Not authorized" if self.is_failure else "Success"


class Info:
    def __init__(self, mid, rc=0):
        self.mid = mid
        self.rc = rc

    def wait_for_publish(self, timeout=None):
        return True


class FakeClient:
    """A paho client whose network the test plays."""

    made = []

    def __init__(self, **kw):
        self.kw = kw
        self.published = []
        self.acked = []
        self.subscribed = []
        self.disconnected = False
        self._mid = 100
        FakeClient.made.append(self)

    def username_pw_set(self, user, password):
        self.credentials = (user, password)

    def will_set(self, topic, payload, qos):
        self.will = (topic, payload, qos)

    def reconnect_delay_set(self, **kw):
        pass

    def connect_async(self, host, port, keepalive):
        self.address = (host, port)

    def loop_start(self):
        pass

    def loop_stop(self):
        pass

    def subscribe(self, topic, qos):
        self.subscribed.append(topic)

    def publish(self, topic, payload, qos=0):
        self._mid += 1
        self.published.append((topic, payload, qos))
        return Info(self._mid)

    def ack(self, mid, qos):
        self.acked.append(mid)

    def disconnect(self):
        self.disconnected = True

    # the broker's side
    def connect(self, ok=True):
        self.on_connect(self, None, None, RC(not ok), None)

    def drop(self):
        self.on_disconnect(self, None, None, RC(True), None)

    def deliver(self, kind, payload, mid, qos=1, retain=False):
        msg = type("Msg", (), {"topic": "pj/%s/dn/%s" % (DEVICE, kind), "payload": payload,
                               "retain": retain, "qos": qos, "mid": mid})()
        self.on_message(self, None, msg)

    def puback(self, mid):
        self.on_publish(self, None, mid, RC(), None)


class FakePort:
    name = "ttyTEST"

    def __init__(self):
        self.to_bridge = bytearray()
        self.sent = bytearray()
        self.is_open = True
        self.generation = 1
        self.failures = 0

    def read(self, n=4096):
        data = bytes(self.to_bridge[:n])
        del self.to_bridge[:n]
        return data

    def write(self, buf):
        if not self.is_open:
            raise OSError(5, "gone")
        self.sent.extend(buf)

    def close(self):
        self.is_open = False


class Rig:
    def __init__(self, pin=None, max_body=S.MAX_BODY):
        FakeClient.made = []
        self.now = 100.0
        self.port = FakePort()
        fields = {"hub_host": "127.0.0.1", "hub_port": 1883}
        if pin:
            fields["device_id"] = pin
        self.bridge = bridgelib.Bridge(self.port, bridgelib.BridgeConfig(fields),
                                       link_timeout_s=5, clock=lambda: self.now,
                                       mqtt_factory=FakeClient)
        self.max_body = max_body

    def send(self, ftype, body=b""):
        S.Framer(self.port.to_bridge.extend).send(ftype, body)

    def hello(self, device=DEVICE, password="pw"):
        self.send(S.HELLO, S.hello_body(device, device, password, self.max_body))

    def pub(self, mid, suffix, payload, qos=1):
        self.send(S.PUB, struct.pack("<HBB", mid, qos, len(suffix)) + suffix.encode() + payload)

    def step(self, dt=0.0):
        self.now += dt
        self.bridge.step()

    def frames(self):
        got = []
        S.Deframer(64 * 1024).feed(bytes(self.port.sent), lambda t, b: got.append((t, bytes(b))))
        del self.port.sent[:]
        return got

    @property
    def client(self):
        return FakeClient.made[-1]


def statuses(frames):
    return [struct.unpack("<BH", body)[0] for t, body in frames if t == S.STATUS]


def test_hello_opens_a_session_as_the_device_and_the_device_bytes_go_up_unchanged():
    rig = Rig()
    rig.send(S.PING)
    rig.step()
    assert statuses(rig.frames()) == [S.ST_WHO]  # nobody attached yet: say HELLO
    rig.hello(password="device-secret")
    rig.step()
    client = rig.client
    assert client.kw == {"client_id": DEVICE, "clean_session": False, "manual_ack": True}
    assert client.credentials == (DEVICE, "device-secret")
    assert client.will[0] == "pj/%s/up/will" % DEVICE and client.will[2] == 1
    assert statuses(rig.frames()) == [S.ST_DOWN]
    client.connect()
    rig.step()
    assert client.subscribed == ["pj/%s/dn/#" % DEVICE]
    assert statuses(rig.frames()) == [S.ST_UP]
    vote = b'{"v":1,"d":"SER001","s":1,"mac":"ab"}'
    rig.pub(7, "vote", vote)
    rig.pub(8, "hb", b"{}", qos=0)
    rig.step()
    assert client.published == [("pj/SER001/up/vote", vote, 1), ("pj/SER001/up/hb", b"{}", 0)]
    client.puback(101)
    rig.step()
    assert [(t, b) for t, b in rig.frames() if t == S.PUBACK] == [(S.PUBACK, struct.pack("<H", 7))]


def test_a_device_can_only_publish_one_level_under_its_own_prefix():
    rig = Rig()
    rig.hello()
    rig.step()
    rig.client.connect()
    rig.step()
    for bad in ("up/x", "#", "+", "a/b", ""):
        rig.pub(1, bad, b"{}")
    rig.step()
    assert rig.client.published == []
    assert rig.bridge.counters["bad_topic"] == 5


def test_downlinks_are_acked_to_the_broker_only_after_the_device_has_them():
    rig = Rig()
    rig.hello()
    rig.step()
    rig.client.connect()
    rig.step()
    rig.frames()
    rig.client.deliver("prompt", b'{"pid":"P1"}', mid=55)
    rig.client.deliver("time", b'{"t":1}', mid=0, qos=0)
    rig.step()
    msgs = [b for t, b in rig.frames() if t == S.MSG]
    assert len(msgs) == 2
    msg_id, flags, tlen = struct.unpack("<HBB", msgs[0][:4])
    assert msgs[0][4:4 + tlen] == b"prompt" and msgs[0][4 + tlen:] == b'{"pid":"P1"}'
    assert struct.unpack("<H", msgs[1][:2]) == (0,)  # QoS 0: no DACK wanted
    assert rig.client.acked == []  # the device has not confirmed yet
    rig.send(S.DACK, struct.pack("<H", msg_id))
    rig.step()
    assert rig.client.acked == [55]


def test_an_unconfirmed_downlink_goes_again_then_the_session_restarts():
    rig = Rig()
    rig.hello()
    rig.step()
    client = rig.client
    client.connect()
    rig.step()
    client.deliver("prompt", b'{"pid":"P1"}', mid=31)
    rig.step()
    first = [b for t, b in rig.frames() if t == S.MSG]
    for _ in range(bridgelib.DACK_TRIES - 1):
        rig.send(S.PING)  # the device is alive; only the MSG (or its DACK) got lost
        rig.step(bridgelib.DACK_RETRY_S + 0.1)
        again = [b for t, b in rig.frames() if t == S.MSG]
        assert again == first  # the same frame, the same id
    rig.send(S.PING)
    rig.step(bridgelib.DACK_RETRY_S + 0.1)
    # Never acked to the broker: a new session gets it again from there.
    assert client.acked == [] and client.disconnected and rig.bridge.identity is None
    assert client.published == []  # no will: the device is not gone
    assert rig.bridge.counters["msg_resent"] == bridgelib.DACK_TRIES - 1
    assert rig.bridge.counters["dack_give_up"] == 1


def test_a_silent_device_ends_the_session_with_its_will():
    rig = Rig()
    rig.hello()
    rig.step()
    client = rig.client
    client.connect()
    rig.client.deliver("prompt", b"{}", mid=9)
    rig.step(1.0)
    rig.step(5.1)
    assert client.published == [("pj/SER001/up/will", b'{"v":1,"d":"SER001","online":false}', 1)]
    assert client.disconnected and client.acked == []  # the prompt stays at the broker
    assert rig.bridge.identity is None
    rig.frames()
    rig.send(S.PING)  # it comes back: who are you?
    rig.step()
    assert statuses(rig.frames()) == [S.ST_WHO]


def test_an_unplugged_adapter_detaches_at_once():
    rig = Rig()
    rig.hello()
    rig.step()
    rig.client.connect()
    rig.step()
    rig.port.is_open = False
    rig.step()
    assert rig.client.disconnected and rig.bridge.identity is None
    assert rig.bridge.counters["detached"] == 1


def test_a_bridge_bound_to_one_device_refuses_another():
    rig = Rig(pin="SER999")
    rig.hello(DEVICE)
    rig.step()
    assert FakeClient.made == []
    assert statuses(rig.frames()) == [S.ST_REFUSED]
    assert rig.bridge.counters["wrong_device"] == 1


def test_a_broker_refusal_reaches_the_device():
    rig = Rig()
    rig.hello()
    rig.step()
    rig.frames()
    rig.client.connect(ok=False)
    rig.step()
    assert statuses(rig.frames()) == [S.ST_REFUSED]


def test_hello_again_replays_who_is_signed_in_and_the_catalogue():
    rig = Rig()
    rig.hello()
    rig.step()
    client = rig.client
    client.connect()
    client.deliver("ctx", b'{"sn":"1"}', mid=3, retain=True)
    client.deliver("cat", b'{"cv":"x","rs":[]}', mid=4, retain=True)
    rig.step()
    rig.frames()
    rig.hello()  # the device rebooted within the link timeout
    rig.step()
    frames = rig.frames()
    assert statuses(frames) == [S.ST_UP]
    kinds = [b[4:4 + b[3]] for t, b in frames if t == S.MSG]
    assert kinds == [b"ctx", b"cat"]
    assert FakeClient.made == [client]  # the same session goes on


def test_a_downlink_too_big_for_the_device_is_dropped_counted_and_acked():
    rig = Rig(max_body=512)
    rig.hello()
    rig.step()
    rig.client.connect()
    rig.step()
    rig.frames()
    rig.client.deliver("ctx", b"x" * 600, mid=77)
    rig.step()
    assert [t for t, _ in rig.frames() if t == S.MSG] == []
    assert rig.client.acked == [77]  # or the broker would stall on it
    assert rig.bridge.counters["too_large_for_device"] == 1


def test_pub_without_a_session_is_refused_and_the_device_told():
    rig = Rig()
    rig.hello()
    rig.step()
    rig.frames()
    rig.pub(1, "vote", b"{}")
    rig.step()
    assert rig.client.published == []
    assert statuses(rig.frames()) == [S.ST_DOWN]
    rig.client.connect()
    rig.client.drop()
    rig.step()
    assert statuses(rig.frames()) == [S.ST_UP, S.ST_DOWN]


def test_bridge_config_checks_and_keeps_the_password_out_of_repr(tmp_path):
    with pytest.raises(bridgelib.BridgeError, match="hub_host"):
        bridgelib.BridgeConfig({})
    with pytest.raises(bridgelib.BridgeError, match="ca"):
        bridgelib.BridgeConfig({"hub_host": "hub", "tls": True})
    ca = tmp_path / "ca.pem"
    ca.write_text("PEM")
    path = tmp_path / "bridge.json"
    path.write_text(json.dumps({"hub_host": "hub", "tls": True, "ca_file": "ca.pem",
                                "mqtt_password": "s3cret", "key": "00" * 32}))
    config = bridgelib.BridgeConfig.load(str(path))
    assert (config.hub_port, config.ca) == (8883, "PEM")
    assert "s3cret" not in repr(config)


# ---- the real thing ----------------------------------------------------------------------

class Cable:
    """device <-> pty A | the cable (a relay this test controls) | pty B <-> bridge.

    cut(): bytes in both directions are lost, as with a broken wire. unplug(): pty B goes
    away as a USB adapter does (the bridge's open port fails, its path vanishes);
    replug() brings a new one under the same path."""

    def __init__(self, folder):
        self.a_master, self.a_slave = os.openpty()
        tty.setraw(self.a_slave)
        self.device_path = os.ttyname(self.a_slave)
        self.bridge_path = os.path.join(folder, "ttyBRIDGE")
        self.lock = threading.Lock()
        self.b_master = self.b_slave = None
        self.cut_flag = False
        self.lost = 0
        self.noise = 0.0  # chance per byte that one of its bits flips on the way
        self.flipped = 0
        self._rng = random.Random(20261121)
        self.stop = False
        self.replug()
        self.thread = threading.Thread(target=self._relay, daemon=True)
        self.thread.start()

    def replug(self):
        master, slave = os.openpty()
        tty.setraw(slave)
        tmp = self.bridge_path + ".new"
        os.symlink(os.ttyname(slave), tmp)
        os.replace(tmp, self.bridge_path)
        with self.lock:
            self.b_master, self.b_slave = master, slave

    def unplug(self):
        with self.lock:
            master, slave = self.b_master, self.b_slave
            self.b_master = self.b_slave = None
        os.unlink(self.bridge_path)
        os.close(master)
        os.close(slave)

    def cut(self, flag=True):
        self.cut_flag = flag

    def _relay(self):
        while not self.stop:
            with self.lock:
                b = self.b_master
            fds = [self.a_master] + ([b] if b is not None else [])
            try:
                ready, _, _ = select.select(fds, [], [], 0.05)
            except (OSError, ValueError):
                continue
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    continue
                other = b if fd == self.a_master else self.a_master
                if self.cut_flag or other is None:
                    self.lost += len(data)
                    continue
                if self.noise:
                    data = bytearray(data)
                    for i in range(len(data)):
                        if self._rng.random() < self.noise:
                            data[i] ^= 1 << self._rng.randrange(8)
                            self.flipped += 1
                try:
                    os.write(other, data)
                except OSError:
                    self.lost += len(data)

    def close(self):
        self.stop = True
        self.thread.join(2)
        for fd in (self.a_master, self.a_slave, self.b_master, self.b_slave):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


class DeviceProcess:
    """This file run as the device: events arrive as JSON lines on its stdout."""

    def __init__(self, config_path, port, journal_dir, log_path):
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "device", config_path, port, journal_dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
        self.events = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

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
            states = [e["st"] for e in self.events if e["e"] == "state"]
        return states[-1] if states else None

    def connected(self):
        with self.lock:
            conns = [e["up"] for e in self.events if e["e"] == "conn"]
        return bool(conns and conns[-1])

    def saved(self):
        with self.lock:
            return [json.loads(e["p"]) for e in self.events if e["e"] == "saved"]

    def stats(self):
        self.proc.stdin.write(b"stats\n")
        self.proc.stdin.flush()

    def press(self, stars):
        self.proc.stdin.write(b"press %d\n" % stars)
        self.proc.stdin.flush()
        time.sleep(0.5)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


class BridgeProcess:
    def __init__(self, port, config_path, log_path):
        self.args = [sys.executable, "-c", "from hub.cli import main; main()", "agent", "bridge",
                     "--port", port, "--config", config_path, "--link-timeout", "2",
                     "--log-level", "debug", "--json"]
        self.log_path = log_path
        self.proc = None
        self.start()

    def start(self):
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=log,
                                         env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            out, _ = self.proc.communicate(timeout=20)
            return json.loads(out) if out.strip() else None
        return None


def test_votes_cross_the_serial_bridge_exactly_once_through_cuts_unplugs_and_a_killed_bridge(
        tmp_path):
    from test_agent_pi import Hall, wait_for

    hall = Hall(str(tmp_path), [(DEVICE, "W07")])
    config_path = str(tmp_path / "device.json")
    with open(config_path, "w") as f:
        json.dump(hall.config(DEVICE), f)
    bridge_config = str(tmp_path / "bridge.json")
    with open(bridge_config, "w") as f:
        # Only where the hub is: the identity comes from the device itself.
        json.dump({"hub_host": "127.0.0.1", "hub_port": hall.settings.broker.port}, f)
    cable = Cable(str(tmp_path))
    device = bridge = None
    try:
        hall.start_hub()
        hall.sign_in("W07", "20001", "李娜")
        device = DeviceProcess(config_path, cable.device_path, str(tmp_path / "journal"),
                               str(tmp_path / "device.log"))
        bridge = BridgeProcess(cable.bridge_path, bridge_config, str(tmp_path / "bridge.log"))
        wait_for(lambda: hall.online(DEVICE), what="the device's birth through the bridge")
        wait_for(lambda: device.state() == "IDLE", what="the signed-in staff on the device")

        def vote(stars, case):
            hall.prompt("W07", case, "营业执照变更")
            wait_for(lambda: device.state() == "PROMPT", what="prompt %s" % case)
            device.press(stars)

        def rest():
            wait_for(lambda: device.state() == "IDLE", what="the device at rest")

        # 1. A vote as usual.
        vote(5, "C1")
        wait_for(lambda: hall.province_ids() == ["SER001:1"], what="vote 1 at the province")
        rest()

        # 2. The wire breaks just as a prompt goes down: the bridge relays it into the
        # break, so the device never confirms it, and the broker keeps it unacked.
        cable.cut()
        lost_before = cable.lost
        # The device cannot confirm it through the break: the hub says "sent" (202).
        pid2 = hall.prompt("W07", "C2", "营业执照变更", expect=(201, 202))
        wait_for(lambda: cable.lost > lost_before, what="the prompt lost in the break")
        wait_for(lambda: not hall.online(DEVICE), what="the will after the cut")
        cable.cut(False)
        wait_for(lambda: device.state() == "PROMPT", timeout=30,
                 what="prompt C2 delivered again after the break")
        with open(str(tmp_path / "bridge.log"), encoding="utf-8") as f:
            # The broker's second try (DUP): the first went into the break unconfirmed.
            after_cut = f.read().split("device silent", 1)[1]
        assert re.search(r"downlink prompt \(\d+ bytes, a repeat\) to SER001", after_cut)
        device.press(4)
        wait_for(lambda: hall.province_ids() == ["SER001:1", "SER001:2"], timeout=30,
                 what="vote 2")
        assert hall.http("GET", "/api/v1/prompts/%s" % pid2)[1]["status"] == "voted"
        rest()

        # 3. The wire breaks with a prompt on screen; the vote waits in the journal, and a
        # prompt for the unreachable device is refused as offline (the business system
        # tries again once the device is back).
        hall.prompt("W07", "C3", "营业执照变更")
        wait_for(lambda: device.state() == "PROMPT", what="prompt C3")
        cable.cut()
        device.press(3)
        wait_for(lambda: not hall.online(DEVICE), what="the will after the second cut")
        hall.prompt("W07", "C4", "营业执照变更", expect=(503,))
        rest()
        assert len(hall.province_ids()) == 2
        cable.cut(False)
        wait_for(lambda: len(hall.province_ids()) == 3, timeout=30,
                 what="vote 3 after the wire is whole again")
        wait_for(lambda: hall.online(DEVICE), what="the device back online")
        hall.prompt("W07", "C4", "营业执照变更")
        wait_for(lambda: device.state() == "PROMPT", what="prompt C4 once the device is back")
        device.press(5)
        wait_for(lambda: len(hall.province_ids()) == 4, timeout=30, what="vote 4")
        rest()

        # 4. The USB adapter is unplugged, a vote is made, and it is plugged in again.
        hall.prompt("W07", "C5", "营业执照变更")
        wait_for(lambda: device.state() == "PROMPT", what="prompt C5")
        cable.unplug()
        # Each key once the screen it is meant for is up, and slower than the rapid-press
        # filter (300 ms), as a person presses; a loaded machine can bunch the keys up.
        device.press(2)  # 不满意: reasons screen
        wait_for(lambda: device.state() == "REASONS", what="the reasons screen")
        time.sleep(0.4)
        device.press(3)  # 选择
        time.sleep(0.4)
        device.press(1)  # 提交
        wait_for(lambda: not hall.online(DEVICE), what="offline after the unplug")
        time.sleep(1.5)
        cable.replug()
        wait_for(lambda: len(hall.province_ids()) == 5, timeout=30, what="vote 5 after replug")
        rest()

        # 5. The bridge is killed (SIGKILL: the broker publishes the will) and restarted.
        hall.prompt("W07", "C6", "营业执照变更")
        wait_for(lambda: device.state() == "PROMPT", what="prompt C6")
        bridge.kill()
        device.press(5)
        wait_for(lambda: not hall.online(DEVICE), what="the will of the killed bridge")
        bridge.start()
        wait_for(lambda: len(hall.province_ids()) == 6, timeout=30, what="vote 6 after restart")

        # Exactly once, end to end, with the device's own MACs.
        assert hall.province_ids() == ["SER001:%d" % s for s in range(1, 7)]
        rows = hall.hub_rows("SELECT seq, mac, stars FROM votes WHERE device_id = ? ORDER BY seq",
                             (DEVICE,))
        saved = {v["s"]: v for v in device.saved()}
        assert [r[0] for r in rows] == [1, 2, 3, 4, 5, 6] == sorted(saved)
        assert [(r[1], r[2]) for r in rows] == [(saved[s]["mac"], saved[s]["stars"])
                                              for s in range(1, 7)]
        assert [r[2] for r in rows] == [5, 4, 3, 5, 2, 5]
        rejected = dict(hall.hub_rows("SELECT reason, count FROM rejections"))
        assert not {"bad_mac", "conflict", "topic_mismatch"} & set(rejected), rejected
        wait_for(lambda: hall.hub_rows("SELECT count(*) FROM votes WHERE forwarded_at IS NULL")
                 [0][0] == 0, what="every vote marked forwarded")
        final = bridge.stop()
        assert final is not None and final["votes_up"] >= 1
    finally:
        if device is not None:
            device.close()
        if bridge is not None and bridge.proc.poll() is None:
            bridge.proc.kill()
            bridge.proc.wait(10)
        cable.close()
        hall.close()


def test_votes_cross_a_noisy_cable_exactly_once(tmp_path):
    from test_agent_pi import Hall, wait_for

    hall = Hall(str(tmp_path), [(DEVICE, "W07")])
    config_path = str(tmp_path / "device.json")
    with open(config_path, "w") as f:
        json.dump(hall.config(DEVICE), f)
    bridge_config = str(tmp_path / "bridge.json")
    with open(bridge_config, "w") as f:
        json.dump({"hub_host": "127.0.0.1", "hub_port": hall.settings.broker.port}, f)
    cable = Cable(str(tmp_path))
    device = bridge = None
    try:
        hall.start_hub()
        hall.sign_in("W07", "20001", "李娜")
        device = DeviceProcess(config_path, cable.device_path, str(tmp_path / "journal"),
                               str(tmp_path / "device.log"))
        bridge = BridgeProcess(cable.bridge_path, bridge_config, str(tmp_path / "bridge.log"))
        # The hub must have the birth too: it refuses a prompt for a device it never saw.
        wait_for(lambda: hall.online(DEVICE), timeout=30,
                 what="the device's birth through the bridge")
        wait_for(lambda: device.state() == "IDLE", timeout=30, what="the device at rest")
        cable.noise = 1 / 1500.0  # about one frame in four of a prompt's size is damaged
        for i in range(5):
            # 202: sent, but the device's "shown" met a damaged frame and came after the
            # hub's wait; the prompt must still reach the screen (next line).
            hall.prompt("W07", "N%d" % i, "营业执照变更", expect=(201, 202))
            wait_for(lambda: device.state() == "PROMPT", timeout=40, what="prompt N%d" % i)
            device.press(5 - i % 3)
            wait_for(lambda: device.state() == "IDLE", timeout=30, what="rest after N%d" % i)
        wait_for(lambda: len(hall.province_ids()) == 5, timeout=60, what="five votes")
        assert hall.province_ids() == ["SER001:%d" % s for s in range(1, 6)]
        assert hall.hub_rows("SELECT count(*) FROM votes")[0][0] == 5
        rejected = dict(hall.hub_rows("SELECT reason, count FROM rejections"))
        assert not {"bad_mac", "conflict", "schema", "bad_json"} & set(rejected), rejected
        assert cable.flipped > 0
        cable.noise = 0.0
        stats = bridge.stop()
        assert stats["bad_crc"] > 0  # damage was seen, and dropped, not relayed
    finally:
        if device is not None:
            device.close()
        if bridge is not None and bridge.proc.poll() is None:
            bridge.proc.kill()
            bridge.proc.wait(10)
        cable.close()
        hall.close()


# ---- the device process ------------------------------------------------------------------

def device_main(config_path, port_name, journal_dir):
    """A serial evaluator: agent/runtime.py over firmware/serial_link.py, keys from stdin."""
    import queue

    from agent.runtime import Evaluator
    from agent.serialport import ReopeningPort
    from agent.transport import SerialTransport
    from firmware.evaluator.config import load
    from firmware.evaluator.journal import Journal

    config = load(config_path)
    levels = {s: 0 for s in range(1, 6)}

    class Board:
        name = "serial-test"
        keys_pins = {s: (lambda s=s: levels[s]) for s in range(1, 6)}
        key_active = 1
        display = None

        def reset_cause(self):
            return "power"

        def rssi(self):
            return None

        def free_memory(self):
            return 1 << 20

    out_lock = threading.Lock()

    def emit(obj):
        with out_lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    transport = SerialTransport(config, ReopeningPort(port_name, 115200, timeout=0),
                                ping_ms=300, timeout_ms=1500)
    ev = Evaluator(config, Board(), Journal(journal_dir), transport, resend_ms=3000,
                   on_event=emit)
    commands = queue.Queue()

    def read_stdin():
        for line in sys.stdin:
            commands.put(line.split())

    threading.Thread(target=read_stdin, daemon=True).start()
    transport.start()
    release_at = None
    while True:
        try:
            cmd = commands.get_nowait()
        except queue.Empty:
            cmd = None
        if cmd and cmd[0] == "press":
            levels[int(cmd[1])] = 1
            release_at = time.monotonic() + 0.1
        elif cmd and cmd[0] == "stats":
            emit(dict(ev.stats(), e="stats"))
        if release_at is not None and time.monotonic() >= release_at:
            for s in levels:
                levels[s] = 0
            release_at = None
        ev.step()
        time.sleep(0.01)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "device":
    device_main(*sys.argv[2:])
