"""The counter flow with the window's business system: services, prompts, outcomes, callbacks.

A business system (the window's 受理/叫号 system) tells the hub that a service is complete.
The hub turns that into a *visit*: one or more *cases* (办件, each with its stage: 即办件 ji,
承诺件 acceptance cn_acc or delivery cn_dlv) rated with one prompt (single, batch, themed
"overall") or one prompt per item (themed "per_item", sent one after the other). Every
case ends in one outcome: voted, unrated, refused (the device could not take the prompt) or
default_rated (the jurisdiction's default, where the hall is responsible for it).

`Engine` does the work. A request handler (hub/http_api.py) calls `start_visit()` and then
`await offer()`, which publishes the prompt and waits briefly for the device's evt (shown,
busy, full, bad). Everything after that happens in `step()`, which runs a few times a second
on the HTTP event loop: it reads the votes the ingest thread stored, settles the cases they
answer (a batch's or themed visit's other cases get a record of their own, made by the hub),
sends a per-item visit's next prompt, flags suspicious votes (hub/suspicion.py), sends
reminders, applies default ratings after the jurisdiction's deadline (hub/policy.py), and
`deliver()` pushes callbacks to the business system, signed and retried.

"Now" is the injected clock everywhere (unix seconds), so tests can jump days.
docs/integration.md is the integrator's view of all this.
"""
import asyncio
import base64
import binascii
import datetime
import hashlib
import hmac
import io
import json
import logging
import re
import secrets

from firmware.evaluator import codec

from . import PingjiaError
from . import policy
from . import suspicion

log = logging.getLogger("pingjia.hub.business")

KINDS = ("ji", "cn_acc", "cn_dlv")
STAGES = {"ji": "即办件", "cn_acc": "承诺件受理", "cn_dlv": "承诺件办结"}
MODES = ("single", "batch", "overall", "per_item")
ROLES = ("business", "manager")
FINAL = ("voted", "default_rated")            # a case in these is rated: 409 on a re-prompt
OPEN = ("queued", "pending", "shown")         # a prompt is (or will be) on the device
MAX_CASES = 500            # cases listed in one request
MAX_N = 10000              # the device's limit for a batch count
MAX_TEXT = 200
MAX_URL = 500
WAIT_DEFAULT_S = 5.0       # how long a request waits for the device's evt
WAIT_MAX_S = 30.0
BUSY_RETRY_S = 1.0         # a device showing thanks (3 s) answers busy: try again this soon
OPEN_GRACE_S = 60          # a prompt unanswered this long past its ttl no longer blocks
OFFLINE_AFTER_S = 95       # three missed heartbeats (30 s) and some slack
QUEUE_PATIENCE_S = 120     # a per-item visit waits this long for a busy device
TICK_S = 0.25
JURISDICTION_EVERY_S = 2.0
VOTES_PER_STEP = 500
CALLBACK_ATTEMPTS = 10
CALLBACK_TIMEOUT_S = 5.0
CALLBACK_BACKOFF_MAX_S = 600
PHOTO_MAX_BYTES = 512 * 1024
PHOTO_BOARDS = ("rpi",)    # boards whose panels show a staff photo (docs/agent.md)
LOCAL = ""                 # the system name of an unauthenticated loopback caller

_SYSTEM_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_URL = re.compile(r"^https?://[^\s/?#]+[^\s]*$")
_FIELDS = {
    "window", "device_id", "case_no", "task_code", "task_name", "dept_code", "kind", "n",
    "mode", "cases", "theme", "ttl", "wait_s", "callback_url",
}
_CASE_FIELDS = {"case_no", "task_code", "task_name", "dept_code"}


class RequestError(PingjiaError):
    """A request refused with an HTTP status; `extra` goes into the JSON answer."""

    def __init__(self, http_status, message, **extra):
        PingjiaError.__init__(self, message)
        self.status = http_status
        self.extra = extra


class SystemError_(PingjiaError):
    """A business system that cannot be added, found or removed."""


def iso(t):
    if t is None:
        return None
    moment = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def unix(iso_text):
    """Unix seconds of the store's ISO timestamps (milliseconds ignored), or None."""
    if not iso_text:
        return None
    try:
        moment = datetime.datetime.strptime(iso_text[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return None
    return int(moment.replace(tzinfo=datetime.timezone.utc).timestamp())


# -- business systems and their tokens ----------------------------------------------------

def token_hash(token):
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def add_system(store, name, role="business", windows=()):
    """Register a business system; returns its bearer token, which is shown only now
    (the store keeps its SHA-256)."""
    if not isinstance(name, str) or not _SYSTEM_NAME.match(name):
        raise SystemError_("system name: 1-64 of A-Z a-z 0-9 . _ -")
    if role not in ROLES:
        raise SystemError_("role: one of %s" % ", ".join(ROLES))
    for window in windows:
        try:
            codec.check_id(window, "window")
        except codec.CodecError as exc:
            raise SystemError_(str(exc)) from None
    token = "pjs_" + secrets.token_urlsafe(32)
    with store.transaction():
        row = store.conn.execute("SELECT revoked_at FROM systems WHERE name = ?",
                                 (name,)).fetchone()
        if row is not None and row["revoked_at"] is None:
            raise SystemError_("system %s exists (remove it first to issue a new token)" % name)
        store.conn.execute(
            "INSERT INTO systems (name, token_hash, role, windows, created_at, revoked_at) "
            "VALUES (?,?,?,?,?,NULL) ON CONFLICT(name) DO UPDATE SET token_hash ="
            " excluded.token_hash, role = excluded.role, windows = excluded.windows,"
            " created_at = excluded.created_at, revoked_at = NULL",
            (name, token_hash(token), role, ",".join(windows), store.now()))
    return token


def remove_system(store, name):
    """Revoke a system's token at once (its cases stay)."""
    with store.transaction():
        cur = store.conn.execute("UPDATE systems SET revoked_at = ? WHERE name = ? AND "
                                 "revoked_at IS NULL", (store.now(), name))
    if not cur.rowcount:
        raise SystemError_("no active system %s" % name)


def list_systems(store):
    return [{"name": r["name"], "role": r["role"],
             "windows": [w for w in r["windows"].split(",") if w],
             "created_at": r["created_at"], "revoked_at": r["revoked_at"]}
            for r in store.conn.execute("SELECT * FROM systems ORDER BY name")]


def active_systems(store):
    return store.conn.execute("SELECT count(*) FROM systems WHERE revoked_at IS NULL"
                              ).fetchone()[0]


def authenticate(store, authorization, loopback):
    """The calling system as {"name", "role", "windows", "key"} or a RequestError 401.

    A hub with no registered system serves loopback callers without a token (the
    simulator, first steps); once one system exists, every caller needs its token."""
    if not authorization:
        if loopback and not active_systems(store):
            return {"name": LOCAL, "role": "manager", "windows": [], "key": None}
        raise RequestError(401, "Authorization: a business system's bearer token is required"
                           " (pingjia hub systems add NAME)")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise RequestError(401, "Authorization: use the form 'Bearer <token>'")
    digest = token_hash(token.strip())
    row = store.conn.execute("SELECT * FROM systems WHERE token_hash = ? AND revoked_at IS NULL",
                             (digest,)).fetchone()
    if row is None:
        raise RequestError(401, "Authorization: unknown or revoked token")
    return {"name": row["name"], "role": row["role"],
            "windows": [w for w in row["windows"].split(",") if w],
            "key": bytes.fromhex(row["token_hash"])}


def may_use_window(system, window):
    return not system["windows"] or window in system["windows"]


def sign(key, timestamp, body):
    """The callback signature: hex HMAC-SHA256 over "<timestamp>.<body>" under the SHA-256
    of the system's token (docs/integration.md, "Callbacks")."""
    return hmac.new(key, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


# -- staff photos --------------------------------------------------------------------------

def photo_field(data):
    """Image file bytes (PNG, JPEG, …) -> the ctx `photo` field (docs/agent.md)."""
    from PIL import Image, UnidentifiedImageError

    from agent.screens import photo_field as to_field

    if len(data) > PHOTO_MAX_BYTES:
        raise RequestError(400, "photo: larger than %d bytes" % PHOTO_MAX_BYTES)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError(400, "photo: not an image Pillow can read") from None
    return to_field(image)


def decode_photo(text):
    if not isinstance(text, str):
        raise RequestError(400, "photo: must be base64 text of an image file")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "photo: not valid base64") from None


def save_photo(store, window, field):
    with store.transaction():
        if field is None:
            store.conn.execute("DELETE FROM window_photos WHERE window = ?", (window,))
        else:
            store.conn.execute(
                "INSERT INTO window_photos (window, photo, updated_at) VALUES (?,?,?) "
                "ON CONFLICT(window) DO UPDATE SET photo = excluded.photo,"
                " updated_at = excluded.updated_at", (window, json.dumps(field), store.now()))


def photo_for(store, device_id, window):
    """The staff photo for this device's ctx, or None: only boards that show photos get it
    (the MCU's downlink limit is 8 KB)."""
    health = store.health(device_id)
    board = ((health or {}).get("birth") or {}).get("board") or ""
    if not any(board.startswith(prefix) for prefix in PHOTO_BOARDS):
        return None
    row = store.conn.execute("SELECT photo FROM window_photos WHERE window = ?",
                             (window,)).fetchone()
    return json.loads(row["photo"]) if row else None


# -- request checking ----------------------------------------------------------------------

def check_id(value, field, allow_empty=False):
    if value is None:
        if allow_empty:
            return ""
        raise RequestError(400, "%s: required" % field)
    try:
        return codec.check_id(value, field, allow_empty)
    except codec.CodecError:
        raise RequestError(400, "%s: must be 1-64 of A-Z a-z 0-9 . _ : -" % field) from None


def check_text(value, field, required=False):
    if value is None:
        value = ""
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise RequestError(400, "%s: must be text of at most %d characters" % (field, MAX_TEXT))
    if required and not value.strip():
        raise RequestError(400, "%s: required" % field)
    return value.strip()


def _int(value, field, lo, hi):
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise RequestError(400, "%s: must be an integer %d..%d" % (field, lo, hi))
    return value


def parse_service(body, jurisdiction):
    """A POST /api/v1/prompts body, checked: every mistake is a 400 naming its field."""
    for key in body:
        if key not in _FIELDS:
            raise RequestError(400, "%s: unknown field" % key)
    kind = body.get("kind", "ji")
    if kind not in KINDS:
        raise RequestError(400, "kind: must be one of %s" % ", ".join(KINDS))
    mode = body.get("mode", "single")
    if mode not in MODES:
        raise RequestError(400, "mode: must be one of %s" % ", ".join(MODES))
    default = {"task_code": check_id(body.get("task_code"), "task_code", True),
               "task_name": check_text(body.get("task_name"), "task_name"),
               "dept_code": check_id(body.get("dept_code"), "dept_code", True)}
    n = 1
    if mode == "single":
        if "cases" in body:
            raise RequestError(400, "cases: mode single takes case_no (use mode batch, "
                                    "overall or per_item for several cases)")
        cases = [dict(default, case_no=check_id(body.get("case_no"), "case_no"))]
        n = _int(body.get("n", 1), "n", 1, MAX_N)
        if n > 1:
            mode = "batch"   # a batch whose other case numbers the caller did not give
    else:
        if body.get("case_no") is not None:
            raise RequestError(400, "case_no: mode %s lists its cases in cases" % mode)
        if body.get("n") is not None:
            raise RequestError(400, "n: mode %s counts its cases" % mode)
        cases = _parse_cases(body.get("cases"), default, mode)
        n = len(cases)
    theme = check_text(body.get("theme"), "theme")
    if theme and mode != "overall":
        raise RequestError(400, "theme: only mode overall shows a theme")
    ttl = _int(body.get("ttl", jurisdiction.prompt_ttl_s), "ttl", 1, 3600)
    wait = body.get("wait_s", WAIT_DEFAULT_S)
    if not isinstance(wait, (int, float)) or isinstance(wait, bool) or \
            not 0 <= wait <= WAIT_MAX_S:
        raise RequestError(400, "wait_s: must be a number 0..%d" % WAIT_MAX_S)
    url = body.get("callback_url") or ""
    if url and (not isinstance(url, str) or len(url) > MAX_URL or not _URL.match(url)):
        raise RequestError(400, "callback_url: must be an http:// or https:// URL of at most"
                                " %d characters" % MAX_URL)
    if mode == "overall":
        display = theme or "、".join(c["task_name"] for c in cases if c["task_name"])
    else:
        display = cases[0]["task_name"]
    return {"kind": kind, "mode": mode, "cases": cases, "n": n, "ttl": ttl,
            "wait_s": float(wait), "callback_url": url, "display": display}


def _parse_cases(value, default, mode):
    least = 1 if mode == "batch" else 2
    if not isinstance(value, list) or not least <= len(value) <= MAX_CASES:
        raise RequestError(400, "cases: mode %s needs a list of %d..%d cases"
                           % (mode, least, MAX_CASES))
    cases, seen = [], {}
    for i, entry in enumerate(value):
        where = "cases[%d]" % i
        if isinstance(entry, str) and mode == "batch":
            entry = {"case_no": entry}
        if not isinstance(entry, dict):
            raise RequestError(400, "%s: must be an object with case_no%s" % (
                where, " (or a case number)" if mode == "batch" else ""))
        for key in entry:
            if key not in _CASE_FIELDS:
                raise RequestError(400, "%s.%s: unknown field" % (where, key))
        case = dict(default)
        case["case_no"] = check_id(entry.get("case_no"), where + ".case_no")
        if "task_code" in entry:
            case["task_code"] = check_id(entry["task_code"], where + ".task_code", True)
        if "task_name" in entry:
            case["task_name"] = check_text(entry["task_name"], where + ".task_name")
        if "dept_code" in entry:
            case["dept_code"] = check_id(entry["dept_code"], where + ".dept_code", True)
        if case["case_no"] in seen:
            raise RequestError(400, "%s.case_no: repeats cases[%d]" % (where,
                                                                       seen[case["case_no"]]))
        seen[case["case_no"]] = i
        cases.append(case)
    return cases


def derived_device(device_id, why):
    """The identity of the records the hub makes for a device's visits: "<device>.<why>".
    Kept within the 64 characters of an identifier."""
    suffix = "." + why
    return device_id[:codec.MAX_FIELD - len(suffix)] + suffix


# -- the engine ------------------------------------------------------------------------------

class Engine:
    """The counter flow over one Store connection, on the HTTP event loop's thread."""

    def __init__(self, store, downlink, province_profile=None, clock=None, post=None):
        self.store = store
        self.downlink = downlink
        self.province_profile = province_profile
        self.clock = clock or store.clock
        self.post = post or _http_post
        self.jurisdiction = policy.current(store, province_profile)
        self.checker = suspicion.Checker(store, self.jurisdiction.suspicion,
                                         visit_of=self._visit_of, is_derived=self._is_derived)
        self.waiting = set()   # visits whose first prompt a request handler is waiting on
        self._jurisdiction_at = 0.0
        self._refused = None   # a jurisdiction whose catalogue cannot reach the devices
        self._failed = set()   # cases whose default rating failed (logged once, not retried)
        self._task = None
        if downlink is not None:
            downlink.set_catalogue(self.jurisdiction.catalogue())

    def now(self):
        return int(self.clock())

    # -- lifecycle (aiohttp cleanup_ctx) ------------------------------------------------------
    async def lifecycle(self, app):
        self._task = asyncio.get_running_loop().create_task(self.run())
        yield
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def run(self):
        while True:
            try:
                self.step()
                await self.deliver()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Logged, counted, retried at the next tick: the counter flow must outlive
                # any single bad row.
                log.exception("business: step failed")
            await asyncio.sleep(TICK_S)

    # -- devices -------------------------------------------------------------------------------
    def target(self, device_id=None, window=None):
        """(device_id, window) a prompt goes to: the named device, or the first active
        device at the window. RequestError 404 when there is none."""
        if device_id:
            device = self.store.device(device_id)
            if device is None or device["retired"]:
                raise RequestError(404, "device %s: not an active device" % device_id)
            return device_id, device["window"] or ""
        devices = self.store.devices_at_window(window)
        if not devices:
            raise RequestError(404, "window %s: no active device" % window)
        return devices[0], window

    def presence(self, device_id):
        """"online", or why not: "never" (no birth or heartbeat yet), "offline" (its last
        will was seen) or "silent" (no heartbeat for OFFLINE_AFTER_S)."""
        health = self.store.health(device_id)
        if health is None or not health["last_seen"]:
            return "never"
        if not health["online"]:
            return "offline"
        seen = unix(health["last_seen"])
        if seen is not None and self.now() - seen > OFFLINE_AFTER_S:
            return "silent"
        return "online"

    def _visit_of(self, device_id, pid):
        row = self.store.conn.execute("SELECT visit_id FROM cases WHERE pid = ? LIMIT 1",
                                      (pid,)).fetchone()
        return ("visit", row["visit_id"]) if row else (device_id, pid)

    def _is_derived(self, device_id):
        return self.store.conn.execute("SELECT 1 FROM derived_records WHERE device_id = ? "
                                       "LIMIT 1", (device_id,)).fetchone() is not None

    # -- a new visit ---------------------------------------------------------------------------
    def start_visit(self, system, service, device_id, window):
        """Record the visit and its cases (checking one service, one rating); returns the
        visit as a dict with its first prompt's pid. Caller publishes with offer()."""
        store = self.store
        now = self.now()
        kind = service["kind"]
        staff = store.window(window) if window else None
        staff_no = staff["staff_no"] if staff else ""
        staff_name = staff["staff_name"] if staff else ""
        with store.transaction():
            for case in service["cases"]:
                self._check_case(system, case["case_no"], kind, now)
            self._check_device_free(device_id, now)
            cur = store.conn.execute(
                "INSERT INTO visits (system, mode, kind, n_cases, device_id, window, staff_no,"
                " staff_name, ttl, display, callback_url, created_t) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (system["name"], service["mode"], kind, service["n"], device_id, window,
                 staff_no, staff_name, service["ttl"], service["display"],
                 service["callback_url"], now))
            visit_id = cur.lastrowid
            first = service["cases"][0]
            n_prompt = 1 if service["mode"] == "per_item" else service["n"]
            pid = store.create_prompt(device_id, window, first["case_no"], first["task_code"],
                                      first["task_name"], first["dept_code"], kind, n_prompt,
                                      staff_no, staff_name)
            for position, case in enumerate(service["cases"], 1):
                queued = service["mode"] == "per_item" and position > 1
                self._upsert_case(case, kind, visit_id, position, None if queued else pid,
                                  "queued" if queued else "pending", now)
        return {"id": visit_id, "pid": pid, "device_id": device_id, "window": window,
                "mode": service["mode"], "kind": kind, "n": n_prompt, "ttl": service["ttl"],
                "case_no": first["case_no"], "display": service["display"],
                "staff_no": staff_no}

    def check_cases(self, system, service):
        """One service, one rating: RequestError 409/403 for a case that cannot be prompted
        now, whatever the device's state (start_visit checks again in its transaction)."""
        now = self.now()
        for case in service["cases"]:
            self._check_case(system, case["case_no"], service["kind"], now)

    def _check_case(self, system, case_no, kind, now):
        rows = self.store.conn.execute(
            "SELECT c.*, v.system, v.created_t AS visit_t, v.ttl FROM cases c "
            "JOIN visits v ON v.id = c.visit_id WHERE c.case_no = ?", (case_no,)).fetchall()
        for row in rows:
            if row["system"] != system["name"] and system["role"] != "manager":
                raise RequestError(403, "case %s: belongs to another business system" % case_no)
            if (row["kind"] == "ji") != (kind == "ji"):
                raise RequestError(409, "case %s: is a %s (%s), not a %s" % (
                    case_no, STAGES[row["kind"]], row["kind"], STAGES[kind]),
                    case_no=case_no, status="conflict")
            if row["kind"] != kind:
                continue
            if row["status"] in FINAL:
                raise RequestError(409, "case %s: already rated at this stage (%s); one "
                                        "service, one rating" % (case_no, kind),
                                   case_no=case_no, status="rated")
            if row["status"] == "queued" or (
                    row["status"] in OPEN and now < row["visit_t"] + row["ttl"] + OPEN_GRACE_S):
                raise RequestError(409, "case %s: a rating prompt for it is already open (%s)"
                                   % (case_no, row["pid"] or "queued"),
                                   case_no=case_no, status="open")

    def _check_device_free(self, device_id, now):
        # A per-item visit keeps sending to its device until every item is answered; a new
        # visit would only collide with it.
        row = self.store.conn.execute(
            "SELECT v.id, count(*) AS left FROM visits v JOIN cases c ON c.visit_id = v.id "
            "WHERE v.device_id = ? AND v.mode = 'per_item' AND c.status IN "
            "('queued', 'pending', 'shown') AND (v.give_up_t IS NULL OR v.give_up_t > ?) "
            "GROUP BY v.id", (device_id, now)).fetchone()
        if row is not None:
            raise RequestError(409, "device %s: busy with a per-item visit (%d items to rate)"
                               % (device_id, row["left"]), device_id=device_id, status="busy")

    def _upsert_case(self, case, kind, visit_id, position, pid, status, now):
        self.store.conn.execute(
            "INSERT INTO cases (case_no, kind, visit_id, position, task_code, task_name,"
            " dept_code, pid, status, created_t) VALUES (?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(case_no, kind) DO UPDATE SET visit_id = excluded.visit_id,"
            " position = excluded.position, task_code = excluded.task_code,"
            " task_name = excluded.task_name, dept_code = excluded.dept_code,"
            " pid = excluded.pid, status = excluded.status, device_state = NULL,"
            " stars = NULL, reasons = '', cat_ver = '', record_device = NULL,"
            " record_seq = NULL, outcome_t = NULL, reminder_due_t = NULL, reminded_t = NULL,"
            " default_due_t = NULL, work_order = NULL",
            (case["case_no"], kind, visit_id, position, case["task_code"], case["task_name"],
             case["dept_code"], pid, status, now))

    def publish_prompt(self, visit, pid, case_no, n, text):
        self.downlink.prompt(visit["device_id"], pid, case_no, visit["kind"], n, text,
                             ttl=visit["ttl"])

    async def offer(self, visit, wait_s):
        """Publish the visit's first prompt and wait up to wait_s for the device's answer:
        "shown", "busy", "full", "bad", or None (no answer in time). A busy device is asked
        again every BUSY_RETRY_S while the wait lasts (the thanks screen passes)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        pid, device_id = visit["pid"], visit["device_id"]
        self.waiting.add(visit["id"])
        try:
            while True:
                self.publish_prompt(visit, pid, visit["case_no"], visit["n"], visit["display"])
                if wait_s <= 0:
                    return None
                state = await self._await_state(pid, device_id, deadline)
                if state == "busy" and loop.time() + BUSY_RETRY_S < deadline:
                    await asyncio.sleep(BUSY_RETRY_S)
                    with self.store.transaction():
                        self.store.set_prompt_device_state(pid, device_id, None)
                    continue
                self._settle_offer(visit, state)
                return state
        finally:
            self.waiting.discard(visit["id"])

    async def _await_state(self, pid, device_id, deadline):
        loop = asyncio.get_running_loop()
        while True:
            row = self.store.prompt(pid)
            state = row["device_state"] if row else None
            if state or loop.time() >= deadline:
                return state
            await asyncio.sleep(0.05)

    def _settle_offer(self, visit, state):
        """The handler's answer is the caller's news: no callback for it."""
        if state is None:
            return
        with self.store.transaction():
            if state == "shown":
                self.store.conn.execute(
                    "UPDATE cases SET status = 'shown', device_state = 'shown' "
                    "WHERE pid = ? AND status = 'pending'", (visit["pid"],))
            else:
                self._refuse_visit(visit["id"], state)

    def refuse_offline(self, visit, why):
        with self.store.transaction():
            self._refuse_visit(visit["id"], why)

    def _refuse_visit(self, visit_id, why):
        self.store.conn.execute(
            "UPDATE cases SET status = 'refused', device_state = ?, outcome_t = ? "
            "WHERE visit_id = ? AND status IN ('queued', 'pending')",
            (why, self.now(), visit_id))
        self.store.conn.execute("UPDATE visits SET next_t = NULL WHERE id = ?", (visit_id,))

    # -- one step of the engine ----------------------------------------------------------------
    def step(self):
        now = self.now()
        self._follow_jurisdiction()
        self._late_states(now)
        self._new_votes(now)
        self._follow_ups(now)
        self._reminders(now)
        self._defaults(now)

    def _follow_jurisdiction(self):
        loop_now = self.clock()
        if abs(loop_now - self._jurisdiction_at) < JURISDICTION_EVERY_S:
            return
        self._jurisdiction_at = loop_now
        name = policy.chosen_name(self.store, self.province_profile)
        if name == self.jurisdiction.name or name == self._refused:
            return
        try:
            jurisdiction = policy.load(name)
        except policy.PolicyError as exc:
            log.error("business: keeping jurisdiction %s: %s", self.jurisdiction.name, exc)
            return
        if self.downlink is not None and not self.downlink.fits(jurisdiction.catalogue()):
            # The devices would drop it and fall back to their built-in list: keep the
            # catalogue they have, and say why.
            log.error("business: keeping jurisdiction %s: the catalogue of %s is too large "
                      "for the devices' downlink buffer", self.jurisdiction.name, name)
            with self.store.transaction():
                self.store.bump("catalogue_too_large")
            self._refused = name
            return
        log.info("business: jurisdiction %s -> %s (catalogue %s)", self.jurisdiction.name,
                 name, jurisdiction.cv)
        self.jurisdiction = jurisdiction
        self.checker.rules = jurisdiction.suspicion
        if self.downlink is not None and self.downlink.set_catalogue(jurisdiction.catalogue()):
            for device in self.store.active_devices():
                self.downlink.cat(device["device_id"])

    def _late_states(self, now):
        """Device answers that no request handler is waiting for: a prompt the handler gave
        up on (202), and the later prompts of a per-item visit."""
        rows = self.store.conn.execute(
            "SELECT c.id, c.visit_id, c.position, c.pid, p.device_state FROM cases c "
            "JOIN prompts p ON p.pid = c.pid WHERE c.status = 'pending' "
            "AND p.device_state IS NOT NULL").fetchall()
        settled = {}
        for row in rows:
            if row["visit_id"] in self.waiting or row["pid"] in settled:
                continue
            state = row["device_state"]
            settled[row["pid"]] = True
            with self.store.transaction():
                if state == "shown":
                    self.store.conn.execute("UPDATE cases SET status = 'shown', device_state ="
                                            " 'shown' WHERE pid = ? AND status = 'pending'",
                                            (row["pid"],))
                elif state == "busy" and row["position"] > 1:
                    self.store.conn.execute("UPDATE cases SET status = 'queued', device_state ="
                                            " 'busy' WHERE id = ?", (row["id"],))
                    self.store.conn.execute("UPDATE visits SET next_t = ? WHERE id = ?",
                                            (now + int(BUSY_RETRY_S), row["visit_id"]))
                else:
                    self._refuse_visit(row["visit_id"], state)
                    self._callback(row["visit_id"], "refused", now)

    def _new_votes(self, now):
        store = self.store
        last = int(store.get_state("business_vote_rowid", 0) or 0)
        rows = store.conn.execute("SELECT rowid AS rowid, * FROM votes WHERE rowid > ? "
                                  "ORDER BY rowid LIMIT ?", (last, VOTES_PER_STEP)).fetchall()
        for row in rows:
            vote = dict(row)
            try:
                with store.transaction():
                    if not self._is_derived_record(vote):
                        prompt = store.prompt(vote["pid"])
                        self.checker.record(self.checker.check(vote, prompt), now)
                        self._outcome(vote, now)
                    store.set_state("business_vote_rowid", vote["rowid"])
            except Exception:
                # One vote the flow cannot settle must not hold up every later one: it is
                # logged, counted and passed over (the vote itself is stored and forwarded).
                log.exception("business: vote %s:%s not settled", vote["device_id"],
                              vote["seq"])
                with store.transaction():
                    store.bump("business_errors")
                    store.set_state("business_vote_rowid", vote["rowid"])

    def _is_derived_record(self, vote):
        return self.store.conn.execute(
            "SELECT 1 FROM derived_records WHERE device_id = ? AND seq = ?",
            (vote["device_id"], vote["seq"])).fetchone() is not None

    def _outcome(self, vote, now):
        """Settle the cases a device record answers (caller holds the transaction)."""
        conn = self.store.conn
        cases = [dict(r) for r in conn.execute(
            "SELECT c.* FROM cases c JOIN visits v ON v.id = c.visit_id WHERE c.pid = ? AND "
            "v.device_id = ? AND c.status NOT IN ('voted', 'default_rated') "
            "ORDER BY c.position", (vote["pid"], vote["device_id"]))]
        if not cases:
            return
        visit = dict(conn.execute("SELECT * FROM visits WHERE id = ?",
                                  (cases[0]["visit_id"],)).fetchone())
        voted = vote["kind"] == codec.KIND_VOTE
        status = "voted" if voted else "unrated"
        reasons = [r for r in (vote["reasons"] or "").split(",") if r]
        own = next((c for c in cases if c["case_no"] == vote["case_no"]), cases[0])
        jurisdiction = self.jurisdiction
        for case in cases:
            if case is own:
                record = (vote["device_id"], vote["seq"])
            else:
                record = self._derive(case, visit, "batch", vote["kind"], vote["stars"],
                                      reasons, vote["cat_ver"] or "", vote["t"], "",
                                      vote["device_id"], vote["seq"], now)
            work_order = None
            if voted and vote["stars"] <= 2:
                work_order = json.dumps(jurisdiction.work_order(vote["t"]))
            conn.execute(
                "UPDATE cases SET status = ?, stars = ?, reasons = ?, cat_ver = ?,"
                " record_device = ?, record_seq = ?, outcome_t = ?, device_state ="
                " coalesce(device_state, 'shown'), work_order = ?, reminder_due_t = ?,"
                " default_due_t = ? WHERE id = ?",
                (status, vote["stars"] if voted else None, ",".join(reasons),
                 vote["cat_ver"] or "", record[0], record[1], now, work_order,
                 None if voted else jurisdiction.reminder_due(case["created_t"]),
                 None if voted else jurisdiction.default_due(case["created_t"]), case["id"]))
        self.store.bump("cases_" + status, len(cases))
        self._callback(visit["id"], "outcome", now, [c["id"] for c in cases])
        if visit["mode"] == "per_item":
            conn.execute("UPDATE visits SET next_t = ?, give_up_t = ? WHERE id = ?",
                         (now, now + QUEUE_PATIENCE_S, visit["id"]))

    def _derive(self, case, visit, why, kind, stars, reasons, cat_ver, t, flags,
                source_device, source_seq, now):
        """A record the hub makes for a case: a votes row under "<device>.<why>" with a
        prompt row of its own carrying the case's item, so the forwarder maps it in full
        like any other. Returns its (device_id, seq). Caller holds the transaction."""
        store = self.store
        conn = store.conn
        device_id = derived_device(visit["device_id"], why)
        seq = conn.execute("SELECT coalesce(max(seq), 0) + 1 FROM votes WHERE device_id = ?",
                           (device_id,)).fetchone()[0]
        pid = store.create_prompt(device_id, visit["window"], case["case_no"],
                                  case["task_code"], case["task_name"], case["dept_code"],
                                  case["kind"], 1, visit["staff_no"], visit["staff_name"])
        store.insert_vote({"d": device_id, "s": seq, "t": t, "k": kind, "pid": pid,
                           "case": case["case_no"], "stars": stars if kind == "v" else 0,
                           "rs": reasons if kind == "v" else [],
                           "cv": cat_ver if kind == "v" else "", "w": visit["window"],
                           "sn": visit["staff_no"], "mac": ""})
        if flags:
            conn.execute("UPDATE votes SET flags = ? WHERE device_id = ? AND seq = ?",
                         (flags, device_id, seq))
        store.set_prompt_outcome(pid, device_id, "voted" if kind == "v" else "unrated", seq)
        store.set_prompt_device_state(pid, device_id, "derived")
        # Nothing to ack for a record no device holds; the mark keeps the status honest.
        store.set_acked(device_id, seq)
        conn.execute("INSERT INTO derived_records (device_id, seq, why, case_id, source_device,"
                     " source_seq) VALUES (?,?,?,?,?,?)",
                     (device_id, seq, why, case["id"], source_device, source_seq))
        store.bump("derived_" + why)
        return device_id, seq

    def _follow_ups(self, now):
        """Send a per-item visit's next prompt once the one before is answered."""
        conn = self.store.conn
        visits = [dict(r) for r in conn.execute(
            "SELECT * FROM visits WHERE next_t IS NOT NULL AND next_t <= ?", (now,))]
        for visit in visits:
            case = conn.execute("SELECT * FROM cases WHERE visit_id = ? AND status = 'queued' "
                                "ORDER BY position LIMIT 1", (visit["id"],)).fetchone()
            with self.store.transaction():
                if case is None:
                    conn.execute("UPDATE visits SET next_t = NULL WHERE id = ?", (visit["id"],))
                    continue
                if visit["give_up_t"] is not None and now > visit["give_up_t"]:
                    why = "busy" if self.presence(visit["device_id"]) == "online" else "offline"
                    self._refuse_visit(visit["id"], why)
                    self._callback(visit["id"], "refused", now)
                    continue
                if self.presence(visit["device_id"]) != "online":
                    conn.execute("UPDATE visits SET next_t = ? WHERE id = ?",
                                 (now + 2, visit["id"]))
                    continue
                pid = case["pid"]
                if pid is None:
                    pid = self.store.create_prompt(
                        visit["device_id"], visit["window"], case["case_no"],
                        case["task_code"], case["task_name"], case["dept_code"], visit["kind"],
                        1, visit["staff_no"], visit["staff_name"])
                else:
                    self.store.set_prompt_device_state(pid, visit["device_id"], None)
                conn.execute("UPDATE cases SET pid = ?, status = 'pending' WHERE id = ?",
                             (pid, case["id"]))
                conn.execute("UPDATE visits SET next_t = NULL WHERE id = ?", (visit["id"],))
            self.publish_prompt(visit, pid, case["case_no"], 1, case["task_name"])

    def _reminders(self, now):
        conn = self.store.conn
        rows = conn.execute("SELECT id, visit_id FROM cases WHERE status = 'unrated' AND "
                            "reminded_t IS NULL AND reminder_due_t <= ?", (now,)).fetchall()
        for row in rows:
            with self.store.transaction():
                conn.execute("UPDATE cases SET reminded_t = ? WHERE id = ?", (now, row["id"]))
                self._callback(row["visit_id"], "reminder_due", now, [row["id"]])

    def _defaults(self, now):
        """After the jurisdiction's deadline an unrated case counts at its default level,
        where the hall applies the default. Never over a real vote: only unrated cases."""
        jurisdiction = self.jurisdiction
        if not jurisdiction.hall_applies_default():
            return
        conn = self.store.conn
        rows = [dict(r) for r in conn.execute(
            "SELECT * FROM cases WHERE status = 'unrated' AND default_due_t <= ? ORDER BY id "
            "LIMIT ?", (now, 200 + len(self._failed)))]
        for case in rows:
            if case["id"] in self._failed:
                continue
            try:
                self._default_one(case, jurisdiction, now)
            except Exception:
                log.exception("business: default rating of case %d failed", case["id"])
                self._failed.add(case["id"])
                with self.store.transaction():
                    self.store.bump("business_errors")

    def _default_one(self, case, jurisdiction, now):
        conn = self.store.conn
        visit = dict(conn.execute("SELECT * FROM visits WHERE id = ?",
                                  (case["visit_id"],)).fetchone())
        with self.store.transaction():
            record = self._derive(case, visit, "default", codec.KIND_VOTE,
                                  jurisdiction.default_stars, [], "", now, "default",
                                  case["record_device"], case["record_seq"], now)
            cur = conn.execute(
                "UPDATE cases SET status = 'default_rated', stars = ?, record_device = ?,"
                " record_seq = ?, outcome_t = ? WHERE id = ? AND status = 'unrated'",
                (jurisdiction.default_stars, record[0], record[1], now, case["id"]))
            if not cur.rowcount:
                raise RuntimeError("case %d changed under the default rating" % case["id"])
            self.store.bump("cases_default_rated")
            self._callback(visit["id"], "default_rated", now, [case["id"]])

    # -- callbacks -----------------------------------------------------------------------------
    def _callback(self, visit_id, event, now, case_ids=None):
        """Queue a callback for the visit's system (caller holds the transaction)."""
        conn = self.store.conn
        visit = conn.execute("SELECT * FROM visits WHERE id = ?", (visit_id,)).fetchone()
        if visit is None or not visit["callback_url"]:
            return
        if case_ids is None:
            case_ids = [r["id"] for r in conn.execute(
                "SELECT id FROM cases WHERE visit_id = ? ORDER BY position", (visit_id,))]
        cases = [self.case_json(r) for r in conn.execute(
            "SELECT * FROM cases WHERE id IN (%s) ORDER BY position"
            % ",".join("?" * len(case_ids)), case_ids)]
        body = {"event": event, "at": iso(now), "visit": {
            "id": visit_id, "mode": visit["mode"], "device_id": visit["device_id"],
            "window": visit["window"]}, "cases": cases}
        conn.execute("INSERT INTO callbacks (system, url, event, body, next_t, created_t) "
                     "VALUES (?,?,?,?,?,?)",
                     (visit["system"], visit["callback_url"], event,
                      json.dumps(body, ensure_ascii=False, sort_keys=True), now, now))

    async def deliver(self):
        """POST the callbacks that are due; a failure is retried with backoff up to
        CALLBACK_ATTEMPTS times, then given up (counted, visible on the case)."""
        now = self.now()
        rows = [dict(r) for r in self.store.conn.execute(
            "SELECT c.*, s.token_hash FROM callbacks c LEFT JOIN systems s ON s.name = c.system"
            " AND s.revoked_at IS NULL WHERE c.done_t IS NULL AND c.failed_t IS NULL AND"
            " c.next_t <= ? ORDER BY c.id LIMIT 20", (now,))]
        for row in rows:
            body = row["body"].encode("utf-8")
            stamp = str(self.now())
            headers = {"Content-Type": "application/json; charset=utf-8",
                       "X-Pingjia-Event": row["event"], "X-Pingjia-Delivery": str(row["id"]),
                       "X-Pingjia-Timestamp": stamp}
            if row["token_hash"]:
                headers["X-Pingjia-Signature"] = "sha256=" + sign(
                    bytes.fromhex(row["token_hash"]), stamp, body)
            error = await self.post(row["url"], body, headers)
            attempts = row["attempts"] + 1
            now = self.now()
            with self.store.transaction():
                if error is None:
                    self.store.conn.execute("UPDATE callbacks SET attempts = ?, done_t = ?,"
                                            " last_error = NULL WHERE id = ?",
                                            (attempts, now, row["id"]))
                    self.store.bump("callbacks_delivered")
                elif attempts >= CALLBACK_ATTEMPTS:
                    self.store.conn.execute("UPDATE callbacks SET attempts = ?, failed_t = ?,"
                                            " last_error = ? WHERE id = ?",
                                            (attempts, now, error[:300], row["id"]))
                    self.store.bump("callbacks_failed")
                    log.warning("business: callback %d to %s given up: %s", row["id"],
                                row["system"] or "local", error)
                else:
                    delay = min(CALLBACK_BACKOFF_MAX_S, 2 ** attempts)
                    self.store.conn.execute("UPDATE callbacks SET attempts = ?, next_t = ?,"
                                            " last_error = ? WHERE id = ?",
                                            (attempts, now + delay, error[:300], row["id"]))

    # -- answers -------------------------------------------------------------------------------
    def case_json(self, row):
        """One case and stage as the API and the callbacks show it."""
        conn = self.store.conn
        row = dict(row)
        visit = conn.execute("SELECT * FROM visits WHERE id = ?", (row["visit_id"],)).fetchone()
        out = {
            "case_no": row["case_no"], "kind": row["kind"], "stage": STAGES[row["kind"]],
            "rates": ["staff"] if row["kind"] == "cn_acc" else ["staff", "item"],
            "status": row["status"], "pid": row["pid"], "device_state": row["device_state"],
            "task_code": row["task_code"], "task_name": row["task_name"],
            "dept_code": row["dept_code"], "device_id": visit["device_id"],
            "window": visit["window"], "staff_no": visit["staff_no"],
            "visit": {"id": visit["id"], "mode": visit["mode"], "n": visit["n_cases"],
                      "position": row["position"]},
            "service_at": iso(row["created_t"]), "outcome_at": iso(row["outcome_t"]),
        }
        if row["status"] in ("voted", "default_rated"):
            out["stars"] = row["stars"]
            out["reasons"] = [r for r in row["reasons"].split(",") if r]
            out["cv"] = row["cat_ver"]
        if row["record_device"]:
            vote = conn.execute("SELECT forwarded_at, flags FROM votes WHERE device_id = ? AND "
                                "seq = ?", (row["record_device"], row["record_seq"])).fetchone()
            derived = conn.execute("SELECT why FROM derived_records WHERE device_id = ? AND "
                                   "seq = ?", (row["record_device"], row["record_seq"])
                                   ).fetchone()
            out["record"] = {
                "vote_id": "%s:%d" % (row["record_device"], row["record_seq"]),
                "made_by": ("hub:" + derived["why"]) if derived else "device",
                "forwarded": bool(vote and vote["forwarded_at"]),
                "flags": [f for f in ((vote["flags"] if vote else "") or "").split(",") if f]}
        if row["status"] == "unrated":
            out["reminder_due_at"] = iso(row["reminder_due_t"])
            out["default_due_at"] = iso(row["default_due_t"])
            out["default_applied_by"] = self.jurisdiction.default_applied_by
        if row["work_order"]:
            order = json.loads(row["work_order"])
            out["bad_rating"] = {
                "deadlines": {name: iso(t) for name, t in order["steps"].items()},
                "appeal_until": iso(order["appeal_until"]),
                "appeal_review_until": iso(order["appeal_review_until"])}
        callback = conn.execute(
            "SELECT attempts, done_t, failed_t, last_error FROM callbacks "
            "WHERE json_extract(body, '$.visit.id') = ? ORDER BY id DESC LIMIT 1",
            (visit["id"],)).fetchone() if visit["callback_url"] else None
        if callback is not None:
            out["callback"] = {"state": "delivered" if callback["done_t"] else
                               "failed" if callback["failed_t"] else "retrying"
                               if callback["attempts"] else "queued",
                               "attempts": callback["attempts"],
                               "last_error": callback["last_error"]}
        return out

    def case(self, case_no, system):
        """Every stage of a case (GET /api/v1/cases/{case_no})."""
        rows = self.store.conn.execute(
            "SELECT c.*, v.system FROM cases c JOIN visits v ON v.id = c.visit_id "
            "WHERE c.case_no = ? ORDER BY c.kind", (case_no,)).fetchall()
        if not rows:
            raise RequestError(404, "case %s: unknown" % case_no)
        if system["role"] != "manager" and any(r["system"] != system["name"] for r in rows):
            raise RequestError(403, "case %s: belongs to another business system" % case_no)
        return {"case_no": case_no, "stages": [self.case_json(r) for r in rows]}

    def visit_cases(self, visit_id):
        return [self.case_json(r) for r in self.store.conn.execute(
            "SELECT * FROM cases WHERE visit_id = ? ORDER BY position", (visit_id,))]


async def _http_post(url, body, headers):
    """POST a callback; None on a 2xx answer, else a one-line error."""
    import aiohttp

    try:
        timeout = aiohttp.ClientTimeout(total=CALLBACK_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(url, data=body, headers=headers) as resp:
                if 200 <= resp.status < 300:
                    return None
                return "HTTP %d" % resp.status
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        return "%s: %s" % (exc.__class__.__name__, exc)
