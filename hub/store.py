"""The hub's durable store: one SQLite file (WAL, synchronous=FULL) via sqlite-utils.

Every writer (ingest, forwarder, HTTP API) opens its own Store, i.e. its own connection; WAL
lets readers such as `pingjia hub status` run beside them. synchronous=FULL makes COMMIT
return only once the data is on disk, which is what lets the hub ack a vote after it.
Writes that must be atomic together go through `with store.transaction():`.
"""
import contextlib
import datetime
import json
import os
import sqlite3
import time

import sqlite_utils

from . import PingjiaError
from .migrations import migrate

REJECTION_LOG_MAX = 1000   # recent rejections kept for the dashboard; counts are kept forever
EVENT_LOG_MAX = 5000       # birth/will events kept; gap events are never pruned
BUSY_TIMEOUT_S = 30.0


# Flags the forwarder sets when the province did not take a record (hub/forward.py _settle).
_REFUSED = "(flags LIKE 'province_rejected%' OR flags LIKE 'province_silent%')"


class StoreError(PingjiaError):
    """The hub store cannot be opened or written."""


def iso(t):
    """Unix seconds as an ISO 8601 UTC timestamp with milliseconds."""
    moment = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (moment.microsecond // 1000)


class Store:
    """One connection to the hub database. Not shared between threads."""

    def __init__(self, path, clock=time.time):
        self.path = path
        self.clock = clock
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
            # isolation_level=None: no implicit transactions; transaction() says BEGIN itself.
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self.db = sqlite_utils.Database(conn)
            migrate(self.db)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError("%s: cannot open the hub store: %s" % (path, exc)) from exc
        self.conn = conn

    def close(self):
        self.conn.close()

    def now(self):
        return iso(self.clock())

    @contextlib.contextmanager
    def transaction(self):
        """One write transaction: IMMEDIATE so the write lock is taken up front (no
        deadlock-prone lock upgrade), committed on success, rolled back on any error."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    def _one(self, sql, params=()):
        return self.conn.execute(sql, params).fetchone()

    def _all(self, sql, params=()):
        return self.conn.execute(sql, params).fetchall()

    # -- devices (registry written by provisioning) -----------------------------------------
    def device(self, device_id):
        row = self._one("SELECT device_id, key_hex, window, label, retired FROM devices "
                        "WHERE device_id = ?", (device_id,))
        return dict(row) if row else None

    def active_devices(self):
        return [dict(r) for r in self._all(
            "SELECT device_id, window, label FROM devices WHERE NOT retired ORDER BY device_id")]

    def devices_at_window(self, window):
        return [r[0] for r in self._all(
            "SELECT device_id FROM devices WHERE window = ? AND NOT retired ORDER BY device_id",
            (window,))]

    # -- votes and acks (ingest) ------------------------------------------------------------
    def vote_mac(self, device_id, seq):
        row = self._one("SELECT mac FROM votes WHERE device_id = ? AND seq = ?", (device_id, seq))
        return row[0] if row else None

    def insert_vote(self, vote, received_at=None):
        """Store a verified vote dict (wire field names). Caller holds a transaction."""
        self.conn.execute(
            "INSERT INTO votes (device_id, seq, t, kind, pid, case_no, stars, reasons, cat_ver,"
            " window, staff_no, mac, received_at, flags) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,'')",
            (vote["d"], vote["s"], vote["t"], vote["k"], vote["pid"], vote["case"],
             vote["stars"], ",".join(vote["rs"]), vote["cv"], vote["w"], vote["sn"],
             vote["mac"], received_at or self.now()))

    def acked_seq(self, device_id):
        row = self._one("SELECT acked_seq FROM device_acks WHERE device_id = ?", (device_id,))
        return row[0] if row else 0

    def set_acked(self, device_id, seq):
        self.conn.execute(
            "INSERT INTO device_acks (device_id, acked_seq, updated_at) VALUES (?,?,?) "
            "ON CONFLICT(device_id) DO UPDATE SET acked_seq = excluded.acked_seq,"
            " updated_at = excluded.updated_at", (device_id, seq, self.now()))

    def advance_contiguous(self, device_id):
        """Move the device's ack mark over every stored sequence that directly follows it
        and return the new mark. A hole stops it: a later vote is never covered by an ack
        while an earlier one is missing."""
        mark = self.acked_seq(device_id)
        seq = mark
        while True:
            rows = self._all("SELECT seq FROM votes WHERE device_id = ? AND seq > ? "
                             "ORDER BY seq LIMIT 500", (device_id, seq))
            hole = False
            for (stored,) in rows:
                if stored != seq + 1:
                    hole = True
                    break
                seq = stored
            if hole or len(rows) < 500:
                break
        if seq != mark:
            self.set_acked(device_id, seq)
        return seq

    # -- counting and logging what was turned away ------------------------------------------
    def count_rejection(self, reason, device_id=None, topic=None, size=None):
        """Count one rejected input and log it without its payload (no personal data)."""
        self.conn.execute("INSERT INTO rejections (reason, count) VALUES (?, 1) "
                          "ON CONFLICT(reason) DO UPDATE SET count = count + 1", (reason,))
        cur = self.conn.execute(
            "INSERT INTO rejection_log (at, reason, device_id, topic, size) VALUES (?,?,?,?,?)",
            (self.now(), reason, device_id, topic[:128] if topic else topic, size))
        if cur.lastrowid % 100 == 0:
            self.conn.execute("DELETE FROM rejection_log WHERE id <= ?",
                              (cur.lastrowid - REJECTION_LOG_MAX,))

    def rejections(self):
        rows = self._all("SELECT reason, count FROM rejections ORDER BY reason")
        return {r[0]: r[1] for r in rows}

    def recent_rejections(self, limit=50):
        return [dict(r) for r in self._all(
            "SELECT at, reason, device_id, topic, size FROM rejection_log ORDER BY id DESC LIMIT ?",
            (limit,))]

    def bump(self, name, n=1):
        self.conn.execute("INSERT INTO counters (name, count) VALUES (?, ?) "
                          "ON CONFLICT(name) DO UPDATE SET count = count + excluded.count",
                          (name, n))

    def counters(self):
        return {r[0]: r[1] for r in self._all("SELECT name, count FROM counters ORDER BY name")}

    # -- device health and events -----------------------------------------------------------
    def add_event(self, device_id, kind, detail=None):
        cur = self.conn.execute(
            "INSERT INTO events (at, device_id, kind, detail) VALUES (?,?,?,?)",
            (self.now(), device_id, kind,
             json.dumps(detail, sort_keys=True) if detail is not None else None))
        if kind != "gap" and cur.lastrowid % 100 == 0:
            self.conn.execute("DELETE FROM events WHERE kind != 'gap' AND id <= ?",
                              (cur.lastrowid - EVENT_LOG_MAX,))

    def events(self, kind=None, device_id=None, limit=100):
        sql = "SELECT id, at, device_id, kind, detail FROM events WHERE 1"
        params = []
        if kind:
            sql += " AND kind = ?"
            params.append(kind)
        if device_id:
            sql += " AND device_id = ?"
            params.append(device_id)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        out = []
        for r in self._all(sql, params):
            row = dict(r)
            row["detail"] = json.loads(row["detail"]) if row["detail"] else None
            out.append(row)
        return out

    def note_health(self, device_id, online=None, birth=None, hb=None):
        now = self.now()
        self.conn.execute("INSERT INTO device_health (device_id, online, last_seen) "
                          "VALUES (?, 0, ?) ON CONFLICT(device_id) DO UPDATE SET "
                          "last_seen = excluded.last_seen", (device_id, now))
        if online is not None:
            self.conn.execute("UPDATE device_health SET online = ? WHERE device_id = ?",
                              (1 if online else 0, device_id))
        if birth is not None:
            self.conn.execute("UPDATE device_health SET birth = ?, last_birth = ? "
                              "WHERE device_id = ?", (json.dumps(birth, sort_keys=True), now,
                                                      device_id))
        if hb is not None:
            self.conn.execute("UPDATE device_health SET hb = ? WHERE device_id = ?",
                              (json.dumps(hb, sort_keys=True), device_id))

    def health(self, device_id):
        row = self._one("SELECT * FROM device_health WHERE device_id = ?", (device_id,))
        if not row:
            return None
        out = dict(row)
        for key in ("birth", "hb"):
            out[key] = json.loads(out[key]) if out[key] else None
        return out

    # -- windows and prompts (HTTP API) -----------------------------------------------------
    def sign_in(self, window, staff_no, staff_name):
        self.conn.execute(
            "INSERT INTO windows (window, staff_no, staff_name, signed_in_at, signed_out_at) "
            "VALUES (?,?,?,?,NULL) ON CONFLICT(window) DO UPDATE SET staff_no = excluded.staff_no,"
            " staff_name = excluded.staff_name, signed_in_at = excluded.signed_in_at,"
            " signed_out_at = NULL", (window, staff_no, staff_name, self.now()))

    def sign_out(self, window):
        self.conn.execute(
            "INSERT INTO windows (window, staff_no, staff_name, signed_in_at, signed_out_at) "
            "VALUES (?,'','',NULL,?) ON CONFLICT(window) DO UPDATE SET staff_no = '',"
            " staff_name = '', signed_out_at = excluded.signed_out_at", (window, self.now()))

    def window(self, window):
        row = self._one("SELECT * FROM windows WHERE window = ?", (window,))
        return dict(row) if row else None

    def create_prompt(self, device_id, window, case_no, task_code, task_name, dept_code, kind,
                      n_cases, staff_no, staff_name):
        """A new prompt with the next hub-assigned id "P<n>"; caller holds a transaction."""
        row = self._one("SELECT coalesce(max(seq_no), 0) + 1 FROM prompts")
        seq_no = row[0]
        pid = "P%d" % seq_no
        self.conn.execute(
            "INSERT INTO prompts (pid, seq_no, device_id, window, case_no, task_code, task_name,"
            " dept_code, kind, n_cases, staff_no, staff_name, created_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (pid, seq_no, device_id, window, case_no, task_code, task_name, dept_code, kind,
             n_cases, staff_no, staff_name, self.now()))
        return pid

    def prompt(self, pid):
        row = self._one("SELECT * FROM prompts WHERE pid = ?", (pid,))
        return dict(row) if row else None

    def prompts_by_pid(self, pids):
        out = {}
        pids = list(set(pids))
        for i in range(0, len(pids), 500):
            chunk = pids[i:i + 500]
            rows = self._all("SELECT * FROM prompts WHERE pid IN (%s)" % ",".join("?" * len(chunk)),
                             chunk)
            for r in rows:
                out[r["pid"]] = dict(r)
        return out

    def set_prompt_outcome(self, pid, device_id, outcome, seq):
        """First vote answering a prompt of this device decides its outcome."""
        cur = self.conn.execute(
            "UPDATE prompts SET outcome = ?, vote_seq = ?, outcome_at = ? "
            "WHERE pid = ? AND device_id = ? AND outcome IS NULL",
            (outcome, seq, self.now(), pid, device_id))
        return cur.rowcount > 0

    def set_prompt_device_state(self, pid, device_id, state):
        cur = self.conn.execute(
            "UPDATE prompts SET device_state = ?, device_state_at = ? "
            "WHERE pid = ? AND device_id = ?", (state, self.now(), pid, device_id))
        return cur.rowcount > 0

    def vote(self, device_id, seq):
        row = self._one("SELECT * FROM votes WHERE device_id = ? AND seq = ?", (device_id, seq))
        return dict(row) if row else None

    # -- batches (forwarder) ----------------------------------------------------------------
    def first_unaccepted_batch(self):
        row = self._one("SELECT * FROM batches WHERE accepted_at IS NULL ORDER BY n LIMIT 1")
        return dict(row) if row else None

    def last_batch(self):
        row = self._one("SELECT n, hash FROM batches ORDER BY n DESC LIMIT 1")
        return (row[0], row[1]) if row else (0, None)

    def batch(self, n):
        row = self._one("SELECT * FROM batches WHERE n = ?", (n,))
        return dict(row) if row else None

    def unbatched_count(self):
        return self._one("SELECT count(*) FROM votes WHERE batch_n IS NULL")[0]

    def oldest_unbatched_rowid(self):
        row = self._one("SELECT min(rowid) FROM votes WHERE batch_n IS NULL")
        return row[0]

    def unbatched_votes(self, limit):
        return [dict(r) for r in self._all(
            "SELECT rowid AS rowid, * FROM votes WHERE batch_n IS NULL ORDER BY rowid LIMIT ?",
            (limit,))]

    def hold_vote(self, device_id, seq, flag):
        """Keep a vote out of batches for good (it cannot be mapped); batch_n 0 = held."""
        self.conn.execute("UPDATE votes SET batch_n = 0, flags = ? WHERE device_id = ? AND seq = ?",
                          (flag, device_id, seq))

    def save_batch(self, n, batch_id, prev, digest, body, votes):
        """Persist a batch and claim its votes; caller holds the transaction."""
        self.conn.execute(
            "INSERT INTO batches (n, batch_id, prev, hash, body, records, created_at,"
            " sent_attempts) VALUES (?,?,?,?,?,?,?,0)",
            (n, batch_id, prev, digest, body, len(votes), self.now()))
        self.conn.executemany("UPDATE votes SET batch_n = ? WHERE device_id = ? AND seq = ?",
                              [(n, d, s) for d, s in votes])

    def note_attempt(self, n, error=None):
        self.conn.execute("UPDATE batches SET sent_attempts = sent_attempts + 1, last_sent_at = ?,"
                          " last_error = ? WHERE n = ?", (self.now(), error, n))

    def accept_batch(self, n, response, forwarded, refused):
        """The province holds the batch: mark its votes forwarded (accepted or duplicate)
        and flag the records it refused. Caller holds the transaction."""
        now = self.now()
        self.conn.execute("UPDATE batches SET accepted_at = ?, last_error = NULL, response = ? "
                          "WHERE n = ?", (now, json.dumps(response, sort_keys=True), n))
        self.conn.executemany(
            "UPDATE votes SET forwarded_at = ? WHERE device_id = ? AND seq = ? AND batch_n = ?",
            [(now, d, s, n) for d, s in forwarded])
        self.conn.executemany(
            "UPDATE votes SET flags = ? WHERE device_id = ? AND seq = ? AND batch_n = ?",
            [(flag, d, s, n) for (d, s), flag in refused])

    # -- small key/value state --------------------------------------------------------------
    def get_state(self, key, default=None):
        row = self._one("SELECT value FROM hub_state WHERE key = ?", (key,))
        return json.loads(row[0]) if row else default

    def set_state(self, key, value):
        self.conn.execute("INSERT INTO hub_state (key, value) VALUES (?, ?) ON CONFLICT(key) "
                          "DO UPDATE SET value = excluded.value", (key, json.dumps(value)))

    def del_state(self, key):
        self.conn.execute("DELETE FROM hub_state WHERE key = ?", (key,))

    # -- status -----------------------------------------------------------------------------
    def status(self):
        """Backlogs, province health, rejections and devices, read in one snapshot."""
        self.conn.execute("BEGIN")
        try:
            return self._status()
        finally:
            self.conn.execute("COMMIT")

    def _status(self):
        unacked = self._one(
            "SELECT count(*) FROM votes v LEFT JOIN device_acks a ON a.device_id = v.device_id "
            "WHERE v.seq > coalesce(a.acked_seq, 0)")[0]
        # Only the province's refusals take a vote out of the backlog; the hub's own marks
        # (suspect:*, default) travel like any vote and are waiting until accepted.
        unforwarded = self._one("SELECT count(*) FROM votes WHERE forwarded_at IS NULL "
                                "AND (batch_n IS NULL OR batch_n > 0) AND NOT " + _REFUSED)[0]
        unbatched = self.unbatched_count()
        held = self._one("SELECT count(*) FROM votes WHERE batch_n = 0")[0]
        refused = self._one("SELECT count(*) FROM votes WHERE batch_n > 0 AND " + _REFUSED)[0]
        unaccepted = self._one("SELECT count(*) FROM batches WHERE accepted_at IS NULL")[0]
        stored = self._one("SELECT count(*) FROM votes")[0]
        forwarded = self._one("SELECT count(*) FROM votes WHERE forwarded_at IS NOT NULL")[0]
        last_n, _ = self.last_batch()
        pending = self.first_unaccepted_batch()
        devices = self._one("SELECT count(*), coalesce(sum(retired != 0), 0) FROM devices")
        online = self._one("SELECT count(*) FROM device_health h JOIN devices d "
                           "ON d.device_id = h.device_id WHERE h.online AND NOT d.retired")[0]
        gaps = self._one("SELECT count(*) FROM events WHERE kind = 'gap'")[0]
        return {
            "votes": {"stored": stored, "forwarded": forwarded},
            "backlog": {
                "unacked": unacked,
                "unforwarded": unforwarded,
                "unbatched": unbatched,
                "unaccepted_batches": unaccepted,
            },
            "province": {
                "last_success": self.get_state("province_last_success"),
                "last_batch": last_n,
                "pending_batch": pending["batch_id"] if pending else None,
                "pending_attempts": pending["sent_attempts"] if pending else 0,
                "last_error": pending["last_error"] if pending else None,
                "chain_error": self.get_state("chain_error"),
                "refused_records": refused,
                "held_records": held,
            },
            "rejections": self.rejections(),
            "counters": self.counters(),
            "devices": {"total": devices[0], "retired": devices[1],
                        "active": devices[0] - devices[1], "online": online},
            "gap_events": gaps,
        }
