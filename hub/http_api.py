"""The hub's HTTP API (aiohttp) and the screen downlinks it drives.

Minimal business endpoints the window systems (and the simulator) need: staff sign-in per
window, a rating prompt per completed service and its outcome, plus /healthz and the status
JSON. Every Chinese text (staff name, item name, reason label) goes to the device as a
bitmap rendered here (hub/bitmaps.py); only identifiers travel as strings.
"""
import json
import logging
import threading
import time

from aiohttp import web

from firmware.evaluator import codec

from . import PingjiaError
from .store import Store

log = logging.getLogger("pingjia.hub.http")

PROMPT_KINDS = ("ji", "cn_acc", "cn_dlv")
PROMPT_TTL_S = 60
MAX_CASES = 10000
MAX_TEXT = 200
SCREEN_W = 256    # the reference display is 256x64 (firmware/display.py)
LINE_H = 16

# The default bad-rating indicator catalogue: a small national one, split as the seeds
# split it into the service item (事项, I..) and the staff member (人员, S..). A jurisdiction
# replaces it by configuration; codes map to provincial codes in the profile.
DEFAULT_CATALOGUE = {
    "cv": "nat-2024.1",
    "rs": [
        ("I01", "item", "办事流程繁琐"),
        ("I02", "item", "材料要求不清楚"),
        ("I03", "item", "办理时间过长"),
        ("I04", "item", "办事指南不准确"),
        ("I05", "item", "线上线下要求不一致"),
        ("I06", "item", "办事环境不便利"),
        ("S01", "staff", "服务态度差"),
        ("S02", "staff", "业务不熟练"),
        ("S03", "staff", "解答不清楚"),
        ("S04", "staff", "推诿扯皮"),
        ("S05", "staff", "窗口无人"),
        ("S06", "staff", "违规收费或索要好处"),
    ],
}


class ApiError(PingjiaError):
    """A request the API refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status, message):
        PingjiaError.__init__(self, message)
        self.status = status


def _render(text, max_lines=1):
    """A wire bitmap of text, or None when no font can draw it (the device shows the
    identifier instead). Long text is cut with "…" rather than refused: the service
    must go on."""
    from . import bitmaps

    try:
        return bitmaps.rasterize(text, height=LINE_H, max_width=SCREEN_W, max_lines=max_lines,
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

    def render(self, text, max_lines=1):
        with self._lock:
            return self._render(text, max_lines)

    def ctx(self, device_id, window, staff_no, name):
        payload = {"w": window or "", "sn": staff_no or "",
                   "name": self.render(name) if staff_no and name else None,
                   "win": self.render("窗口 " + window) if window else None,
                   "t": int(self.clock())}
        self.publish("pj/%s/dn/ctx" % device_id, json.dumps(payload), qos=1, retain=True)
        return payload

    def prompt(self, device_id, pid, case_no, kind, n_cases, item_text, ttl=PROMPT_TTL_S):
        payload = {"pid": pid, "case": case_no or "", "kind": kind, "n": n_cases,
                   "item": self.render(item_text, max_lines=2) if item_text else None,
                   "ttl": ttl, "t": int(self.clock())}
        self.publish("pj/%s/dn/prompt" % device_id, json.dumps(payload), qos=1)
        return payload

    def cat_payload(self):
        if self._cat_payload is None:
            # Rendered once: twelve labels cost a few hundred ms of font work.
            self._cat_payload = json.dumps({
                "cv": self.catalogue["cv"],
                "rs": [{"c": code, "a": area, "bm": self.render(label)}
                       for code, area, label in self.catalogue["rs"]],
            })
        return self._cat_payload

    def cat(self, device_id):
        self.publish("pj/%s/dn/cat" % device_id, self.cat_payload(), qos=1, retain=True)

    def time(self, device_id):
        self.publish("pj/%s/dn/time" % device_id, json.dumps({"t": int(self.clock())}), qos=0)

    def greet(self, store, device_id):
        """A device (re)connected: its clock, the catalogue and who is at its window.
        cat and ctx are retained anyway; sending them again repairs a broker that lost
        its retained messages."""
        self.time(device_id)
        self.cat(device_id)
        device = store.device(device_id)
        if device and device["window"]:
            signed = store.window(device["window"])
            if signed and signed["staff_no"]:
                self.ctx(device_id, device["window"], signed["staff_no"], signed["staff_name"])


def status_json(store, hub_id):
    """What `pingjia hub status --json` and GET /api/v1/status print."""
    report = {"hub": hub_id, "at": store.now()}
    report.update(store.status())
    return report


# -- request checking ------------------------------------------------------------------------

def _id(body, key, allow_empty=False, required=True):
    value = body.get(key, None if required else "")
    if value is None:
        raise ApiError(400, "%s: required" % key)
    try:
        return codec.check_id(value, key, allow_empty)
    except codec.CodecError as exc:
        raise ApiError(400, str(exc))


def _text(body, key, required=False):
    value = body.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ApiError(400, "%s: must be text of at most %d characters" % (key, MAX_TEXT))
    if required and not value.strip():
        raise ApiError(400, "%s: required" % key)
    return value.strip()


async def _json_body(request):
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "body: not JSON")
    if not isinstance(body, dict):
        raise ApiError(400, "body: not a JSON object")
    return body


# -- the app ---------------------------------------------------------------------------------

class Api:
    """Handlers over one Store connection (used from the event loop thread only)."""

    def __init__(self, store, downlink, hub_id, health=None):
        self.store = store
        self.downlink = downlink
        self.hub_id = hub_id
        self.health = health or (lambda: {})

    async def healthz(self, request):
        detail = dict(self.health())
        ok = all(detail.values()) if detail else True
        return web.json_response(dict(detail, ok=ok), status=200 if ok else 503)

    async def status(self, request):
        return web.json_response(status_json(self.store, self.hub_id))

    async def sign_in(self, request):
        window = _id(request.match_info, "window")
        body = await _json_body(request)
        staff_no = _id(body, "staff_no")
        name = _text(body, "name", required=True)
        with self.store.transaction():
            self.store.sign_in(window, staff_no, name)
        devices = self.store.devices_at_window(window)
        for device_id in devices:
            self.downlink.ctx(device_id, window, staff_no, name)
        return web.json_response({"window": window, "staff_no": staff_no, "devices": devices})

    async def sign_out(self, request):
        window = _id(request.match_info, "window")
        with self.store.transaction():
            self.store.sign_out(window)
        devices = self.store.devices_at_window(window)
        for device_id in devices:
            self.downlink.ctx(device_id, window, "", None)
        return web.json_response({"window": window, "staff_no": "", "devices": devices})

    async def create_prompt(self, request):
        body = await _json_body(request)
        device_id, window = self._target(body)
        case_no = _id(body, "case_no", allow_empty=True, required=False)
        task_code = _id(body, "task_code", allow_empty=True, required=False)
        dept_code = _id(body, "dept_code", allow_empty=True, required=False)
        task_name = _text(body, "task_name")
        kind = body.get("kind", "ji")
        if kind not in PROMPT_KINDS:
            raise ApiError(400, "kind: must be one of %s" % ", ".join(PROMPT_KINDS))
        n_cases = body.get("n", 1)
        if not isinstance(n_cases, int) or isinstance(n_cases, bool) or \
                not 1 <= n_cases <= MAX_CASES:
            raise ApiError(400, "n: must be an integer 1..%d" % MAX_CASES)
        signed = self.store.window(window) if window else None
        staff_no = signed["staff_no"] if signed else ""
        staff_name = signed["staff_name"] if signed else ""
        with self.store.transaction():
            pid = self.store.create_prompt(device_id, window, case_no, task_code, task_name,
                                           dept_code, kind, n_cases, staff_no, staff_name)
        # Recorded first, published second: a prompt the device never saw stays "pending"
        # and is visible as such, never the other way round.
        self.downlink.prompt(device_id, pid, case_no, kind, n_cases, task_name)
        return web.json_response({"pid": pid, "device_id": device_id}, status=201)

    def _target(self, body):
        if body.get("device_id") is not None:
            device_id = _id(body, "device_id")
            device = self.store.device(device_id)
            if device is None or device["retired"]:
                raise ApiError(404, "device %s: not an active device" % device_id)
            return device_id, device["window"] or ""
        window = _id(body, "window")
        devices = self.store.devices_at_window(window)
        if not devices:
            raise ApiError(404, "window %s: no active device" % window)
        return devices[0], window

    async def get_prompt(self, request):
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


@web.middleware
async def _errors(request, handler):
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response({"error": str(exc)}, status=exc.status)


def make_app(store, downlink, hub_id, health=None):
    api = Api(store, downlink, hub_id, health)
    app = web.Application(middlewares=[_errors], client_max_size=64 * 1024)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/api/v1/status", api.status)
    app.router.add_post("/api/v1/windows/{window}/staff", api.sign_in)
    app.router.add_delete("/api/v1/windows/{window}/staff", api.sign_out)
    app.router.add_post("/api/v1/prompts", api.create_prompt)
    app.router.add_get("/api/v1/prompts/{pid}", api.get_prompt)
    return app


def open_api(settings, downlink, clock=time.time, health=None):
    """The app for these settings with its own store connection: (app, store)."""
    store = Store(settings.db_path, clock=clock)
    app = make_app(store, downlink, settings.hub.id, health)
    from .dashboard import setup_dashboard  # the hall manager's pages and /metrics
    setup_dashboard(app, settings, clock=clock, health=health)
    return app, store
