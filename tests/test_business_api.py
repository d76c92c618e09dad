# The business API's plumbing, with scripted devices (paho, the protocol by hand) where a
# real firmware device cannot be made to misbehave on cue: staff photos only for panels
# that show them, callbacks signed and retried until delivered (or given up), late device
# answers, a per-item visit waiting for a busy device, loopback access without a token,
# the `pingjia hub systems` commands, and an OpenAPI document that names every route.
import base64
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from firmware.evaluator import codec
from hub import business, http_api
from hub.store import Store
from test_business_hall import BusinessHall, CallbackSink, free_port, wait_for

pytestmark = pytest.mark.xdist_group("business_api")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ScriptedDevice:
    """A device that answers prompts as told (`answer`: an evt state, or None for
    silence) and votes when the test says so."""

    def __init__(self, provisioned, port, clock, board="sim-v1"):
        self.id = provisioned.device_id
        self.clock = clock
        self.key = bytes.fromhex(provisioned.key_hex)
        self.board = board
        self.answer = "shown"
        self.downlinks = []
        self.seq = 0
        self.lock = threading.Lock()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.id,
                             clean_session=False)
        client.username_pw_set(self.id, provisioned.mqtt_password)
        client.will_set("pj/%s/up/will" % self.id,
                        json.dumps({"v": 1, "d": self.id, "online": False}), qos=1)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        self.client = client
        client.connect("127.0.0.1", port, keepalive=10)
        client.loop_start()
        # Heartbeats keep the device "online" however far the hub's clock jumps.
        self._stop = threading.Event()
        self._beats = threading.Thread(target=self._heartbeats, daemon=True)
        self._beats.start()

    def _heartbeats(self):
        while not self._stop.wait(0.5):
            self.client.publish("pj/%s/up/hb" % self.id, json.dumps(
                {"v": 1, "d": self.id, "up": 1, "heap": 1, "jd": 0}), qos=0)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        client.subscribe("pj/%s/dn/#" % self.id, qos=1)
        birth = {"v": 1, "d": self.id, "fw": "test", "board": self.board, "up": 1,
                 "rst": "power", "heap": 1, "jd": 0, "old": 0, "rc": 0, "rssi": -40,
                 "stuck": [], "disp": 0, "mis": 0, "clk": 0, "lo": self.seq + 1,
                 "next": self.seq + 1}
        client.publish("pj/%s/up/birth" % self.id, json.dumps(birth), qos=1)

    def _on_message(self, client, userdata, message):
        kind = message.topic.rsplit("/", 1)[1]
        body = json.loads(message.payload) if kind != "ack" else None
        with self.lock:
            self.downlinks.append((kind, body))
            answer = self.answer
        if kind == "prompt" and answer:
            client.publish("pj/%s/up/evt" % self.id,
                           json.dumps({"pid": body["pid"], "st": answer}), qos=1)

    def latest(self, kind):
        with self.lock:
            found = [b for k, b in self.downlinks if k == kind]
        return found[-1] if found else None

    def prompts(self):
        with self.lock:
            return [b for k, b in self.downlinks if k == "prompt"]

    def evt(self, pid, state):
        self.client.publish("pj/%s/up/evt" % self.id, json.dumps({"pid": pid, "st": state}),
                            qos=1)

    def vote(self, pid, case_no, stars=5, window="W01", staff_no="10234", t=None):
        self.seq += 1
        vote = codec.make_vote(self.key, self.id, self.seq, int(t or self.clock()), "v", pid,
                               case_no, stars, ["S02"] if stars <= 2 else [],
                               "nat-2024.1" if stars <= 2 else "", window, staff_no)
        self.client.publish("pj/%s/up/vote" % self.id, codec.encode_vote(vote), qos=1)
        return self.seq

    def close(self):
        self._stop.set()
        self._beats.join(5)
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(scope="module")
def hall(tmp_path_factory):
    hall = BusinessHall(str(tmp_path_factory.mktemp("api")),
                        [("PI01", "W01"), ("MCU1", "W01"), ("D0003", "W03")], spawn=())
    port = hall.settings.broker.port
    hall.pi = ScriptedDevice(hall.provisioned["PI01"], port, hall.clock, board="rpi-v1")
    hall.mcu = ScriptedDevice(hall.provisioned["MCU1"], port, hall.clock, board="esp32s3-v1")
    hall.d3 = ScriptedDevice(hall.provisioned["D0003"], port, hall.clock)
    for device_id in ("PI01", "MCU1", "D0003"):
        wait_for(lambda: hall.query("SELECT online FROM device_health WHERE device_id = ?",
                                    (device_id,)) == [{"online": 1}], 20, device_id + " online")
    yield hall
    for device in (hall.pi, hall.mcu, hall.d3):
        device.close()
    hall.close()


def png(colour=128, size=(120, 160)):
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", size, colour).save(out, "PNG")
    return out.getvalue()


def test_without_registered_systems_only_loopback_callers_go_without_a_token(hall):
    store = hall.store()
    try:
        assert business.active_systems(store) == 0
        assert business.authenticate(store, None, loopback=True)["role"] == "manager"
        with pytest.raises(business.RequestError) as refused:
            business.authenticate(store, None, loopback=False)
        assert refused.value.status == 401
    finally:
        store.close()
    status, body = hall.http("POST", "/api/v1/windows/W03/staff",
                             {"staff_no": "7", "name": "赵六"})
    assert status == 200 and body["devices"] == ["D0003"]


def test_a_staff_photo_goes_only_to_panels_that_show_photos(hall):
    photo = base64.b64encode(png()).decode()
    status, body = hall.http("POST", "/api/v1/windows/W01/staff",
                             {"staff_no": "10234", "name": "张伟", "photo": photo})
    assert status == 200 and body["photo"] is True and body["devices"] == ["MCU1", "PI01"]
    pi_ctx = wait_for(lambda: hall.pi.latest("ctx"), 10, "ctx on the Pi")
    mcu_ctx = wait_for(lambda: hall.mcu.latest("ctx"), 10, "ctx on the MCU")
    from agent.screens import decode_photo
    picture = decode_photo(pi_ctx["photo"])
    assert picture.size == (48, 64) and pi_ctx["sn"] == "10234"
    assert "photo" not in mcu_ctx and mcu_ctx["name"] is not None
    # A photo from a URL the hub fetches, and again after the Pi reconnects (greeting).
    served = png(200)

    class Photo(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(served)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Photo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = "http://127.0.0.1:%d/staff/10235.png" % server.server_address[1]
        status, body = hall.http("POST", "/api/v1/windows/W01/staff",
                                 {"staff_no": "10235", "name": "李强", "photo_url": url})
        assert status == 200 and body["photo"] is True
    finally:
        server.shutdown()
        server.server_close()
    wait_for(lambda: hall.pi.latest("ctx")["sn"] == "10235", 10, "the new ctx")
    assert decode_photo(hall.pi.latest("ctx")["photo"]).getpixel((10, 10)) > \
        picture.getpixel((10, 10))
    count = len([1 for k, _b in hall.pi.downlinks if k == "ctx"])
    hall.pi.client.reconnect()
    wait_for(lambda: len([1 for k, _b in hall.pi.downlinks if k == "ctx"]) > count + 1, 10,
             "the ctx again after a reconnect")
    assert hall.pi.latest("ctx")["photo"]["w"] == 48
    status, body = hall.http("POST", "/api/v1/windows/W01/staff",
                             {"staff_no": "10235", "name": "李强",
                              "photo_url": "http://127.0.0.1:%d/gone.png" % free_port()})
    assert status == 400 and body["error"].startswith("photo_url:")
    assert hall.http("DELETE", "/api/v1/windows/W01/staff")[0] == 200
    wait_for(lambda: hall.pi.latest("ctx")["sn"] == "", 10, "signed out")
    assert "photo" not in hall.pi.latest("ctx")
    assert hall.query("SELECT * FROM window_photos") == []
    hall.http("POST", "/api/v1/windows/W01/staff", {"staff_no": "10234", "name": "张伟"})


def test_a_late_answer_after_202_settles_the_case_and_is_called_back(hall):
    sink = CallbackSink()
    try:
        hall.mcu.answer = None   # says nothing while the request waits
        status, body = hall.http("POST", "/api/v1/prompts", {
            "device_id": "MCU1", "case_no": "L-1", "task_name": "出生登记", "wait_s": 0.5,
            "callback_url": sink.url})
        assert status == 202 and body["status"] == "sent" and "GET /api/v1/cases" in body["note"]
        assert body["cases"][0]["status"] == "pending"
        hall.mcu.evt(body["pid"], "full")
        stage = hall.wait_stage("L-1", "ji", "refused")
        assert stage["device_state"] == "full"
        event = wait_for(lambda: sink.events(), 10, "the refused callback")[0]
        assert event["event"] == "refused" and event["cases"][0]["case_no"] == "L-1"
        # No token is registered, so the callback carries no signature.
        assert "X-Pingjia-Signature" not in sink.received[0][0]
    finally:
        hall.mcu.answer = "shown"
        sink.close()


def test_callbacks_are_signed_and_retried_with_backoff_until_delivered(hall, tmp_path):
    store = hall.store()
    token = business.add_system(store, "queue-cb", windows=["W01"])
    store.close()
    sink = CallbackSink(fail_first=2)
    try:
        status, body = hall.http("POST", "/api/v1/prompts", {
            "device_id": "MCU1", "case_no": "CB-1", "task_name": "出生登记",
            "callback_url": sink.url}, token=token)
        assert status == 201, body
        hall.mcu.vote(body["pid"], "CB-1", stars=4, window="W01")
        hall.wait_stage("CB-1", "ji", "voted", token)
        wait_for(lambda: hall.stage("CB-1", "ji", token).get("callback", {}).get("attempts")
                 == 1, 10, "the first attempt")
        stage = hall.stage("CB-1", "ji", token)
        assert stage["callback"]["state"] == "retrying" and stage["callback"]["last_error"] == \
            "HTTP 500"
        for attempts in (2, 3):
            hall.clock.jump(2 ** (attempts - 1) + 1)   # the backoff: 2 s, then 4 s
            wait_for(lambda: hall.stage("CB-1", "ji", token)["callback"]["attempts"] ==
                     attempts, 10, "attempt %d" % attempts)
        assert hall.stage("CB-1", "ji", token)["callback"]["state"] == "delivered"
        events = sink.verified(token)
        assert len(events) == 1 and events[0]["event"] == "outcome"
        assert events[0]["cases"][0]["stars"] == 4
        assert sink.verified("pjs_someone-else") == []
        headers = sink.received[0][0]
        assert headers["X-Pingjia-Event"] == "outcome" and headers["X-Pingjia-Delivery"]
        # A callback nobody takes is given up after ten attempts, and says so.
        status, body = hall.http("POST", "/api/v1/prompts", {
            "device_id": "MCU1", "case_no": "CB-2", "wait_s": 2,
            "callback_url": "http://127.0.0.1:%d/nobody" % free_port()}, token=token)
        assert status == 201, body
        hall.mcu.vote(body["pid"], "CB-2", stars=5, window="W01")
        hall.wait_stage("CB-2", "ji", "voted", token)
        for _ in range(40):
            if hall.stage("CB-2", "ji", token).get("callback", {}).get("state") == "failed":
                break
            hall.clock.jump(business.CALLBACK_BACKOFF_MAX_S + 1)
            time.sleep(0.3)
        callback = hall.stage("CB-2", "ji", token)["callback"]
        assert callback["state"] == "failed" and callback["attempts"] == 10
        assert "ClientConnectorError" in callback["last_error"]
    finally:
        sink.close()
        store = hall.store()
        business.remove_system(store, "queue-cb")
        store.close()


def test_a_per_item_visit_waits_for_a_busy_device_then_gives_up(hall):
    sink = CallbackSink()
    try:
        request = {
            "device_id": "D0003", "mode": "per_item", "callback_url": sink.url,
            "cases": [{"case_no": "Q-1", "task_name": "甲"}, {"case_no": "Q-2", "task_name": "乙"},
                      {"case_no": "Q-3", "task_name": "丙"}]}
        # Earlier tests jumped the hub's clock past the device's last heartbeat: it reads
        # "silent" (503) until the next beat lands, as a business system would see and retry.
        status, body = wait_for(lambda: (lambda r: r if r[0] != 503 else None)(
            hall.http("POST", "/api/v1/prompts", request)), 15, "D0003 heard from again")
        assert status == 201 and [c["status"] for c in body["cases"]] == \
            ["shown", "queued", "queued"]
        hall.d3.answer = "busy"   # a citizen drums on it: every next prompt is refused busy
        hall.d3.vote(body["pid"], "Q-1", stars=5, window="W03", staff_no="7")
        hall.wait_stage("Q-1", "ji", "voted")
        wait_for(lambda: len([p for p in hall.d3.prompts() if p["case"] == "Q-2"]) >= 3, 15,
                 "Q-2 offered again while the device is busy")
        assert hall.stage("Q-2", "ji")["status"] in ("queued", "pending")
        assert hall.stage("Q-2", "ji")["device_state"] in ("busy", None)
        hall.clock.jump(business.QUEUE_PATIENCE_S + 5)
        hall.wait_stage("Q-2", "ji", "refused")
        assert hall.stage("Q-3", "ji")["status"] == "refused"
        assert [p["case"] for p in hall.d3.prompts()].count("Q-3") == 0
        refused = wait_for(lambda: [e for e in sink.events() if e["event"] == "refused"], 10,
                           "the refused callback")[0]
        assert [c["case_no"] for c in refused["cases"]] == ["Q-1", "Q-2", "Q-3"]
        assert [c["status"] for c in refused["cases"]] == ["voted", "refused", "refused"]
    finally:
        hall.d3.answer = "shown"
        sink.close()


def test_the_hall_manager_sees_votes_at_impossible_rates(hall):
    t = int(hall.clock())
    for i in range(4):
        status, body = hall.http("POST", "/api/v1/prompts", {"device_id": "D0003",
                                                              "case_no": "R-%d" % i})
        assert status == 201, body
        hall.d3.vote(body["pid"], "R-%d" % i, stars=5, window="W03", staff_no="7", t=t + i)
        hall.wait_stage("R-%d" % i, "ji", "voted")
    flags = wait_for(lambda: hall.http("GET", "/api/v1/flags?kind=rate&window=W03")[1]
                     ["flags"], 10, "rate flags")
    assert {f["device_id"] for f in flags} == {"D0003"} and len(flags) == 4
    status, body = hall.http("GET", "/api/v1/flags?limit=2")
    assert status == 200 and len(body["flags"]) == 2 and body["counts"]["rate"] == 4
    stage = hall.stage("R-3", "ji")
    assert "suspect:rate" in stage["record"]["flags"]
    # Flagged, not held back: the province has every one.
    hall.wait_province([hall.stage("R-%d" % i, "ji")["record"]["vote_id"] for i in range(4)])


def test_the_systems_commands_issue_list_and_revoke_tokens(hall):
    def pingjia(*args):
        return subprocess.run([sys.executable, "-m", "hub.cli", "hub", *args, "--config",
                               hall.settings.source], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)

    added = pingjia("systems", "add", "ops-view", "--role", "manager", "--json")
    assert added.returncode == 0, added.stderr
    token = json.loads(added.stdout)["token"]
    assert hall.http("GET", "/api/v1/flags", token=token)[0] == 200
    again = pingjia("systems", "add", "ops-view")
    assert again.returncode != 0 and "exists" in again.stderr
    listed = pingjia("systems", "list", "--json")
    rows = json.loads(listed.stdout)
    assert [r["name"] for r in rows if not r["revoked_at"]] == ["ops-view"]
    assert token not in listed.stdout and "token" not in rows[0]
    # The hub keeps only the token's SHA-256.
    assert hall.query("SELECT token_hash FROM systems WHERE name = 'ops-view'")[0][
        "token_hash"] == business.token_hash(token)
    assert pingjia("systems", "remove", "ops-view").returncode == 0
    status, body = hall.http("GET", "/api/v1/flags", token=token)
    assert status == 401 and "revoked" in body["error"]
    shown = pingjia("jurisdiction", "show", "--json")
    assert json.loads(shown.stdout)["name"] == "national"


def test_the_openapi_document_and_the_integration_guide_cover_every_route(tmp_path):
    with open(http_api.OPENAPI_PATH, encoding="utf-8") as f:
        doc = json.load(f)
    assert doc["openapi"].startswith("3.")
    store = Store(str(tmp_path / "hub.db"))
    try:
        app = http_api.make_app(store, http_api.Downlink(lambda *a, **k: None), "t")
        routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
                  if r.method != "HEAD"}
    finally:
        store.close()
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops if m != "parameters"}
    assert routes == documented
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if method == "parameters":
                continue
            assert op.get("summary") and op.get("responses"), (method, path)
            if op.get("security", doc["security"]):
                assert "401" in op["responses"], (method, path)
    schemas = doc["components"]["schemas"]
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                refs.add(node["$ref"].rsplit("/", 1)[1])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs <= set(schemas)
    fields = set(schemas["PromptRequest"]["properties"])
    assert fields == business._FIELDS
    with open(os.path.join(ROOT, "docs", "integration.md"), encoding="utf-8") as f:
        guide = f.read()
    for _method, path in routes:
        assert path in guide, path
