# The hub never crashes on any uplink, never stores a malformed or forged one, and counts
# every one it turns away. First hypothesis against the Ingestor on a real store, then
# thousands of malformed payloads through a real broker into a running hub.
import json
import random
import socket
import threading
import time
import urllib.request

import paho.mqtt.client as mqtt
from hypothesis import HealthCheck, assume, given, settings as hsettings, strategies as st

from firmware.evaluator import codec
from hub import keys
from hub.app import Hub
from hub.ingest import Ingestor, Uplink
from hub.settings import write_default
from hub.store import Store

KEY = bytes(range(32))
KINDS = ("vote", "birth", "hb", "evt", "will")
DEVICES = ("D0001", "D0002", "D9999")   # D9999 is not registered


def free_port():
    # Local, not from conftest: with tests/core/ collected too, "conftest" is ambiguous.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


QUIET = [HealthCheck.function_scoped_fixture]
GOOD = codec.make_vote(KEY, "D0001", 1, 1763712000, "v", "P1", "C-1", 2, ["S01"], "nat-1",
                       "W01", "10234")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)


def _registry(store):
    store.conn.execute("INSERT INTO devices (device_id, key_hex, window, label, created_at,"
                       " retired) VALUES ('D0001', ?, 'W01', '', 'x', 0)", (KEY.hex(),))
    store.conn.execute("INSERT INTO devices (device_id, key_hex, window, label, created_at,"
                       " retired) VALUES ('D0002', ?, 'W02', '', 'x', 1)", (KEY.hex(),))


class Fuzzed:
    """One Ingestor over one store for a whole hypothesis run (examples share it)."""

    def __init__(self, path):
        self.store = Store(path)
        _registry(self.store)
        self.ingest = Ingestor(self.store)

    def rejected_total(self):
        return sum(self.store.rejections().values())

    def votes(self):
        return self.store.conn.execute("SELECT count(*) FROM votes").fetchone()[0]

    def check_one(self, topic, payload):
        before = self.rejected_total()
        result = self.ingest.handle_group([Uplink(topic, payload, 0, 1, 0)])
        assert result.stored == 0
        assert result.rejected == 1
        assert self.rejected_total() == before + 1
        assert self.votes() == 0


_FUZZ = {}


def _fuzzed(tmp_path_factory):
    if "f" not in _FUZZ:
        _FUZZ["f"] = Fuzzed(str(tmp_path_factory.mktemp("fuzz") / "hub.db"))
    return _FUZZ["f"]


@hsettings(max_examples=300, deadline=None, suppress_health_check=QUIET)
@given(kind=st.sampled_from(KINDS), device=st.sampled_from(DEVICES),
       payload=st.binary(max_size=300))
def test_random_bytes_on_any_uplink_are_counted_never_stored(tmp_path_factory, kind, device,
                                                              payload):
    fuzz = _fuzzed(tmp_path_factory)
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeError, RecursionError):
        obj = None
    # A random byte string that happens to be a valid non-vote message is not a fuzz case.
    assume(kind == "vote" or not isinstance(obj, dict))
    fuzz.check_one("pj/%s/up/%s" % (device, kind), payload)


@hsettings(max_examples=300, deadline=None, suppress_health_check=QUIET)
@given(field=st.sampled_from(sorted(GOOD)), value=json_values)
def test_any_changed_field_of_a_signed_vote_is_refused(tmp_path_factory, field, value):
    fuzz = _fuzzed(tmp_path_factory)
    forged = dict(GOOD)
    forged[field] = value
    # Changing the MAC's case only is the same vote, and 1 == 1.0 == True in JSON terms.
    assume(json.dumps(forged, sort_keys=True) != json.dumps(GOOD, sort_keys=True))
    assume(not (field == "mac" and isinstance(value, str) and value.lower() == GOOD["mac"]))
    fuzz.check_one("pj/D0001/up/vote", json.dumps(forged).encode())


@hsettings(max_examples=200, deadline=None, suppress_health_check=QUIET)
@given(cut=st.integers(0, len(codec.encode_vote(GOOD)) - 1))
def test_truncated_votes_are_refused(tmp_path_factory, cut):
    fuzz = _fuzzed(tmp_path_factory)
    fuzz.check_one("pj/D0001/up/vote", codec.encode_vote(GOOD)[:cut])


# -- thousands through a real broker into a running hub --------------------------------------

def _malformed(rng, n):
    """n (topic, payload) pairs, each of which the hub must refuse."""
    other_key = bytes(32)
    out = []
    base = codec.encode_vote(GOOD)
    for i in range(n):
        pick = i % 10
        if pick == 0:
            noise = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200)))
            out.append(("pj/D0001/up/vote", noise))
        elif pick == 1:
            out.append(("pj/D0001/up/vote", base[:rng.randrange(len(base))]))
        elif pick == 2:
            huge = b"{\"pad\":\"" + b"x" * rng.randrange(3000, 120000) + b"\"}"
            out.append(("pj/D0001/up/vote", huge))
        elif pick == 3:
            vote = dict(GOOD, s=rng.randrange(1, 10 ** 6))  # MAC no longer matches
            out.append(("pj/D0001/up/vote", json.dumps(vote).encode()))
        elif pick == 4:
            vote = codec.make_vote(other_key, "D0001", rng.randrange(1, 10 ** 6), 1, "v", "P1", "",
                                   5, [], "", "", "")
            out.append(("pj/D0001/up/vote", codec.encode_vote(vote)))
        elif pick == 5:
            vote = codec.make_vote(KEY, "D%04d" % rng.randrange(3000, 9999), 1, 1, "v", "P1", "",
                                   5, [], "", "", "")
            out.append(("pj/%s/up/vote" % vote["d"], codec.encode_vote(vote)))
        elif pick == 6:
            out.append(("pj/D0001/up/vote", codec.encode_vote(dict(GOOD, d="D0002"))))
        elif pick == 7:
            key = rng.choice(sorted(GOOD))
            wrong_type = dict(GOOD, **{key: [rng.random()]})
            out.append(("pj/D0001/up/vote", json.dumps(wrong_type).encode()))
        elif pick == 8:
            out.append(("pj/D0001/up/%s" % rng.choice(("birth", "hb", "will")),
                        json.dumps({"v": 1, "d": "D0001", "lo": "x", "next": [],
                                    "rssi": "?"}).encode()))
        else:
            out.append(("pj/D0001/up/%s" % rng.choice(("vote", "evt", "x", "")),
                        b"[" * rng.randrange(1, 2000)))
    return out


def test_thousands_of_malformed_uplinks_through_a_running_hub(tmp_path, mosquitto):
    settings = write_default(str(tmp_path / "hub.toml"),
                             broker={"mode": "external", "port": mosquitto.port},
                             http={"port": free_port()},
                             province={"endpoint": "http://127.0.0.1:%d/api/v1" % free_port()})
    keys.ensure_signing_key(settings.signing_key_path)
    store = Store(settings.db_path)
    _registry(store)
    hub = Hub(settings)
    hub.start()
    acks = []
    got_ack = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fuzzer")

    def on_message(c, u, message):
        acks.append(codec.decode_ack(message.payload))
        got_ack.set()

    client.on_message = on_message
    client.connect("127.0.0.1", mosquitto.port)
    client.subscribe("pj/D0001/dn/ack", qos=1)
    client.loop_start()
    try:
        assert hub.ingest.wait_connected()
        cases = _malformed(random.Random(20260101), 2500)
        deadline = time.monotonic() + 120
        for start in range(0, len(cases), 250):
            # Paced in rounds: a plain broker queues at most 1000 messages for a client, and
            # the point here is the count, not the broker's queue.
            for topic, payload in cases[start:start + 250]:
                client.publish(topic, payload, qos=1).wait_for_publish(10)
            while sum(store.rejections().values()) < min(start + 250, len(cases)):
                assert time.monotonic() < deadline, store.rejections()
                time.sleep(0.05)
        rejections = store.rejections()
        assert sum(rejections.values()) == len(cases)
        assert {"bad_json", "schema", "too_large", "bad_mac", "unknown_device",
                "topic_mismatch", "unknown_topic"} <= set(rejections)
        assert store.conn.execute("SELECT count(*) FROM votes").fetchone()[0] == 0
        assert acks == []
        # Still alive and still storing: a good vote is stored and acked.
        client.publish("pj/D0001/up/vote", codec.encode_vote(GOOD), qos=1)
        assert got_ack.wait(20) and acks == [1]
        assert store.vote("D0001", 1)["stars"] == 2
        with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % settings.http.port) as r:
            assert json.loads(r.read())["ok"] is True
        assert hub.ingest.ingestor.internal_errors == 0
    finally:
        client.loop_stop()
        client.disconnect()
        hub.stop()
        store.close()


def teardown_module(module):
    fuzz = _FUZZ.pop("f", None)
    if fuzz is not None:
        fuzz.store.close()
