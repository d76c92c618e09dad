# The hub store: schema migrations, durability settings, the contiguous ack mark, bounded
# logs, atomic transactions and the status snapshot.
import json
import sqlite3

import pytest

from firmware.evaluator import codec
from hub import migrations
from hub.store import REJECTION_LOG_MAX, Store

KEY = bytes(range(32))


def _device(store, device_id="D0001", window="W01", retired=0):
    store.conn.execute("INSERT INTO devices (device_id, key_hex, window, label, created_at,"
                       " retired) VALUES (?,?,?,?,?,?)",
                       (device_id, KEY.hex(), window, "", store.now(), retired))


def _vote(seq, device_id="D0001", stars=5):
    return codec.make_vote(KEY, device_id, seq, 1763712000 + seq, "v", "P%d" % seq, "C-%d" % seq,
                           stars, [] if stars > 2 else ["S01"], "nat-1", "W01", "10234")


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "hub.db"))
    yield s
    s.close()


def test_migrations_run_once_and_are_recorded(tmp_path):
    path = str(tmp_path / "hub.db")
    first = Store(path)
    rows = first.conn.execute("SELECT id FROM migrations").fetchall()
    assert [r[0] for r in rows] == [n for n, _, _ in migrations.MIGRATIONS]
    first.close()
    again = Store(path)
    assert migrations.migrate(again.db) == []
    assert again.conn.execute("SELECT count(*) FROM migrations").fetchone()[0] == \
        len(migrations.MIGRATIONS)
    for table in ("devices", "votes", "device_acks", "rejections", "rejection_log", "batches",
                  "prompts", "windows", "events", "device_health", "hub_state", "counters"):
        assert again.db[table].exists(), table
    again.close()


def test_newer_schema_is_refused(tmp_path):
    path = str(tmp_path / "hub.db")
    Store(path).close()
    raw = sqlite3.connect(path)
    raw.execute("INSERT INTO migrations (id, name, applied_at) VALUES (999, 'future', 'x')")
    raw.commit()
    raw.close()
    with pytest.raises(migrations.MigrationError):
        Store(path)


def test_existing_device_registry_is_kept(tmp_path):
    # Provisioning may have created the devices table first; the migration must not clobber it.
    path = str(tmp_path / "hub.db")
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE devices (device_id TEXT PRIMARY KEY, key_hex TEXT NOT NULL,"
                " window TEXT, label TEXT, created_at TEXT, retired INTEGER NOT NULL DEFAULT 0)")
    raw.execute("INSERT INTO devices VALUES ('D9', 'aa', 'W1', 'x', 't', 0)")
    raw.commit()
    raw.close()
    store = Store(path)
    assert store.device("D9")["key_hex"] == "aa"
    store.close()


def test_wal_and_full_sync(store):
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_transaction_is_all_or_nothing(store):
    _device(store)
    with pytest.raises(sqlite3.IntegrityError):
        with store.transaction():
            store.insert_vote(_vote(1))
            store.insert_vote(_vote(1))  # same identity twice
    assert store.vote("D0001", 1) is None
    with store.transaction():
        store.insert_vote(_vote(1))
    other = sqlite3.connect(store.path)
    assert other.execute("SELECT count(*) FROM votes").fetchone()[0] == 1
    other.close()


def test_ack_mark_stops_at_a_hole(store):
    _device(store)
    with store.transaction():
        for seq in (1, 2, 4, 5):
            store.insert_vote(_vote(seq))
        assert store.advance_contiguous("D0001") == 2
    assert store.status()["backlog"]["unacked"] == 2  # 4 and 5 wait behind the hole
    with store.transaction():
        store.insert_vote(_vote(3))
        assert store.advance_contiguous("D0001") == 5
    assert store.acked_seq("D0001") == 5
    assert store.status()["backlog"]["unacked"] == 0


def test_ack_mark_walks_long_runs(store):
    _device(store)
    with store.transaction():
        for seq in range(1, 1201):
            store.insert_vote(_vote(seq))
        assert store.advance_contiguous("D0001") == 1200


def test_rejections_are_counted_forever_and_logged_bounded(store):
    with store.transaction():
        for i in range(REJECTION_LOG_MAX + 250):
            store.count_rejection("bad_mac", "D0001", "pj/D0001/up/vote", 300)
        store.count_rejection("too_large", None, "pj/x/up/vote", 5000)
    assert store.rejections() == {"bad_mac": REJECTION_LOG_MAX + 250, "too_large": 1}
    logged = store.conn.execute("SELECT count(*) FROM rejection_log").fetchone()[0]
    assert logged <= REJECTION_LOG_MAX + 100
    recent = store.recent_rejections(1)[0]
    assert recent["reason"] == "too_large" and recent["size"] == 5000
    # The log has no column that could hold a payload.
    columns = {c.name for c in store.db["rejection_log"].columns}
    assert columns == {"id", "at", "reason", "device_id", "topic", "size"}


def test_prompt_ids_are_sequential_and_outcome_is_first_vote(store):
    _device(store)
    with store.transaction():
        p1 = store.create_prompt("D0001", "W01", "C1", "T1", "办理", "D1", "ji", 1, "1", "张三")
        p2 = store.create_prompt("D0001", "W01", "C2", "T1", "办理", "D1", "ji", 1, "1", "张三")
    assert (p1, p2) == ("P1", "P2")
    with store.transaction():
        assert store.set_prompt_outcome("P1", "D0001", "voted", 7)
        assert not store.set_prompt_outcome("P1", "D0001", "unrated", 8)
        assert not store.set_prompt_outcome("P2", "D0002", "voted", 9)  # not its prompt
    assert store.prompt("P1")["outcome"] == "voted" and store.prompt("P1")["vote_seq"] == 7
    assert store.prompt("P2")["outcome"] is None


def test_status_counts_backlogs_and_devices(store):
    _device(store, "D0001")
    _device(store, "D0002", retired=1)
    with store.transaction():
        store.insert_vote(_vote(1))
        store.insert_vote(_vote(2))
        store.advance_contiguous("D0001")
        store.save_batch(1, "hall-1-1", "0" * 64, "ab" * 32, "{}", [("D0001", 1)])
    status = store.status()
    assert status["devices"] == {"total": 2, "retired": 1, "active": 1, "online": 0}
    assert status["backlog"] == {"unacked": 0, "unforwarded": 2, "unbatched": 1,
                                 "unaccepted_batches": 1}
    assert status["province"]["pending_batch"] == "hall-1-1"
    with store.transaction():
        store.accept_batch(1, {"ok": 1}, [("D0001", 1)], [])
    status = store.status()
    assert status["backlog"]["unforwarded"] == 1
    assert status["backlog"]["unaccepted_batches"] == 0
    assert status["votes"] == {"stored": 2, "forwarded": 1}


def test_hub_status_command_reads_the_store(tmp_path):
    from click.testing import CliRunner

    from hub.cli import cli
    from hub.settings import write_default

    settings = write_default(str(tmp_path / "hub.toml"))
    runner = CliRunner()
    missing = runner.invoke(cli, ["hub", "status", "--config", settings.source])
    assert missing.exit_code != 0 and "no hub store yet" in str(missing.exception)
    store = Store(settings.db_path)
    _device(store)
    with store.transaction():
        store.insert_vote(_vote(1))
        store.insert_vote(_vote(3))
        store.advance_contiguous("D0001")
        store.count_rejection("bad_mac", "D0001", "pj/D0001/up/vote", 400)
        store.set_state("chain_error", {"batch_id": "hall-1-7"})
    store.close()
    out = runner.invoke(cli, ["hub", "status", "--config", settings.source, "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["hub"] == "hall-1" and report["backlog"]["unacked"] == 1
    assert report["rejections"] == {"bad_mac": 1} and report["devices"]["active"] == 1
    human = runner.invoke(cli, ["hub", "status", "--config", settings.source])
    assert human.exit_code == 0
    assert "1 unacked, 2 unforwarded" in human.output
    assert "rejections: bad_mac 1" in human.output
    assert "CHAIN ERROR at hall-1-7" in human.output
