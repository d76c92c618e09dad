"""The hall manager's dashboard, served by the hub: pages, JSON, live updates, logins.

`setup_dashboard(app, settings)` adds, to the hub's aiohttp app:

- `/dashboard/` the page (hub/web/: plain HTML, JS and CSS, nothing from elsewhere);
- `/dashboard/api/...` JSON for the page, behind a manager login;
- `/dashboard/api/stream` server-sent events: new votes, alerts, device states, sign-ins;
- `/metrics` (hub/metrics.py).

Managers log in with a name and password made by `pingjia hub managers add`; a session is
a random cookie whose SHA-256 is kept in `manager_sessions`. Each manager belongs to one
hall and sees only that hall: its windows, devices, votes and alerts. A hub serves one hall
named `hub.id` unless `dashboard.halls` splits its windows into several; a manager of
`hub.id` then sees them all.

A watcher runs beside the HTTP handlers, once a second, on its own thread and store
connection: it lets the health Monitor judge devices, raises alerts for new bad ratings
and state changes, keeps the forward-latency histogram for /metrics, and hands what
changed to the live streams. It reads the store rather than hooking into ingest, so a vote
shows on the page about a second after it is committed, whichever thread committed it.
"""
import asyncio
import concurrent.futures
import fnmatch
import functools
import hashlib
import hmac
import json
import logging
import os
import secrets
import time

from aiohttp import web

from firmware.evaluator import codec

from . import PingjiaError
from . import alerts as alertlib
from . import health as healthlib
from . import metrics
from . import updates as updatelib
from .store import Store, iso

log = logging.getLogger("pingjia.hub.dashboard")

WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
COOKIE = "pj_session"
TICK_S = 1.0
STREAM_QUEUE = 200          # messages waiting for one slow browser; beyond that: resync
STREAM_KEEPALIVE_S = 15.0
LOGIN_FAILS = 5             # wrong passwords in a row before a name is locked ...
LOGIN_LOCK_S = 60.0         # ... for this long
PASSWORD_MIN = 8
VOTE_BATCH = 500            # votes the watcher takes per tick
FEED_MAX = 200
PROVINCE_CACHE_S = 5.0
SCRYPT = (2 ** 14, 8, 1)    # n, r, p: ~50 ms per check
CONTENT_TYPES = {".html": "text/html", ".js": "application/javascript", ".css": "text/css",
                 ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon"}
SECURITY_HEADERS = {
    # Everything the page needs comes from here; no inline script, no other origin.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class DashboardError(PingjiaError):
    """A dashboard request refused; `status` is the HTTP status to answer with."""

    def __init__(self, status, message):
        PingjiaError.__init__(self, message)
        self.status = status


class ManagerError(PingjiaError):
    """A manager account that cannot be created, changed or found."""


# -- halls -----------------------------------------------------------------------------------

class Halls:
    """Which hall each window belongs to. Without `dashboard.halls` the hub is one hall,
    named hub.id; with it, a window belongs to the first hall whose patterns match it, and
    windows matching none belong to hub.id only."""

    def __init__(self, hub_id, patterns=None):
        self.hub_id = hub_id
        self.patterns = dict(patterns or {})

    def names(self):
        return [self.hub_id] + [h for h in self.patterns if h != self.hub_id]

    def hall_of(self, window):
        for hall, patterns in self.patterns.items():
            if window and any(fnmatch.fnmatchcase(window, p) for p in patterns):
                return hall
        return self.hub_id

    def known(self, hall):
        return hall == self.hub_id or hall in self.patterns

    def sees_all(self, hall):
        return hall == self.hub_id

    def sees(self, hall, window):
        return self.sees_all(hall) or self.hall_of(window or "") == hall

    def alert_scope(self, hall):
        """The `hall` filter for alert listings: None for the whole hub."""
        return None if self.sees_all(hall) else hall


# -- managers and sessions -------------------------------------------------------------------

def hash_password(password, salt=None):
    salt = salt or secrets.token_bytes(16)
    n, r, p = SCRYPT
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32)
    return "scrypt$%d$%d$%d$%s$%s" % (n, r, p, salt.hex(), digest.hex())


def check_password(password, stored):
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        ours = hashlib.scrypt(password.encode("utf-8"), salt=bytes.fromhex(salt), n=int(n),
                              r=int(r), p=int(p), dklen=len(digest) // 2)
    except (ValueError, AttributeError):
        return False
    return hmac.compare_digest(ours.hex(), digest)


def _check_name(name):
    try:
        return codec.check_id(name, "manager name")
    except codec.CodecError as exc:
        raise ManagerError(str(exc))


def add_manager(store, name, password, hall, display_name=None, replace=False):
    """Create a manager login for one hall (replace=True: a new password for an existing
    one, which also ends its sessions)."""
    name = _check_name(name)
    if not isinstance(password, str) or len(password) < PASSWORD_MIN:
        raise ManagerError("password: at least %d characters" % PASSWORD_MIN)
    try:
        codec.check_id(hall, "hall")
    except codec.CodecError as exc:
        raise ManagerError(str(exc))
    if display_name is not None and (not isinstance(display_name, str) or
                                     len(display_name) > 64):
        raise ManagerError("display name: at most 64 characters")
    pw_hash = hash_password(password)
    with store.transaction():
        exists = store.conn.execute("SELECT 1 FROM managers WHERE name = ?", (name,)).fetchone()
        if exists and not replace:
            raise ManagerError("manager %s already exists (use --replace to set a new "
                               "password)" % name)
        store.conn.execute(
            "INSERT INTO managers (name, hall, display_name, pw_hash, created_at, disabled) "
            "VALUES (?,?,?,?,?,0) ON CONFLICT(name) DO UPDATE SET hall = excluded.hall,"
            " display_name = coalesce(excluded.display_name, display_name),"
            " pw_hash = excluded.pw_hash, disabled = 0",
            (name, hall, display_name, pw_hash, store.now()))
        store.conn.execute("DELETE FROM manager_sessions WHERE manager = ?", (name,))
    return manager(store, name)


def remove_manager(store, name):
    """Disable a login and end its sessions (its acknowledgements stay on record)."""
    with store.transaction():
        cur = store.conn.execute("UPDATE managers SET disabled = 1 WHERE name = ?", (name,))
        if not cur.rowcount:
            raise ManagerError("manager %s: no such manager" % name)
        store.conn.execute("DELETE FROM manager_sessions WHERE manager = ?", (name,))


def manager(store, name):
    row = store.conn.execute("SELECT name, hall, display_name, created_at, disabled "
                             "FROM managers WHERE name = ?", (name,)).fetchone()
    return dict(row) if row else None


def list_managers(store):
    return [dict(r) for r in store.conn.execute(
        "SELECT name, hall, display_name, created_at, disabled FROM managers ORDER BY name")]


def _token_hash(token):
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def start_session(store, name, hall, hours, now):
    token = secrets.token_urlsafe(32)
    with store.transaction():
        store.conn.execute("DELETE FROM manager_sessions WHERE expires_at < ?", (now,))
        store.conn.execute(
            "INSERT INTO manager_sessions (token_hash, manager, hall, created_at, expires_at) "
            "VALUES (?,?,?,?,?)", (_token_hash(token), name, hall, iso(now), now + hours * 3600))
    return token


def session_for(store, token, now):
    """The live session of this cookie value (joined with its manager), or None."""
    if not token or len(token) > 100:
        return None
    row = store.conn.execute(
        "SELECT s.manager, s.hall, s.expires_at, m.display_name FROM manager_sessions s "
        "JOIN managers m ON m.name = s.manager WHERE s.token_hash = ? AND NOT m.disabled",
        (_token_hash(token),)).fetchone()
    if row is None or row["expires_at"] < now:
        return None
    return dict(row)


def end_session(store, token):
    with store.transaction():
        store.conn.execute("DELETE FROM manager_sessions WHERE token_hash = ?",
                           (_token_hash(token),))


# -- how votes look on the page --------------------------------------------------------------

def reason_labels():
    """Reason code -> Chinese label, from the hub's indicator catalogue."""
    try:
        from .http_api import DEFAULT_CATALOGUE
        return {entry[0]: entry[-1] for entry in DEFAULT_CATALOGUE.get("rs", ())}
    except (ImportError, AttributeError, IndexError, TypeError):
        return {}


# Why the hub turned an input away (store.rejections()), for a manager who is not a technician.
REJECTION_LABELS = {
    "unknown_topic": "未知的上报主题", "too_large": "上报过大", "bad_json": "格式错误",
    "schema": "字段不符合协议", "topic_mismatch": "设备号与主题不符",
    "unknown_device": "未登记的设备", "retired_device": "已停用的设备",
    "device_key": "设备密钥损坏", "bad_mac": "签名不符（疑似伪造）",
    "conflict": "序号冲突（同号不同内容）", "unknown_prompt": "未知的评价请求",
    "internal_error": "中心内部错误", "province_rejected": "省平台拒收",
    "province_silent": "省平台未答复", "unmappable": "无法转换为省平台格式",
    "ota_not_offered": "索取未推送给它的固件", "ota_offset": "固件索取位置越界",
}

VOTE_SQL = ("SELECT v.rowid AS rowid, v.device_id, v.seq, v.t, v.kind, v.pid, v.case_no,"
            " v.stars, v.reasons, v.cat_ver, v.window, v.staff_no, v.received_at,"
            " v.forwarded_at, p.staff_name, p.task_name, p.task_code"
            " FROM votes v LEFT JOIN prompts p ON p.pid = v.pid AND p.device_id = v.device_id")


def vote_view(row, labels):
    row = dict(row)
    stars = row["stars"]
    voted = row["kind"] == codec.KIND_VOTE
    return {
        "id": "%s:%d" % (row["device_id"], row["seq"]),
        "device_id": row["device_id"], "seq": row["seq"], "t": row["t"], "kind": row["kind"],
        "stars": stars, "stars_label": alertlib.STAR_LABELS.get(stars, "未评价") if voted
        else "未评价",
        "good": voted and stars >= 3, "bad": voted and 1 <= stars <= 2,
        "reasons": [{"code": c, "label": labels.get(c, c)}
                    for c in (row["reasons"] or "").split(",") if c],
        "cat_ver": row["cat_ver"], "window": row["window"] or "",
        "staff_no": row["staff_no"] or "", "staff_name": row.get("staff_name") or "",
        "item": row.get("task_name") or "", "case_no": row["case_no"] or "",
        "received_at": row["received_at"], "forwarded": row["forwarded_at"] is not None,
    }


def feed_view(vote):
    # The live feed and the streams leave out the case number: it leads to a person's
    # file. A bad rating's alert carries it, for the manager handling it.
    out = dict(vote)
    out.pop("case_no", None)
    return out


def _rate(good, bad):
    return round(good / (good + bad), 4) if good + bad else None


# -- the watcher (its own thread and store connection) ---------------------------------------

class Update:
    """What one watcher tick found, to be streamed."""

    def __init__(self):
        self.votes = []
        self.alerts = []
        self.devices = []
        self.windows = []

    def __bool__(self):
        return bool(self.votes or self.alerts or self.devices or self.windows)


class Watcher:
    def __init__(self, db_path, halls, limits, clock, webhook_on):
        self.store = Store(db_path, clock=clock)
        self.clock = clock
        self.halls = halls
        self.monitor = healthlib.Monitor(self.store, limits, clock)
        self.book = alertlib.AlertBook(self.store, halls.hall_of, clock, webhook_on)
        self.labels = reason_labels()
        self._windows = None
        self.ticks = 0
        self.errors = 0

    def close(self):
        self.store.close()

    def tick(self):
        update = Update()
        store = self.store
        for change in self.monitor.tick():
            with store.transaction():
                update.alerts += self.book.for_change(change)
            update.devices.append({"device_id": change.device_id, "window": change.window,
                                   "state": change.new, "from": change.old,
                                   "state_label": healthlib.STATE_LABELS[change.new],
                                   "reasons": change.detail.reason_codes,
                                   "reason_labels": [healthlib.describe_reason(
                                       r, change.reasons[r]) for r in change.detail.reason_codes],
                                   "since": change.detail.since, "at": change.at})
        cursor = store.get_state("dashboard_vote_rowid", 0)
        rows = store.conn.execute(VOTE_SQL + " WHERE v.rowid > ? ORDER BY v.rowid LIMIT ?",
                                  (cursor, VOTE_BATCH)).fetchall()
        if rows:
            votes = [vote_view(r, self.labels) for r in rows]
            with store.transaction():
                update.alerts += self.book.for_votes(votes)
                store.set_state("dashboard_vote_rowid", rows[-1]["rowid"])
            update.votes = votes
        self._latency()
        self._sign_ins(update)
        self.ticks += 1
        return update

    def _sign_ins(self, update):
        rows = {r["window"]: tuple(r) for r in self.store.conn.execute(
            "SELECT window, staff_no, staff_name, signed_in_at, signed_out_at FROM windows")}
        if self._windows is not None:
            update.windows = sorted(w for w in rows if self._windows.get(w) != rows[w])
        self._windows = rows

    def _latency(self):
        """Add newly accepted batches to the forward-latency histograms, in batch order."""
        store = self.store
        cursor = store.get_state("dashboard_latency_batch", 0)
        batches = store.conn.execute("SELECT n, accepted_at FROM batches WHERE n > ? "
                                     "ORDER BY n LIMIT 20", (cursor,)).fetchall()
        done = []
        for n, accepted_at in batches:
            if accepted_at is None:
                break  # the province has not taken it yet; later ones wait behind it
            done.append((n, healthlib.parse_iso(accepted_at)))
        if not done:
            return
        hist = {"forward": {}, "press_to_province": {}}
        for n, accepted in done:
            for received_at, t in store.conn.execute(
                    "SELECT received_at, t FROM votes WHERE batch_n = ?", (n,)):
                received = healthlib.parse_iso(received_at)
                if accepted is None or received is None:
                    continue
                metrics.observe(hist["forward"], max(accepted - received, 0.0))
                metrics.observe(hist["press_to_province"], max(accepted - t, 0.0))
        with store.transaction():
            for name, buckets in hist.items():
                for bucket, value in buckets.items():
                    store.conn.execute(
                        "INSERT INTO latency_hist (name, bucket, value) VALUES (?,?,?) "
                        "ON CONFLICT(name, bucket) DO UPDATE SET value = value + excluded.value",
                        (name, bucket, value))
            store.set_state("dashboard_latency_batch", done[-1][0])


# -- the HTTP side ---------------------------------------------------------------------------

class Subscriber:
    def __init__(self, session):
        self.session = session
        self.queue = asyncio.Queue(STREAM_QUEUE)


def _sse(event, data):
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return ("event: %s\ndata: %s\n\n" % (event, payload)).encode("utf-8")


def _handler(func):
    """JSON errors for DashboardError; every answer gets the security headers."""
    @functools.wraps(func)
    async def wrapped(self, request):
        try:
            response = await func(self, request)
        except DashboardError as exc:
            response = web.json_response({"error": str(exc)}, status=exc.status)
        except alertlib.AlertError as exc:
            response = web.json_response({"error": str(exc)}, status=404)
        if not response.prepared:
            response.headers.update(SECURITY_HEADERS)
            response.headers.setdefault("Cache-Control", "no-store")
        return response
    return wrapped


class Dashboard:
    """The dashboard's handlers and background tasks for one hub."""

    def __init__(self, settings, clock=time.time, health=None):
        self.settings = settings
        self.clock = clock
        self.hub_health = health or (lambda: {})
        cfg = getattr(settings, "dashboard", None)
        self.offset_s = int(getattr(cfg, "utc_offset_hours", 8)) * 3600
        self.session_hours = int(getattr(cfg, "session_hours", 12))
        self.halls = Halls(settings.hub.id, getattr(cfg, "halls", None) or {})
        self.limits = healthlib.Limits(offline_after_s=int(getattr(cfg, "offline_after_s", 90)))
        hook_url = getattr(cfg, "webhook_url", "") or ""
        self.webhook = None
        if hook_url:
            self.webhook = alertlib.Webhook(
                hook_url, getattr(cfg, "webhook_format", "json"),
                getattr(cfg, "webhook_secret", ""), int(getattr(cfg, "webhook_attempts", 8)),
                settings.hub.id, alertlib.local_clock(self.offset_s), clock)
        self.store = None
        self.book = None
        self.watcher = None
        self.labels = reason_labels()
        self.subscribers = set()
        self.stream_resyncs = 0
        self.watch_errors = 0
        self.hook_stats = {"sent": 0, "failed": 0, "retrying": 0}
        self._fails = {}
        self._province_cache = None
        self._executor = None
        self._tasks = []

    # -- lifecycle (aiohttp cleanup context) ------------------------------------------------
    async def lifecycle(self, app):
        self.store = Store(self.settings.db_path, clock=self.clock)
        self.book = alertlib.AlertBook(self.store, self.halls.hall_of, self.clock,
                                       self.webhook is not None)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "pingjia-dashboard")
        loop = asyncio.get_running_loop()
        self.watcher = await loop.run_in_executor(
            self._executor, lambda: Watcher(self.settings.db_path, self.halls, self.limits,
                                            self.clock, self.webhook is not None))
        self._tasks = [asyncio.ensure_future(self._watch())]
        if self.webhook is not None:
            self._tasks.append(asyncio.ensure_future(self._deliver()))
        yield
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await loop.run_in_executor(self._executor, self.watcher.close)
        self._executor.shutdown(wait=True)
        self.store.close()

    async def on_shutdown(self, app):
        # Open streams would hold the server's shutdown; tell each to end.
        for sub in list(self.subscribers):
            _put(sub, None)

    async def _watch(self):
        loop = asyncio.get_running_loop()
        while True:
            try:
                update = await loop.run_in_executor(self._executor, self.watcher.tick)
                if update:
                    self.publish(update)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The page must keep going; the next tick tries again.
                self.watch_errors += 1
                log.exception("dashboard watcher tick failed")
            await asyncio.sleep(TICK_S)

    async def _deliver(self):
        import aiohttp

        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    sent, failed, retrying = await self.webhook.deliver_due(self.store, session)
                    self.hook_stats["sent"] += sent
                    self.hook_stats["failed"] += failed
                    self.hook_stats["retrying"] += retrying
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("webhook delivery failed")
                await asyncio.sleep(TICK_S)

    def counters(self):
        """The dashboard's own counts for /metrics."""
        return {"streams": len(self.subscribers), "stream_resyncs": self.stream_resyncs,
                "watch_errors": self.watch_errors,
                "watch_ticks": self.watcher.ticks if self.watcher else 0}

    # -- live streams -----------------------------------------------------------------------
    def publish(self, update):
        for sub in list(self.subscribers):
            hall = sub.session["hall"]
            for vote in update.votes:
                if self.halls.sees(hall, vote["window"]):
                    _put(sub, _sse("vote", feed_view(vote)), self)
            for alert in update.alerts:
                if self.halls.sees_all(hall) or alert["hall"] == hall:
                    _put(sub, _sse("alert", alert), self)
            for device in update.devices:
                if self.halls.sees(hall, device["window"]):
                    _put(sub, _sse("device", device), self)
            windows = [w for w in update.windows if self.halls.sees(hall, w)]
            if windows:
                _put(sub, _sse("windows", {"windows": windows}), self)

    # -- auth -------------------------------------------------------------------------------
    def _session(self, request):
        session = session_for(self.store, request.cookies.get(COOKIE), self.clock())
        if session is None:
            raise DashboardError(401, "not logged in")
        return session

    def _same_origin(self, request):
        # With the SameSite=Strict cookie this is the second fence against cross-site posts.
        origin = request.headers.get("Origin")
        if origin and origin.split("://", 1)[-1] != request.host:
            raise DashboardError(403, "cross-site request refused")

    async def _body(self, request):
        self._same_origin(request)
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise DashboardError(400, "body: not JSON")
        if not isinstance(body, dict):
            raise DashboardError(400, "body: not a JSON object")
        return body

    @_handler
    async def login(self, request):
        body = await self._body(request)
        name, password = body.get("name"), body.get("password")
        if not isinstance(name, str) or not isinstance(password, str) or len(password) > 200:
            raise DashboardError(400, "name and password required")
        now = self.clock()
        fails, until = self._fails.get(name, (0, 0.0))
        if until > now:
            raise DashboardError(429, "too many wrong passwords: try again in %d s"
                                 % (until - now + 1))
        row = self.store.conn.execute("SELECT name, hall, pw_hash, disabled FROM managers "
                                      "WHERE name = ?", (name,)).fetchone()
        stored = row["pw_hash"] if row else hash_password("no such manager")
        ok = await asyncio.get_running_loop().run_in_executor(
            None, check_password, password, stored)
        if not ok or row is None or row["disabled"] or not self.halls.known(row["hall"]):
            fails += 1
            self._fails[name] = (0, now + LOGIN_LOCK_S) if fails >= LOGIN_FAILS else \
                (fails, 0.0)
            if len(self._fails) > 10000:
                self._fails.clear()  # bounded: a flood of made-up names costs nothing
            log.info("manager login refused")
            raise DashboardError(401, "wrong name or password")
        self._fails.pop(name, None)
        token = start_session(self.store, row["name"], row["hall"], self.session_hours, now)
        log.info("manager login (hall %s)", row["hall"])
        response = web.json_response(self._me(session_for(self.store, token, now)))
        response.set_cookie(COOKIE, token, max_age=self.session_hours * 3600, path="/dashboard",
                            httponly=True, samesite="Strict", secure=request.secure)
        return response

    @_handler
    async def logout(self, request):
        self._same_origin(request)
        token = request.cookies.get(COOKIE)
        if token:
            end_session(self.store, token)
        response = web.json_response({"ok": True})
        response.del_cookie(COOKIE, path="/dashboard")
        return response

    def _me(self, session):
        return {"name": session["manager"], "display_name": session["display_name"],
                "hall": session["hall"], "hub": self.settings.hub.id,
                "whole_hub": self.halls.sees_all(session["hall"]),
                "utc_offset_hours": self.offset_s // 3600}

    @_handler
    async def me(self, request):
        return web.json_response(self._me(self._session(request)))

    # -- the page ---------------------------------------------------------------------------
    @_handler
    async def index(self, request):
        return self._file("index.html")

    @_handler
    async def static(self, request):
        return self._file(request.match_info["name"])

    def _file(self, name):
        if name not in _web_files():
            raise DashboardError(404, "no such file")
        with open(os.path.join(WEB_DIR, name), "rb") as f:
            body = f.read()
        ext = os.path.splitext(name)[1]
        response = web.Response(body=body, content_type=CONTENT_TYPES.get(ext, "text/plain"),
                                charset="utf-8" if ext in (".html", ".js", ".css") else None)
        response.headers["Cache-Control"] = "no-cache"
        return response

    async def redirect(self, request):
        raise web.HTTPFound("/dashboard/")

    # -- time -------------------------------------------------------------------------------
    def day_range(self, day=None):
        """(start, end, "YYYY-MM-DD") in unix seconds of a day in the hall's time zone."""
        if day:
            try:
                parsed = time.strptime(day, "%Y-%m-%d")
            except ValueError:
                raise DashboardError(400, "day: YYYY-MM-DD")
            import calendar
            start = calendar.timegm(parsed) - self.offset_s
        else:
            local = self.clock() + self.offset_s
            start = int(local // 86400) * 86400 - self.offset_s
        label = time.strftime("%Y-%m-%d", time.gmtime(start + self.offset_s))
        return start, start + 86400, label

    # -- JSON for the page ------------------------------------------------------------------
    def _states(self):
        """device_id -> state dict, from the monitor's verdicts (judged on the spot for a
        device it has not reached yet)."""
        out = {}
        for row in self.store.conn.execute(
                "SELECT d.device_id, d.window, s.state, s.reasons, s.since FROM devices d "
                "LEFT JOIN device_state s ON s.device_id = d.device_id WHERE NOT d.retired "
                "ORDER BY d.device_id"):
            if row["state"] is None:
                verdict = healthlib.current(self.store, row["device_id"], self.clock(),
                                            self.limits)
                state, reasons, since = verdict.state, verdict.reasons, verdict.since
            else:
                state, reasons, since = row["state"], json.loads(row["reasons"] or "{}"), \
                    row["since"]
            codes = [r for r in healthlib.REASONS if r in reasons]
            out[row["device_id"]] = {
                "device_id": row["device_id"], "window": row["window"] or "", "state": state,
                "state_label": healthlib.STATE_LABELS.get(state, state), "reasons": codes,
                "reason_labels": [healthlib.describe_reason(r, reasons[r]) for r in codes],
                "since": since}
        return out

    @_handler
    async def overview(self, request):
        session = self._session(request)
        hall = session["hall"]
        start, end, day = self.day_range()
        conn = self.store.conn
        states = {d: s for d, s in self._states().items() if self.halls.sees(hall, s["window"])}
        signed = {r["window"]: dict(r) for r in conn.execute("SELECT * FROM windows")
                  if self.halls.sees(hall, r["window"])}
        counts, last = {}, {}
        for row in conn.execute(
                "SELECT window, sum(kind = 'v' AND stars >= 3), sum(kind = 'v' AND stars <= 2),"
                " sum(kind = 'u'), max(rowid) FROM votes WHERE t >= ? AND t < ? GROUP BY window",
                (start, end)):
            if self.halls.sees(hall, row[0]):
                counts[row[0]] = {"good": row[1], "bad": row[2], "unrated": row[3],
                                  "votes": row[1] + row[2], "rate": _rate(row[1], row[2])}
                last[row[0]] = row[4]
        if last:
            ids = list(last.values())
            for row in conn.execute(VOTE_SQL + " WHERE v.rowid IN (%s)" % ",".join("?" * len(ids)),
                                    ids):
                last[row["window"]] = feed_view(vote_view(row, self.labels))
        windows = {}
        for name in set(signed) | {s["window"] for s in states.values() if s["window"]} | \
                set(counts):
            windows[name] = {"window": name, "devices": [], "staff_no": "", "staff_name": "",
                             "signed_in_at": None,
                             "today": counts.get(name, {"good": 0, "bad": 0, "unrated": 0,
                                                        "votes": 0, "rate": None}),
                             "last_vote": last.get(name) if isinstance(last.get(name), dict)
                             else None}
            if name in signed and signed[name]["staff_no"]:
                windows[name].update(staff_no=signed[name]["staff_no"],
                                     staff_name=signed[name]["staff_name"],
                                     signed_in_at=signed[name]["signed_in_at"])
        unassigned = []
        for state in states.values():
            (windows[state["window"]]["devices"] if state["window"] else unassigned).append(state)
        order = {healthlib.OFFLINE: 0, healthlib.DEGRADED: 1, healthlib.NEVER: 2,
                 healthlib.ONLINE: 3}
        for item in windows.values():
            item["state"] = min((d["state"] for d in item["devices"]), key=order.get,
                                default=None)
        good = sum(c["good"] for c in counts.values())
        bad = sum(c["bad"] for c in counts.values())
        by_state = {s: 0 for s in healthlib.STATES}
        for state in states.values():
            by_state[state["state"]] = by_state.get(state["state"], 0) + 1
        open_alerts = self.book.listing(self.halls.alert_scope(hall), open_only=True, limit=1000)
        return web.json_response({
            "hall": hall, "day": day, "at": iso(self.clock()),
            "totals": {"good": good, "bad": bad, "votes": good + bad,
                       "unrated": sum(c["unrated"] for c in counts.values()),
                       "rate": _rate(good, bad), "open_alerts": len(open_alerts)},
            "devices": by_state,
            "windows": sorted(windows.values(), key=lambda w: w["window"]),
            "unassigned": unassigned,
            "province": self._province(),
        })

    def _province(self):
        """The province link for the overview. status() counts whole tables, and every
        browser asks for the overview after every vote: a few seconds old is fresh enough."""
        now = time.monotonic()
        if self._province_cache is None or now - self._province_cache[0] > PROVINCE_CACHE_S:
            self._province_cache = (now, _province_summary(self.store.status()))
        return self._province_cache[1]

    @_handler
    async def votes(self, request):
        session = self._session(request)
        limit = _int_param(request, "limit", 50, 1, FEED_MAX)
        bad_only = request.query.get("bad") == "1"
        clause, params = self._window_clause(session["hall"])
        sql = VOTE_SQL + " WHERE " + clause
        if bad_only:
            sql += " AND v.kind = 'v' AND v.stars <= 2"
        rows = self.store.conn.execute(sql + " ORDER BY v.rowid DESC LIMIT ?",
                                       params + [limit]).fetchall()
        return web.json_response({"votes": [feed_view(vote_view(r, self.labels))
                                            for r in rows]})

    def _window_clause(self, hall, column="v.window"):
        """SQL limiting rows to a hall's windows (GLOB matches as fnmatchcase does)."""
        if self.halls.sees_all(hall):
            return "1", []
        own = self.halls.patterns.get(hall, [])
        # A window of this hall matches one of its patterns and none of an earlier hall's.
        earlier = []
        for name, patterns in self.halls.patterns.items():
            if name == hall:
                break
            earlier += patterns
        sql = "(" + " OR ".join("%s GLOB ?" % column for _ in own) + ")"
        if earlier:
            sql += " AND NOT (" + " OR ".join("%s GLOB ?" % column for _ in earlier) + ")"
        return sql, list(own) + earlier

    @_handler
    async def alerts(self, request):
        session = self._session(request)
        start, _, _ = self.day_range()
        listing = self.book.listing(self.halls.alert_scope(session["hall"]),
                                    since=iso(start), limit=_int_param(request, "limit", 100,
                                                                       1, 500))
        return web.json_response({"alerts": listing})

    @_handler
    async def ack(self, request):
        session = self._session(request)
        await self._body(request)
        try:
            alert_id = int(request.match_info["id"])
        except ValueError:
            raise DashboardError(404, "no such alert")
        alert = self.book.ack(alert_id, session["manager"],
                              self.halls.alert_scope(session["hall"]))
        update = Update()
        update.alerts.append(alert)
        self.publish(update)  # every manager of the hall sees it acknowledged at once
        return web.json_response(alert)

    @_handler
    async def charts(self, request):
        session = self._session(request)
        start, end, day = self.day_range(request.query.get("day"))
        clause, params = self._window_clause(session["hall"])
        conn = self.store.conn
        base = (" FROM votes v LEFT JOIN prompts p ON p.pid = v.pid AND p.device_id = v.device_id"
                " WHERE v.t >= ? AND v.t < ? AND " + clause)
        args = [start, end] + params
        tally = ("sum(v.kind = 'v' AND v.stars >= 3), sum(v.kind = 'v' AND v.stars <= 2),"
                 " sum(v.kind = 'u')")
        hours = [{"hour": h, "good": 0, "bad": 0, "unrated": 0} for h in range(24)]
        for row in conn.execute("SELECT ((v.t + ?) %% 86400) / 3600, %s %s GROUP BY 1"
                                % (tally, base), [self.offset_s] + args):
            hours[int(row[0])].update(good=row[1], bad=row[2], unrated=row[3])

        def grouped(key_sql, label_sql):
            out = []
            for row in conn.execute("SELECT %s, %s, %s %s GROUP BY 1" % (
                    key_sql, label_sql, tally, base), args):
                out.append({"key": row[0] or "", "label": row[1] or row[0] or "",
                            "good": row[2], "bad": row[3], "unrated": row[4],
                            "votes": row[2] + row[3], "rate": _rate(row[2], row[3])})
            return sorted(out, key=lambda r: (-r["votes"], r["key"]))

        return web.json_response({
            "day": day, "hours": hours,
            "windows": grouped("v.window", "v.window"),
            "staff": grouped("v.staff_no", "max(p.staff_name)"),
            "items": grouped("coalesce(nullif(p.task_code, ''), p.task_name)",
                             "max(p.task_name)"),
        })

    @_handler
    async def devices(self, request):
        session = self._session(request)
        now = self.clock()
        out = []
        states = self._states()
        for device_id, state in states.items():
            if not self.halls.sees(session["hall"], state["window"]):
                continue
            health = self.store.health(device_id) or {}
            fields = healthlib.latest_fields(health) if health else {}
            out.append(dict(state, last_seen=health.get("last_seen"),
                            fw=fields.get("fw"), jd=fields.get("jd"), heap=fields.get("heap"),
                            rssi=fields.get("rssi")))
        return web.json_response({"devices": out, "at": iso(now)})

    @_handler
    async def device(self, request):
        session = self._session(request)
        device_id = request.match_info["id"]
        report = healthlib.report(self.store, device_id, self.clock(), self.limits)
        if report is None or report["retired"] or \
                not self.halls.sees(session["hall"], report["window"]):
            raise DashboardError(404, "no such device in this hall")
        start, end, _ = self.day_range()
        row = self.store.conn.execute(
            "SELECT sum(kind = 'v' AND stars >= 3), sum(kind = 'v' AND stars <= 2), "
            "sum(kind = 'u') FROM votes WHERE device_id = ? AND t >= ? AND t < ?",
            (device_id, start, end)).fetchone()
        report["today"] = {"good": row[0] or 0, "bad": row[1] or 0, "unrated": row[2] or 0,
                           "rate": _rate(row[0] or 0, row[1] or 0)}
        return web.json_response(report)

    @_handler
    async def system(self, request):
        """The hub itself: its parts, the province link, backlogs, what it turned away and
        votes lost on devices. Counts are the whole hub's; the lists name only devices of
        the manager's hall (or no device at all)."""
        session = self._session(request)
        hall = session["hall"]
        status = self.store.status()
        windows = {d["device_id"]: d["window"] or "" for d in self.store.active_devices()}

        def visible(device_id):
            if self.halls.sees_all(hall):
                return True
            return device_id in windows and self.halls.sees(hall, windows[device_id])

        recent = [dict(r, label=REJECTION_LABELS.get(r["reason"], r["reason"]))
                  for r in self.store.recent_rejections(200)
                  if not r["device_id"] or visible(r["device_id"])][:50]
        gaps = [{"at": e["at"], "device_id": e["device_id"], "detail": e["detail"]}
                for e in self.store.events(kind="gap", limit=200) if visible(e["device_id"])]
        return web.json_response({
            "hub": self.settings.hub.id, "at": iso(self.clock()),
            "parts": dict(self.hub_health()),
            "province": _province_summary(status),
            "backlog": status["backlog"], "votes": status["votes"],
            "rejections": [{"reason": r, "label": REJECTION_LABELS.get(r, r), "count": n}
                           for r, n in sorted(status["rejections"].items(),
                                              key=lambda kv: -kv[1])],
            "recent_rejections": recent,
            "gaps": gaps[:50], "lost_votes": status["counters"].get("gap_seqs", 0),
        })

    def _rollout_view(self, hall, rid):
        """A rollout with the devices of this hall (counts are the whole hub's, as on the
        system panel)."""
        found = updatelib.rollout(self.store, rid, clock=self.clock,
                                  offline_after_s=self.limits.offline_after_s)
        found["device_list"] = [d for d in found["device_list"]
                                if self.halls.sees(hall, d["window"])]
        return found

    @_handler
    async def updates(self, request):
        """Firmware rollouts, newest first, each with its devices' states and progress."""
        session = self._session(request)
        limit = _int_param(request, "limit", 10, 1, 50)
        listing = [self._rollout_view(session["hall"], r["rid"])
                   for r in updatelib.rollouts(self.store, limit)]
        return web.json_response({"at": iso(self.clock()), "rollouts": listing,
                                  "releases": updatelib.releases(self.store)})

    @_handler
    async def update(self, request):
        session = self._session(request)
        try:
            found = self._rollout_view(session["hall"], request.match_info["rid"])
        except updatelib.UpdateError:
            raise DashboardError(404, "no such rollout")
        return web.json_response(found)

    async def stream(self, request):
        try:
            session = self._session(request)
        except DashboardError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        response = web.StreamResponse(headers=dict(SECURITY_HEADERS, **{
            "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no"}))
        await response.prepare(request)
        sub = Subscriber(session)
        self.subscribers.add(sub)
        token = request.cookies.get(COOKIE)
        try:
            await response.write(b"retry: 2000\n\n" + _sse("hello", self._me(session)))
            while True:
                try:
                    message = await asyncio.wait_for(sub.queue.get(), STREAM_KEEPALIVE_S)
                except asyncio.TimeoutError:
                    if session_for(self.store, token, self.clock()) is None:
                        await response.write(_sse("logout", {}))
                        break
                    message = b": keepalive\n\n"
                if message is None:
                    break
                await response.write(message)
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self.subscribers.discard(sub)
        return response

    @_handler
    async def metrics(self, request):
        text = metrics.render(self.store, self.settings.hub.id, states=self._states(),
                              alert_counts=self.book.counts(), hub_health=self.hub_health(),
                              dashboard=self.counters(), now=self.clock())
        return web.Response(body=text.encode("utf-8"), headers={
            "Content-Type": "text/plain; version=0.0.4; charset=utf-8",
            "Cache-Control": "no-store"})


def _province_summary(status):
    province = status["province"]
    return {"unforwarded": status["backlog"]["unforwarded"],
            "last_success": province["last_success"],
            "pending_attempts": province["pending_attempts"],
            "error": province["last_error"] if province["pending_attempts"] else None,
            "chain_error": bool(province["chain_error"])}


def _put(sub, message, dashboard=None):
    if message is None:
        # End of stream: make room for it whatever is queued.
        while sub.queue.full():
            sub.queue.get_nowait()
        sub.queue.put_nowait(None)
        return
    try:
        sub.queue.put_nowait(message)
    except asyncio.QueueFull:
        # A browser this far behind gets told to reload what it shows, not a partial story.
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.queue.put_nowait(_sse("resync", {}))
        if dashboard is not None:
            dashboard.stream_resyncs += 1


def _int_param(request, name, default, lo, hi):
    try:
        value = int(request.query.get(name, default))
    except ValueError:
        raise DashboardError(400, "%s: an integer" % name)
    return max(lo, min(hi, value))


@functools.lru_cache(maxsize=1)
def _web_files():
    return frozenset(n for n in os.listdir(WEB_DIR) if not n.startswith((".", "_")) and
                     os.path.isfile(os.path.join(WEB_DIR, n)))


DASHBOARD = web.AppKey("pingjia_dashboard", Dashboard)


def setup_dashboard(app, settings, clock=None, health=None):
    """Add the dashboard and /metrics routes to the hub's aiohttp app; returns the
    Dashboard (its tasks start and stop with the app)."""
    dash = Dashboard(settings, clock=clock or time.time, health=health)
    app.cleanup_ctx.append(dash.lifecycle)
    app.on_shutdown.append(dash.on_shutdown)
    router = app.router
    if not any(r.canonical == "/" for r in router.resources()):
        router.add_get("/", dash.redirect)
    router.add_get("/dashboard", dash.redirect)
    router.add_get("/dashboard/", dash.index)
    router.add_get("/dashboard/static/{name}", dash.static)
    router.add_post("/dashboard/api/login", dash.login)
    router.add_post("/dashboard/api/logout", dash.logout)
    router.add_get("/dashboard/api/me", dash.me)
    router.add_get("/dashboard/api/overview", dash.overview)
    router.add_get("/dashboard/api/votes", dash.votes)
    router.add_get("/dashboard/api/alerts", dash.alerts)
    router.add_post("/dashboard/api/alerts/{id}/ack", dash.ack)
    router.add_get("/dashboard/api/charts", dash.charts)
    router.add_get("/dashboard/api/devices", dash.devices)
    router.add_get("/dashboard/api/devices/{id}", dash.device)
    router.add_get("/dashboard/api/system", dash.system)
    router.add_get("/dashboard/api/updates", dash.updates)
    router.add_get("/dashboard/api/updates/{rid}", dash.update)
    router.add_get("/dashboard/api/stream", dash.stream)
    router.add_get("/metrics", dash.metrics)
    app[DASHBOARD] = dash
    return dash
