"""The hub's HTTP API for the windows' business systems (aiohttp) and the screen downlinks.

Staff sign-in and sign-out per window (name, 工号, an optional photo for wide panels), a
rating prompt per completed service (case kinds, batch and themed business; the answer says
whether the device took it), the outcome per case, suspicious votes for the hall manager,
the jurisdiction in force, /healthz and the status JSON. hub/openapi.json documents every
route; docs/integration.md walks an integrator through them. The counter-flow logic lives
in hub/business.py; this module checks requests, authenticates callers and answers.

Every Chinese text (staff name, item name, reason label) goes to the device as a bitmap
rendered here (hub/bitmaps.py); only identifiers travel as strings.
"""
import ipaddress
import json
import logging
import os
import threading
import time

from aiohttp import web

from . import business
from . import policy
from . import suspicion
from .store import Store

log = logging.getLogger("pingjia.hub.http")

PROMPT_KINDS = business.KINDS
PROMPT_TTL_S = 60
MAX_TEXT = business.MAX_TEXT
SCREEN_W = 256    # the reference display is 256x64 (firmware/display.py)
LINE_H = 16
ITEM_MAX_W = 1024   # the protocol's widest bitmap: 1024 x 16 is its 2048 bytes
BODY_MAX = 1024 * 1024   # a staff photo as base64 is the largest body
# The largest MQTT packet the MCU evaluator takes (firmware/app.py MAX_DOWNLINK); a bigger
# downlink is dropped there, so a catalogue must stay under it with its topic and header.
DEVICE_DOWNLINK_MAX = 5120
PACKET_OVERHEAD = 64
OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")
PHOTO_FETCH_TIMEOUT_S = 5.0

# The catalogue a hub sends before its jurisdiction is known: the national one (I.. = the
# item, S.. = the staff member). hub/business.Engine replaces it with the jurisdiction's.
DEFAULT_CATALOGUE = policy.load(policy.FALLBACK).catalogue()

ApiError = business.RequestError
BUSINESS = web.AppKey("pingjia.business", business.Engine)


def _render(text, max_lines=1, max_width=SCREEN_W):
    """A wire bitmap of text, or None when no font can draw it (the device shows the
    identifier instead). Text beyond max_width is cut with a visible "…" rather than
    refused: the service must go on."""
    from . import bitmaps

    try:
        return bitmaps.rasterize(text, height=LINE_H, max_width=max_width, max_lines=max_lines,
                                 overflow="ellipsis").bitmap
    except bitmaps.BitmapError as exc:
        log.warning("cannot render text for a device: %s", exc)
        return None


class Downlink:
    """Builds and publishes ctx, prompt, cat and time downlinks (docs/protocol.md)."""

    def __init__(self, publish, render=_render, clock=time.time, catalogue=DEFAULT_CATALOGUE):
        self.publish = publish
        self._render = render
        self.clock = clock
        self.catalogue = catalogue
        self._cat_payload = None
        # The ingest thread (greeting devices) and the HTTP thread both render; font
        # objects are not made to be shared between threads.
        self._lock = threading.Lock()

    def render(self, text, max_lines=1, max_width=SCREEN_W):
        with self._lock:
            if max_width == SCREEN_W:
                return self._render(text, max_lines)
            return self._render(text, max_lines, max_width)

    def item(self, text):
        """An item name as the device shows it: one 16 px line, as wide as the protocol
        allows (the device scrolls what is wider than its screen, docs/screens.md)."""
        return self.render(text, 1, ITEM_MAX_W)

    def ctx(self, device_id, window, staff_no, name, photo=None):
        payload = {"w": window or "", "sn": staff_no or "",
                   "name": self.render(name) if staff_no and name else None,
                   "win": self.render("窗口 " + window) if window else None,
                   "t": int(self.clock())}
        if photo and staff_no:
            payload["photo"] = photo   # only for panels that show it (docs/agent.md)
        self.publish("pj/%s/dn/ctx" % device_id, json.dumps(payload), qos=1, retain=True)
        return payload

    def prompt(self, device_id, pid, case_no, kind, n_cases, item_text, ttl=PROMPT_TTL_S):
        payload = {"pid": pid, "case": case_no or "", "kind": kind, "n": n_cases,
                   "item": self.item(item_text) if item_text else None,
                   "ttl": ttl, "t": int(self.clock())}
        self.publish("pj/%s/dn/prompt" % device_id, json.dumps(payload), qos=1)
        return payload

    def set_catalogue(self, catalogue):
        """Use another catalogue from now on; True when it differs from the one in use."""
        with self._lock:
            if catalogue == self.catalogue:
                return False
            self.catalogue = catalogue
            self._cat_payload = None
            return True

    def payload_for(self, catalogue):
        """The cat downlink for a catalogue, labels rendered."""
        return json.dumps({
            "cv": catalogue["cv"],
            "rs": [{"c": code, "a": area, "bm": self.render(label)}
                   for code, area, label in catalogue["rs"]],
        })

    def fits(self, catalogue):
        """True when the rendered catalogue fits the MCU's downlink buffer."""
        size = len(self.payload_for(catalogue).encode("utf-8"))
        return size + PACKET_OVERHEAD <= DEVICE_DOWNLINK_MAX

    def cat_payload(self):
        with self._lock:
            catalogue, payload = self.catalogue, self._cat_payload
        if payload is None:
            # Rendered once per catalogue: twelve labels cost a few hundred ms of font work.
            payload = self.payload_for(catalogue)
            with self._lock:
                if self.catalogue is catalogue:
                    self._cat_payload = payload
        return payload

    def cat(self, device_id):
        self.publish("pj/%s/dn/cat" % device_id, self.cat_payload(), qos=1, retain=True)

    def time(self, device_id):
        self.publish("pj/%s/dn/time" % device_id, json.dumps({"t": int(self.clock())}), qos=0)

    def greet(self, store, device_id):
        """A device (re)connected: its clock, the catalogue and who is at its window.
        cat and ctx are retained anyway; sending them again repairs a broker that lost
        its retained messages (and gives a panel that shows photos the staff photo)."""
        self.time(device_id)
        self.cat(device_id)
        device = store.device(device_id)
        if device and device["window"]:
            signed = store.window(device["window"])
            if signed and signed["staff_no"]:
                self.ctx(device_id, device["window"], signed["staff_no"], signed["staff_name"],
                         photo=business.photo_for(store, device_id, device["window"]))


def status_json(store, hub_id):
    """What `pingjia hub status --json` and GET /api/v1/status print."""
    report = {"hub": hub_id, "at": store.now()}
    report.update(store.status())
    return report


# -- request checking ------------------------------------------------------------------------

def _id(body, key, allow_empty=False, required=True):
    value = body.get(key, None if required else "")
    return business.check_id(value, key, allow_empty)


async def _json_body(request):
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "body: not JSON")
    if not isinstance(body, dict):
        raise ApiError(400, "body: not a JSON object")
    return body


def _loopback(request):
    try:
        return ipaddress.ip_address((request.remote or "").split("%")[0]).is_loopback
    except ValueError:
        return False


# -- the app ---------------------------------------------------------------------------------

class Api:
    """Handlers over one Store connection (used from the event loop thread only)."""

    def __init__(self, store, downlink, hub_id, health=None, engine=None):
        self.store = store
        self.downlink = downlink
        self.hub_id = hub_id
        self.health = health or (lambda: {})
        self.engine = engine

    def _system(self, request, role=None):
        system = business.authenticate(self.store, request.headers.get("Authorization"),
                                       _loopback(request))
        if role == "manager" and system["role"] != "manager":
            raise ApiError(403, "system %s: this needs a manager system (pingjia hub systems "
                                "add NAME --role manager)" % system["name"])
        return system

    def _window_allowed(self, system, window):
        if not business.may_use_window(system, window):
            raise ApiError(403, "window %s: not among the windows of system %s"
                           % (window, system["name"]))

    async def healthz(self, request):
        detail = dict(self.health())
        ok = all(detail.values()) if detail else True
        return web.json_response(dict(detail, ok=ok), status=200 if ok else 503)

    async def status(self, request):
        return web.json_response(status_json(self.store, self.hub_id))

    async def openapi(self, request):
        return web.FileResponse(OPENAPI_PATH, headers={"Content-Type": "application/json"})

    async def policy(self, request):
        self._system(request)
        jurisdiction = self.engine.jurisdiction
        return web.json_response({"jurisdiction": jurisdiction.name,
                                  "title": jurisdiction.title, "profile": jurisdiction.raw})

    # -- staff ---------------------------------------------------------------------------------
    async def sign_in(self, request):
        system = self._system(request)
        window = _id(request.match_info, "window")
        self._window_allowed(system, window)
        body = await _json_body(request)
        for key in body:
            if key not in ("staff_no", "name", "photo", "photo_url"):
                raise ApiError(400, "%s: unknown field" % key)
        staff_no = _id(body, "staff_no")
        name = business.check_text(body.get("name"), "name", required=True)
        photo = None
        if body.get("photo") is not None and body.get("photo_url") is not None:
            raise ApiError(400, "photo_url: give photo or photo_url, not both")
        if body.get("photo") is not None:
            photo = business.photo_field(business.decode_photo(body["photo"]))
        elif body.get("photo_url") is not None:
            photo = business.photo_field(await _fetch_photo(body["photo_url"]))
        with self.store.transaction():
            self.store.sign_in(window, staff_no, name)
        business.save_photo(self.store, window, photo)
        devices = self.store.devices_at_window(window)
        for device_id in devices:
            self.downlink.ctx(device_id, window, staff_no, name,
                              photo=business.photo_for(self.store, device_id, window))
        return web.json_response({"window": window, "staff_no": staff_no, "devices": devices,
                                  "photo": photo is not None})

    async def sign_out(self, request):
        system = self._system(request)
        window = _id(request.match_info, "window")
        self._window_allowed(system, window)
        with self.store.transaction():
            self.store.sign_out(window)
        business.save_photo(self.store, window, None)
        devices = self.store.devices_at_window(window)
        for device_id in devices:
            self.downlink.ctx(device_id, window, "", None)
        return web.json_response({"window": window, "staff_no": "", "devices": devices})

    # -- prompts and cases ---------------------------------------------------------------------
    async def create_prompt(self, request):
        system = self._system(request)
        body = await _json_body(request)
        engine = self.engine
        if body.get("device_id") is not None:
            device_id, window = engine.target(device_id=_id(body, "device_id"))
        elif body.get("window") is not None:
            device_id, window = engine.target(window=_id(body, "window"))
        else:
            raise ApiError(400, "window: required (or device_id)")
        self._window_allowed(system, window)
        service = business.parse_service(body, engine.jurisdiction)
        engine.check_cases(system, service)
        presence = engine.presence(device_id)
        if presence != "online":
            why = {"never": "has not connected since it was provisioned (no birth)",
                   "offline": "is offline (its last will was seen)",
                   "silent": "is silent (no heartbeat for %d s)" % business.OFFLINE_AFTER_S}
            raise ApiError(503, "device %s %s: hand the citizen the receipt's QR code"
                           % (device_id, why[presence]), status="offline", device_id=device_id,
                           window=window, presence=presence)
        visit = engine.start_visit(system, service, device_id, window)
        state = await engine.offer(visit, service["wait_s"])
        answer = {"pid": visit["pid"], "device_id": device_id, "window": window,
                  "visit": visit["id"], "mode": service["mode"], "kind": service["kind"],
                  "device_state": state, "cases": engine.visit_cases(visit["id"])}
        if state == "shown":
            return web.json_response(dict(answer, status="shown"), status=201)
        if state is None:
            note = ("the device has not confirmed the prompt yet (waited %g s); its outcome "
                    "comes by GET /api/v1/cases/{case_no} or the callback" % service["wait_s"])
            return web.json_response(dict(answer, status="sent", note=note), status=202)
        errors = {
            "busy": (409, "device %s is busy: a citizen is rating another service; try again "
                          "when they are done" % device_id),
            "full": (409, "device %s cannot store another rating (journal full) and shows "
                          "the QR code instead" % device_id),
            "bad": (422, "device %s refused the prompt as malformed" % device_id),
        }
        code, message = errors.get(state, (502, "device %s answered %r" % (device_id, state)))
        return web.json_response(dict(answer, status=state, error=message), status=code)

    async def get_prompt(self, request):
        self._system(request)
        pid = _id(request.match_info, "pid")
        prompt = self.store.prompt(pid)
        if prompt is None:
            raise ApiError(404, "prompt %s: unknown" % pid)
        answer = {"pid": pid, "device_id": prompt["device_id"], "window": prompt["window"],
                  "case_no": prompt["case_no"], "kind": prompt["kind"], "n": prompt["n_cases"],
                  "created_at": prompt["created_at"], "device_state": prompt["device_state"],
                  "status": prompt["outcome"] or "pending"}
        if prompt["outcome"]:
            vote = self.store.vote(prompt["device_id"], prompt["vote_seq"])
            answer.update(stars=vote["stars"],
                          reasons=[r for r in vote["reasons"].split(",") if r],
                          at=vote["t"], forwarded=vote["forwarded_at"] is not None)
        return web.json_response(answer)

    async def get_case(self, request):
        system = self._system(request)
        case_no = _id(request.match_info, "case_no")
        return web.json_response(self.engine.case(case_no, system))

    async def flags(self, request):
        self._system(request, role="manager")
        query = request.query
        kind = query.get("kind") or None
        if kind is not None and kind not in suspicion.KINDS:
            raise ApiError(400, "kind: must be one of %s" % ", ".join(suspicion.KINDS))
        window = _id(query, "window", required=False, allow_empty=True) or None
        limit = _query_int(query, "limit", 100, 1, 1000)
        before = _query_int(query, "before", 0, 0, 2 ** 62) or None
        return web.json_response({
            "counts": suspicion.counts(self.store),
            "flags": suspicion.listing(self.store, kind=kind, window=window, limit=limit,
                                       before_id=before)})


def _query_int(query, key, default, lo, hi):
    text = query.get(key)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, "%s: must be an integer %d..%d" % (key, lo, hi)) from None
    if not lo <= value <= hi:
        raise ApiError(400, "%s: must be an integer %d..%d" % (key, lo, hi))
    return value


async def _fetch_photo(url):
    import asyncio

    import aiohttp

    if not isinstance(url, str) or len(url) > business.MAX_URL or \
            not business._URL.match(url):
        raise ApiError(400, "photo_url: must be an http:// or https:// URL")
    try:
        timeout = aiohttp.ClientTimeout(total=PHOTO_FETCH_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(url) as resp:
                if resp.status != 200:
                    raise ApiError(400, "photo_url: the server answered HTTP %d" % resp.status)
                data = await resp.content.read(business.PHOTO_MAX_BYTES + 1)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise ApiError(400, "photo_url: cannot fetch it (%s)" % exc.__class__.__name__) \
            from None
    return data


@web.middleware
async def _errors(request, handler):
    try:
        return await handler(request)
    except ApiError as exc:
        answer = dict(exc.extra, error=str(exc))
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return web.json_response(answer, status=exc.status, headers=headers)
    except web.HTTPException as exc:
        # aiohttp's own answers (unknown route, wrong method, body too large) in the API's
        # JSON too, so a client always gets {"error": …}.
        if not request.path.startswith("/api/") or exc.status < 400:
            raise
        return web.json_response({"error": "%s %s: %s" % (request.method, request.path,
                                                          exc.reason)}, status=exc.status)


def make_app(store, downlink, hub_id, health=None, province_profile=None, clock=None):
    engine = business.Engine(store, downlink, province_profile=province_profile,
                             clock=clock or store.clock)
    api = Api(store, downlink, hub_id, health, engine)
    app = web.Application(middlewares=[_errors], client_max_size=BODY_MAX)
    app.cleanup_ctx.append(engine.lifecycle)
    app[BUSINESS] = engine
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/api/v1/status", api.status)
    app.router.add_get("/api/v1/openapi.json", api.openapi)
    app.router.add_get("/api/v1/policy", api.policy)
    app.router.add_post("/api/v1/windows/{window}/staff", api.sign_in)
    app.router.add_delete("/api/v1/windows/{window}/staff", api.sign_out)
    app.router.add_post("/api/v1/prompts", api.create_prompt)
    app.router.add_get("/api/v1/prompts/{pid}", api.get_prompt)
    app.router.add_get("/api/v1/cases/{case_no}", api.get_case)
    app.router.add_get("/api/v1/flags", api.flags)
    return app


def open_api(settings, downlink, clock=time.time, health=None):
    """The app for these settings with its own store connection: (app, store)."""
    store = Store(settings.db_path, clock=clock)
    app = make_app(store, downlink, settings.hub.id, health,
                   province_profile=settings.province.profile, clock=clock)
    from .dashboard import setup_dashboard  # the hall manager's pages and /metrics
    setup_dashboard(app, settings, clock=clock, health=health)
    return app, store
