# The test hall the business-flow tests drive, as a window's business system would: the real
# hub (in this process, so its clock can jump days), its supervised mosquitto, the reference
# province receiver, and counter evaluators running the real firmware under MicroPython with
# the simulated board (simulator/fleet.py), whose framebuffer shows what the citizen saw.
# Other test_business_* files import BusinessHall from here; the one test below checks the
# hall's own tools (bitmap search, clock) so a broken harness fails here first.
import asyncio
import hashlib
import hmac
import http.server
import json
import os
import socket
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.request

from hub import bitmaps, keys, policy, provision
from hub.settings import write_default
from hub.store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "firmware") not in sys.path:
    sys.path.append(os.path.join(ROOT, "firmware"))

KEY_GAP_MS = 400   # presses spaced like a person's, above the device's rapid-press filter


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Clock:
    """Wall time plus an offset the test moves: the hub's "now"."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self):
        return time.time() + self.offset

    def jump(self, seconds):
        self.offset += seconds


def wait_for(check, timeout=20.0, what="condition", every=0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(every)


# -- pictures --------------------------------------------------------------------------------

def rows_of_bitmap(bitmap):
    """A hub wire bitmap as rows of "0"/"1" strings."""
    return ["".join(str(p) for p in row) for row in bitmaps.unpack(bitmap)]


def rows_of_ui(text):
    """A firmware ui_text constant (rows, w, h, MONO_HLSB) as rows of "0"/"1" strings."""
    raw, w, h = text[0], text[1], text[2]
    stride = (w + 7) // 8
    return ["".join(str((raw[y * stride + (x >> 3)] >> (7 - (x & 7))) & 1) for x in range(w))
            for y in range(h)]


def find(screen, pattern):
    """(x, y) where the pattern's pixels appear exactly on the screen, or None."""
    h = len(pattern)
    for y in range(len(screen) - h + 1):
        x = screen[y].find(pattern[0])
        while x != -1:
            if all(screen[y + i][x:x + len(pattern[i])] == pattern[i] for i in range(1, h)):
                return x, y
            x = screen[y].find(pattern[0], x + 1)
    return None


def ink(pattern):
    return sum(row.count("1") for row in pattern)


# -- a business system's callback endpoint --------------------------------------------------

class CallbackSink:
    """An HTTP endpoint that records callbacks; the first `fail_first` answers are 500."""

    def __init__(self, fail_first=0):
        self.received = []
        self.fail_first = fail_first
        self.lock = threading.Lock()
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with sink.lock:
                    failing = sink.fail_first > 0
                    if failing:
                        sink.fail_first -= 1
                    else:
                        sink.received.append((dict(self.headers), body))
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = "http://127.0.0.1:%d/pingjia" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self):
        with self.lock:
            return [json.loads(body) for _h, body in self.received]

    def verified(self, token):
        """The callbacks whose signature checks under this token (docs/integration.md)."""
        key = hashlib.sha256(token.encode()).digest()
        good = []
        with self.lock:
            for headers, body in self.received:
                stamp = headers.get("X-Pingjia-Timestamp", "")
                want = hmac.new(key, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
                if hmac.compare_digest(headers.get("X-Pingjia-Signature", ""),
                                       "sha256=" + want):
                    good.append(json.loads(body))
        return good

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# -- the hall --------------------------------------------------------------------------------

class BusinessHall:
    """Hub + province + real-firmware devices. `devices` is [(device_id, window)];
    `spawn` lists the devices to boot (others stay provisioned but never connect)."""

    def __init__(self, folder, devices, jurisdiction=None, flash=None, spawn=None):
        from hub.app import Hub
        from simulator.fleet import Fleet
        from simulator.province import ProvinceStore, ThreadedReceiver

        self.folder = folder
        self.clock = Clock()
        self.province_port = free_port()
        self.settings = write_default(
            os.path.join(folder, "hub", "hub.toml"), hub={"id": "biz-hall"},
            broker={"port": free_port()}, http={"port": free_port()},
            province={"endpoint": "http://127.0.0.1:%d/api/v1" % self.province_port,
                      "batch_interval_ms": 100, "batch_max": 50, "retry_max_s": 0.5,
                      "timeout_s": 3.0})
        self.signing_key = keys.ensure_signing_key(self.settings.signing_key_path)
        self.provisioned = {d: provision.add_device(self.settings, d, window=w)
                            for d, w in devices}
        if jurisdiction:
            store = Store(self.settings.db_path)
            try:
                policy.choose(store, jurisdiction)
            finally:
                store.close()
        self.province_db = os.path.join(folder, "province.db")
        self.province_store = ProvinceStore(self.province_db)
        self.province = ThreadedReceiver(self.province_store, [self.signing_key.public_key()],
                                         port=self.province_port).start()
        self.hub = Hub(self.settings, clock=self.clock)
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.loop_thread.start()
        self.fleet = None
        try:
            self.hub.start()
            self.fleet = Fleet(os.path.join(folder, "fleet"))
            self.run(self.fleet.start(), 120)
            for device_id, _window in devices:
                if spawn is None or device_id in spawn:
                    self.fleet.add(device_id, provision.device_config(self.provisioned[device_id]),
                                   flash=flash)
                    self.run(self.fleet.spawn(device_id))
            for device_id in self.fleet.devices:
                self.wait_online(device_id)
        except BaseException:
            self.close()
            raise

    # -- plumbing ------------------------------------------------------------------------------
    def run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def base(self):
        return "http://127.0.0.1:%d" % self.settings.http.port

    def http(self, method, path, body=None, token=None, headers=None):
        data = json.dumps(body, ensure_ascii=False).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers=dict(headers or {}))
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", "Bearer " + token)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, {"raw": raw.decode(errors="replace")}

    def store(self):
        return Store(self.settings.db_path, clock=self.clock)

    def query(self, sql, params=()):
        conn = sqlite3.connect(self.settings.db_path, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(sql, params)]
        finally:
            conn.close()

    def wait_online(self, device_id, timeout=60):
        dev = self.fleet.devices[device_id]
        wait_for(lambda: dev.connected, timeout, "%s connected" % device_id)
        wait_for(lambda: self.query("SELECT online FROM device_health WHERE device_id = ?",
                                    (device_id,)) == [{"online": 1}], timeout,
                 "%s online at the hub" % device_id)

    # -- devices -------------------------------------------------------------------------------
    def device(self, device_id):
        return self.fleet.devices[device_id]

    def state(self, device_id):
        return self.fleet.devices[device_id].state

    def wait_state(self, device_id, state, timeout=20):
        wait_for(lambda: self.state(device_id) == state, timeout,
                 "%s in %s (now %s)" % (device_id, state, self.state(device_id)))

    def press(self, device_id, stars):
        self.run(self.fleet.press(device_id, stars, KEY_GAP_MS))

    def screen(self, device_id):
        """The device's framebuffer as rows of "0"/"1" strings."""
        from simulator import framebuffer

        w, h, raw = self.run(self.fleet.framebuffer(device_id))
        return ["".join(str(p) for p in row) for row in framebuffer.pixels(raw, w, h)]

    def shows(self, device_id, pattern, timeout=5):
        """Where the device's screen shows the pattern (waits a little for redraws)."""
        return wait_for(lambda: find(self.screen(device_id), pattern), timeout,
                        "%s to show a %dx%d picture" % (device_id, len(pattern[0]),
                                                         len(pattern)), every=0.2)

    def kill(self, device_id):
        self.run(self.fleet.kill(device_id))

    # -- what the hub renders ------------------------------------------------------------------
    def rendered(self, text):
        """The bitmap the hub sends for this name or label, as rows."""
        return rows_of_bitmap(self.hub.downlink.render(text))

    def item(self, text):
        """The bitmap the hub sends for this item name, as rows."""
        return rows_of_bitmap(self.hub.downlink.item(text))

    # -- the province --------------------------------------------------------------------------
    def province_records(self):
        conn = sqlite3.connect(self.province_db, timeout=30)
        try:
            rows = conn.execute("SELECT vote_id, rated, fields FROM records ORDER BY rowid")
            out = {}
            for vote_id, rated, fields in rows:
                record = json.loads(fields)
                record["rated"] = rated
                out[vote_id] = record
            return out
        finally:
            conn.close()

    def wait_province(self, vote_ids, timeout=30):
        wait_for(lambda: set(vote_ids) <= set(self.province_records()), timeout,
                 "%s at the province" % ", ".join(sorted(vote_ids)))
        records = self.province_records()
        return {v: records[v] for v in vote_ids}

    # -- the business system's calls -----------------------------------------------------------
    def case(self, case_no, token=None):
        status, body = self.http("GET", "/api/v1/cases/" + case_no, token=token)
        assert status == 200, body
        return body

    def stage(self, case_no, kind, token=None):
        for stage in self.case(case_no, token)["stages"]:
            if stage["kind"] == kind:
                return stage
        raise AssertionError("case %s has no %s stage" % (case_no, kind))

    def wait_stage(self, case_no, kind, status, token=None, timeout=20):
        return wait_for(lambda: (lambda s: s if s["status"] == status else None)(
            self.stage(case_no, kind, token)), timeout,
            "case %s %s to be %s" % (case_no, kind, status), every=0.1)

    def close(self):
        if self.fleet is not None:
            try:
                self.run(self.fleet.close(), 60)
            except Exception:
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.loop_thread.join(10)
        self.hub.stop()
        self.province.stop()
        self.province_store.close()


# -- the harness's own checks ----------------------------------------------------------------

def test_find_locates_a_rendered_bitmap_and_only_where_it_is():
    picture = rows_of_bitmap(bitmaps.render("办事指南"))
    screen = ["0" * 256 for _ in range(64)]
    for i, row in enumerate(picture):
        screen[20 + i] = "0" * 30 + row + "0" * (256 - 30 - len(row))
    assert find(screen, picture) == (30, 20)
    assert find(screen, rows_of_bitmap(bitmaps.render("办事流程"))) is None
    assert ink(picture) > 20


def test_clock_jumps_forward_from_the_wall_clock():
    clock = Clock()
    before = clock()
    clock.jump(7 * 86400)
    assert clock() - before >= 7 * 86400
