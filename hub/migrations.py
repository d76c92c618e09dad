"""Numbered schema migrations for the hub's SQLite store.

Each migration runs once, in order, inside one write transaction together with its row in
the `migrations` table, so a hub killed half-way through an upgrade simply runs it again.
Never edit a migration that has shipped: add the next number.
"""
import datetime

from . import PingjiaError


class MigrationError(PingjiaError):
    """The store's schema is newer than this hub or a migration failed."""


def _m1_core(db):
    # The device registry is owned by provisioning (hub/provision.py); it is created here
    # too so a fresh store works before any device exists. Same columns either way.
    db.execute("""CREATE TABLE IF NOT EXISTS devices (
        device_id TEXT PRIMARY KEY,
        key_hex TEXT NOT NULL,
        window TEXT,
        label TEXT,
        created_at TEXT,
        retired INTEGER NOT NULL DEFAULT 0)""")
    # One row per (device, sequence): the vote's identity end to end. rowid order is the
    # order the hub received them in, which is the order they are forwarded in.
    db["votes"].create({
        "device_id": str, "seq": int, "t": int, "kind": str, "pid": str, "case_no": str,
        "stars": int, "reasons": str, "cat_ver": str, "window": str, "staff_no": str,
        "mac": str, "received_at": str, "batch_n": int, "forwarded_at": str, "flags": str,
    }, pk=("device_id", "seq"), not_null={"t", "kind", "pid", "stars", "mac", "received_at"},
        defaults={"flags": "", "reasons": "", "case_no": "", "cat_ver": "", "window": "",
                  "staff_no": ""})
    db.execute("CREATE INDEX votes_unbatched ON votes(batch_n) WHERE batch_n IS NULL")
    db.execute("CREATE INDEX votes_batch ON votes(batch_n)")
    db.execute("CREATE INDEX votes_pid ON votes(pid)")
    # The highest contiguous sequence committed per device: what the ack says.
    db["device_acks"].create({"device_id": str, "acked_seq": int, "updated_at": str},
                             pk="device_id", not_null={"acked_seq"})
    db["rejections"].create({"reason": str, "count": int}, pk="reason", not_null={"count"})
    # Bounded (see store.REJECTION_LOG_MAX); never holds a payload, only its size.
    db["rejection_log"].create({"id": int, "at": str, "reason": str, "device_id": str,
                                "topic": str, "size": int}, pk="id")
    db["counters"].create({"name": str, "count": int}, pk="name", not_null={"count"})
    db["batches"].create({
        "n": int, "batch_id": str, "prev": str, "hash": str, "body": str, "records": int,
        "created_at": str, "sent_attempts": int, "last_sent_at": str, "accepted_at": str,
        "last_error": str, "response": str,
    }, pk="n", not_null={"batch_id", "prev", "hash", "body", "created_at", "sent_attempts"},
        defaults={"sent_attempts": 0})
    db["prompts"].create({
        "pid": str, "seq_no": int, "device_id": str, "window": str, "case_no": str,
        "task_code": str, "task_name": str, "dept_code": str, "kind": str, "n_cases": int,
        "staff_no": str, "staff_name": str, "created_at": str, "device_state": str,
        "device_state_at": str, "outcome": str, "vote_seq": int, "outcome_at": str,
    }, pk="pid", not_null={"seq_no", "device_id", "created_at"})
    db.execute("CREATE UNIQUE INDEX prompts_seq_no ON prompts(seq_no)")
    db["windows"].create({"window": str, "staff_no": str, "staff_name": str,
                          "signed_in_at": str, "signed_out_at": str}, pk="window")
    db["device_health"].create({"device_id": str, "online": int, "last_seen": str,
                                "last_birth": str, "birth": str, "hb": str}, pk="device_id")
    db["events"].create({"id": int, "at": str, "device_id": str, "kind": str, "detail": str},
                        pk="id", not_null={"at", "kind"})
    db.execute("CREATE INDEX events_kind ON events(kind, id)")
    db["hub_state"].create({"key": str, "value": str}, pk="key")


def _m2_dashboard(db):
    # Hall managers and their logins. Only a password hash is kept (hub/dashboard.py).
    db["managers"].create({"name": str, "hall": str, "display_name": str, "pw_hash": str,
                           "created_at": str, "disabled": int}, pk="name",
                          not_null={"hall", "pw_hash", "created_at"}, defaults={"disabled": 0})
    # A session cookie is a random token; the store holds only its SHA-256.
    db["manager_sessions"].create({"token_hash": str, "manager": str, "hall": str,
                                   "created_at": str, "expires_at": float}, pk="token_hash",
                                  not_null={"manager", "hall", "expires_at"})
    # Alerts for bad ratings and device trouble. `ref` makes raising one idempotent (a vote
    # "<d>:<s>", a state event id); ack_* says who acknowledged it and when; hook_* is the
    # webhook delivery, retried from here after a hub restart.
    db["alerts"].create({
        "id": int, "at": str, "hall": str, "kind": str, "ref": str, "device_id": str,
        "window": str, "detail": str, "acked_by": str, "acked_at": str, "resolved_at": str,
        "hook_state": str, "hook_attempts": int, "hook_next_at": float, "hook_error": str,
    }, pk="id", not_null={"at", "hall", "kind", "ref", "hook_state", "hook_attempts"},
        defaults={"hook_state": "off", "hook_attempts": 0})
    db.execute("CREATE UNIQUE INDEX alerts_ref ON alerts(kind, ref)")
    db.execute("CREATE INDEX alerts_open ON alerts(hall, id) WHERE acked_at IS NULL")
    db.execute("CREATE INDEX alerts_hook ON alerts(hook_next_at) WHERE hook_state = 'pending'")
    # The derived state of each device (hub/health.py); changes also go to `events`.
    db["device_state"].create({"device_id": str, "state": str, "reasons": str, "since": str,
                               "checked_at": str}, pk="device_id", not_null={"state"})
    # Heartbeat samples for the device page's history; bounded per device by the monitor.
    db["health_samples"].create({"id": int, "device_id": str, "at": str, "t": float,
                                 "up": int, "heap": int, "jd": int, "old": int, "rc": int,
                                 "rssi": int, "mis": int, "clk": int}, pk="id",
                                not_null={"device_id", "at", "t"})
    db.execute("CREATE INDEX health_samples_device ON health_samples(device_id, id)")
    # Cumulative latency histograms for /metrics (bucket "+Inf", and "_sum" in seconds).
    db["latency_hist"].create({"name": str, "bucket": str, "value": float},
                              pk=("name", "bucket"), not_null={"value"})
    # "Today" on the dashboard is a range of press times.
    db.execute("CREATE INDEX votes_t ON votes(t)")
    # Alerts start from here: an upgraded hub does not alert on its whole history.
    last = db.execute("SELECT coalesce(max(rowid), 0) FROM votes").fetchone()[0]
    db.execute("INSERT OR REPLACE INTO hub_state (key, value) VALUES ('dashboard_vote_rowid', ?)",
               (str(last),))


def _m3_sample_fields(db):
    # A sample also says where it came from (birth or heartbeat) and carries the stuck keys
    # and display fault, so the latest sample alone tells a device's current condition.
    db.execute("ALTER TABLE health_samples ADD COLUMN kind TEXT")
    db.execute("ALTER TABLE health_samples ADD COLUMN stuck TEXT")
    db.execute("ALTER TABLE health_samples ADD COLUMN disp INTEGER")


MIGRATIONS = (
    (1, "core tables: votes, acks, rejections, batches, prompts, windows, events", _m1_core),
    (2, "dashboard: managers, sessions, alerts, device state, health samples, latency",
     _m2_dashboard),
    (3, "health samples: origin, stuck keys, display fault", _m3_sample_fields),
)


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def applied(db):
    if not db["migrations"].exists():
        return set()
    return {row[0] for row in db.execute("SELECT id FROM migrations").fetchall()}


def migrate(db):
    """Bring the schema up to date; returns the numbers applied now. Safe to call from
    several processes at once: the check and the change share one IMMEDIATE transaction."""
    conn = db.conn
    done = []
    for number, name, step in MIGRATIONS:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS migrations "
                         "(id INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)")
            if conn.execute("SELECT 1 FROM migrations WHERE id = ?", (number,)).fetchone():
                conn.execute("COMMIT")
                continue
            step(db)
            conn.execute("INSERT INTO migrations (id, name, applied_at) VALUES (?, ?, ?)",
                         (number, name, _now()))
            conn.execute("COMMIT")
        except BaseException as exc:
            conn.execute("ROLLBACK")
            if isinstance(exc, Exception):
                raise MigrationError("migration %d (%s) failed: %s" % (number, name, exc)) from exc
            raise
        done.append(number)
    newest = max(n for n, _, _ in MIGRATIONS)
    row = conn.execute("SELECT max(id) FROM migrations").fetchone()
    if row and row[0] and row[0] > newest:
        raise MigrationError("store schema %d is newer than this hub (%d)" % (row[0], newest))
    return done
