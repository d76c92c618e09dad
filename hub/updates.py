"""Over-the-air updates, the hub's side: releases, staged rollouts, per-device update state.

Three parts share the store (tables `releases`, `rollouts`, `rollout_devices`, migration 5):

- the library the CLI calls (`add_release`, `start_rollout`, `pause`, `resume`, `cancel`,
  `rollouts`, `rollout`): it only writes the store, so it works while the hub runs or not;
- `Reports`, called by ingest for every `pj/<d>/up/ota` inside ingest's transaction: it
  records progress and outcomes and answers a `get` with one chunk on `pj/<d>/dn/fw`;
- `RolloutEngine`, a thread inside the running hub: every half second it reads the store,
  moves each running rollout on (canaries first, then the rest in batches), publishes the
  retained offers on `pj/<d>/dn/ota` and withdraws them when a device is done or failed.

Nothing lives only in memory: the engine decides from the store and marks an offer live
(`offer_live`) before publishing it, so a hub killed at any moment publishes again, on its
next start, every offer that may be missing, and withdraws every one it owed.

The device side of the contract is in docs/protocol.md ("Updates over the air").
"""
import collections
import hashlib
import json
import logging
import re
import struct
import threading
import time

from . import PingjiaError
from . import health as healthlib
from .store import Store, iso

log = logging.getLogger("pingjia.hub.updates")

CHUNK = 1024                   # image bytes per dn/fw answer (the device's buffer)
MAX_IMAGE = 8 * 1024 * 1024    # a ROMFS app partition is far smaller; this stops a wrong file
CONFIRM_TIMEOUT_S = 600        # installed but no `ok` for this long: failed
TICK_S = 0.5                   # how soon the engine sees a CLI change
PUBLISH_WAIT_S = 5.0           # broker PUBACK for an offer or a withdrawal
OFFER_AGAIN_S = 30.0           # an online device that has not asked yet is offered again
IMAGES_CACHED = 4              # release images kept in memory for chunk serving

# Rollout states. running and paused are "active": at most one per board.
RUNNING, PAUSED, HALTED, CANCELLED, DONE = "running", "paused", "halted", "cancelled", "done"
ROLLOUT_STATES = (RUNNING, PAUSED, HALTED, CANCELLED, DONE)
ACTIVE = (RUNNING, PAUSED)
CANARY, REST = "canary", "rest"

# Device states in a rollout.
PENDING, OFFERED, DOWNLOADING, INSTALLING = "pending", "offered", "downloading", "installing"
DONE_DEV, SKIPPED, FAILED, WITHDRAWN = "done", "skipped", "failed", "withdrawn"
DEVICE_STATES = (PENDING, OFFERED, DOWNLOADING, INSTALLING, DONE_DEV, SKIPPED, FAILED, WITHDRAWN)
IN_FLIGHT = (OFFERED, DOWNLOADING, INSTALLING)
FINISHED = (DONE_DEV, SKIPPED, FAILED, WITHDRAWN)

# What a device may report (docs/protocol.md) and the failure reasons it may give.
REPORTS = ("get", "bad", "err", "installed", "ok", "rolledback")
BAD_WHY = ("hash", "size", "image")
ERR_WHY = ("flash",)
NO_CONFIRMATION = "no confirmation in %d min" % (CONFIRM_TIMEOUT_S // 60)
ROLLED_BACK = "rolled back"

_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,31}$")
_BOARD = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")
_SQL_IN_FLIGHT = "('offered', 'downloading', 'installing')"


class UpdateError(PingjiaError):
    """A release or rollout request that cannot be done as asked."""


class Refused(Exception):
    """An up/ota report turned away; `reason` is the rejection counter it goes under."""

    def __init__(self, reason):
        Exception.__init__(self, reason)
        self.reason = reason


def check_version(version):
    if not isinstance(version, str) or not _VERSION.match(version):
        raise UpdateError("version %r: 1..32 characters of A-Z a-z 0-9 . _ + -, starting "
                          "with a letter or digit" % (version,))
    return version


def check_board(board):
    if not isinstance(board, str) or not _BOARD.match(board):
        raise UpdateError("board %r: 1..64 characters of A-Z a-z 0-9 . _ -" % (board,))
    return board


def offer_topic(device_id):
    return "pj/%s/dn/ota" % device_id


def chunk_topic(device_id):
    return "pj/%s/dn/fw" % device_id


# -- releases ---------------------------------------------------------------------------------

def _release_view(row):
    return {"id": row["id"], "version": row["version"], "board": row["board"],
            "sha256": row["sha256"], "size": row["size"], "notes": row["notes"],
            "created_at": row["created_at"]}


_RELEASE_COLUMNS = "id, version, board, sha256, size, notes, created_at"


def add_release(store, image, version, board, notes=""):
    """Store a firmware image as release (version, board); returns the release dict.
    Adding the same image again is a no-op; another image under a taken name is refused."""
    check_version(version)
    check_board(board)
    if not isinstance(image, (bytes, bytearray)) or not image:
        raise UpdateError("image: empty")
    if len(image) > MAX_IMAGE:
        raise UpdateError("image: %d bytes, more than %d" % (len(image), MAX_IMAGE))
    notes = notes or ""
    if not isinstance(notes, str) or len(notes) > 500:
        raise UpdateError("notes: at most 500 characters")
    sha = hashlib.sha256(image).hexdigest()
    with store.transaction():
        row = store.conn.execute("SELECT %s FROM releases WHERE version = ? AND board = ?"
                                 % _RELEASE_COLUMNS, (version, board)).fetchone()
        if row is not None:
            if row["sha256"] != sha:
                raise UpdateError("release %s for %s already exists with another image "
                                  "(sha256 %s...)" % (version, board, row["sha256"][:12]))
            return _release_view(row)
        store.conn.execute(
            "INSERT INTO releases (version, board, sha256, size, image, notes, created_at) "
            "VALUES (?,?,?,?,?,?,?)", (version, board, sha, len(image), bytes(image), notes,
                                       store.now()))
    log.info("release %s for %s added: %d bytes, sha256 %s", version, board, len(image), sha)
    return release(store, version, board)


def releases(store):
    return [_release_view(r) for r in store.conn.execute(
        "SELECT %s FROM releases ORDER BY id" % _RELEASE_COLUMNS)]


def release(store, version, board):
    row = store.conn.execute("SELECT %s FROM releases WHERE version = ? AND board = ?"
                             % _RELEASE_COLUMNS, (version, board)).fetchone()
    return _release_view(row) if row else None


# -- rollouts (the CLI's side) -----------------------------------------------------------------

def start_rollout(store, version, board=None, canary=2, batch=20, max_failures=0):
    """A new running rollout of release `version` (for `board`, which may be left out when
    only one board has that version). The engine in the running hub takes it from here."""
    check_version(version)
    for name, value, lo in (("canary", canary, 0), ("batch", batch, 1),
                            ("max_failures", max_failures, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo or value > 10000:
            raise UpdateError("%s: an integer from %d to 10000" % (name.replace("_", "-"), lo))
    with store.transaction():
        conn = store.conn
        if board is None:
            boards = [r[0] for r in conn.execute(
                "SELECT board FROM releases WHERE version = ? ORDER BY board", (version,))]
            if not boards:
                raise UpdateError("no release %s (see `pingjia hub release list`)" % version)
            if len(boards) > 1:
                raise UpdateError("release %s exists for several boards (%s): say which "
                                  "with --board" % (version, ", ".join(boards)))
            board = boards[0]
        check_board(board)
        row = conn.execute("SELECT id FROM releases WHERE version = ? AND board = ?",
                           (version, board)).fetchone()
        if row is None:
            raise UpdateError("no release %s for board %s (see `pingjia hub release list`)"
                              % (version, board))
        busy = conn.execute("SELECT rid, version FROM rollouts WHERE board = ? AND state IN "
                            "('running', 'paused')", (board,)).fetchone()
        if busy is not None:
            raise UpdateError("rollout %s (%s) is still active for board %s: let it finish "
                              "or cancel it first" % (busy["rid"], busy["version"], board))
        n = conn.execute("SELECT coalesce(max(n), 0) + 1 FROM rollouts").fetchone()[0]
        rid = "R%d" % n
        now = store.now()
        conn.execute(
            "INSERT INTO rollouts (rid, n, release_id, version, board, state, stage, canary,"
            " batch, max_failures, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (rid, n, row["id"], version, board, RUNNING, CANARY if canary else REST, canary,
             batch, max_failures, now, now))
    log.info("rollout %s of %s for %s started (canary %d, batch %d, max failures %d)",
             rid, version, board, canary, batch, max_failures)
    return rollout(store, rid)


def _rollout_row(store, rid):
    row = store.conn.execute("SELECT * FROM rollouts WHERE rid = ?", (rid,)).fetchone()
    if row is None:
        raise UpdateError("no rollout %s (see `pingjia hub updates`)" % rid)
    return row


def pause(store, rid):
    """Offer no more devices; those already offered go on downloading and installing."""
    return _set_state(store, rid, (RUNNING,), PAUSED)


def resume(store, rid):
    return _set_state(store, rid, (PAUSED,), RUNNING)


def cancel(store, rid):
    """End the rollout: offers not yet installed are withdrawn; devices already installing
    finish (their reports are still recorded)."""
    return _set_state(store, rid, (RUNNING, PAUSED, HALTED), CANCELLED)


def _set_state(store, rid, allowed, new):
    with store.transaction():
        row = _rollout_row(store, rid)
        if row["state"] not in allowed:
            hint = ""
            if row["state"] == HALTED and new == RUNNING:
                hint = " (it stopped on failures: start a new rollout once they are understood)"
            raise UpdateError("rollout %s is %s: cannot %s it%s" % (
                rid, row["state"], {PAUSED: "pause", RUNNING: "resume",
                                    CANCELLED: "cancel"}[new], hint))
        now = store.now()
        store.conn.execute("UPDATE rollouts SET state = ?, updated_at = ?, finished_at = ? "
                           "WHERE rid = ?", (new, now, now if new == CANCELLED else None, rid))
        if new == CANCELLED:
            _withdraw(store, rid, "cancelled")
    log.info("rollout %s %s", rid, new)
    return rollout(store, rid)


def _withdraw(store, rid, why):
    # Devices not yet installing stop here; the engine withdraws their retained offers.
    store.conn.execute("UPDATE rollout_devices SET state = ?, why = ?, updated_at = ? "
                       "WHERE rid = ? AND state IN ('offered', 'downloading')",
                       (WITHDRAWN, why, store.now(), rid))


def counts(store, rid):
    out = {s: 0 for s in DEVICE_STATES}
    for state, n in store.conn.execute("SELECT state, count(*) FROM rollout_devices "
                                       "WHERE rid = ? GROUP BY state", (rid,)):
        out[state] = n
    return out


def _summary(store, row):
    tally = counts(store, row["rid"])
    return {"rid": row["rid"], "version": row["version"], "board": row["board"],
            "state": row["state"], "stage": row["stage"], "canary": row["canary"],
            "batch": row["batch"], "max_failures": row["max_failures"], "why": row["why"],
            "created_at": row["created_at"], "updated_at": row["updated_at"],
            "finished_at": row["finished_at"], "counts": tally,
            "devices": sum(tally.values()), "failures": tally[FAILED]}


def rollouts(store, limit=50):
    """The newest rollouts first, each with its counts per device state."""
    return [_summary(store, r) for r in store.conn.execute(
        "SELECT * FROM rollouts ORDER BY n DESC LIMIT ?", (limit,))]


def rollout(store, rid, clock=None, offline_after_s=90):
    """One rollout with every device's state, progress and failure reason."""
    row = _rollout_row(store, rid)
    out = _summary(store, row)
    size = store.conn.execute("SELECT size, sha256 FROM releases WHERE id = ?",
                              (row["release_id"],)).fetchone()
    out["size"], out["sha256"] = size["size"], size["sha256"]
    facts = device_facts(store, (clock or store.clock)(), offline_after_s)
    devices = []
    for d in store.conn.execute(
            "SELECT rd.*, dv.window FROM rollout_devices rd LEFT JOIN devices dv "
            "ON dv.device_id = rd.device_id WHERE rd.rid = ? ORDER BY rd.canary DESC, "
            "rd.device_id", (rid,)):
        fact = facts.get(d["device_id"])
        off = d["off"]
        devices.append({
            "device_id": d["device_id"], "window": d["window"] or "", "state": d["state"],
            "canary": bool(d["canary"]), "off": off, "size": out["size"],
            "progress": round(min(off, out["size"]) / out["size"], 4)
            if off is not None and out["size"] else None,
            "why": d["why"], "from_fw": d["from_fw"],
            "fw": fact.fw if fact else None, "online": fact.online if fact else False,
            "chunks": d["chunks"], "offered_at": d["offered_at"],
            "updated_at": d["updated_at"]})
    out["device_list"] = devices
    return out


# -- what the hub knows of each device ---------------------------------------------------------

Fact = collections.namedtuple("Fact", "board fw online window")


def device_facts(store, now, offline_after_s=90):
    """device_id -> Fact for every active device: its board and firmware from its latest
    birth/heartbeat (None until it has reported), and whether it is online now."""
    out = {}
    for row in store.conn.execute(
            "SELECT d.device_id, d.window, h.online, h.last_seen, h.birth, h.hb FROM devices d "
            "LEFT JOIN device_health h ON h.device_id = d.device_id WHERE NOT d.retired"):
        birth = json.loads(row["birth"]) if row["birth"] else None
        hb = json.loads(row["hb"]) if row["hb"] else None
        # The newer report (by uptime, as the health monitor reads them) wins; a field it
        # lacks comes from the other.
        if birth and hb:
            newer, older = (hb, birth) if (_num(hb.get("up")) >= _num(birth.get("up"))) \
                else (birth, hb)
        else:
            newer, older = birth or hb or {}, {}
        board = newer.get("board") or older.get("board")
        fw = newer.get("fw") or older.get("fw")
        seen = healthlib.parse_iso(row["last_seen"]) if row["last_seen"] else None
        online = bool(row["online"]) and seen is not None and now - seen < offline_after_s
        out[row["device_id"]] = Fact(board if isinstance(board, str) else None,
                                     fw if isinstance(fw, str) else None, online,
                                     row["window"] or "")
    return out


def _num(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


# -- reports from devices (called by ingest, inside its transaction) ---------------------------

class Reports:
    """Handles `pj/<d>/up/ota` reports for ingest; one per ingest store connection."""

    def __init__(self, store):
        self.store = store
        self._images = collections.OrderedDict()

    def handle(self, device_id, obj):
        """Record one report; returns the downlinks to publish after the commit as
        (topic, payload, qos, retain). Raises Refused for a malformed or unwarranted one."""
        st, ver = obj.get("st"), obj.get("ver")
        if st not in REPORTS or not isinstance(ver, str) or not _VERSION.match(ver):
            raise Refused("schema")
        if "d" in obj and obj["d"] != device_id:
            raise Refused("topic_mismatch")
        if st == "get":
            return self._get(device_id, ver, obj.get("off"))
        why = obj.get("why")
        if st == "bad" and why not in BAD_WHY or st == "err" and why not in ERR_WHY:
            raise Refused("schema")
        row = self._row(device_id, ver, IN_FLIGHT + (DONE_DEV,), any_rollout=True)
        if row is None:
            # Well-formed but about nothing in flight (a device that rolled back long ago
            # says so on every connect): counted, not refused.
            self.store.bump("ota_stray")
            return []
        state = row["state"]
        if st in ("bad", "err"):
            new = (FAILED, why) if state != DONE_DEV else None
        elif st == "installed":
            # A repeat (QoS 1 may deliver twice) must not restart the confirmation clock.
            new = (INSTALLING, None) if state not in (DONE_DEV, INSTALLING) else None
        elif st == "ok":
            # An offer of the version it already runs is answered at once: nothing to do.
            new = None if state == DONE_DEV else (SKIPPED, "already running") \
                if state == OFFERED else (DONE_DEV, None)
        else:  # rolledback: also after a short-lived "ok" (the trial never held)
            new = (FAILED, ROLLED_BACK)
        if new is None:
            return []
        now = self.store.now()
        self.store.conn.execute(
            "UPDATE rollout_devices SET state = ?, why = ?, updated_at = ?, installed_t = "
            "CASE WHEN ? THEN ? ELSE installed_t END WHERE rid = ? AND device_id = ?",
            (new[0], new[1], now, new[0] == INSTALLING, self.store.clock(), row["rid"],
             device_id))
        self.store.add_event(device_id, "ota", {"rid": row["rid"], "ver": ver, "st": st,
                                                "state": new[0], "why": new[1]})
        log.info("device %s: %s %s -> %s%s", device_id, row["rid"], ver, new[0],
                 " (%s)" % new[1] if new[1] else "")
        return []

    def _row(self, device_id, ver, states, any_rollout):
        sql = ("SELECT rd.rid, rd.state, r.release_id, r.state AS rollout_state FROM "
               "rollout_devices rd JOIN rollouts r ON r.rid = rd.rid WHERE rd.device_id = ? "
               "AND r.version = ? AND rd.state IN (%s)" % ",".join("?" * len(states)))
        if not any_rollout:
            sql += " AND r.state IN ('running', 'paused')"
        return self.store.conn.execute(sql + " ORDER BY r.n DESC LIMIT 1",
                                       (device_id, ver) + tuple(states)).fetchone()

    def _get(self, device_id, ver, off):
        if not isinstance(off, int) or isinstance(off, bool) or off < 0:
            raise Refused("schema")
        # Only to a device in flight in an active rollout of exactly this version: a
        # release is never served to a device it was not offered to.
        row = self._row(device_id, ver, IN_FLIGHT, any_rollout=False)
        if row is None:
            if self._row(device_id, ver, FINISHED, any_rollout=True) is not None:
                # Its offer ended (withdrawn, failed, done) while this request was on its
                # way: no chunk, but no misbehaviour either.
                self.store.bump("ota_stray")
                return []
            raise Refused("ota_not_offered")
        image = self._image(row["release_id"])
        if off >= len(image):
            raise Refused("ota_offset")
        self.store.conn.execute(
            "UPDATE rollout_devices SET state = ?, off = ?, chunks = chunks + 1, "
            "updated_at = ? WHERE rid = ? AND device_id = ?",
            (DOWNLOADING, off, self.store.now(), row["rid"], device_id))
        payload = struct.pack(">I", off) + image[off:off + CHUNK]
        return [(chunk_topic(device_id), payload, 1, False)]

    def _image(self, release_id):
        image = self._images.get(release_id)
        if image is None:
            image = bytes(self.store.conn.execute("SELECT image FROM releases WHERE id = ?",
                                                  (release_id,)).fetchone()[0])
            self._images[release_id] = image
            while len(self._images) > IMAGES_CACHED:
                self._images.popitem(last=False)
        else:
            self._images.move_to_end(release_id)
        return image


# -- the rollout engine (a thread in the running hub) ------------------------------------------

class RolloutEngine:
    """Moves rollouts on from the store and keeps the retained offers right.

    `publish(topic, payload, qos, retain)` is the hub's MQTT publish (it returns paho's
    MQTTMessageInfo); `wait_connected(timeout)` tells when the hub's connection is up."""

    def __init__(self, db_path, publish, wait_connected=None, clock=time.time,
                 offline_after_s=90, tick_s=TICK_S):
        self.db_path = db_path
        self.publish = publish
        self.wait_connected = wait_connected or (lambda timeout: True)
        self.clock = clock
        self.offline_after_s = offline_after_s
        self.tick_s = tick_s
        self.store = None
        self.ticks = 0
        self.errors = 0
        self.offers_sent = 0
        self.offers_repeated = 0
        self.withdrawals_sent = 0
        self._offered_at = {}   # (rid, device_id) -> when its offer was last published
        self._stop = threading.Event()
        self._thread = None
        self._republish_due = True

    # -- lifecycle --------------------------------------------------------------------------
    def start(self):
        self.store = Store(self.db_path, clock=self.clock)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="pingjia-updates", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
            self._thread = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def _run(self):
        # After a start, and after the broker connection was lost, every offer that is meant
        # to be out is put out again: the previous run may have died between marking it and
        # publishing it, and an offer sent into a lost connection may never have arrived.
        self._republish_due = True
        while not self._stop.is_set():
            if not self.wait_connected(0):
                self._republish_due = True
                self.wait_connected(1.0)
                continue
            try:
                if self._republish_due:
                    self._republish_due = False
                    self.republish()
                self.tick()
            except Exception:
                self.errors += 1
                log.exception("rollout engine tick failed")
            self._stop.wait(self.tick_s)

    # -- one pass ---------------------------------------------------------------------------
    def republish(self):
        rows = self.store.conn.execute(
            "SELECT rd.device_id, r.rid, r.version, r.release_id FROM rollout_devices rd "
            "JOIN rollouts r ON r.rid = rd.rid WHERE rd.offer_live = 1 AND r.state IN "
            "('running', 'paused') AND rd.state IN %s" % _SQL_IN_FLIGHT).fetchall()
        for row in rows:
            if not self._send(offer_topic(row["device_id"]), self._offer(row)):
                self._republish_due = True
            self._offered_at[(row["rid"], row["device_id"])] = self.clock()
        return len(rows)

    def tick(self):
        store = self.store
        now = self.clock()
        self._confirm_timeouts(now)
        self._withdraw_finished()
        active = store.conn.execute("SELECT * FROM rollouts WHERE state IN "
                                    "('running', 'paused') ORDER BY n").fetchall()
        if active:
            facts = device_facts(store, now, self.offline_after_s)
            for row in active:
                with store.transaction():
                    offers = self._step(row["rid"], facts)
                for device_id, payload in offers:
                    if not self._send(offer_topic(device_id), payload):
                        self._republish_due = True   # marked live: sent again from the store
                    self._offered_at[(row["rid"], device_id)] = now
                    self.offers_sent += 1
            self._withdraw_finished()  # for a rollout that halted or finished this tick
            self._offer_again(facts, now)
        self.ticks += 1

    def _offer_again(self, facts, now):
        """An online device offered a while ago that has not asked for a single chunk gets
        its offer once more: a device that dropped it (busy, short of memory) picks it up."""
        rows = self.store.conn.execute(
            "SELECT rd.device_id, r.rid, r.version, r.release_id FROM rollout_devices rd "
            "JOIN rollouts r ON r.rid = rd.rid WHERE rd.state = 'offered' AND "
            "rd.offer_live = 1 AND r.state IN ('running', 'paused')").fetchall()
        waiting = set()
        for row in rows:
            key = (row["rid"], row["device_id"])
            waiting.add(key)
            last = self._offered_at.setdefault(key, now)
            fact = facts.get(row["device_id"])
            if now - last >= OFFER_AGAIN_S and fact is not None and fact.online:
                self._send(offer_topic(row["device_id"]), self._offer(row))
                self._offered_at[key] = now
                self.offers_repeated += 1
                log.info("device %s: %s offered again (no request yet)", row["device_id"],
                         row["rid"])
        for key in list(self._offered_at):
            if key not in waiting:
                del self._offered_at[key]

    def _confirm_timeouts(self, now):
        store = self.store
        late = store.conn.execute(
            "SELECT rid, device_id FROM rollout_devices WHERE state = 'installing' AND "
            "installed_t IS NOT NULL AND installed_t < ?", (now - CONFIRM_TIMEOUT_S,)).fetchall()
        if not late:
            return
        with store.transaction():
            self._fail_late(late)

    def _fail_late(self, late):
        store = self.store
        for row in late:
            # Still installing? A report may have come in since the look outside.
            cur = store.conn.execute(
                "UPDATE rollout_devices SET state = ?, why = ?, updated_at = ? WHERE rid = ? "
                "AND device_id = ? AND state = 'installing'",
                (FAILED, NO_CONFIRMATION, store.now(), row["rid"], row["device_id"]))
            if not cur.rowcount:
                continue
            store.add_event(row["device_id"], "ota", {"rid": row["rid"], "state": FAILED,
                                                      "why": NO_CONFIRMATION})
            log.warning("device %s: %s never confirmed its update", row["device_id"], row["rid"])

    def _withdraw_finished(self):
        """Empty retained offers for devices done, failed or withdrawn, and for every
        device of a rollout that stopped; offer_live is cleared once the broker has it."""
        store = self.store
        rows = store.conn.execute(
            "SELECT rd.rid, rd.device_id FROM rollout_devices rd JOIN rollouts r "
            "ON r.rid = rd.rid WHERE rd.offer_live = 1 AND (rd.state NOT IN %s OR r.state "
            "NOT IN ('running', 'paused'))" % _SQL_IN_FLIGHT).fetchall()
        for row in rows:
            device_id = row["device_id"]
            # The topic is the device's, not the rollout's: never wipe a newer live offer.
            newer = store.conn.execute(
                "SELECT 1 FROM rollout_devices rd JOIN rollouts r ON r.rid = rd.rid WHERE "
                "rd.device_id = ? AND rd.rid != ? AND rd.offer_live = 1 AND rd.state IN %s "
                "AND r.state IN ('running', 'paused')" % _SQL_IN_FLIGHT,
                (device_id, row["rid"])).fetchone()
            if newer is None and not self._send(offer_topic(device_id), b""):
                continue  # the broker did not take it: next tick
            with store.transaction():
                store.conn.execute("UPDATE rollout_devices SET offer_live = 0 WHERE rid = ? "
                                   "AND device_id = ?", (row["rid"], device_id))
            self.withdrawals_sent += 1

    def _send(self, topic, payload):
        try:
            info = self.publish(topic, payload, qos=1, retain=True)
            info.wait_for_publish(PUBLISH_WAIT_S)
            return info.is_published()
        except (ValueError, RuntimeError) as exc:
            log.warning("offer on %s not published: %s", topic, exc)
            return False

    def _offer(self, row):
        rel = self.store.conn.execute("SELECT size, sha256 FROM releases WHERE id = ?",
                                      (row["release_id"],)).fetchone()
        return json.dumps({"ver": row["version"], "size": rel["size"], "sha": rel["sha256"],
                           "rid": row["rid"]}, separators=(",", ":"))

    def _step(self, rid, facts):
        """One rollout, in one transaction: membership, failures, stage, new offers.
        Returns [(device_id, offer payload)] to publish after the commit."""
        store = self.store
        conn = store.conn
        ro = conn.execute("SELECT * FROM rollouts WHERE rid = ?", (rid,)).fetchone()
        if ro["state"] not in ACTIVE:
            return []
        version, board = ro["version"], ro["board"]
        now = store.now()
        rows = {r["device_id"]: dict(r) for r in conn.execute(
            "SELECT * FROM rollout_devices WHERE rid = ?", (rid,))}
        # Membership: every active device of this board, and those whose board is not
        # known yet (never connected: they wait as pending until they report one).
        for device_id, fact in facts.items():
            if device_id not in rows and fact.board in (None, board):
                conn.execute("INSERT INTO rollout_devices (rid, device_id, state, from_fw,"
                             " updated_at) VALUES (?,?,?,?,?)",
                             (rid, device_id, PENDING, fact.fw, now))
                rows[device_id] = {"device_id": device_id, "state": PENDING, "canary": 0,
                                   "from_fw": fact.fw}
        for device_id, row in list(rows.items()):
            fact = facts.get(device_id)
            if fact is None and row["state"] in IN_FLIGHT:
                # Retired while updating: nothing more will come from it under this id.
                conn.execute("UPDATE rollout_devices SET state = ?, why = 'retired', "
                             "updated_at = ? WHERE rid = ? AND device_id = ?",
                             (WITHDRAWN, now, rid, device_id))
                row["state"] = WITHDRAWN
            if row["state"] != PENDING:
                continue
            if fact is None or (fact.board is not None and fact.board != board):
                # Retired, or it turned out to be another board: not part of this rollout.
                conn.execute("DELETE FROM rollout_devices WHERE rid = ? AND device_id = ?",
                             (rid, device_id))
                del rows[device_id]
            elif fact.fw == version:
                conn.execute("UPDATE rollout_devices SET state = ?, why = ?, from_fw = ?, "
                             "updated_at = ? WHERE rid = ? AND device_id = ?",
                             (SKIPPED, "already on %s" % version, fact.fw, now, rid, device_id))
                row["state"] = SKIPPED
            elif fact.fw != row["from_fw"]:
                conn.execute("UPDATE rollout_devices SET from_fw = ? WHERE rid = ? AND "
                             "device_id = ?", (fact.fw, rid, device_id))
        failures = sum(1 for r in rows.values() if r["state"] == FAILED)
        if failures > ro["max_failures"]:
            why = "%d failed (at most %d allowed)" % (failures, ro["max_failures"])
            conn.execute("UPDATE rollouts SET state = ?, why = ?, updated_at = ?, "
                         "finished_at = ? WHERE rid = ?", (HALTED, why, now, now, rid))
            _withdraw(store, rid, "halted")
            log.warning("rollout %s halted: %s", rid, why)
            return []
        if all(r["state"] in FINISHED for r in rows.values()):
            conn.execute("UPDATE rollouts SET state = ?, stage = ?, updated_at = ?, "
                         "finished_at = ? WHERE rid = ?", (DONE, REST, now, now, rid))
            log.info("rollout %s done", rid)
            return []
        if ro["state"] == PAUSED:
            return []
        # Candidates: pending, known to be this board and not yet on this version. New
        # offers go to online ones; offline devices wait (an offer already out waits for
        # them on the broker, retained).
        candidates = sorted(d for d, r in rows.items() if r["state"] == PENDING and
                            facts[d].board == board)
        online = [d for d in candidates if facts[d].online]
        picks = []
        stage = ro["stage"]
        if stage == CANARY:
            chosen = [d for d, r in rows.items() if r["canary"]]
            picks = online[:max(0, ro["canary"] - len(chosen))]
            chosen += picks
            settled = all(rows[d]["state"] in FINISHED for d in chosen if d not in picks)
            if chosen and not picks and settled and (len(chosen) >= ro["canary"] or
                                                      not candidates):
                stage = REST
                conn.execute("UPDATE rollouts SET stage = ?, updated_at = ? WHERE rid = ?",
                             (REST, now, rid))
                log.info("rollout %s: canaries settled, on to the rest", rid)
                online = [d for d in online if d not in picks]
        if stage == REST:
            in_flight = sum(1 for r in rows.values() if r["state"] in IN_FLIGHT)
            picks = online[:max(0, ro["batch"] - in_flight)]
        offers = []
        for device_id in picks:
            conn.execute("UPDATE rollout_devices SET state = ?, canary = ?, offer_live = 1, "
                         "offered_at = ?, updated_at = ?, why = NULL WHERE rid = ? AND "
                         "device_id = ?", (OFFERED, 1 if stage == CANARY else 0, now, now, rid,
                                           device_id))
            store.add_event(device_id, "ota", {"rid": rid, "ver": version, "state": OFFERED})
            offers.append((device_id, self._offer({"rid": rid, "version": version,
                                                   "release_id": ro["release_id"]})))
        if offers:
            log.info("rollout %s (%s): offered to %d device(s)", rid, stage, len(offers))
        return offers
