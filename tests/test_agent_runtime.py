# The Pi evaluator's runtime (agent/runtime.py) on gpiozero mock pins, a luma.emulator
# display and a scripted transport: thanks only after the journal write, trimming only on
# the hub's ack, resend after 10 s without ack progress, birth and heartbeats the hub
# accepts, downlinks to the screen, and a dead panel that never stops a vote.
import json
import os

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import pytest
from gpiozero.pins.mock import MockFactory
from luma.emulator.device import capture

from agent import board as boardlib
from agent.runtime import Evaluator
from conftest import ROOT
from firmware.evaluator import codec
from firmware.evaluator.config import Config
from firmware.evaluator.journal import Journal
from hub.ingest import health_fields

BOARD_FILE = os.path.join(ROOT, "hardware", "boards", "rpi-evaluator.json")
KEY = bytes(range(32))
CTX = {"w": "W03", "sn": "10234", "name": None, "win": None, "t": 1700000000}


def prompt(pid="P1", ttl=60):
    return {"pid": pid, "case": "GD2026-0001", "kind": "ji", "n": 1, "item": None, "ttl": ttl,
            "t": 1700000000}


class FakeClock:
    def __init__(self):
        self.ms = 1000
        self.wall = 1_763_700_000

    def ticks_ms(self):
        return self.ms

    def time(self):
        return self.wall


class FakeTransport:
    """Records publishes; the test plays the broker (PUBACK) and the hub (events)."""

    def __init__(self):
        self.connected = False
        self.reconnects = 0
        self.sent = []  # (suffix, payload, qos)
        self.queue = []
        self.unacked = 0
        self.started = self.stopped = False

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True

    def poll(self, now):
        pass

    def events(self):
        out, self.queue = self.queue, []
        return out

    @property
    def inflight(self):
        return self.unacked

    def publish(self, suffix, payload, qos=1):
        if not self.connected:
            return False
        self.sent.append((suffix, payload, qos))
        if qos:
            self.unacked += 1
        return True

    # the test's side
    def up(self):
        self.connected = True
        self.queue.append(("session", True))

    def down(self):
        self.connected = False
        self.unacked = 0
        self.queue.append(("session", False))

    def puback_all(self):
        self.unacked = 0

    def downlink(self, kind, obj):
        payload = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.queue.append(("msg", kind, payload, False))

    def take(self, suffix):
        got = [json.loads(p) for s, p, _ in self.sent if s == suffix]
        self.sent = [x for x in self.sent if x[0] != suffix]
        return got


class Rig:
    def __init__(self, tmp_path, display=None, journal=None, hb_s=30):
        self.factory = MockFactory()
        spec = boardlib.load_spec(BOARD_FILE)
        self.board = boardlib.open_board(spec, pin_factory=self.factory, display=display,
                                         reset_cause="power")
        self.journal_dir = str(tmp_path / "journal")
        self.journal = journal or Journal(self.journal_dir, segments=4, segment_bytes=2048)
        self.config = Config({"device_id": "D0001", "key": KEY.hex(), "hub_host": "127.0.0.1",
                              "mqtt_password": "pw", "window": "W03"})
        self.clock = FakeClock()
        self.transport = FakeTransport()
        self.events = []
        self.ev = Evaluator(self.config, self.board, self.journal, self.transport,
                            clock=self.clock, hb_s=hb_s, on_event=self.events.append)
        self.pins = {k["stars"]: self.factory.pin(k["pin"]) for k in spec["keys"]}

    def run(self, ms, step=20):
        end = self.clock.ms + ms
        while self.clock.ms < end:
            self.ev.step()
            self.clock.ms += step

    def press(self, stars):
        self.pins[stars].drive_low()
        self.run(100)
        self.pins[stars].drive_high()
        self.run(400)  # past the rating's 300 ms rapid-press guard

    def vote(self, stars, pid, rest=True):
        self.transport.downlink("prompt", prompt(pid))
        self.run(100)
        assert self.ev.rating.state == "PROMPT"
        self.press(stars)
        if rest:
            self.run(3000)  # the thanks screen is over: ready for the next citizen

    def close(self):
        self.board.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def test_a_key_press_on_gpio_makes_a_signed_vote_durable_before_thanks(rig):
    durable_at_thanks = []

    def on_event(obj):
        if obj["e"] == "state" and obj["st"] == "THANKS":
            # A second journal opened on the same folder (a reboot, in effect) has it.
            again = Journal(rig.journal_dir, segments=4, segment_bytes=2048)
            durable_at_thanks.append([json.loads(p)["s"] for _, _, p in again.unacked()])
        rig.events.append(obj)

    rig.ev._notify = on_event
    rig.transport.downlink("ctx", CTX)
    rig.vote(4, "P1", rest=False)
    assert rig.ev.rating.state == "THANKS"
    assert durable_at_thanks == [[1]]
    (_seq, _t, payload), = rig.journal.unacked()
    vote = codec.decode_vote(payload)
    assert codec.verify_vote(KEY, vote)
    assert (vote["d"], vote["s"], vote["stars"], vote["pid"], vote["w"], vote["sn"]) == \
        ("D0001", 1, 4, "P1", "W03", "10234")
    assert vote["t"] == rig.clock.wall


def test_a_failed_journal_write_shows_the_qr_fallback_never_thanks(rig, monkeypatch):
    def broken(seq, t, payload):
        raise OSError(5, "EIO")

    monkeypatch.setattr(rig.journal, "append", broken)
    rig.vote(5, "P1", rest=False)
    states = [e["st"] for e in rig.events if e["e"] == "state"]
    assert "THANKS" not in states and rig.ev.rating.state == "FULL"
    assert rig.ev.flash_errors == 1 and rig.ev.saved_records == 0


def test_birth_first_then_votes_in_order_within_the_window(rig):
    rig.ev.window = 2
    for i in range(3):
        rig.vote(5, "P%d" % i)
    assert rig.transport.sent == []  # no session yet: everything waits in the journal
    rig.transport.up()
    rig.run(100)
    births = rig.transport.take("birth")
    assert len(births) == 1 and births[0]["lo"] == 1 and births[0]["next"] == 4
    assert health_fields(births[0])["lo"] == 1  # a birth the hub's checks accept
    # Then the three prompt outcomes, then the votes, never more than 2 unPUBACKed.
    order = []
    for _ in range(6):
        assert rig.transport.unacked <= 2
        order += [(s, json.loads(p).get("s")) for s, p, _ in rig.transport.sent]
        rig.transport.sent = []
        rig.transport.puback_all()
        rig.run(40)
    assert order == [("evt", None)] * 3 + [("vote", 1), ("vote", 2), ("vote", 3)]


def test_only_the_hub_ack_trims_and_silence_means_resend_after_10_s(rig):
    rig.vote(5, "P1")
    rig.vote(3, "P2")
    rig.transport.up()
    rig.run(100)
    rig.transport.puback_all()  # the broker has them: not a reason to forget them
    rig.run(100)
    assert [v["s"] for v in rig.transport.take("vote")] == [1, 2]
    assert rig.journal.depth == 2
    rig.run(9000)
    assert rig.transport.take("vote") == []
    rig.run(2000)  # 10 s without ack progress
    assert [v["s"] for v in rig.transport.take("vote")] == [1, 2]
    assert rig.ev.resends == 1
    rig.transport.puback_all()
    rig.transport.downlink("ack", codec.encode_ack(2))
    rig.run(100)
    assert rig.journal.depth == 0 and rig.journal.acked == 2
    rig.run(15000)
    assert rig.transport.take("vote") == []


def test_a_new_session_starts_again_at_the_oldest_unacked_record(rig):
    rig.transport.up()
    rig.run(100)
    rig.vote(5, "P1")
    rig.vote(4, "P2")
    rig.transport.downlink("ack", codec.encode_ack(1))
    rig.run(100)
    rig.transport.take("vote")
    rig.transport.take("birth")
    rig.transport.down()
    rig.run(100)
    rig.transport.up()
    rig.run(100)
    assert rig.transport.take("birth")[0]["lo"] == 2
    assert [v["s"] for v in rig.transport.take("vote")] == [2]


def test_heartbeats_carry_health_the_hub_accepts(tmp_path):
    r = Rig(tmp_path, hb_s=5)
    try:
        r.transport.up()
        r.run(100)
        r.vote(5, "P1")
        r.pins[3].drive_low()  # held for good: a stuck key
        r.run(16000)
        hbs = r.transport.take("hb")
        assert hbs, "no heartbeat in 11 s at hb_s=5"
        hb = hbs[-1]
        checked = health_fields(hb)
        assert hb["d"] == "D0001" and hb["board"] == "rpi-v1" and hb["rst"] == "power"
        assert checked["jd"] == 1 and checked["stuck"] == [3] and hb["disp"] == 1
        assert "rssi" not in hb or isinstance(hb["rssi"], int)
        assert all(qos == 0 for s, _, qos in r.transport.sent if s == "hb")
    finally:
        r.close()


def test_downlinks_drive_the_screen_and_bad_ones_are_counted(rig):
    rig.transport.up()
    rig.transport.downlink("ctx", CTX)
    rig.run(100)
    assert rig.ev.rating.state == "IDLE"
    rig.transport.downlink("time", {"t": rig.clock.wall + 3600})
    rig.transport.downlink("prompt", {"pid": "P9", "kind": "nonsense"})
    rig.transport.downlink("prompt", b"\xff not json")
    rig.transport.downlink("cat", {"cv": "x", "rs": "not a list"})
    rig.transport.downlink("weird", {})
    rig.run(100)
    assert rig.ev.clk_correction == 3600 and rig.ev.unix_time() == rig.clock.wall + 3600
    assert rig.ev.bad_downlinks == 4
    assert rig.ev.rating.state == "IDLE"
    assert sorted(e["st"] for e in rig.transport.take("evt")) == ["bad", "bad"]
    rig.transport.downlink("prompt", prompt("P10"))
    rig.run(100)
    assert rig.transport.take("evt") == [{"pid": "P10", "st": "shown"}]


def test_an_unanswered_prompt_becomes_an_unrated_record(rig):
    rig.transport.downlink("prompt", prompt("P7", ttl=2))
    rig.run(2500)
    (_s, _t, payload), = rig.journal.unacked()
    vote = codec.decode_vote(payload)
    assert vote["k"] == "u" and vote["stars"] == 0


def test_a_full_journal_refuses_prompts_with_the_qr_screen(tmp_path):
    r = Rig(tmp_path, journal=Journal(str(tmp_path / "small"), segments=2, segment_bytes=530))
    try:
        for pid in ("P1", "P2", "P3"):  # two records fill a segment: the third needs the last
            r.vote(5, pid)
        r.transport.downlink("prompt", prompt("P4"))
        r.run(1100)
        assert r.ev.rating.state == "FULL"
        r.transport.up()
        r.run(100)
        assert {"pid": "P4", "st": "full"} in r.transport.take("evt")
        r.transport.downlink("ack", codec.encode_ack(2))
        r.run(1100)
        assert r.ev.rating.state == "OFF"
    finally:
        r.close()


def test_the_screen_is_drawn_to_the_luma_device(tmp_path):
    frames = str(tmp_path / "frame_{0:04}.png")
    panel = capture(width=256, height=64, mode="RGB", transform="none", scale=1,
                    file_template=frames)
    r = Rig(tmp_path, display=panel)
    try:
        r.transport.downlink("ctx", CTX)
        r.run(200)
        shots = sorted(os.listdir(tmp_path))
        assert any(name.startswith("frame_") for name in shots)
        from PIL import Image
        last = Image.open(os.path.join(tmp_path, [n for n in shots if n.startswith("frame_")][-1]))
        assert last.size == (256, 64)
        assert last.convert("L").getbbox() is not None  # something is lit
        assert r.ev.disp_ok and r.ev.stats()["state"] == "IDLE"
    finally:
        r.close()


class DeadPanel:
    width, height, mode = 128, 64, "1"

    def display(self, image):
        raise OSError(121, "Remote I/O error")  # what an I2C panel that fell off says

    def cleanup(self):
        pass


def test_a_dead_panel_is_reported_and_votes_go_on(tmp_path):
    r = Rig(tmp_path, display=DeadPanel())
    try:
        r.transport.up()
        r.vote(5, "P1")
        assert r.ev.saved_records == 1
        assert r.ev.disp_failed >= 1
        assert json.loads(r.ev.heartbeat())["disp"] == 1
    finally:
        r.close()
