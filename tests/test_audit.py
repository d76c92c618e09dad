# The audit trail nobody can quietly change: a hall's votes go through the real ingest and
# forwarder to the reference receiver (with a key rotation half-way), then deleting or editing
# any stored batch, on the hub's side or the province's, is detected and named by verify;
# and hall statistics computed from the stored votes are reproduced from the chain alone.
import csv
import hashlib
import io
import json
import os
import sqlite3
import time

import pytest
from click.testing import CliRunner

from conftest import free_port, wait_port
from firmware.evaluator import codec
from hub import audit as A
from hub import batch as B
from hub import keys as K
from hub import policy
from hub.cli import cli
from hub.forward import Forwarder
from hub.ingest import Ingestor, Uplink
from hub.settings import write_default
from hub.store import Store
from simulator import province as P

# One hall built once per module: keep its tests on one xdist worker.
pytestmark = pytest.mark.xdist_group("audit_trail")

T0 = 1767225600          # 2026-01-01 08:00:00 +08:00
DAY = 86400
DEVICES = {"D0001": (bytes(range(32)), "W01", "10234", "李晓𪚥"),
           "D0002": (bytes(range(1, 33)), "W02", "10235", "王芳")}
ITEMS = [("T-REG", "不动产登记𠀾", "DEPT-A"), ("T-HUK", "户籍迁移", "DEPT-B")]
# (device, stars or 0 for unrated, reasons, item index, seconds after T0)
PLAN_1 = [("D0001", 5, [], 0, 0), ("D0001", 4, [], 1, 60), ("D0002", 5, [], 0, 120),
          ("D0002", 2, ["S01"], 1, 180), ("D0001", 0, [], 0, 240), ("D0001", 3, [], 0, 300),
          ("D0002", 1, ["I02", "S04"], 0, 360), ("D0002", 5, [], 1, 420)]
PLAN_2 = [("D0001", 5, [], 1, 5 * DAY), ("D0002", 0, [], 1, 5 * DAY + 60),
          ("D0001", 2, ["I01"], 1, 5 * DAY + 120), ("D0002", 4, [], 0, 5 * DAY + 180),
          ("D0001", 5, [], 0, 5 * DAY + 240)]


def _copy_db(src, dst):
    source, target = sqlite3.connect(src), sqlite3.connect(dst)
    source.backup(target)
    source.close()
    target.close()


class Hall:
    """A hub folder: settings, signing key, store with two devices and their prompts."""

    def __init__(self, folder, endpoint):
        self.settings = write_default(os.path.join(folder, "hub.toml"), hub={"id": "hall-a"},
                                      province={"endpoint": endpoint})
        self.key = K.generate_signing_key(self.settings.signing_key_path)
        self.first_public = self.key.public_key()
        self.store = Store(self.settings.db_path)
        for device, (key, window, _, _) in DEVICES.items():
            self.store.conn.execute(
                "INSERT INTO devices (device_id, key_hex, window, label, created_at, retired) "
                "VALUES (?, ?, ?, '', 'x', 0)", (device, key.hex(), window))
        self.ingest = Ingestor(self.store)
        self.seq = {d: 0 for d in DEVICES}

    def votes(self, plan):
        ups = []
        for device, stars, reasons, item, dt in plan:
            key, window, staff_no, staff_name = DEVICES[device]
            task_code, task_name, dept = ITEMS[item]
            self.seq[device] += 1
            seq = self.seq[device]
            with self.store.transaction():
                pid = self.store.create_prompt(device, window, "C-%s-%d" % (device, seq),
                                               task_code, task_name, dept, "ji", 1, staff_no,
                                               staff_name)
            vote = codec.make_vote(key, device, seq, T0 + dt, "v" if stars else "u", pid,
                                   "C-%s-%d" % (device, seq), stars, reasons, "nat-2024.1",
                                   window, staff_no)
            ups.append(Uplink("pj/%s/up/vote" % device, codec.encode_vote(vote), 0, 1, 0))
        assert self.ingest.handle_group(ups).stored == len(plan)

    def forward(self, url):
        fw = Forwarder(self.settings.db_path, "hall-a", url, self.key, batch_max=3,
                       batch_interval_ms=0, retry_max_s=0.2, timeout_s=10)
        try:
            for _ in range(100):
                status = self.store.status()
                if status["backlog"]["unforwarded"] == 0:
                    return
                pause = fw.step()
                if pause:
                    time.sleep(min(pause, 0.1))
            raise AssertionError("forwarder did not drain: %s" % self.store.status())
        finally:
            fw.stop()


@pytest.fixture(scope="module")
def trail(tmp_path_factory):
    """One hall forwarded to the province: 3 batches under Ed25519, a rotation to SM2, then
    2 more batches. Tests copy the two databases before breaking them."""
    folder = str(tmp_path_factory.mktemp("trail"))
    port = free_port()
    url = "http://127.0.0.1:%d/api/v1" % port
    hall = Hall(folder, url)
    province_db = os.path.join(folder, "province.db")
    store = P.ProvinceStore(province_db)
    receiver = P.ThreadedReceiver(store, [hall.first_public], port=port).start()
    wait_port(port)
    try:
        hall.votes(PLAN_1)
        hall.forward(url)
        K.rotate_signing_key(hall.settings.signing_key_path, "hall-a", scheme="sm2-sm3")
        hall.votes(PLAN_2)
        hall.forward(url)
    finally:
        receiver.stop()
        store.close()
    hall.store.close()
    return {"folder": folder, "hub_db": hall.settings.db_path, "province_db": province_db,
            "settings": hall.settings, "first_public": hall.first_public}


def _hub_report(db_path, trail, trusted=None):
    store = Store(db_path)
    try:
        if trusted is None:
            trusted = K.keyring_public_keys(trail["settings"].signing_key_path)
        return A.verify_hub(store, "hall-a", trusted)
    finally:
        store.close()


def _province_report(db_path, trusted):
    store = P.ProvinceStore(db_path)
    try:
        return P.verify_store(store, trusted)
    finally:
        store.close()


def _named(report):
    return sorted({(p["problem"], p["batch_id"]) for p in report["problems"]})


def test_the_chain_spans_the_rotation_and_verifies_on_both_sides(trail):
    conn = sqlite3.connect(trail["hub_db"])
    bodies = [json.loads(b) for (b,) in conn.execute("SELECT body FROM batches ORDER BY n")]
    conn.close()
    assert len(bodies) == 5
    assert [b["alg"] for b in bodies] == ["ed25519"] * 3 + ["sm2-sm3"] * 2
    assert all("rotations" in b for b in bodies[3:]) and "rotations" not in bodies[0]
    report = _hub_report(trail["hub_db"], trail)
    assert report["ok"], report["problems"]
    assert (report["batches"], report["records"]) == (5, 13)
    # Trusting only the first key from outside: the rotation statement in the chain
    # vouches for the second.
    only_first = {B.key_id(trail["first_public"]): trail["first_public"]}
    assert _hub_report(trail["hub_db"], trail, only_first)["ok"]
    # The province was given the first key only and learned the SM2 key from the chain.
    report = _province_report(trail["province_db"], None)
    assert report["ok"], report["problems"]
    assert report["batches"] == 5 and report["records"] == 13


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_deleting_or_editing_any_hub_batch_is_named(trail, tmp_path, n):
    batch_id = "hall-a-%d" % n
    path = str(tmp_path / "hub.db")
    _copy_db(trail["hub_db"], path)
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM batches WHERE n = ?", (n,))
    conn.commit()
    report = _hub_report(path, trail)
    assert _named(report) == [("missing", batch_id)]
    assert "stored votes name it" in report["problems"][0]["detail"]
    # Editing the signed body (one record's satisfaction), even recomputing the hash column
    # as a careful forger would, is named as that batch and nothing else.
    _copy_db(trail["hub_db"], path)
    conn = sqlite3.connect(path)
    body = json.loads(conn.execute("SELECT body FROM batches WHERE n = ?", (n,)).fetchone()[0])
    record = body["records"][0]
    record["satisfaction"] = "5" if record["satisfaction"] != "5" else "4"
    if record["rated"] == 0:
        record.update(rated=1, satisfaction="5")
    conn.execute("UPDATE batches SET body = ? WHERE n = ?", (json.dumps(body), n))
    conn.commit()
    report = _hub_report(path, trail)
    assert {b for _, b in _named(report)} == {batch_id}
    assert ("altered", batch_id) in _named(report)
    conn.execute("UPDATE batches SET hash = ? WHERE n = ?", (B.batch_hash(body), n))
    conn.commit()
    report = _hub_report(path, trail)
    assert ("altered", batch_id) in _named(report) and {b for _, b in _named(report)} == \
        {batch_id}
    assert any(p["detail"] == "signature does not verify" for p in report["problems"])
    conn.close()


def test_editing_the_chain_links_or_the_last_batch_is_named(trail, tmp_path):
    path = str(tmp_path / "hub.db")
    _copy_db(trail["hub_db"], path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE batches SET prev = ? WHERE n = 3", ("a" * 64,))
    conn.commit()
    assert _named(_hub_report(path, trail)) == [("altered", "hall-a-3")]
    _copy_db(trail["hub_db"], path)
    conn = sqlite3.connect(path)
    # The tail cut off: the votes that named batch 5 still say so.
    conn.execute("DELETE FROM batches WHERE n = 5")
    conn.commit()
    assert _named(_hub_report(path, trail)) == [("missing", "hall-a-5")]
    conn.close()


def test_editing_moving_or_deleting_a_vote_is_named(trail, tmp_path):
    path = str(tmp_path / "hub.db")
    _copy_db(trail["hub_db"], path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE votes SET stars = 1, reasons = 'S01' WHERE device_id = 'D0001' "
                 "AND seq = 1")
    conn.execute("DELETE FROM votes WHERE device_id = 'D0002' AND seq = 2")
    moved_from = conn.execute("SELECT batch_n FROM votes WHERE device_id = 'D0001' "
                              "AND seq = 3").fetchone()[0]
    conn.execute("UPDATE votes SET batch_n = 5 WHERE device_id = 'D0001' AND seq = 3")
    conn.execute("UPDATE votes SET staff_no = '99999' WHERE device_id = 'D0002' AND seq = 3")
    conn.commit()
    conn.close()
    report = _hub_report(path, trail)
    found = {(p["problem"], p.get("voteId")) for p in report["problems"]}
    assert found == {("record_altered", "D0001:1"), ("record_deleted", "D0002:2"),
                     ("record_missing", "D0001:3"), ("record_moved", "D0001:3"),
                     ("record_altered", "D0002:3")}
    details = {p.get("voteId") + p["problem"]: p for p in report["problems"]}
    assert "satisfaction" in details["D0001:1record_altered"]["detail"]
    assert "proManagerNo" in details["D0002:3record_altered"]["detail"]
    assert details["D0001:3record_moved"]["batch_id"] == "hall-a-%d" % moved_from


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_deleting_or_editing_any_province_batch_is_named(trail, tmp_path, n):
    batch_id = "hall-a-%d" % n
    path = str(tmp_path / "province.db")
    _copy_db(trail["province_db"], path)
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))
    conn.commit()
    report = _province_report(path, None)
    assert ("missing", batch_id) in _named(report)
    assert {p["batch_id"] for p in report["problems"]} == {batch_id}   # its orphaned records
    _copy_db(trail["province_db"], path)
    conn = sqlite3.connect(path)
    body = json.loads(conn.execute("SELECT body FROM batches WHERE batch_id = ?",
                                   (batch_id,)).fetchone()[0])
    body["created"] = "2000-01-01T00:00:00Z"
    text = B.canonical(body).decode("utf-8")
    conn.execute("UPDATE batches SET body = ?, hash = ? WHERE batch_id = ?",
                 (text, hashlib.sha256(text.encode()).hexdigest(), batch_id))
    conn.commit()
    conn.close()
    report = _province_report(path, None)
    assert _named(report) == [("altered", batch_id)]
    # The key table is no shortcut: verify with the first hub key given from outside.
    assert _province_report(path, [trail["first_public"]])["problems"][0]["batch_id"] == batch_id


# ---------------------------------------------------------------- statistics

def _services(trail):
    store = Store(trail["hub_db"])
    try:
        return (A.services_from_votes(store), A.services_from_votes(store, "chained"),
                A.services_from_chain(store, A.device_windows(store)))
    finally:
        store.close()


def test_statistics_from_the_votes_are_reproduced_from_the_chain(trail):
    stored, chained, chain = _services(trail)
    rules = policy.load("national")            # 7 natural days -> 基本满意
    assert len(stored) == len(chained) == len(chain) == 13
    for at in (T0 + DAY, T0 + 30 * DAY):
        from_votes = A.hall_stats(stored, rules, "hall-a", at)
        assert from_votes == A.hall_stats(chain, rules, "hall-a", at)
        assert A.stats_csv(from_votes) == A.stats_csv(A.hall_stats(chain, rules, "hall-a", at))
    rows = {(r["dimension"], r["key"]): r for r in A.hall_stats(stored, rules, "hall-a",
                                                                T0 + 6 * DAY)}
    hall = rows[("hall", "hall-a")]
    assert (hall["votes"], hall["good"], hall["bad"]) == (11, 8, 3)
    assert [hall["level_%d" % s] for s in (5, 4, 3, 2, 1)] == [5, 2, 1, 2, 1]
    assert hall["good_rate"] == round(8 / 11, 4)
    # One unrated service is 6 days old at T0 + 6 days (not yet 7), one is one day old.
    assert (hall["unrated"], hall["default_rated"]) == (2, 0)
    later = {(r["dimension"], r["key"]): r for r in A.hall_stats(stored, rules, "hall-a",
                                                                 T0 + 7 * DAY + 300)}
    assert (later[("hall", "hall-a")]["unrated"], later[("hall", "hall-a")]["default_rated"]) \
        == (1, 1)
    assert later[("hall", "hall-a")]["good_rate_with_default"] == round(9 / 12, 4)
    # Tai'an counts working days (New Year holidays included) and defaults to 满意.
    taian = {(r["dimension"], r["key"]): r for r in A.hall_stats(
        stored, policy.load("taian"), "hall-a", T0 + 7 * DAY + 300)}[("hall", "hall-a")]
    assert (taian["unrated"], taian["default_rated"], taian["default_stars"]) == (2, 0, 4)
    assert A.hall_stats(stored, None, "hall-a", T0 + 99 * DAY)[0]["default_rated"] == 0
    w1 = rows[("window", "W01")]
    assert (w1["votes"], w1["good"], w1["bad"], w1["unrated"]) == (6, 5, 1, 1)
    staff = rows[("staff", "10235")]
    assert staff["name"] == "王芳" and staff["votes"] == 5 and staff["good"] == 3
    item = rows[("item", "T-REG")]
    assert item["name"] == "不动产登记𠀾" and item["votes"] == 6
    assert rows[("department", "DEPT-B")]["votes"] == 5


def test_a_default_rating_the_hall_applied_counts_once_as_default_rated():
    def service(device, case, rated, stars=None, t=T0):
        return {"vote_id": device + ":1", "hall_default": device.endswith(".default"),
                "device": device, "case_no": case, "rated": rated, "stars": stars, "t": t,
                "window": "W01", "staff_no": "7", "staff_name": "", "task_code": "T",
                "task_name": "", "dept_code": "D"}

    services = [service("D0001", "C1", False),                      # walked away
                service("D0001.default", "C1", True, 4, T0 + 5 * DAY),  # the hall's default
                service("D0001", "C2", False, t=T0 + 20 * DAY),         # still pending
                service("D0001", "C3", True, 2)]
    hall = A.hall_stats(services, policy.load("taian"), "h", T0 + 21 * DAY)[0]
    assert (hall["votes"], hall["bad"], hall["unrated"], hall["default_rated"]) == (1, 1, 1, 1)
    assert hall["good_rate_with_default"] == 0.5


def test_stats_command_writes_csv_from_votes_and_from_the_chain(trail, tmp_path):
    env = {"PINGJIA_CONFIG": trail["settings"].source}
    runner = CliRunner()
    out = {}
    for source in ("votes", "chain"):
        result = runner.invoke(cli, ["hub", "stats", "--from", source, "--csv",
                                     "--at", "2026-01-09T00:00:00Z"], env=env,
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
        out[source] = result.output
    assert out["votes"] == out["chain"]
    rows = list(csv.DictReader(io.StringIO(out["votes"])))
    assert list(rows[0]) == list(A.CSV_COLUMNS)
    hall = [r for r in rows if r["dimension"] == "hall"][0]
    assert (hall["votes"], hall["good_rate"], hall["default_rated"]) == ("11", "0.7273", "1")
    target = tmp_path / "stats.json"
    result = runner.invoke(cli, ["hub", "stats", "--json", "--by", "window", "--output",
                                 str(target)], env=env, catch_exceptions=False)
    assert result.exit_code == 0
    assert {r["key"] for r in json.loads(target.read_text())} == {"W01", "W02"}
    result = runner.invoke(cli, ["hub", "stats", "--by", "floor"], env=env)
    assert result.exit_code != 0


def test_verify_command_reports_ok_and_names_a_deleted_batch(trail, tmp_path):
    env = {"PINGJIA_CONFIG": trail["settings"].source}
    result = CliRunner().invoke(cli, ["hub", "verify"], env=env, catch_exceptions=False)
    assert result.exit_code == 0 and result.output.startswith("OK: 5 batches, 13 records")
    # The same hub folder with batch 2 gone (the settings point at the copy's folder).
    folder = tmp_path / "copy"
    settings = write_default(str(folder / "hub.toml"), hub={"id": "hall-a"})
    os.makedirs(os.path.dirname(settings.db_path), exist_ok=True)
    _copy_db(trail["hub_db"], settings.db_path)
    keys_dir = os.path.dirname(settings.signing_key_path)
    os.makedirs(keys_dir, exist_ok=True)
    for name in (K.KEYRING_NAME, os.path.basename(trail["settings"].signing_key_path)):
        with open(os.path.join(os.path.dirname(trail["settings"].signing_key_path), name),
                  "rb") as f:
            data = f.read()
        with open(os.path.join(keys_dir, name), "wb") as f:
            f.write(data)
    conn = sqlite3.connect(settings.db_path)
    conn.execute("DELETE FROM batches WHERE n = 2")
    conn.commit()
    conn.close()
    result = CliRunner().invoke(cli, ["hub", "verify", "--json"],
                                env={"PINGJIA_CONFIG": settings.source})
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert [(p["problem"], p["batch_id"]) for p in report["problems"]] == \
        [("missing", "hall-a-2")]
