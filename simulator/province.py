"""The reference provincial 好差评 receiver: verifies signed, chained batches and stores records.

It plays the province in tests and simulations: an aiohttp app (make_app) over its own SQLite
store (ProvinceStore). It speaks every profile it is given (hub/profiles/*.json by default):
each profile's endpoint path, request authentication (token or app key with signed requests,
checked against a registry of hub credentials) and SM4 payload encryption. It checks each
batch's signature (Ed25519, ECDSA P-256 or SM2, as the profile allows) against trusted hub keys
and keys introduced by rotation statements in the chain, the per-hub hash chain, each record's
fields in the profile's terms, and dedupes records by voteId across batches. A fault switch
(only when enabled) makes it fail the ways a real provincial system does. verify_store
re-checks the stored audit trail. docs/province.md is the specification.
"""
import asyncio
import collections
import datetime
import glob
import hashlib
import json
import os
import re
import sqlite3
import threading
import time

from aiohttp import web

from hub import PingjiaError
from hub import batch as batchlib
from hub import schemes

# A batch of a few thousand records is a few MB; anything far larger is not a batch.
MAX_BODY = 64 * 1024 * 1024
RECORDS_LIMIT_DEFAULT = 1000
RECORDS_LIMIT_MAX = 10000
FAULT_MODES = ("ok", "error", "timeout", "slow", "drop")
# How long a "timeout" fault holds a request when no delay_ms is given: longer than any
# sensible client timeout (the hub's default is 10 s).
TIMEOUT_HOLD_MS = 30000
SLOW_DELAY_MS = 2000

COUNTERS = ("duplicates", "rejected", "resent_batches", "chain_errors", "bad_signatures",
            "bad_requests", "altered", "faulted", "auth_failures", "learned_keys")
# Nonces of signed requests are remembered for the allowed clock skew; past this many the
# oldest are forgotten first (at 300 s skew that is over 300 requests a second sustained).
NONCE_CACHE_MAX = 100000

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_VOTE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}:[0-9]{1,10}$")
_ASSESS_TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    hub TEXT NOT NULL,
    n INTEGER NOT NULL,
    prev TEXT NOT NULL,
    hash TEXT NOT NULL,
    sig TEXT NOT NULL,
    key_id TEXT NOT NULL,
    profile TEXT,
    body TEXT NOT NULL,
    answer TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL,
    UNIQUE (hub, n)
);
CREATE TABLE IF NOT EXISTS records (
    vote_id TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL,
    rated INTEGER NOT NULL,
    satisfaction INTEGER,
    fields TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_received ON records (received_at_ms);
CREATE TABLE IF NOT EXISTS hubs (
    hub TEXT PRIMARY KEY,
    last_n INTEGER NOT NULL,
    last_hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS trusted_keys (
    key_id TEXT PRIMARY KEY,
    pem TEXT NOT NULL,
    added_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS learned_keys (
    hub TEXT NOT NULL,
    key_id TEXT NOT NULL,
    pem TEXT NOT NULL,
    by_key TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    added_at_ms INTEGER NOT NULL,
    PRIMARY KEY (hub, key_id)
);
CREATE TABLE IF NOT EXISTS profiles (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    added_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS retired_keys (
    hub TEXT NOT NULL,
    key_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    PRIMARY KEY (hub, key_id)
);
"""


class ProvinceError(PingjiaError):
    """The receiver cannot start or its store cannot be read."""


def _wall_ms():
    return int(time.time() * 1000)


def _envelope_text(batch):
    """What of the signature envelope the store keeps beside sig and key_id."""
    envelope = {"alg": batch.get("alg", schemes.ED25519)}
    if batch.get("rotations"):
        envelope["rotations"] = batch["rotations"]
    return json.dumps(envelope, ensure_ascii=False, sort_keys=True)


# ---------------------------------------------------------------- trusted hub keys

class TrustedKeys:
    """Hub public keys by key_id: files given at start, plus every *.pem in trust folders.

    A batch signed by a key not yet known makes the folders be read again, so a hub set up
    after the receiver started is trusted once its public key lands in a trust folder.
    """

    def __init__(self, keys=(), dirs=()):
        self._keys = {}
        self._pems = {}
        self.dirs = list(dirs)
        for key in keys:
            self.add(key)
        self.rescan()

    @classmethod
    def from_files(cls, paths=(), dirs=()):
        trusted = cls(dirs=())
        for path in paths:
            trusted.add_file(path)
        for folder in dirs:
            if not os.path.isdir(folder):
                raise ProvinceError("%s: trust folder does not exist" % folder)
        trusted.dirs = list(dirs)
        trusted.rescan()
        return trusted

    def add(self, public_key):
        kid = batchlib.key_id(public_key)
        self._keys[kid] = public_key
        self._pems[kid] = batchlib.public_pem(public_key).decode("ascii")
        return kid

    def add_file(self, path):
        try:
            with open(path, "rb") as f:
                pem = f.read()
        except OSError as exc:
            raise ProvinceError("%s: cannot read trusted key: %s" % (path, exc.strerror)) from None
        try:
            return self.add(batchlib.load_public_key(pem))
        except batchlib.BatchError as exc:
            raise ProvinceError("%s: %s" % (path, exc)) from None

    def rescan(self):
        for folder in self.dirs:
            for path in sorted(glob.glob(os.path.join(folder, "*.pem"))):
                try:
                    self.add_file(path)
                except ProvinceError:
                    # A private key or a half-written file in a shared folder is not ours to
                    # judge; it simply is not trusted.
                    continue

    def get(self, kid):
        key = self._keys.get(kid)
        if key is None and self.dirs:
            self.rescan()
            key = self._keys.get(kid)
        return key

    def pems(self):
        return dict(self._pems)

    def __len__(self):
        return len(self._keys)


def _as_trusted(trusted_keys):
    if isinstance(trusted_keys, TrustedKeys):
        return trusted_keys
    if isinstance(trusted_keys, dict):
        return TrustedKeys(trusted_keys.values())
    return TrustedKeys(trusted_keys or ())


# ---------------------------------------------------------------- record checks

def check_record(record, profile=None):
    """None when the record is acceptable, else a short reason code.

    With a profile, the record is read in the profile's terms (its field names, satisfaction
    numbering, indicator separator and time format) and reasons name its fields.
    """
    if profile is None:
        return _check_national(record)
    reason = _check_national(batchlib.national_form(record, profile))
    return None if reason is None else batchlib.missing_field_name(reason, profile)


def _check_national(record):
    if not isinstance(record, dict):
        return "not_object"
    for field in batchlib.RECORD_FIELDS:
        if field not in record:
            return "missing_" + field
    if not isinstance(record["voteId"], str) or not _VOTE_ID.match(record["voteId"]):
        return "bad_voteId"
    if not isinstance(record["deviceNo"], str) or not record["deviceNo"]:
        return "bad_deviceNo"
    if not isinstance(record["pf"], str) or not record["pf"]:
        return "bad_pf"
    for field in ("projectNo", "taskCode", "taskName", "areaCode", "deptCode", "proManager",
                  "proManagerNo", "evalDetail", "writingEvaluation"):
        if not isinstance(record[field], str):
            return "bad_" + field
    if "windowNo" in record and not isinstance(record["windowNo"], str):
        return "bad_windowNo"
    if not _valid_time(record["assessTime"]):
        return "bad_assessTime"
    if record["assessNumber"] not in (1, 2) or isinstance(record["assessNumber"], bool):
        return "bad_assessNumber"
    rated = record["rated"]
    if rated not in (0, 1) or isinstance(rated, bool):
        return "bad_rated"
    satisfaction = record["satisfaction"]
    if rated == 0:
        if satisfaction not in ("", None):
            return "unrated_with_satisfaction"
        return None
    if satisfaction in ("", None):
        return "satisfaction_required"
    level = _level(satisfaction)
    if level is None:
        return "satisfaction_range"
    if level <= 2 and not record["evalDetail"]:
        return "evalDetail_required"
    return None


def _level(satisfaction):
    # "1".."5" as the national interface sends it; a plain integer is read the same way.
    if isinstance(satisfaction, bool):
        return None
    if isinstance(satisfaction, int):
        value = satisfaction
    elif isinstance(satisfaction, str) and satisfaction.isdigit() and len(satisfaction) == 1:
        value = int(satisfaction)
    else:
        return None
    return value if 1 <= value <= 5 else None


def _valid_time(text):
    if not isinstance(text, str) or not _ASSESS_TIME.match(text):
        return False
    try:
        datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return False
    return True


def check_batch_shape(batch):
    """None when the body has every batch field with the right type, else a reason."""
    if not isinstance(batch, dict):
        return "body is not a JSON object"
    for field, kind in (("batch_id", str), ("hub", str), ("n", int), ("prev", str),
                        ("created", str), ("profile", str), ("records", list), ("sig", str),
                        ("key_id", str)):
        if field not in batch:
            return "missing " + field
        if not isinstance(batch[field], kind) or isinstance(batch[field], bool):
            return "%s has the wrong type" % field
    if not isinstance(batch.get("alg", schemes.ED25519), str):
        return "alg has the wrong type"
    if not isinstance(batch.get("rotations", []), list):
        return "rotations has the wrong type"
    if not batch["hub"] or batch["n"] < 1:
        return "hub must be non-empty and n >= 1"
    if batch["batch_id"] != "%s-%d" % (batch["hub"], batch["n"]):
        return "batch_id must be <hub>-<n>"
    if not _HEX64.match(batch["prev"]):
        return "prev must be 64 lowercase hex"
    return None


# ---------------------------------------------------------------- the store

class ProvinceStore:
    """The receiver's SQLite store (WAL): batches, records, per-hub chain heads, counters."""

    def __init__(self, path, now_ms=_wall_ms):
        self.path = path
        self._now_ms = now_ms
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA busy_timeout=5000")
            self.db.executescript(_SCHEMA)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(batches)")}
            if "envelope" not in columns:
                # Stores made before keys could rotate: their batches carry no envelope.
                self.db.execute("ALTER TABLE batches ADD COLUMN envelope TEXT")
        except (OSError, sqlite3.Error) as exc:
            raise ProvinceError("%s: cannot open the province store: %s" % (path, exc)) from None
        row = self.db.execute("SELECT MAX(received_at_ms) FROM batches").fetchone()
        self._last_ms = row[0] or 0

    def close(self):
        self.db.close()

    def _received_ms(self):
        # Never earlier than the last batch: readers page through records by received_at_ms,
        # so a wall clock stepping back must not hide newer records behind older ones.
        self._last_ms = max(self._now_ms(), self._last_ms)
        return self._last_ms

    def count(self, name, k=1):
        self.db.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) "
                        "DO UPDATE SET value = value + excluded.value", (name, k))

    def counter(self, name):
        row = self.db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return row[0] if row else 0

    def remember_keys(self, trusted):
        """Record the keys this receiver trusts, so `verify` can re-check without them."""
        now = self._now_ms()
        for kid, pem in trusted.pems().items():
            self.db.execute("INSERT OR IGNORE INTO trusted_keys (key_id, pem, added_at_ms) "
                            "VALUES (?, ?, ?)", (kid, pem, now))

    def remembered_keys(self):
        trusted = TrustedKeys()
        for (pem,) in self.db.execute("SELECT pem FROM trusted_keys"):
            try:
                trusted.add(batchlib.load_public_key(pem.encode("ascii")))
            except (batchlib.BatchError, UnicodeError):
                continue
        return trusted

    def remember_profiles(self, profiles):
        """Record the profiles this receiver speaks, so `verify` reads records as they came."""
        now = self._now_ms()
        for name, profile in profiles.by_name.items():
            self.db.execute("INSERT INTO profiles (name, body, added_at_ms) VALUES (?, ?, ?) "
                            "ON CONFLICT(name) DO UPDATE SET body = excluded.body, "
                            "added_at_ms = excluded.added_at_ms",
                            (name, json.dumps(profile, ensure_ascii=False, sort_keys=True), now))

    def remembered_profiles(self):
        profiles = []
        for (body,) in self.db.execute("SELECT body FROM profiles ORDER BY name"):
            try:
                profile = json.loads(body)
                batchlib._check_profile(profile, "stored")
            except (ValueError, batchlib.ProfileError):
                continue
            profiles.append(profile)
        return Profiles(profiles) if profiles else Profiles.load()

    def learned_key(self, hub, kid):
        """A key a rotation statement in this hub's chain introduced, or None."""
        row = self.db.execute("SELECT pem FROM learned_keys WHERE hub = ? AND key_id = ?",
                              (hub, kid)).fetchone()
        if row is None:
            return None
        try:
            return batchlib.load_public_key(row[0].encode("ascii"))
        except (batchlib.BatchError, UnicodeError):
            return None

    def accept(self, batch, digest, profile=None, learned=()):
        """Store a signature-checked batch. Returns (http status, answer).

        profile: how to read its records (None: national). learned: [(key_id, public key,
        by key_id)] the batch's rotation statements introduced, kept only if it is accepted.
        """
        self.db.execute("BEGIN IMMEDIATE")
        try:
            status, answer = self._accept(batch, digest, profile, learned)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return status, answer

    def _accept(self, batch, digest, profile, learned):
        row = self.db.execute("SELECT hash, answer FROM batches WHERE batch_id = ?",
                              (batch["batch_id"],)).fetchone()
        if row is not None:
            if row[0] == digest:
                # The hub never saw our answer (timeout, dropped connection) and asks again.
                self.count("resent_batches")
                return 200, json.loads(row[1])
            self.count("altered")
            return 409, {"error": "altered", "batch_id": batch["batch_id"]}
        retired = self.db.execute("SELECT batch_id FROM retired_keys WHERE hub = ? AND key_id = ?",
                                  (batch["hub"], batch["key_id"])).fetchone()
        if retired is not None:
            # A key rotated out must not go on extending the chain: it may be the one lost.
            self.count("bad_signatures")
            return 401, {"error": "signature", "detail": "key %s was retired by the rotation "
                         "in %s" % (batch["key_id"], retired[0])}
        head = self.db.execute("SELECT last_n, last_hash FROM hubs WHERE hub = ?",
                               (batch["hub"],)).fetchone()
        last_n, last_hash = head if head else (0, batchlib.GENESIS)
        if batch["n"] != last_n + 1 or batch["prev"] != last_hash:
            self.count("chain_errors")
            return 409, {"error": "chain", "expected_n": last_n + 1, "expected_prev": last_hash}
        now = self._received_ms()
        accepted, duplicate, rejected, seen = [], [], [], set()
        for index, record in enumerate(batch["records"]):
            national = batchlib.national_form(record, profile) if profile else record
            reason = _check_national(national)
            if reason is not None and profile:
                reason = batchlib.missing_field_name(reason, profile)
            if reason is not None:
                rid = national.get("voteId") if isinstance(national, dict) else None
                rejected.append({"id": rid if isinstance(rid, str) else "#%d" % index,
                                 "reason": reason})
                continue
            vote_id = national["voteId"]
            if vote_id in seen or self.db.execute(
                    "SELECT 1 FROM records WHERE vote_id = ?", (vote_id,)).fetchone():
                duplicate.append(vote_id)
                continue
            seen.add(vote_id)
            self.db.execute(
                "INSERT INTO records (vote_id, batch_id, rated, satisfaction, fields, "
                "received_at_ms) VALUES (?, ?, ?, ?, ?, ?)",
                (vote_id, batch["batch_id"], national["rated"],
                 _level(national["satisfaction"]) if national["rated"] else None,
                 json.dumps(record, ensure_ascii=False, sort_keys=True), now))
            accepted.append(vote_id)
        answer = {"batch_id": batch["batch_id"], "accepted": accepted, "duplicate": duplicate,
                  "rejected": rejected}
        self.db.execute(
            "INSERT INTO batches (batch_id, hub, n, prev, hash, sig, key_id, profile, body, "
            "answer, received_at_ms, envelope) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (batch["batch_id"], batch["hub"], batch["n"], batch["prev"], digest, batch["sig"],
             batch["key_id"], batch["profile"], batchlib.canonical(batch).decode("utf-8"),
             json.dumps(answer, ensure_ascii=False), now, _envelope_text(batch)))
        self.db.execute("INSERT INTO hubs (hub, last_n, last_hash) VALUES (?, ?, ?) "
                        "ON CONFLICT(hub) DO UPDATE SET last_n = excluded.last_n, "
                        "last_hash = excluded.last_hash", (batch["hub"], batch["n"], digest))
        self._learn(batch, learned, now)
        if duplicate:
            self.count("duplicates", len(duplicate))
        if rejected:
            self.count("rejected", len(rejected))
        return 200, answer

    def _learn(self, batch, learned, now):
        hub = batch["hub"]
        for kid, public, by in learned:
            cur = self.db.execute(
                "INSERT OR IGNORE INTO learned_keys (hub, key_id, pem, by_key, batch_id, "
                "added_at_ms) VALUES (?, ?, ?, ?, ?, ?)",
                (hub, kid, batchlib.public_pem(public).decode("ascii"), by, batch["batch_id"],
                 now))
            if cur.rowcount:
                self.count("learned_keys")
        # Every key on the rotation path to the key that signed this batch is now retired
        # for this hub.
        kid, seen = batch["key_id"], set()
        while kid not in seen:
            seen.add(kid)
            row = self.db.execute("SELECT by_key FROM learned_keys WHERE hub = ? AND key_id = ?",
                                  (hub, kid)).fetchone()
            if row is None:
                break
            kid = row[0]
            self.db.execute("INSERT OR IGNORE INTO retired_keys (hub, key_id, batch_id) "
                            "VALUES (?, ?, ?)", (hub, kid, batch["batch_id"]))

    def stats(self):
        one = lambda sql: self.db.execute(sql).fetchone()[0]  # noqa: E731
        result = {
            "batches": one("SELECT COUNT(*) FROM batches"),
            "records": one("SELECT COUNT(*) FROM records"),
            "votes": one("SELECT COUNT(*) FROM records WHERE rated = 1"),
            "unrated": one("SELECT COUNT(*) FROM records WHERE rated = 0"),
        }
        for name in COUNTERS:
            result[name] = self.counter(name)
        result["last_n"] = {hub: n for hub, n in
                            self.db.execute("SELECT hub, last_n FROM hubs ORDER BY hub")}
        return result

    def records(self, after_ms=0, limit=RECORDS_LIMIT_DEFAULT):
        """Records received after after_ms, oldest first, and whether more remain.

        A page always ends on a whole millisecond (all records of one batch share one), so a
        reader that asks again with after_ms = the last received_at_ms it saw never skips one.
        """
        rows = self.db.execute(
            "SELECT vote_id, batch_id, fields, received_at_ms FROM records "
            "WHERE received_at_ms > ? ORDER BY received_at_ms, rowid LIMIT ?",
            (after_ms, limit + 1)).fetchall()
        more = len(rows) > limit
        if more:
            rows = rows[:limit]
            last = rows[-1][3]
            rows += self.db.execute(
                "SELECT vote_id, batch_id, fields, received_at_ms FROM records "
                "WHERE received_at_ms = ? ORDER BY rowid LIMIT -1 OFFSET ?",
                (last, sum(1 for r in rows if r[3] == last))).fetchall()
            more = self.db.execute("SELECT 1 FROM records WHERE received_at_ms > ? LIMIT 1",
                                   (last,)).fetchone() is not None
        out = []
        for vote_id, batch_id, fields, received in rows:
            record = json.loads(fields)
            record.update(voteId=vote_id, batch_id=batch_id, received_at_ms=received)
            out.append(record)
        return out, more


# ---------------------------------------------------------------- fault injection

class Faults:
    """The current injected fault; it reverts to "ok" after for_s seconds when given."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self.mode, self.status, self.delay_ms, self._until = "ok", 503, None, None

    def set(self, spec):
        if not isinstance(spec, dict):
            raise ValueError("fault spec must be a JSON object")
        mode = spec.get("mode", "ok")
        if mode not in FAULT_MODES:
            raise ValueError("mode must be one of " + ", ".join(FAULT_MODES))
        status = spec.get("status", 503)
        if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
            raise ValueError("status must be an HTTP error status 400..599")
        delay_ms = spec.get("delay_ms")
        if delay_ms is not None and (not isinstance(delay_ms, (int, float))
                                     or isinstance(delay_ms, bool) or delay_ms < 0):
            raise ValueError("delay_ms must be a number >= 0")
        for_s = spec.get("for_s")
        if for_s is not None and (not isinstance(for_s, (int, float))
                                  or isinstance(for_s, bool) or for_s <= 0):
            raise ValueError("for_s must be a number > 0")
        self.mode, self.status, self.delay_ms = mode, status, delay_ms
        self._until = None if for_s is None else self._clock() + for_s

    def current(self):
        if self._until is not None and self._clock() >= self._until:
            self.mode, self.delay_ms, self._until = "ok", None, None
        return self.mode

    def describe(self):
        mode = self.current()
        remaining = None if self._until is None else max(0.0, self._until - self._clock())
        return {"mode": mode, "status": self.status, "delay_ms": self.delay_ms,
                "remaining_s": remaining}

    def delay_s(self, default_ms):
        return (default_ms if self.delay_ms is None else self.delay_ms) / 1000.0


# ---------------------------------------------------------------- profiles and hub credentials

class Profiles:
    """The profiles the receiver speaks, by name and by endpoint path."""

    def __init__(self, profiles):
        self.by_name = {}
        for profile in profiles:
            self.by_name[profile["name"]] = profile
        if "national" not in self.by_name:
            self.by_name["national"] = batchlib.load_profile("national")
        self.by_path = {}
        for profile in self.by_name.values():
            self.by_path.setdefault(batchlib.endpoint_path(profile), []).append(profile)

    @classmethod
    def load(cls, extra_paths=()):
        """Every shipped profile plus profile files given by path (a file wins over a
        shipped profile of the same name)."""
        profiles = dict(batchlib.shipped_profiles())
        for path in extra_paths:
            try:
                profile = batchlib.load_profile(path)
            except batchlib.ProfileError as exc:
                raise ProvinceError(str(exc)) from None
            profiles[profile["name"]] = profile
        return cls(profiles.values())

    def for_batch(self, name, path):
        """(profile, None) for a batch naming `name` posted to `path`, or (None, why)."""
        profile = self.by_name.get(name)
        if profile is None:
            # Batches naming a profile the receiver does not know (a file path, an older
            # name) are read as national records on the national path.
            if path == batchlib.DEFAULT_PATH:
                return self.by_name["national"], None
            return None, "profile %r is not known here" % name
        if batchlib.endpoint_path(profile) != path:
            return None, "profile %s is posted to /api/v1%s" % (name,
                                                                batchlib.endpoint_path(profile))
        return profile, None


class Clients:
    """The credentials the province issued to each hub: token, app key/secret, SM4 key.

    Empty means an open receiver: requests are not authenticated and nothing can be
    decrypted (batch signatures are still checked). A file holds
    {"clients": [{"hub": "hall-7", "token": …, "app_key": …, "app_secret": …,
    "sm4_key": …}]}.
    """

    def __init__(self, entries=()):
        self.entries = []
        self._by_token, self._by_app_key = {}, {}
        for entry in entries:
            self.add(entry)

    @classmethod
    def from_file(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            entries = data["clients"]
            if not isinstance(entries, list):
                raise ValueError("clients must be a list")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ProvinceError("%s: unreadable clients file: %s" % (path, exc)) from None
        clients = cls()
        for entry in entries:
            clients.add(entry)
        return clients

    def add(self, entry):
        try:
            entry = batchlib.check_credentials(dict(entry), "client")
        except (batchlib.CredentialsError, TypeError, ValueError) as exc:
            raise ProvinceError(str(exc)) from None
        if not entry.get("hub"):
            raise ProvinceError("client: every client names its hub")
        self.entries.append(entry)
        if entry.get("token"):
            self._by_token[entry["token"]] = entry
        if entry.get("app_key"):
            self._by_app_key[entry["app_key"]] = entry

    def by_token(self, token):
        return self._by_token.get(token)

    def by_app_key(self, app_key):
        return self._by_app_key.get(app_key)

    def __len__(self):
        return len(self.entries)


class NonceCache:
    """Nonces of signed requests seen within the allowed skew, so a replay is refused."""

    def __init__(self, limit=NONCE_CACHE_MAX):
        self.limit = limit
        self._seen = collections.OrderedDict()
        self.forgotten = 0

    def fresh(self, key, now_s, ttl_s):
        """True (and remembered) when key was not seen within ttl_s."""
        while self._seen:
            oldest, expiry = next(iter(self._seen.items()))
            if expiry > now_s and len(self._seen) < self.limit:
                break
            self._seen.popitem(last=False)
            if expiry > now_s:
                self.forgotten += 1
        if key in self._seen:
            return False
        self._seen[key] = now_s + ttl_s
        return True


class Refused(Exception):
    """A request turned away before its batch is looked at: (status, answer, counter)."""

    def __init__(self, status, answer, counter):
        Exception.__init__(self, answer.get("error"))
        self.status, self.answer, self.counter = status, answer, counter


def authenticate(profiles, clients, nonces, path, headers, data, now_s):
    """(client or None, how it authenticated: "none" | "token" | "app_key").

    Tries the auth of every profile posted to this path; raises Refused when the receiver has
    clients and the request proves none of them."""
    if not len(clients):
        return None, "none"
    full_path = "/api/v1" + path
    for profile in profiles.by_path.get(path, []):
        auth = profile.get("auth", {})
        kind = batchlib.auth_type(profile)
        if kind == "token":
            value = headers.get(auth.get("header", "Authorization"))
            prefix = auth.get("prefix", "Bearer ")
            if value is None or not value.startswith(prefix):
                continue
            client = clients.by_token(value[len(prefix):])
            if client is None:
                raise Refused(401, {"error": "auth", "detail": "unknown token"}, "auth_failures")
            return client, "token"
        if kind == "app_key":
            names = dict(batchlib.APP_KEY_HEADERS, **auth.get("headers", {}))
            app_key = headers.get(names["app_key"])
            if app_key is None:
                continue
            return _check_signed_request(auth, names, clients.by_app_key(app_key), full_path,
                                         headers, data, nonces, now_s), "app_key"
    raise Refused(401, {"error": "auth", "detail": "no credentials this endpoint accepts"},
                  "auth_failures")


def _check_signed_request(auth, names, client, full_path, headers, data, nonces, now_s):
    def refuse(why):
        raise Refused(401, {"error": "auth", "detail": why}, "auth_failures")

    if client is None or not client.get("app_secret"):
        refuse("unknown app key")
    timestamp, nonce = headers.get(names["timestamp"], ""), headers.get(names["nonce"], "")
    digest, signature = headers.get(names["digest"], ""), headers.get(names["signature"], "")
    if not timestamp.isdigit() or not 8 <= len(nonce) <= 64:
        refuse("timestamp and nonce headers are required")
    skew = auth.get("max_skew_s", 300)
    if abs(now_s - int(timestamp) / 1000.0) > skew:
        refuse("timestamp outside the allowed %d s" % skew)
    if not schemes.mac_equal(digest, schemes.digest_hex(auth.get("digest", "sha256"), data)):
        refuse("body digest does not match the body")
    expected = batchlib.request_signature(auth.get("mac", "hmac-sha256"), client["app_secret"],
                                          "POST", full_path, timestamp, nonce, digest)
    if not schemes.mac_equal(signature, expected):
        refuse("request signature does not verify")
    # Only a request that proved the secret can spend a nonce, so nobody can burn another's.
    if not nonces.fresh((client["app_key"], nonce), now_s, skew * 2):
        refuse("nonce already used (a replayed request)")
    return client


# ---------------------------------------------------------------- HTTP

STORE = web.AppKey("store", ProvinceStore)
TRUSTED = web.AppKey("trusted", TrustedKeys)
FAULTS = web.AppKey("faults", Faults)
CLOSING = web.AppKey("closing", asyncio.Event)
PROFILES = web.AppKey("profiles", Profiles)
CLIENTS = web.AppKey("clients", Clients)
NONCES = web.AppKey("nonces", NonceCache)
WALL = web.AppKey("wall", object)


def make_app(store, trusted_keys, faults=False, clock=time.monotonic, profiles=None,
             clients=None, wall=time.time):
    """The receiver as an aiohttp app. faults=True adds the /_control/faults switch.

    profiles: a Profiles (default: every shipped profile); each profile's endpoint path is
    served under /api/v1. clients: a Clients registry (default: none, an open receiver).
    wall: the clock signed requests' timestamps are checked against.
    """
    app = web.Application(client_max_size=MAX_BODY)
    app[STORE] = store
    app[TRUSTED] = _as_trusted(trusted_keys)
    app[FAULTS] = Faults(clock)
    app[PROFILES] = profiles if profiles is not None else Profiles.load()
    app[CLIENTS] = clients if clients is not None else Clients()
    app[NONCES] = NonceCache()
    app[WALL] = wall
    store.remember_keys(app[TRUSTED])
    store.remember_profiles(app[PROFILES])
    for path in sorted(app[PROFILES].by_path):
        app.router.add_post("/api/v1" + path, _batch_handler(path))
    app.router.add_get("/api/v1/stats", _get_stats)
    app.router.add_get("/api/v1/records", _get_records)
    app.router.add_get("/healthz", _healthz)
    if faults:
        app.router.add_get("/_control/faults", _get_faults)
        app.router.add_post("/_control/faults", _post_faults)

    async def on_startup(app):
        app[CLOSING] = asyncio.Event()

    async def on_shutdown(app):
        # Wake requests held by a "timeout" or "slow" fault so shutdown does not wait for them.
        app[CLOSING].set()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    return app


def _json(status, body):
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, ensure_ascii=False))


async def _hold(app, seconds):
    try:
        await asyncio.wait_for(app[CLOSING].wait(), seconds)
    except asyncio.TimeoutError:
        pass


def _batch_handler(path):
    async def handler(request):
        return await _post_batch(request, path)
    return handler


async def _post_batch(request, path="/batches"):
    app = request.app
    store, faults = app[STORE], app[FAULTS]
    mode = faults.current()
    if mode == "error":
        store.count("faulted")
        return _json(faults.status, {"error": "injected", "mode": "error"})
    if mode == "timeout":
        store.count("faulted")
        await _hold(app, faults.delay_s(TIMEOUT_HOLD_MS))
        return _json(504, {"error": "injected", "mode": "timeout"})
    raw = await request.read()
    status, answer = receive(app, path, request.headers, raw)
    if mode == "slow":
        await _hold(app, faults.delay_s(SLOW_DELAY_MS))
    elif mode == "drop":
        # Stored (or refused) above; the hub just never hears about it.
        store.count("faulted")
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError()
    return _json(status, answer)


def receive(app, path, headers, raw):
    """One POSTed batch through authentication, decryption, checks and the store."""
    store = app[STORE]
    try:
        return _receive(store, app[TRUSTED], app[PROFILES], app[CLIENTS], app[NONCES],
                        app[WALL](), path, headers, raw)
    except Refused as refused:
        store.count(refused.counter)
        return refused.status, refused.answer


def _receive(store, trusted, profiles, clients, nonces, now_s, path, headers, raw):
    client, auth_used = authenticate(profiles, clients, nonces, path, headers, raw, now_s)
    encrypted = False
    try:
        outer = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, {"error": "bad_json"}, "bad_requests") from None
    if isinstance(outer, dict) and list(outer) == ["encrypted"]:
        if client is None or not client.get("sm4_key"):
            raise Refused(400, {"error": "encryption", "detail": "no SM4 key to decrypt with"},
                          "bad_requests")
        try:
            plain = batchlib.decrypt_body(raw, client["sm4_key"])
            outer = json.loads(plain.decode("utf-8"))
        except batchlib.BatchError as exc:
            raise Refused(400, {"error": "encryption", "detail": str(exc)},
                          "bad_requests") from None
        except (UnicodeDecodeError, ValueError):
            raise Refused(400, {"error": "bad_json"}, "bad_requests") from None
        encrypted = True
    batch = outer
    why = check_batch_shape(batch)
    if why is not None:
        raise Refused(400, {"error": "schema", "detail": why}, "bad_requests")
    profile, why = profiles.for_batch(batch["profile"], path)
    if profile is None:
        raise Refused(400, {"error": "profile", "detail": why}, "bad_requests")
    if client is not None:
        wanted = batchlib.auth_type(profile)
        if wanted != "none" and wanted != auth_used:
            raise Refused(401, {"error": "auth", "detail": "profile %s authenticates with %s"
                                % (profile["name"], wanted)}, "auth_failures")
        if client["hub"] != batch["hub"]:
            raise Refused(403, {"error": "hub", "detail": "these credentials belong to hub %s"
                                % client["hub"]}, "auth_failures")
        cipher = batchlib.encryption_cipher(profile)
        if cipher and not encrypted:
            raise Refused(400, {"error": "encryption", "detail": "profile %s requires %s"
                                % (profile["name"], cipher)}, "bad_requests")
    alg = batch.get("alg", schemes.ED25519)
    if alg not in batchlib.accepted_schemes(profile):
        raise Refused(401, {"error": "signature", "detail": "profile %s does not accept %s"
                            % (profile["name"], alg)}, "bad_signatures")
    key, learned = resolve_key(store, trusted, batch)
    if key is None or not batchlib.verify_batch(batch, key):
        raise Refused(401, {"error": "signature",
                            "detail": "unknown key" if key is None else
                            "signature does not verify"}, "bad_signatures")
    return store.accept(batch, batchlib.batch_hash(batch), profile, learned)


def resolve_key(store, trusted, batch):
    """(public key for the batch's key_id or None, keys its rotation statements introduce)."""
    hub, kid = batch["hub"], batch["key_id"]

    def known(key_id):
        return trusted.get(key_id) or store.learned_key(hub, key_id)

    key = known(kid)
    learned = batchlib.learn_rotations(batch, known) if batch.get("rotations") else []
    if key is None:
        for learned_kid, public, _by in learned:
            if learned_kid == kid:
                key = public
    return key, learned


async def _get_stats(request):
    return _json(200, request.app[STORE].stats())


async def _get_records(request):
    try:
        after_ms = int(request.query.get("after_ms", "0"))
        limit = int(request.query.get("limit", str(RECORDS_LIMIT_DEFAULT)))
    except ValueError:
        return _json(400, {"error": "after_ms and limit must be integers"})
    limit = max(1, min(limit, RECORDS_LIMIT_MAX))
    records, more = request.app[STORE].records(after_ms, limit)
    last_ms = records[-1]["received_at_ms"] if records else after_ms
    return _json(200, {"records": records, "last_ms": last_ms, "more": more})


async def _healthz(request):
    return _json(200, {"ok": True})


async def _get_faults(request):
    return _json(200, request.app[FAULTS].describe())


async def _post_faults(request):
    try:
        spec = json.loads((await request.read()).decode("utf-8") or "{}")
        request.app[FAULTS].set(spec)
    except (UnicodeDecodeError, ValueError) as exc:
        return _json(400, {"error": str(exc)})
    return _json(200, request.app[FAULTS].describe())


# ---------------------------------------------------------------- audit trail verification

def verify_store(store, trusted=None, profiles=None):
    """Re-check every stored batch and record. Returns a report dict; report["ok"] is the verdict.

    trusted: the hub keys to check signatures with; None uses the keys the receiver recorded.
    profiles: a Profiles to read records with; None uses the profiles the receiver recorded.
    Keys introduced by rotation are learned again from the statements in the stored chain
    (never from the learned_keys table), and a batch signed by a key an earlier rotation
    retired is reported. Each problem names the batch (or record) and says what is wrong.
    """
    trusted = store.remembered_keys() if trusted is None else _as_trusted(trusted)
    if profiles is None:
        profiles = store.remembered_profiles()
    problems = []

    def problem(kind, batch_id, detail, hub=None, n=None, vote_id=None):
        entry = {"problem": kind, "batch_id": batch_id, "hub": hub, "n": n, "detail": detail}
        if vote_id is not None:
            entry["voteId"] = vote_id
        problems.append(entry)

    rows = store.db.execute(
        "SELECT batch_id, hub, n, prev, hash, sig, key_id, body, answer, envelope FROM batches "
        "ORDER BY hub, n").fetchall()
    heads = dict(store.db.execute("SELECT hub, last_n FROM hubs").fetchall())
    by_hub, bodies = {}, {}
    for row in rows:
        by_hub.setdefault(row[1], []).append(row)
    for hub in sorted(set(by_hub) | set(heads)):
        stored = {row[2]: row for row in by_hub.get(hub, [])}
        top = max(list(stored) + [heads.get(hub, 0)])
        altered, real_hash = set(), {}
        keys = batchlib.ChainKeys(hub, trusted.get)
        for n in range(1, top + 1):
            batch_id = "%s-%d" % (hub, n)
            row = stored.get(n)
            if row is None:
                problem("missing", batch_id, "batch is not in the store", hub, n)
                continue
            why, body = _check_stored_batch(row, keys)
            real_hash[n] = hashlib.sha256(row[7].encode("utf-8")).hexdigest()
            if why is not None:
                altered.add(n)
                problem("altered", batch_id, why, hub, n)
            if body is not None:
                bodies[batch_id] = body
            prev = body["prev"] if body is not None else row[3]
            if n == 1:
                if prev != batchlib.GENESIS:
                    problem("chain", batch_id, "batch 1 does not start from the genesis hash",
                            hub, n)
            elif n - 1 in real_hash and prev != real_hash[n - 1] and n - 1 not in altered:
                problem("chain", batch_id,
                        "prev does not match batch %s-%d as stored" % (hub, n - 1), hub, n)
        for n in sorted(stored):
            if n < 1:
                problem("chain", stored[n][0], "batch number outside the chain", hub, n)
    problems.extend(_check_records(store, bodies, rows, profiles))
    return {
        "ok": not problems,
        "batches": len(rows),
        "records": store.db.execute("SELECT COUNT(*) FROM records").fetchone()[0],
        "hubs": {hub: heads.get(hub, 0) for hub in sorted(set(by_hub) | set(heads))},
        "problems": problems,
    }


def _envelope(text):
    try:
        envelope = json.loads(text) if text else {}
    except ValueError:
        envelope = None
    return envelope if isinstance(envelope, dict) else None


def _check_stored_batch(row, keys):
    """(reason or None, parsed body or None) for one stored batch row; keys is the ChainKeys
    of its hub, which learns the batch's rotation statements as it goes."""
    batch_id, hub, n, prev, digest, sig, kid, body_text, _answer, envelope_text = row
    envelope = _envelope(envelope_text)
    if envelope is None:
        return "stored signature envelope is not a JSON object", None
    # Statements are signed by keys already trusted, so learning them first is safe even
    # when this batch turns out altered.
    keys.learn(envelope.get("rotations"))
    try:
        body = json.loads(body_text)
    except ValueError:
        return "stored body is not JSON", None
    if not isinstance(body, dict):
        return "stored body is not a JSON object", None
    if hashlib.sha256(body_text.encode("utf-8")).hexdigest() != digest:
        return "stored body does not match its recorded hash", body
    if (body.get("batch_id"), body.get("hub"), body.get("n"), body.get("prev")) != \
            (batch_id, hub, n, prev):
        return "batch columns disagree with the signed body", body
    key = keys.get(kid)
    if key is None:
        return "signed by key %s, which is not trusted" % kid, body
    if kid in keys.retired:
        return "signed by key %s, retired by the rotation in %s" % (kid, keys.retired[kid]), body
    signed = dict(body, sig=sig, key_id=kid, alg=envelope.get("alg", schemes.ED25519))
    if not batchlib.verify_batch(signed, key):
        return "signature does not verify", body
    keys.signed(kid, batch_id)
    return None, body


def _check_records(store, bodies, rows, profiles):
    problems = []
    signed = {}
    for batch_id, body in bodies.items():
        profile = profiles.by_name.get(body.get("profile")) or profiles.by_name["national"]
        records = body.get("records")
        for record in records if isinstance(records, list) else []:
            vote_id = batchlib.national_form(record, profile).get("voteId") \
                if isinstance(record, dict) else None
            if isinstance(vote_id, str):
                signed.setdefault(vote_id, (batch_id, record))
    known = {row[0] for row in rows}
    stored_ids = set()
    for vote_id, batch_id, fields in store.db.execute(
            "SELECT vote_id, batch_id, fields FROM records ORDER BY rowid"):
        stored_ids.add(vote_id)
        entry = {"problem": "record_altered", "batch_id": batch_id, "hub": None, "n": None,
                 "voteId": vote_id}
        if batch_id not in known:
            entry.update(problem="record_orphan", detail="its batch is not in the store")
        elif batch_id not in bodies:
            continue  # the batch itself is already reported as unreadable
        else:
            origin = signed.get(vote_id)
            try:
                same = origin is not None and origin[0] == batch_id and json.loads(fields) == \
                    origin[1]
            except ValueError:
                same = False
            if same:
                continue
            entry["detail"] = "differs from the record in the signed batch"
        problems.append(entry)
    for row in rows:
        batch_id, answer = row[0], row[8]
        try:
            accepted = json.loads(answer).get("accepted", [])
        except (ValueError, AttributeError):
            continue
        for vote_id in accepted:
            if vote_id not in stored_ids:
                problems.append({"problem": "record_missing", "batch_id": batch_id, "hub": None,
                                 "n": None, "voteId": vote_id,
                                 "detail": "accepted record is not in the store"})
    return problems


# ---------------------------------------------------------------- running it

class ThreadedReceiver:
    """The receiver on its own event loop in a background thread, for tests and tools.

    Start with start(); stop() shuts the server down (waking held fault requests) and joins.
    The store belongs to the caller, who closes it after stop().
    """

    def __init__(self, store, trusted, host="127.0.0.1", port=9100, faults=False,
                 clock=time.monotonic, **app_options):
        self.host, self.port = host, port
        # app_options: profiles, clients, wall (see make_app).
        self.app = make_app(store, trusted, faults=faults, clock=clock, **app_options)
        self._loop = asyncio.new_event_loop()
        self._runner = None
        self._started = threading.Event()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="province", daemon=True)

    @property
    def url(self):
        return "http://%s:%d" % (self.host, self.port)

    def start(self, timeout=30):
        self._thread.start()
        if not self._started.wait(timeout):
            raise ProvinceError("receiver did not start within %s s" % timeout)
        if self._error is not None:
            raise ProvinceError("receiver cannot listen on %s:%d: %s"
                                % (self.host, self.port, self._error))
        return self

    def _run(self):
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._listen())
        except OSError as exc:
            self._error = exc
            self._loop.close()
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.close()

    async def _listen(self):
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    def stop(self, timeout=30):
        if self._runner is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)


def serve(store, trusted, host="127.0.0.1", port=9100, faults=False, print_fn=print,
          profiles=None, clients=None):
    """Run the receiver until interrupted (Ctrl-C / SIGTERM)."""
    app = make_app(store, trusted, faults=faults, profiles=profiles, clients=clients)
    print_fn("province receiver on http://%s:%d/api/v1 (%d trusted hub keys, profiles %s, %s%s)"
             % (host, port, len(trusted), ", ".join(sorted(app[PROFILES].by_name)),
                "%d hub clients" % len(app[CLIENTS]) if len(app[CLIENTS]) else
                "open: requests are not authenticated",
                ", faults enabled" if faults else ""))
    web.run_app(app, host=host, port=port, print=None, access_log=None, handle_signals=True)
