# The reference provincial receiver over real HTTP and a real SQLite store: signatures, chain,
# idempotent resends, dedupe by voteId, record checks, every fault mode, and `verify`.
import hashlib
import http.client
import json
import os
import socket
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from click.testing import CliRunner

from conftest import free_port, wait_port
from hub import batch as B
from hub.cli import cli
from simulator import province as P

PROFILE = B.load_profile("national")


class Clock:
    """A hand-moved monotonic clock for the fault timer."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Receiver:
    """The receiver on a free loopback port (ThreadedReceiver) plus a small HTTP client."""

    def __init__(self, db_path, trusted, faults=True, clock=None):
        self.db_path = db_path
        self.store = P.ProvinceStore(db_path)
        self.port = free_port()
        self.server = P.ThreadedReceiver(self.store, trusted, port=self.port, faults=faults,
                                         clock=clock or Clock()).start()
        wait_port(self.port)

    def stop(self):
        self.server.stop()
        self.store.close()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def request(self, method, path, body=None, timeout=30):
        data = None if body is None else (body if isinstance(body, bytes) else
                                          json.dumps(body, ensure_ascii=False).encode("utf-8"))
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8")
            return exc.code, (json.loads(text) if text.startswith("{") else text)

    def post(self, batch, **kw):
        return self.request("POST", "/api/v1/batches", batch, **kw)

    def stats(self):
        status, body = self.request("GET", "/api/v1/stats")
        assert status == 200
        return body

    def faults(self, **spec):
        status, body = self.request("POST", "/_control/faults", spec)
        assert status == 200, body
        return body


@pytest.fixture
def key():
    return B.generate_private_key()


@pytest.fixture
def receiver(tmp_path, key):
    rx = Receiver(str(tmp_path / "province.db"), [key.public_key()])
    yield rx
    rx.stop()


def vote(seq, stars=5, kind="v", device="D0001"):
    reasons = ["S01"] if kind == "v" and stars <= 2 else []
    row = dict(device_id=device, seq=seq, t=1767196800 + seq, kind=kind, pid="P%d" % seq,
               case_no="GD2026-%04d" % seq, stars=stars if kind == "v" else 0, reasons=reasons,
               cat_ver="gd-2024.1", window="W01", staff_no="10234", mac="00" * 32)
    prompt = dict(task_code="T001", task_name="户籍迁移", dept_code="11440100MB2C92145X",
                  area_code="440100", staff_name="王芳", kind="ji", n_cases=1)
    return B.map_record(row, prompt, PROFILE)


class Chain:
    """A hub's side of the chain: builds, signs and links batches."""

    def __init__(self, key, hub="hubA"):
        self.key, self.hub, self.n, self.prev = key, hub, 0, B.GENESIS

    def next(self, records):
        self.n += 1
        batch = B.sign_batch(B.make_batch(self.hub, self.n, self.prev, records, "national",
                                          created=1767196800 + self.n), self.key)
        self.prev = B.batch_hash(batch)
        return batch


# ---------------------------------------------------------------- acceptance

def test_accepts_a_signed_batch(receiver, key):
    batch = Chain(key).next([vote(1, 5), vote(2, 1), vote(3, kind="u")])
    status, answer = receiver.post(batch)
    assert status == 200
    assert answer == {"batch_id": "hubA-1", "accepted": ["D0001:1", "D0001:2", "D0001:3"],
                      "duplicate": [], "rejected": []}
    stats = receiver.stats()
    assert (stats["batches"], stats["records"], stats["votes"], stats["unrated"]) == (1, 3, 2, 1)
    assert stats["last_n"] == {"hubA": 1}
    assert stats["duplicates"] == stats["rejected"] == stats["bad_signatures"] == 0
    status, page = receiver.request("GET", "/api/v1/records?after_ms=0")
    assert status == 200 and page["more"] is False
    assert [r["voteId"] for r in page["records"]] == ["D0001:1", "D0001:2", "D0001:3"]
    assert all(isinstance(r["received_at_ms"], int) and r["batch_id"] == "hubA-1"
               for r in page["records"])
    assert page["records"][1]["satisfaction"] == "1" and page["records"][1]["evalDetail"] == "S01"
    assert page["records"][0]["proManager"] == "王芳"
    status, later = receiver.request("GET", "/api/v1/records?after_ms=%d" % page["last_ms"])
    assert later["records"] == []


def test_bad_signature_is_refused_with_401(receiver, key):
    chain = Chain(key)
    batch = chain.next([vote(1, 4)])
    tampered = json.loads(json.dumps(batch))
    tampered["records"][0]["satisfaction"] = "5"
    assert receiver.post(tampered)[0] == 401
    stranger = Chain(B.generate_private_key()).next([vote(1, 4)])
    status, answer = receiver.post(stranger)
    assert status == 401 and answer["error"] == "signature"
    assert receiver.post(dict(batch, sig="AAAA"))[0] == 401
    stats = receiver.stats()
    assert stats["bad_signatures"] == 3 and stats["batches"] == 0 and stats["records"] == 0
    # Nothing moved the chain: the genuine batch 1 is still the one expected.
    assert receiver.post(batch)[0] == 200


def test_malformed_body_is_refused_with_400(receiver, key):
    batch = Chain(key).next([vote(1)])
    for body in (b"{not json", b"\xff\xfe", b"[]", json.dumps({"n": 1}).encode()):
        assert receiver.post(body)[0] == 400
    assert receiver.post(dict(batch, batch_id="other-1"))[0] == 400
    assert receiver.post(dict(batch, n="1"))[0] == 400
    assert receiver.stats()["bad_requests"] == 6


def test_broken_chain_is_refused_with_409(receiver, key):
    chain = Chain(key)
    first, second = chain.next([vote(1)]), chain.next([vote(2)])
    status, answer = receiver.post(second)
    assert status == 409
    assert answer == {"error": "chain", "expected_n": 1, "expected_prev": B.GENESIS}
    assert receiver.post(first)[0] == 200
    # Batch 2 naming the wrong predecessor, even correctly signed.
    wrong_prev = B.sign_batch(B.make_batch("hubA", 2, "f" * 64, [vote(2)], "national"), key)
    status, answer = receiver.post(wrong_prev)
    assert status == 409
    assert answer == {"error": "chain", "expected_n": 2, "expected_prev": B.batch_hash(first)}
    third = chain.next([vote(3)])
    assert receiver.post(third)[0] == 409  # skips batch 2
    assert receiver.post(second)[0] == 200
    assert receiver.post(third)[0] == 200
    stats = receiver.stats()
    assert stats["chain_errors"] == 3 and stats["last_n"] == {"hubA": 3}
    # Chains are per hub: another hub starts at 1 from the genesis hash.
    assert receiver.post(Chain(key, hub="hubB").next([vote(1, device="D0009")]))[0] == 200
    assert receiver.stats()["last_n"] == {"hubA": 3, "hubB": 1}


def test_altered_resend_is_refused_with_409(receiver, key):
    batch = Chain(key).next([vote(1, 5)])
    assert receiver.post(batch)[0] == 200
    other = Chain(key).next([vote(1, 1)])  # same batch id, validly signed, different content
    status, answer = receiver.post(other)
    assert status == 409 and answer["error"] == "altered"
    stats = receiver.stats()
    assert stats["altered"] == 1 and stats["records"] == 1 and stats["resent_batches"] == 0
    status, page = receiver.request("GET", "/api/v1/records")
    assert page["records"][0]["satisfaction"] == "5"


def test_resend_of_an_accepted_batch_is_idempotent(receiver, key):
    batch = Chain(key).next([vote(1), vote(2, 2), vote(3, kind="u")])
    first = receiver.post(batch)
    # A resend may be re-signed (key_id/sig are outside the hash) and re-serialised.
    again = receiver.post(json.loads(json.dumps(batch, indent=2)))
    assert first == again and first[0] == 200
    stats = receiver.stats()
    assert stats["resent_batches"] == 1 and stats["duplicates"] == 0
    assert stats["records"] == 3 and stats["batches"] == 1


def test_duplicate_vote_ids_across_batches_are_counted(receiver, key):
    chain = Chain(key)
    assert receiver.post(chain.next([vote(1), vote(2)]))[0] == 200
    status, answer = receiver.post(chain.next([vote(2), vote(3), vote(3)]))
    assert status == 200
    assert answer["accepted"] == ["D0001:3"]
    assert answer["duplicate"] == ["D0001:2", "D0001:3"]
    stats = receiver.stats()
    assert stats["duplicates"] == 2 and stats["records"] == 3


def test_records_are_checked_one_by_one(receiver, key):
    good = vote(1)
    bad = {
        "D0001:2": dict(vote(2), satisfaction="6"),
        "D0001:3": dict(vote(3), satisfaction=""),
        "D0001:4": dict(vote(4, 1), evalDetail=""),
        "D0001:5": dict(vote(5, kind="u"), satisfaction="3"),
        "D0001:6": dict(vote(6), assessTime="2026-13-01 00:00:00"),
        "D0001:7": {k: v for k, v in vote(7).items() if k != "taskCode"},
        "D0001:8": dict(vote(8), rated=2),
        "D0001:9": dict(vote(9), satisfaction="0"),
    }
    records = [good] + list(bad.values()) + [dict(vote(10), voteId="no colon"), "not a record"]
    status, answer = receiver.post(Chain(key).next(records))
    assert status == 200
    assert answer["accepted"] == ["D0001:1"]
    reasons = {r["id"]: r["reason"] for r in answer["rejected"]}
    assert reasons == {
        "D0001:2": "satisfaction_range", "D0001:3": "satisfaction_required",
        "D0001:4": "evalDetail_required", "D0001:5": "unrated_with_satisfaction",
        "D0001:6": "bad_assessTime", "D0001:7": "missing_taskCode", "D0001:8": "bad_rated",
        "D0001:9": "satisfaction_range", "no colon": "bad_voteId", "#10": "not_object",
    }
    assert receiver.stats()["rejected"] == 10


def test_check_record_accepts_what_map_record_produces():
    for record in (vote(1, 5), vote(2, 3), vote(3, 2), vote(4, 1), vote(5, kind="u")):
        assert P.check_record(record) is None
    assert P.check_record(dict(vote(1), satisfaction=4)) is None


# ---------------------------------------------------------------- records paging

def test_records_pages_never_split_a_millisecond(tmp_path, key):
    now = [5000]
    store = P.ProvinceStore(str(tmp_path / "p.db"), now_ms=lambda: now[0])
    chain = Chain(key)
    for b in range(3):
        batch = chain.next([vote(b * 10 + i) for i in range(1, 5)])
        assert store.accept(batch, B.batch_hash(batch))[0] == 200
        now[0] += 1 if b == 0 else -100  # a wall clock stepping back must not reorder
    seen, after = [], 0
    while True:
        page, more = store.records(after, limit=3)
        seen += [r["voteId"] for r in page]
        after = page[-1]["received_at_ms"] if page else after
        if not more:
            break
    assert seen == ["D0001:%d" % s for s in (1, 2, 3, 4, 11, 12, 13, 14, 21, 22, 23, 24)]
    assert len(set(seen)) == 12
    store.close()


# ---------------------------------------------------------------- fault injection

def test_fault_error_answers_without_storing(receiver, key):
    batch = Chain(key).next([vote(1)])
    receiver.faults(mode="error")
    status, answer = receiver.post(batch)
    assert status == 503 and answer["error"] == "injected"
    receiver.faults(mode="error", status=502)
    assert receiver.post(batch)[0] == 502
    assert receiver.stats()["batches"] == 0
    receiver.faults(mode="ok")
    assert receiver.post(batch)[0] == 200
    assert receiver.stats()["resent_batches"] == 0


def test_fault_timeout_holds_then_answers_504_without_storing(receiver, key):
    batch = Chain(key).next([vote(1)])
    receiver.faults(mode="timeout", delay_ms=600000)
    with pytest.raises((socket.timeout, TimeoutError, urllib.error.URLError)):
        receiver.post(batch, timeout=0.5)
    receiver.faults(mode="timeout", delay_ms=50)
    status, answer = receiver.post(batch)
    assert status == 504
    assert receiver.stats()["batches"] == 0
    receiver.faults(mode="ok")
    assert receiver.post(batch)[0] == 200
    # The request still held above is released when the receiver stops (fixture teardown).


def test_fault_slow_stores_and_answers_late(receiver, key):
    batch = Chain(key).next([vote(1)])
    receiver.faults(mode="slow", delay_ms=200)
    status, answer = receiver.post(batch)
    assert status == 200 and answer["accepted"] == ["D0001:1"]
    assert receiver.stats()["records"] == 1


def test_fault_slow_past_the_client_timeout_still_stores(receiver, key):
    batch = Chain(key).next([vote(1)])
    receiver.faults(mode="slow", delay_ms=600000)
    with pytest.raises((socket.timeout, TimeoutError, urllib.error.URLError)):
        receiver.post(batch, timeout=0.5)
    receiver.faults(mode="ok")
    # The resend finds the batch already stored and gets the same answer.
    status, answer = receiver.post(batch)
    assert status == 200 and answer["accepted"] == ["D0001:1"]
    assert receiver.stats()["resent_batches"] == 1


def test_fault_drop_stores_then_closes_and_resend_is_idempotent(receiver, key):
    chain = Chain(key)
    batch = chain.next([vote(1), vote(2, 1)])
    receiver.faults(mode="drop")
    conn = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=30)
    conn.request("POST", "/api/v1/batches", body=json.dumps(batch).encode(),
                 headers={"Content-Type": "application/json"})
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError,
                        http.client.IncompleteRead, http.client.BadStatusLine)):
        conn.getresponse().read()
    conn.close()
    receiver.faults(mode="ok")
    stats = receiver.stats()
    assert stats["batches"] == 1 and stats["records"] == 2
    status, answer = receiver.post(batch)
    assert status == 200 and answer["accepted"] == ["D0001:1", "D0001:2"]
    assert receiver.post(chain.next([vote(3)]))[0] == 200
    stats = receiver.stats()
    assert stats["resent_batches"] == 1 and stats["duplicates"] == 0 and stats["records"] == 3


def test_fault_reverts_to_ok_after_for_s(tmp_path, key):
    clock = Clock()
    rx = Receiver(str(tmp_path / "p.db"), [key.public_key()], clock=clock)
    try:
        shown = rx.faults(mode="error", status=500, for_s=10)
        assert shown["mode"] == "error" and shown["remaining_s"] == 10
        batch = Chain(key).next([vote(1)])
        assert rx.post(batch)[0] == 500
        clock.now += 9.5
        assert rx.post(batch)[0] == 500
        clock.now += 1
        assert rx.request("GET", "/_control/faults")[1]["mode"] == "ok"
        assert rx.post(batch)[0] == 200
    finally:
        rx.stop()


def test_fault_control_validates_and_exists_only_when_enabled(receiver, tmp_path, key):
    for spec in ({"mode": "explode"}, {"mode": "error", "status": 200}, {"delay_ms": -1},
                 {"mode": "slow", "for_s": 0}, [1]):
        assert receiver.request("POST", "/_control/faults", spec)[0] == 400
    assert receiver.request("GET", "/_control/faults")[1]["mode"] == "ok"
    plain = Receiver(str(tmp_path / "plain.db"), [key.public_key()], faults=False)
    try:
        assert plain.request("GET", "/_control/faults")[0] == 404
        assert plain.request("POST", "/_control/faults", {"mode": "error"})[0] in (404, 405)
    finally:
        plain.stop()


# ---------------------------------------------------------------- trust folder

def test_trust_folder_is_read_again_for_an_unknown_key(tmp_path, key):
    folder = tmp_path / "trust"
    folder.mkdir()
    (folder / "junk.pem").write_text("not a key")
    rx = Receiver(str(tmp_path / "p.db"), P.TrustedKeys.from_files((), [str(folder)]))
    try:
        batch = Chain(key).next([vote(1)])
        assert rx.post(batch)[0] == 401
        (folder / "hubA.pem").write_bytes(B.public_pem(key))
        assert rx.post(batch)[0] == 200
    finally:
        rx.stop()


# ---------------------------------------------------------------- verify

def _fill(tmp_path, key, batches=4):
    db = str(tmp_path / "audit.db")
    store = P.ProvinceStore(db)
    trusted = P.TrustedKeys([key.public_key()])
    store.remember_keys(trusted)
    chain = Chain(key)
    for b in range(batches):
        batch = chain.next([vote(b * 10 + 1), vote(b * 10 + 2, 2)])
        assert store.accept(batch, B.batch_hash(batch))[0] == 200
    store.close()
    return db


def _verify_cli(db, *extra):
    result = CliRunner().invoke(cli, ["province", "verify", "--db", db, *extra])
    return result.exit_code, result.output


def test_verify_passes_an_untouched_store(tmp_path, key):
    db = _fill(tmp_path, key)
    code, output = _verify_cli(db)
    assert code == 0 and output.startswith("OK: 4 batches, 8 records")
    code, output = _verify_cli(db, "--json")
    report = json.loads(output)
    assert code == 0 and report["ok"] and report["problems"] == [] and report["hubs"] == {"hubA": 4}


def test_verify_names_a_deleted_batch(tmp_path, key):
    db = _fill(tmp_path, key)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM batches WHERE batch_id = 'hubA-2'")
    code, output = _verify_cli(db, "--json")
    report = json.loads(output)
    assert code == 1 and not report["ok"]
    assert {(p["problem"], p["batch_id"]) for p in report["problems"]} == {
        ("missing", "hubA-2"), ("record_orphan", "hubA-2")}
    code, text = _verify_cli(db)
    assert code == 1 and "MISSING hubA-2" in text


def test_verify_names_a_deleted_last_batch(tmp_path, key):
    db = _fill(tmp_path, key)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM batches WHERE batch_id = 'hubA-4'")
        conn.execute("DELETE FROM records WHERE batch_id = 'hubA-4'")
    report = json.loads(_verify_cli(db, "--json")[1])
    assert [(p["problem"], p["batch_id"]) for p in report["problems"]] == [("missing", "hubA-4")]


def test_verify_names_an_edited_batch(tmp_path, key):
    db = _fill(tmp_path, key)
    with sqlite3.connect(db) as conn:
        body, = conn.execute("SELECT body FROM batches WHERE batch_id = 'hubA-3'").fetchone()
        assert '"satisfaction":"2"' in body
        conn.execute("UPDATE batches SET body = ? WHERE batch_id = 'hubA-3'",
                     (body.replace('"satisfaction":"2"', '"satisfaction":"5"'),))
    code, output = _verify_cli(db, "--json")
    report = json.loads(output)
    assert code == 1
    # The edit is pinned on batch 3; batch 4 naming the old hash is not blamed for it.
    assert [(p["problem"], p["batch_id"]) for p in report["problems"] if "voteId" not in p] == [
        ("altered", "hubA-3")]
    # Batch 3's stored records now differ from its (edited) body.
    assert any(p["problem"] == "record_altered" and p["voteId"] == "D0001:22"
               for p in report["problems"])


def test_verify_names_an_edit_that_also_fixes_the_hash(tmp_path, key):
    db = _fill(tmp_path, key)
    with sqlite3.connect(db) as conn:
        body, = conn.execute("SELECT body FROM batches WHERE batch_id = 'hubA-1'").fetchone()
        edited = body.replace('"proManager":"王芳"', '"proManager":"李四"')
        conn.execute("UPDATE batches SET body = ?, hash = ? WHERE batch_id = 'hubA-1'",
                     (edited, hashlib.sha256(edited.encode()).hexdigest()))
    report = json.loads(_verify_cli(db, "--json")[1])
    assert ("altered", "hubA-1", "signature does not verify") in {
        (p["problem"], p["batch_id"], p["detail"]) for p in report["problems"]}


def test_verify_names_an_edited_record(tmp_path, key):
    db = _fill(tmp_path, key)
    with sqlite3.connect(db) as conn:
        fields, = conn.execute("SELECT fields FROM records WHERE vote_id = 'D0001:12'").fetchone()
        record = json.loads(fields)
        record["satisfaction"] = "5"
        conn.execute("UPDATE records SET fields = ?, satisfaction = 5 WHERE vote_id = 'D0001:12'",
                     (json.dumps(record),))
        conn.execute("DELETE FROM records WHERE vote_id = 'D0001:31'")
    report = json.loads(_verify_cli(db, "--json")[1])
    assert {(p["problem"], p["batch_id"], p["voteId"]) for p in report["problems"]} == {
        ("record_altered", "hubA-2", "D0001:12"), ("record_missing", "hubA-4", "D0001:31")}


def test_verify_with_an_outside_key_catches_a_swapped_key_list(tmp_path, key):
    db = _fill(tmp_path, key)
    outsider = B.generate_private_key()
    pem = tmp_path / "other.pem"
    pem.write_bytes(B.public_pem(outsider))
    code, output = _verify_cli(db, "--trust", str(pem), "--json")
    report = json.loads(output)
    assert code == 1 and {p["problem"] for p in report["problems"]} == {"altered"}
    assert all("not trusted" in p["detail"] for p in report["problems"])
    good = tmp_path / "hub.pem"
    good.write_bytes(B.public_pem(key))
    assert _verify_cli(db, "--trust", str(good))[0] == 0


# ---------------------------------------------------------------- the command line

def test_serve_and_stats_commands(tmp_path, key):
    pem = tmp_path / "hub.pem"
    pem.write_bytes(B.public_pem(key))
    port = free_port()
    db = str(tmp_path / "served.db")
    run = [sys.executable, "-c", "from hub.cli import main; main()"]
    proc = subprocess.Popen(run + ["province", "serve", "--port", str(port), "--db", db,
                                   "--trust", str(pem)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        wait_port(port)
        batch = Chain(key).next([vote(1), vote(2, kind="u")])
        req = urllib.request.Request("http://127.0.0.1:%d/api/v1/batches" % port,
                                     data=json.dumps(batch).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as response:
            assert json.loads(response.read())["accepted"] == ["D0001:1", "D0001:2"]
        # Faults were not enabled on the command line.
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen("http://127.0.0.1:%d/_control/faults" % port, timeout=30)
        out = subprocess.run(run + ["province", "stats", "--url", "http://127.0.0.1:%d" % port,
                                    "--json"], capture_output=True, text=True, timeout=60)
        stats = json.loads(out.stdout)
        assert out.returncode == 0 and stats["votes"] == 1 and stats["unrated"] == 1
        out = subprocess.run(run + ["province", "stats", "--url", "http://127.0.0.1:%d" % port],
                             capture_output=True, text=True, timeout=60)
        assert "votes:" in out.stdout and "hubA:" in out.stdout
    finally:
        proc.terminate()
        proc.wait(30)
    assert "province receiver on http://127.0.0.1:%d" % port in proc.stderr.read().decode()
    proc.stderr.close()
    assert _verify_cli(db)[0] == 0


def test_cli_errors_are_one_line(tmp_path):
    run = [sys.executable, "-c", "from hub.cli import main; main()"]
    out = subprocess.run(run + ["province", "serve", "--db", str(tmp_path / "x.db")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--trust" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run(run + ["province", "stats", "--url", "http://127.0.0.1:%d" % free_port()],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.startswith("error: ")
    assert "Traceback" not in out.stderr


def test_threaded_receiver_reports_a_busy_port(tmp_path, key):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        store = P.ProvinceStore(str(tmp_path / "busy.db"))
        server = P.ThreadedReceiver(store, [key.public_key()], port=taken.getsockname()[1])
        with pytest.raises(P.ProvinceError):
            server.start()
        server.stop()
        store.close()
