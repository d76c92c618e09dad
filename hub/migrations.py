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


def _m4_business(db):
    # Business systems and their bearer tokens; only the SHA-256 of a token is kept.
    db.execute("""CREATE TABLE systems (
        name TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL DEFAULT 'business',
        windows TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        revoked_at TEXT)""")
    # One request of a business system: a service completed at a window, rated with one
    # prompt (single, batch, overall) or one prompt per item (per_item). Times: unix s.
    db.execute("""CREATE TABLE visits (
        id INTEGER PRIMARY KEY,
        system TEXT NOT NULL DEFAULT '',
        mode TEXT NOT NULL,
        kind TEXT NOT NULL,
        n_cases INTEGER NOT NULL DEFAULT 1,
        device_id TEXT NOT NULL,
        window TEXT NOT NULL DEFAULT '',
        staff_no TEXT NOT NULL DEFAULT '',
        staff_name TEXT NOT NULL DEFAULT '',
        ttl INTEGER NOT NULL,
        display TEXT NOT NULL DEFAULT '',
        callback_url TEXT NOT NULL DEFAULT '',
        created_t INTEGER NOT NULL,
        next_t INTEGER,
        give_up_t INTEGER)""")
    # One row per case and stage (kind): one service, one rating. A re-prompt after an
    # unrated or refused attempt reuses the row; created_t stays the service's time.
    db.execute("""CREATE TABLE cases (
        id INTEGER PRIMARY KEY,
        case_no TEXT NOT NULL,
        kind TEXT NOT NULL,
        visit_id INTEGER NOT NULL,
        position INTEGER NOT NULL,
        task_code TEXT NOT NULL DEFAULT '',
        task_name TEXT NOT NULL DEFAULT '',
        dept_code TEXT NOT NULL DEFAULT '',
        pid TEXT,
        status TEXT NOT NULL,
        device_state TEXT,
        stars INTEGER,
        reasons TEXT NOT NULL DEFAULT '',
        cat_ver TEXT NOT NULL DEFAULT '',
        record_device TEXT,
        record_seq INTEGER,
        created_t INTEGER NOT NULL,
        outcome_t INTEGER,
        reminder_due_t INTEGER,
        reminded_t INTEGER,
        default_due_t INTEGER,
        work_order TEXT,
        UNIQUE (case_no, kind))""")
    db.execute("CREATE INDEX cases_pid ON cases(pid)")
    db.execute("CREATE INDEX cases_status ON cases(status)")
    db.execute("CREATE INDEX cases_visit ON cases(visit_id, position)")
    # Callbacks to business systems, retried with backoff until delivered or given up.
    db.execute("""CREATE TABLE callbacks (
        id INTEGER PRIMARY KEY,
        system TEXT NOT NULL DEFAULT '',
        url TEXT NOT NULL,
        event TEXT NOT NULL,
        body TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_t INTEGER NOT NULL,
        created_t INTEGER NOT NULL,
        done_t INTEGER,
        failed_t INTEGER,
        last_error TEXT)""")
    db.execute("CREATE INDEX callbacks_due ON callbacks(next_t) "
               "WHERE done_t IS NULL AND failed_t IS NULL")
    # Suspicious votes: flagged (also in votes.flags), never deleted.
    db.execute("""CREATE TABLE vote_flags (
        id INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        window TEXT NOT NULL DEFAULT '',
        staff_no TEXT NOT NULL DEFAULT '',
        stars INTEGER,
        t INTEGER,
        flagged_at TEXT NOT NULL,
        UNIQUE (device_id, seq, kind))""")
    # Records the hub made itself (votes rows under a "<device>.<why>" identity): the
    # other cases of a batch or themed visit, and default ratings.
    db.execute("""CREATE TABLE derived_records (
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        why TEXT NOT NULL,
        case_id INTEGER NOT NULL,
        source_device TEXT,
        source_seq INTEGER,
        PRIMARY KEY (device_id, seq))""")
    db.execute("""CREATE TABLE window_photos (
        window TEXT PRIMARY KEY,
        photo TEXT NOT NULL,
        updated_at TEXT NOT NULL)""")
    # Vote checks start from here: an upgraded hub does not flag its whole history.
    last = db.execute("SELECT coalesce(max(rowid), 0) FROM votes").fetchone()[0]
    db.execute("INSERT OR REPLACE INTO hub_state (key, value) VALUES ('business_vote_rowid', ?)",
               (str(last),))


def _m5_updates(db):
    # Firmware releases: the ROMFS image itself is kept here, so a hub restored from its
    # store can go on serving a rollout. (version, board) names a release.
    db.execute("""CREATE TABLE releases (
        id INTEGER PRIMARY KEY,
        version TEXT NOT NULL,
        board TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        image BLOB NOT NULL,
        notes TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        UNIQUE (version, board))""")
    # A staged rollout of one release to the devices of its board (hub/updates.py).
    db.execute("""CREATE TABLE rollouts (
        rid TEXT PRIMARY KEY,
        n INTEGER NOT NULL UNIQUE,
        release_id INTEGER NOT NULL REFERENCES releases(id),
        version TEXT NOT NULL,
        board TEXT NOT NULL,
        state TEXT NOT NULL,
        stage TEXT NOT NULL,
        canary INTEGER NOT NULL,
        batch INTEGER NOT NULL,
        max_failures INTEGER NOT NULL,
        why TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        finished_at TEXT)""")
    # One device in one rollout. offer_live: a retained offer for it is (or may be) on the
    # broker and must be withdrawn once the device is done, failed or withdrawn.
    db.execute("""CREATE TABLE rollout_devices (
        rid TEXT NOT NULL REFERENCES rollouts(rid),
        device_id TEXT NOT NULL,
        state TEXT NOT NULL,
        canary INTEGER NOT NULL DEFAULT 0,
        off INTEGER,
        why TEXT,
        from_fw TEXT,
        offer_live INTEGER NOT NULL DEFAULT 0,
        chunks INTEGER NOT NULL DEFAULT 0,
        offered_at TEXT,
        installed_t REAL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (rid, device_id))""")
    db.execute("CREATE INDEX rollout_devices_device ON rollout_devices(device_id, state)")
    db.execute("CREATE INDEX rollout_devices_live ON rollout_devices(offer_live) "
               "WHERE offer_live = 1")


MIGRATIONS = (
    (1, "core tables: votes, acks, rejections, batches, prompts, windows, events", _m1_core),
    (2, "dashboard: managers, sessions, alerts, device state, health samples, latency",
     _m2_dashboard),
    (3, "health samples: origin, stuck keys, display fault", _m3_sample_fields),
    (4, "business systems, visits, cases, callbacks, vote flags, derived records, photos",
     _m4_business),
    (5, "over-the-air updates: releases, rollouts, per-device update state", _m5_updates),
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
