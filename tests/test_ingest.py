# Ingest: every uplink is stored once or counted as rejected, and an ack only ever covers
# what is committed. First the Ingestor on a real SQLite store, then the MQTT service on a
# real mosquitto.
import json
import os
import sqlite3
import threading

import paho.mqtt.client as mqtt
import pytest

from firmware.evaluator import codec
from hub.ingest import IngestService, Ingestor, Uplink
from hub.settings import Settings
from hub.store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = bytes(range(32))
KEY2 = bytes(range(32, 64))


def _device(store, device_id, key=KEY, window="W01", retired=0):
    store.conn.execute("INSERT INTO devices (device_id, key_hex, window, label, created_at,"
                       " retired) VALUES (?,?,?,?,?,?)",
                       (device_id, key.hex(), window, "", store.now(), retired))


def _vote(seq, device_id="D0001", key=KEY, stars=5, pid=None):
    return codec.make_vote(key, device_id, seq, 1763712000 + seq, "v", pid or "P%d" % seq,
                           "C-%d" % seq, stars, [] if stars > 2 else ["S01"], "nat-1", "W01",
                           "10234")


def _up(device_id, kind, payload):
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode()
    return Uplink("pj/%s/up/%s" % (device_id, kind), payload, 0, 1, 0)


def _vote_up(vote, device_id=None):
    return _up(device_id or vote["d"], "vote", codec.encode_vote(vote))


def _birth(device_id, lo, nxt):
    return {"v": 1, "d": device_id, "fw": "0.1.0", "board": "sim", "up": 3, "rst": "power",
            "heap": 30000, "jd": nxt - lo, "old": 0, "rc": 0, "rssi": -50, "stuck": [],
            "disp": 0, "mis": 0, "clk": 0, "lo": lo, "next": nxt}


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "hub.db"))
    _device(s, "D0001")
    _device(s, "D0002", key=KEY2)
    _device(s, "D0003", retired=1)
    yield s
    s.close()


# -- the Ingestor on a real store ----------------------------------------------------------

def test_same_vote_three_times_is_stored_once_and_acked_each_time(store):
    ingest = Ingestor(store)
    vote = _vote(1)
    acks = []
    for _ in range(3):
        acks.append(ingest.handle_group([_vote_up(vote)]).acks)
    assert acks == [{"D0001": 1}] * 3
    assert store.conn.execute("SELECT count(*) FROM votes").fetchone()[0] == 1
    assert store.counters()["duplicate"] == 2
    assert store.rejections() == {}


def test_repeats_inside_one_group_are_deduplicated(store):
    ingest = Ingestor(store)
    vote = _vote(1)
    result = ingest.handle_group([_vote_up(vote)] * 3 + [_vote_up(_vote(2))])
    assert result.stored == 2 and result.duplicates == 2
    assert result.acks == {"D0001": 2}


def test_conflict_is_counted_never_stored(store):
    ingest = Ingestor(store)
    ingest.handle_group([_vote_up(_vote(1, stars=5))])
    other = _vote(1, stars=4)  # same identity, different content, valid MAC
    result = ingest.handle_group([_vote_up(other)])
    assert result.acks == {"D0001": 1}
    assert store.rejections() == {"conflict": 1}
    assert store.vote("D0001", 1)["stars"] == 5


def test_bad_inputs_are_never_stored_and_each_is_counted(store):
    ingest = Ingestor(store)
    good = _vote(5)
    forged = dict(_vote(5), stars=1, rs=["S01"])          # MAC of another content
    wrong_key = _vote(5, key=KEY2)                        # signed with D0002's key
    cases = [
        (_vote_up(forged), "bad_mac"),
        (_vote_up(wrong_key), "bad_mac"),
        (_vote_up(good, device_id="D0002"), "topic_mismatch"),
        (_vote_up(_vote(5, device_id="D9999")), "unknown_device"),
        (_vote_up(_vote(5, device_id="D0003")), "retired_device"),
        (_up("D0001", "vote", b"{\"v\":1,"), "bad_json"),
        (_up("D0001", "vote", b"[" * 1500), "bad_json"),
        (_up("D0001", "vote", b"\xff\xfe"), "bad_json"),
        (_up("D0001", "vote", dict(good, stars="5")), "schema"),
        # "v" is not under the MAC: true and 1.0 equal 1 in Python but are not version 1.
        (_up("D0001", "vote", dict(good, v=True)), "schema"),
        (_up("D0001", "vote", dict(good, v=1.0)), "schema"),
        (_up("D0001", "vote", b"x" * (codec.MAX_UPLINK + 1)), "too_large"),
        (Uplink("pj/D0001/up/other", b"{}", 0, 1, 0), "unknown_topic"),
        (Uplink("pj/D0001/down/vote", b"{}", 0, 1, 0), "unknown_topic"),
        (Uplink("pj/D|1/up/vote", b"{}", 0, 1, 0), "unknown_topic"),
        (_up("D0001", "birth", dict(_birth("D0001", 1, 1), lo="1")), "schema"),
        (_up("D0001", "birth", _birth("D0002", 1, 1)), "topic_mismatch"),
        (_up("D0001", "hb", dict(_birth("D0001", 1, 1), stuck="x")), "schema"),
        (_up("D0001", "evt", {"pid": "P1", "st": "exploded"}), "schema"),
        (_up("D0001", "evt", {"pid": "", "st": "shown"}), "schema"),
        (_up("D0001", "evt", {"pid": "P404", "st": "shown"}), "unknown_prompt"),
        (_up("D9999", "will", {"v": 1, "d": "D9999", "online": False}), "unknown_device"),
    ]
    vectors = json.load(open(os.path.join(ROOT, "tests", "vectors", "forged_votes.json")))
    for payload in vectors["payloads"]:
        cases.append((_up("D0001", "vote", payload.encode()), "bad_mac"))
    expected = {}
    for up, reason in cases:
        result = ingest.handle_group([up])
        assert result.rejected == 1 and result.stored == 0, reason
        assert result.acks == {}, reason
        expected[reason] = expected.get(reason, 0) + 1
    assert store.rejections() == expected
    assert store.conn.execute("SELECT count(*) FROM votes").fetchone()[0] == 0
    # The log keeps the reason and size, never the payload.
    logged = store.recent_rejections(100)
    assert len(logged) == len(cases)
    assert all(set(row) == {"at", "reason", "device_id", "topic", "size"} for row in logged)
    # And the hub still stores a good vote afterwards.
    assert ingest.handle_group([_vote_up(_vote(1))]).acks == {"D0001": 1}


def test_bad_vote_vectors_are_rejected(store):
    ingest = Ingestor(store)
    vectors = json.load(open(os.path.join(ROOT, "tests", "vectors", "bad_votes.json")))
    for case in vectors["payloads"]:
        result = ingest.handle_group([_up("D0001", "vote", case["payload"].encode())])
        assert result.rejected == 1, case["reason"]
    assert sum(store.rejections().values()) == len(vectors["payloads"])
    assert store.conn.execute("SELECT count(*) FROM votes").fetchone()[0] == 0


def test_ack_covers_only_contiguous_sequences(store):
    ingest = Ingestor(store)
    assert ingest.handle_group([_vote_up(_vote(1)), _vote_up(_vote(3))]).acks == {"D0001": 1}
    assert ingest.handle_group([_vote_up(_vote(4))]).acks == {"D0001": 1}
    assert ingest.handle_group([_vote_up(_vote(2))]).acks == {"D0001": 4}


def test_birth_moves_past_a_wiped_journal_and_records_the_gap(store):
    ingest = Ingestor(store)
    ingest.handle_group([_vote_up(_vote(1)), _vote_up(_vote(5))])
    # The device says its oldest record is 8: 2..7 will never come (5 did).
    result = ingest.handle_group([_up("D0001", "birth", _birth("D0001", 8, 9))])
    assert result.births == ["D0001"]
    assert result.acks == {"D0001": 7}
    gap = store.events(kind="gap")[0]
    assert gap["device_id"] == "D0001"
    assert gap["detail"] == {"from": 2, "to": 7, "missing": 5}
    assert store.counters()["gap_seqs"] == 5
    assert ingest.handle_group([_vote_up(_vote(8))]).acks == {"D0001": 8}
    # A birth that names nothing new moves nothing and records no gap.
    assert ingest.handle_group([_up("D0001", "birth", _birth("D0001", 9, 9))]).acks == \
        {"D0001": 8}
    assert len(store.events(kind="gap")) == 1
    assert store.health("D0001")["online"] == 1


def test_will_heartbeat_and_prompt_events(store):
    ingest = Ingestor(store)
    with store.transaction():
        pid = store.create_prompt("D0001", "W01", "C1", "T1", "办理", "D1", "ji", 1, "1",
                                  "张三")
    ingest.handle_group([_up("D0001", "hb", _birth("D0001", 1, 1)),
                         _up("D0001", "evt", {"pid": pid, "st": "shown"})])
    assert store.health("D0001")["hb"]["rssi"] == -50
    assert store.prompt(pid)["device_state"] == "shown"
    # A board that cannot tell its RSSI says null; a prompt too broken to name its pid is
    # reported with an empty one.
    ingest.handle_group([_up("D0001", "hb", dict(_birth("D0001", 1, 1), rssi=None,
                                                 fw="0.1.0+sim build")),
                         _up("D0001", "evt", {"pid": "", "st": "bad"})])
    assert store.health("D0001")["hb"]["rssi"] is None
    assert store.events(kind="bad_prompt")[0]["device_id"] == "D0001"
    ingest.handle_group([_vote_up(_vote(1, pid=pid))])
    assert store.prompt(pid)["outcome"] == "voted"
    ingest.handle_group([_up("D0001", "will", {"v": 1, "d": "D0001", "online": False})])
    assert store.health("D0001")["online"] == 0
    assert store.events(kind="will")[0]["device_id"] == "D0001"
    assert store.rejections() == {}


def test_a_failed_commit_acks_nothing_it_did_not_store(store):
    ingest = Ingestor(store)
    # A real SQLite failure inside the transaction, injected from another connection.
    other = sqlite3.connect(store.path)
    other.execute("CREATE TRIGGER fail_seq2 BEFORE INSERT ON votes WHEN NEW.seq = 2 "
                  "BEGIN SELECT RAISE(ABORT, 'injected disk trouble'); END")
    other.commit()
    result = ingest.handle_group([_vote_up(_vote(1)), _vote_up(_vote(2)), _vote_up(_vote(3)),
                                  _vote_up(_vote(1, device_id="D0002", key=KEY2))])
    # The group fell back to one transaction per uplink: 1, 3 and D0002's vote are in;
    # 2 is not, so D0001's ack stays at 1 (3 waits behind the hole).
    assert result.acks == {"D0001": 1, "D0002": 1}
    assert store.vote("D0001", 2) is None and store.vote("D0001", 3) is not None
    assert ingest.store_failures == 1
    # A lone uplink whose commit fails gets no ack at all.
    assert ingest.handle_group([_vote_up(_vote(2))]).acks == {}
    other.execute("DROP TRIGGER fail_seq2")
    other.commit()
    other.close()
    assert ingest.handle_group([_vote_up(_vote(2))]).acks == {"D0001": 3}


# -- the MQTT service on a real broker -----------------------------------------------------

def _settings(tmp_path, port):
    return Settings(base_dir=str(tmp_path)).replace(
        broker={"mode": "external", "port": port, "hub_password": ""},
        ingest={"max_batch": 50, "max_wait_ms": 10})


class AckWatcher:
    """Subscribes to every ack; on each one checks, from its own SQLite connection, that the
    acked votes are already readable."""

    def __init__(self, port, db_path):
        self.db_path = db_path
        self.acks = []
        self.unsafe = []
        self.cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ack-watcher")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("pj/+/dn/ack", qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, message):
        device_id = message.topic.split("/")[1]
        seq = codec.decode_ack(message.payload)
        conn = sqlite3.connect(self.db_path)
        stored = conn.execute("SELECT count(*) FROM votes WHERE device_id = ? AND seq <= ?",
                              (device_id, seq)).fetchone()[0]
        conn.close()
        with self.cond:
            if stored < seq:
                self.unsafe.append((device_id, seq, stored))
            self.acks.append((device_id, seq))
            self.cond.notify_all()

    def wait_for(self, device_id, seq, timeout=20):
        with self.cond:
            return self.cond.wait_for(lambda: (device_id, seq) in self.acks, timeout)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def _publisher(port):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="devices")
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def test_service_acks_only_what_is_committed(tmp_path, mosquitto):
    settings = _settings(tmp_path, mosquitto.port)
    setup = Store(settings.db_path)
    _device(setup, "D0001")
    _device(setup, "D0002", key=KEY2)
    setup.conn.execute("CREATE TRIGGER fail_d2 BEFORE INSERT ON votes "
                       "WHEN NEW.device_id = 'D0002' AND NEW.seq = 1 "
                       "BEGIN SELECT RAISE(ABORT, 'injected'); END")
    service = IngestService(settings)
    service.start()
    assert service.wait_connected()
    watcher = AckWatcher(mosquitto.port, settings.db_path)
    devices = _publisher(mosquitto.port)
    try:
        # D0002's vote cannot commit; D0001's votes after it can. Delivery is in order on
        # one connection, so by the time D0001's last ack arrives D0002's vote was handled.
        devices.publish("pj/D0002/up/vote", codec.encode_vote(_vote(1, "D0002", KEY2)), qos=1)
        for seq in range(1, 41):
            devices.publish("pj/D0001/up/vote", codec.encode_vote(_vote(seq)), qos=1)
        assert watcher.wait_for("D0001", 40)
        assert watcher.unsafe == []
        assert not [a for a in watcher.acks if a[0] == "D0002"]
        # Repair the disk; the device's resend is stored and acked.
        setup.conn.execute("DROP TRIGGER fail_d2")
        devices.publish("pj/D0002/up/vote", codec.encode_vote(_vote(1, "D0002", KEY2)), qos=1)
        assert watcher.wait_for("D0002", 1)
        # A repeat is acked again and stored once.
        devices.publish("pj/D0001/up/vote", codec.encode_vote(_vote(40)), qos=1)
        with watcher.cond:
            assert watcher.cond.wait_for(lambda: watcher.acks.count(("D0001", 40)) >= 2, 20)
        assert watcher.unsafe == []
        assert setup.conn.execute("SELECT count(*) FROM votes").fetchone()[0] == 41
        assert setup.counters()["duplicate"] == 1
    finally:
        devices.loop_stop()
        devices.disconnect()
        watcher.close()
        service.stop()
        setup.close()


def test_service_survives_garbage_and_keeps_storing(tmp_path, mosquitto):
    settings = _settings(tmp_path, mosquitto.port)
    setup = Store(settings.db_path)
    _device(setup, "D0001")
    service = IngestService(settings)
    service.start()
    assert service.wait_connected()
    watcher = AckWatcher(mosquitto.port, settings.db_path)
    devices = _publisher(mosquitto.port)
    try:
        for payload in (b"", b"null", b"\x00" * 10, b"{" * 3000, b"[" * 1000):
            devices.publish("pj/D0001/up/vote", payload, qos=1)
            devices.publish("pj/D0001/up/birth", payload, qos=1)
        devices.publish("pj/D0001/up/vote", codec.encode_vote(_vote(1)), qos=1)
        assert watcher.wait_for("D0001", 1)
        assert sum(setup.rejections().values()) == 10
    finally:
        devices.loop_stop()
        devices.disconnect()
        watcher.close()
        service.stop()
        setup.close()


def test_an_internal_error_leaves_nothing_half_done_and_is_counted(store, monkeypatch):
    ingest = Ingestor(store)

    def broken(*args):
        raise RuntimeError("a bug after the vote row was written")

    monkeypatch.setattr(store, "set_prompt_outcome", broken)
    result = ingest.handle_group([_vote_up(_vote(1)), _vote_up(_vote(1, device_id="D0002",
                                                                   key=KEY2))])
    assert result.rejected == 2 and result.acks == {}
    assert store.vote("D0001", 1) is None and store.rejections() == {"internal_error": 2}
    assert ingest.internal_errors == 2
    monkeypatch.undo()
    assert ingest.handle_group([_vote_up(_vote(1))]).acks == {"D0001": 1}
