# Forwarding to the province: signed, chained batches persisted before sending, the same
# bytes resent after a crash, votes marked forwarded only on the province's word, outages
# drained by themselves, and a broken chain stops the line. Against the reference receiver.
import json
import os
import socket
import sqlite3
import time
import urllib.request

import pytest

from firmware.evaluator import codec
from hub import batch as batchlib
from hub.forward import Forwarder, ProvinceUnreachable, backoff_s, http_post
from hub.ingest import Ingestor, Uplink
from hub.store import Store
from simulator.province import ProvinceStore, ThreadedReceiver, verify_store

KEY = bytes(range(32))


def free_port():
    # Local, not from conftest: with tests/core/ collected too, "conftest" is ambiguous.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



class Province:
    """The reference receiver (ThreadedReceiver) on a loopback port, with faults enabled."""

    def __init__(self, folder, public_key, port=None):
        self.port = port or free_port()
        self.db_path = os.path.join(folder, "province.db")
        self.public_key = public_key
        self.url = "http://127.0.0.1:%d/api/v1" % self.port
        self.receiver = None
        self.store = None

    def start(self):
        self.store = ProvinceStore(self.db_path)
        self.receiver = ThreadedReceiver(self.store, [self.public_key], port=self.port,
                                         faults=True).start()

    def stop(self):
        if self.receiver is not None:
            self.receiver.stop()
            self.store.close()
            self.receiver = None

    def fault(self, **spec):
        request = urllib.request.Request(self.url.replace("/api/v1", "/_control/faults"),
                                         data=json.dumps(spec).encode(), method="POST")
        urllib.request.urlopen(request, timeout=5).read()

    def stats(self):
        with urllib.request.urlopen(self.url + "/stats", timeout=5) as response:
            return json.loads(response.read())

    def vote_ids(self):
        conn = sqlite3.connect(self.db_path)
        ids = [r[0] for r in conn.execute("SELECT vote_id FROM records")]
        conn.close()
        return ids

    def verify(self):
        store = ProvinceStore(self.db_path)
        try:
            return verify_store(store)
        finally:
            store.close()


@pytest.fixture
def signing_key():
    return batchlib.generate_private_key()


@pytest.fixture
def province(tmp_path, signing_key):
    p = Province(str(tmp_path), signing_key.public_key())
    p.start()
    yield p
    p.stop()


class Hall:
    """A hub store with one device and a way to add votes through the real ingest path."""

    def __init__(self, db_path):
        self.store = Store(db_path)
        self.store.conn.execute(
            "INSERT INTO devices (device_id, key_hex, window, label, created_at, retired) "
            "VALUES ('D0001', ?, 'W01', '', 'x', 0)", (KEY.hex(),))
        self.ingest = Ingestor(self.store)
        self.seq = 0

    def votes(self, n, stars=5):
        ups = []
        for _ in range(n):
            self.seq += 1
            vote = codec.make_vote(KEY, "D0001", self.seq, 1763712000 + self.seq,
                                   "v" if stars else "u", "P%d" % self.seq, "C-%d" % self.seq,
                                   stars, ["S01"] if 0 < stars <= 2 else [], "nat-1", "W01", "7")
            ups.append(Uplink("pj/D0001/up/vote", codec.encode_vote(vote), 0, 1, 0))
        assert self.ingest.handle_group(ups).stored == n

    def forwarded(self):
        return self.store.conn.execute(
            "SELECT count(*) FROM votes WHERE forwarded_at IS NOT NULL").fetchone()[0]


@pytest.fixture
def hall(tmp_path):
    h = Hall(str(tmp_path / "hub.db"))
    yield h
    h.store.close()


def _forwarder(hall, province, key, **kw):
    kw.setdefault("batch_max", 10)
    kw.setdefault("batch_interval_ms", 0)
    kw.setdefault("retry_max_s", 0.2)
    kw.setdefault("timeout_s", 5.0)
    return Forwarder(hall.store.path, "hall-1", province.url, key, **kw)


def _drive(forwarder, until, limit=200):
    """Step the forwarder (sleeping its pauses) until until() holds."""
    for _ in range(limit):
        if until():
            return True
        pause = forwarder.step()
        if pause:
            time.sleep(min(pause, 0.25))
    return until()


def test_batches_are_signed_chained_and_every_vote_lands_once(hall, province, signing_key):
    hall.votes(23)
    hall.votes(2, stars=0)   # unrated records travel too
    hall.votes(3, stars=1)   # bad ratings with a reason
    fw = _forwarder(hall, province, signing_key)
    assert _drive(fw, lambda: hall.forwarded() == 28)
    batches = hall.store.conn.execute("SELECT n, batch_id, prev, hash, body FROM batches "
                                      "ORDER BY n").fetchall()
    assert [b[0] for b in batches] == [1, 2, 3]
    prev = batchlib.GENESIS
    for n, batch_id, stored_prev, digest, body in batches:
        signed = json.loads(body)
        assert batch_id == "hall-1-%d" % n and signed["prev"] == stored_prev == prev
        assert batchlib.verify_batch(signed, signing_key.public_key())
        assert batchlib.batch_hash(signed) == digest
        prev = digest
    assert sorted(province.vote_ids()) == sorted("D0001:%d" % s for s in range(1, 29))
    assert province.verify()["ok"]
    stats = province.stats()
    assert stats["duplicates"] == 0 and stats["unrated"] == 2
    status = hall.store.status()
    assert status["backlog"]["unforwarded"] == 0 and status["province"]["last_success"]
    fw.stop()


def test_batch_is_persisted_before_it_is_sent(hall, province, signing_key):
    hall.votes(5)
    seen = []

    def post(url, body, timeout, headers=None):
        # At the moment of sending, the batch and its votes are already on disk.
        conn = sqlite3.connect(hall.store.path)
        seen.append((conn.execute("SELECT body FROM batches WHERE n = 1").fetchone()[0],
                     conn.execute("SELECT count(*) FROM votes WHERE batch_n = 1").fetchone()[0]))
        conn.close()
        return http_post(url, body, timeout, headers)

    fw = _forwarder(hall, province, signing_key, post=post)
    assert _drive(fw, lambda: hall.forwarded() == 5)
    assert seen and seen[0][1] == 5 and json.loads(seen[0][0])["n"] == 1
    fw.stop()


def test_after_a_crash_the_same_batch_is_resent_byte_for_byte(hall, province, signing_key):
    hall.votes(4)
    sent = []

    def post_then_lose_answer(url, body, timeout, headers=None):
        sent.append(body)
        http_post(url, body, timeout, headers)  # the province stores it ...
        raise ProvinceUnreachable("connection reset")  # ... and the answer is lost

    crashed = _forwarder(hall, province, signing_key, post=post_then_lose_answer)
    assert crashed.build() == 1
    crashed.step()
    crashed.stop()                         # the hub dies here
    hall.votes(3)                          # more votes arrive meanwhile
    restarted = _forwarder(hall, province, signing_key,
                           post=lambda u, b, t, h=None: (sent.append(b), http_post(u, b, t, h))[1])
    restarted.step()                       # the first thing it does: resend batch 1
    assert sent[0] == sent[1]
    assert hall.store.batch(1)["accepted_at"] is not None
    assert _drive(restarted, lambda: hall.forwarded() == 7)
    stats = province.stats()
    assert stats["resent_batches"] == 1 and stats["duplicates"] == 0 and stats["records"] == 7
    assert sorted(province.vote_ids()) == sorted("D0001:%d" % s for s in range(1, 8))
    restarted.stop()


def test_outage_grows_the_backlog_and_it_drains_by_itself(hall, province, signing_key):
    fw = _forwarder(hall, province, signing_key, batch_interval_ms=50)
    fw.start()
    try:
        hall.votes(5)
        province.fault(mode="error", status=503)
        deadline = time.monotonic() + 20
        while hall.store.status()["province"]["pending_attempts"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        hall.votes(30)                     # the hall keeps rating during the outage
        status = hall.store.status()
        assert status["backlog"]["unforwarded"] == 35
        assert status["backlog"]["unaccepted_batches"] == 1   # one in flight, never more
        assert "503" in status["province"]["last_error"]
        assert hall.forwarded() == 0
        province.fault(mode="ok")
        deadline = time.monotonic() + 30
        while hall.forwarded() < 35:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        fw.stop()
    assert sorted(province.vote_ids()) == sorted("D0001:%d" % s for s in range(1, 36))
    assert province.stats()["duplicates"] == 0
    assert hall.store.status()["backlog"] == {"unacked": 0, "unforwarded": 0, "unbatched": 0,
                                              "unaccepted_batches": 0}


def test_province_down_then_back_on_the_same_port(hall, province, signing_key, tmp_path):
    province.stop()
    hall.votes(12)
    fw = _forwarder(hall, province, signing_key)
    for _ in range(3):
        fw.step()
    assert hall.forwarded() == 0
    assert "unreachable" in hall.store.batch(1)["last_error"]
    back = Province(str(tmp_path), signing_key.public_key(), port=province.port)
    back.start()
    try:
        assert _drive(fw, lambda: hall.forwarded() == 12)
        assert back.stats()["records"] == 12 and back.stats()["duplicates"] == 0
    finally:
        fw.stop()
        back.stop()


def test_chain_refusal_stops_new_batches_and_shows_in_status(hall, province, signing_key):
    hall.votes(3)
    # This hub believes batch 1 was accepted long ago; the province has never seen it.
    hall.store.conn.execute("INSERT INTO batches (n, batch_id, prev, hash, body, records,"
                            " created_at, sent_attempts, accepted_at) VALUES (1, 'hall-1-1', ?,"
                            " ?, '{}', 0, 'x', 1, 'x')", (batchlib.GENESIS, "ab" * 32))
    fw = _forwarder(hall, province, signing_key, retry_max_s=0.05)
    assert fw.build() == 2
    assert not fw.send(hall.store.first_unaccepted_batch())
    hall.votes(20)
    for _ in range(5):
        time.sleep(fw.step())
    status = hall.store.status()
    assert status["province"]["chain_error"]["batch_id"] == "hall-1-2"
    assert status["province"]["chain_error"]["answer"]["error"] == "chain"
    assert status["counters"]["chain_errors"] == 1
    count = hall.store.conn.execute("SELECT count(*) FROM batches").fetchone()[0]
    assert count == 2                      # nothing built on top of the refused batch
    assert hall.forwarded() == 0 and province.stats()["records"] == 0
    fw.stop()


def test_records_the_province_refuses_are_flagged_and_counted(hall, province, signing_key):
    hall.votes(3)

    def post(url, body, timeout, headers=None):
        batch = json.loads(body)
        ids = [r["voteId"] for r in batch["records"]]
        return 200, {"batch_id": batch["batch_id"], "accepted": ids[:1], "duplicate": ids[1:2],
                     "rejected": [{"id": ids[2], "reason": "bad_taskCode"}]}

    fw = _forwarder(hall, province, signing_key, post=post)
    fw.build()
    assert fw.step() == 0
    assert hall.forwarded() == 2
    assert hall.store.vote("D0001", 3)["flags"] == "province_rejected:bad_taskCode"
    status = hall.store.status()
    assert status["rejections"] == {"province_rejected": 1}
    assert status["province"]["refused_records"] == 1
    assert status["backlog"]["unforwarded"] == 0 and status["backlog"]["unaccepted_batches"] == 0
    fw.stop()


def test_unmappable_votes_are_held_back_and_counted(hall, province, signing_key, tmp_path):
    profile = batchlib.load_profile("national")
    profile["indicators"] = {"unknown": "reject", "codes": {"S02": "0201"}}
    path = tmp_path / "strict.json"
    path.write_text(json.dumps(profile))
    hall.votes(2)
    hall.votes(1, stars=2)                 # reason S01 has no provincial code here
    fw = _forwarder(hall, province, signing_key, profile_name=str(path))
    assert _drive(fw, lambda: hall.forwarded() == 2)
    assert hall.store.vote("D0001", 3)["flags"] == "unmappable"
    status = hall.store.status()
    assert status["rejections"] == {"unmappable": 1}
    assert status["province"]["held_records"] == 1
    assert status["backlog"]["unbatched"] == 0
    fw.stop()


def test_backoff_grows_with_jitter_and_is_capped():
    lows = [backoff_s(a, 60, rng=lambda: 0.0) for a in range(1, 12)]
    highs = [backoff_s(a, 60, rng=lambda: 1.0) for a in range(1, 12)]
    assert lows == sorted(lows) and highs == sorted(highs)
    assert highs[0] == 0.5 and highs[-1] == 60 and lows[-1] == 30
    assert all(lo < hi for lo, hi in zip(lows, highs))
