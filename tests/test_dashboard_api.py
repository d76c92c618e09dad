# The dashboard's HTTP side on a real store: nothing without a login; sessions are
# HttpOnly/SameSite cookies that end on logout, expiry or removal; wrong passwords lock a
# name for a while; a manager sees only their hall (overview, votes, alerts, charts,
# devices, acknowledgements and the live stream); "today" is the hall's day; and the page
# loads nothing from anywhere but the hub.
import asyncio
import calendar
import json
import os
import re

import pytest
from aiohttp.test_utils import TestClient, TestServer

from firmware.evaluator import codec
from hub import dashboard
from hub.dashboard import add_manager, remove_manager, setup_dashboard
from hub.http_api import make_app
from hub.ingest import Ingestor, Uplink
from hub.settings import Settings
from hub.store import Store, iso

KEY = bytes(range(32))
# 2026-09-21 12:00 in China Standard Time (UTC+8).
NOON = float(calendar.timegm((2026, 9, 21, 12, 0, 0)) - 8 * 3600)
PASSWORD = "correct-horse"


class Clock:
    def __init__(self, t=NOON):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def hall(tmp_path):
    settings = Settings.from_dict({"hub": {"id": "center"},
                                   "dashboard": {"halls": {"hall-a": ["A*"],
                                                           "hall-b": ["B*"]}}},
                                  base_dir=str(tmp_path))
    clock = Clock()
    store = Store(settings.db_path, clock=clock)
    for device_id, window in (("DA", "A01"), ("DB", "B01")):
        store.conn.execute("INSERT INTO devices (device_id, key_hex, window, label, created_at)"
                           " VALUES (?,?,?,?,?)", (device_id, KEY.hex(), window, "", iso(NOON)))
    with store.transaction():
        store.sign_in("A01", "10234", "王芳")
        store.sign_in("B01", "20001", "李娜")
    add_manager(store, "anna", PASSWORD, "hall-a", "安主任")
    add_manager(store, "bo", PASSWORD, "hall-b")
    add_manager(store, "chief", PASSWORD, "center")
    yield settings, clock, store, Ingestor(store)
    store.close()


def run(hall, scenario):
    settings, clock, store, ingestor = hall

    async def main():
        app = make_app(store, None, settings.hub.id)
        setup_dashboard(app, settings, clock=clock)
        server = TestServer(app)
        clients = {}
        try:
            await server.start_server()
            for name in ("anna", "bo", "chief", "nobody"):
                clients[name] = TestClient(server)
                await clients[name].start_server()
            await scenario(clients)
        finally:
            for client in clients.values():
                await client.close()
            await server.close()

    asyncio.run(main())


async def login(client, name, password=PASSWORD):
    return await client.post("/dashboard/api/login", json={"name": name, "password": password})


def vote(hall, device_id, seq, stars, window, t=None, reasons=None):
    settings, clock, store, ingestor = hall
    with store.transaction():
        pid = store.create_prompt(device_id, window, "C%d" % seq, "T%s" % window[0],
                                  "事项" + window[0], "", "ji", 1, "", "")
    reasons = reasons if reasons is not None else (["S01"] if stars <= 2 else [])
    v = codec.make_vote(KEY, device_id, seq, int(t or clock()), "v", pid, "C%d" % seq, stars,
                        reasons, "nat-2024.1", window, "10234" if window[0] == "A" else "20001")
    result = ingestor.handle_group([Uplink("pj/%s/up/vote" % device_id, codec.encode_vote(v),
                                           0, 1, 0)])
    assert result.stored == 1


async def settle(seconds=1.6):
    # The watcher looks once a second.
    await asyncio.sleep(seconds)


API_GETS = ("me", "overview", "votes", "alerts", "charts", "devices", "devices/DA", "system",
            "stream")


def test_nothing_but_the_login_page_without_a_login(hall):
    async def scenario(c):
        anon = c["nobody"]
        for path in API_GETS:
            resp = await anon.get("/dashboard/api/" + path)
            assert resp.status == 401, path
        resp = await anon.post("/dashboard/api/alerts/1/ack", json={})
        assert resp.status == 401
        page = await anon.get("/dashboard/")
        assert page.status == 200 and "大厅管理员登录" in await page.text()
        assert "default-src 'self'" in page.headers["Content-Security-Policy"]
        resp = await anon.get("/", allow_redirects=False)
        assert resp.status == 302 and resp.headers["Location"] == "/dashboard/"
        assert (await anon.get("/dashboard/static/../dashboard.py")).status == 404

    run(hall, scenario)


def test_login_sets_a_strict_http_only_cookie_and_logout_ends_the_session(hall):
    settings, clock, store, _ = hall

    async def scenario(c):
        client = c["anna"]
        resp = await login(client, "anna")
        assert resp.status == 200
        me = await resp.json()
        assert (me["name"], me["display_name"], me["hall"], me["whole_hub"]) == \
            ("anna", "安主任", "hall-a", False)
        cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
        token = re.search(r"pj_session=([^;]+)", cookie).group(1)
        # Only a hash of the token is stored.
        stored = store.conn.execute("SELECT token_hash FROM manager_sessions").fetchall()
        assert token not in json.dumps([tuple(r) for r in stored])
        assert (await client.get("/dashboard/api/me")).status == 200
        assert (await client.post("/dashboard/api/logout", json={})).status == 200
        assert (await client.get("/dashboard/api/me")).status == 401
        # The old cookie value, sent again by hand, is dead too.
        again = await c["nobody"].get("/dashboard/api/me", cookies={"pj_session": token})
        assert again.status == 401

    run(hall, scenario)


def test_wrong_passwords_lock_the_name_and_sessions_end_on_expiry_or_removal(hall):
    settings, clock, store, _ = hall

    async def scenario(c):
        client = c["bo"]
        for _ in range(dashboard.LOGIN_FAILS):
            assert (await login(client, "bo", "wrong-password")).status == 401
        assert (await login(client, "bo")).status == 429  # even the right one, for now
        clock.t += dashboard.LOGIN_LOCK_S + 1
        assert (await login(client, "bo")).status == 200
        assert (await login(c["nobody"], "ghost")).status == 401
        clock.t += settings.dashboard.session_hours * 3600 + 1
        assert (await client.get("/dashboard/api/me")).status == 401
        assert (await login(client, "bo")).status == 200
        remove_manager(store, "bo")
        assert (await client.get("/dashboard/api/me")).status == 401
        assert (await login(client, "bo")).status == 401

    run(hall, scenario)


def test_a_cross_site_post_is_refused(hall):
    async def scenario(c):
        client = c["anna"]
        await login(client, "anna")
        resp = await client.post("/dashboard/api/logout", json={},
                                 headers={"Origin": "http://evil.example"})
        assert resp.status == 403
        assert (await client.get("/dashboard/api/me")).status == 200

    run(hall, scenario)


def test_managers_see_only_their_hall(hall):
    async def scenario(c):
        for name in ("anna", "bo", "chief"):
            assert (await login(c[name], name)).status == 200
        vote(hall, "DA", 1, 5, "A01")
        vote(hall, "DA", 2, 1, "A01")
        vote(hall, "DB", 1, 2, "B01")
        await settle()

        async def get(name, path):
            resp = await c[name].get("/dashboard/api/" + path)
            return resp.status, await resp.json()

        _, a = await get("anna", "overview")
        assert [w["window"] for w in a["windows"]] == ["A01"]
        assert a["totals"] == {"good": 1, "bad": 1, "votes": 2, "unrated": 0, "rate": 0.5,
                               "open_alerts": 1}
        assert a["windows"][0]["staff_name"] == "王芳"
        _, b = await get("bo", "overview")
        assert [w["window"] for w in b["windows"]] == ["B01"]
        _, whole = await get("chief", "overview")
        assert [w["window"] for w in whole["windows"]] == ["A01", "B01"]
        assert whole["totals"]["open_alerts"] == 2

        _, votes = await get("anna", "votes")
        assert [v["id"] for v in votes["votes"]] == ["DA:2", "DA:1"]
        assert all("case_no" not in v for v in votes["votes"])  # not in the feed
        _, alerts_b = await get("bo", "alerts")
        assert [(x["window"], x["detail"]["case_no"]) for x in alerts_b["alerts"]] == \
            [("B01", "C1")]
        _, charts = await get("bo", "charts")
        assert [w["key"] for w in charts["windows"]] == ["B01"]
        assert [i["label"] for i in charts["items"]] == ["事项B"]
        _, devices = await get("anna", "devices")
        assert [d["device_id"] for d in devices["devices"]] == ["DA"]
        assert (await get("anna", "devices/DB"))[0] == 404
        assert (await get("anna", "devices/DA"))[0] == 200

        # An alert of the other hall cannot be acknowledged.
        b_alert = alerts_b["alerts"][0]["id"]
        resp = await c["anna"].post("/dashboard/api/alerts/%d/ack" % b_alert, json={})
        assert resp.status == 404
        resp = await c["bo"].post("/dashboard/api/alerts/%d/ack" % b_alert, json={})
        acked = await resp.json()
        assert resp.status == 200 and acked["acked_by"] == "bo" and not acked["open"]

    run(hall, scenario)


def test_what_the_hub_turned_away_and_lost_is_visible(hall):
    settings, clock, store, ingestor = hall
    forged = codec.make_vote(bytes(32), "DA", 1, int(NOON), "v", "P1", "", 5, [], "nat", "A01",
                             "")
    ingestor.handle_group([
        Uplink("pj/DA/up/vote", codec.encode_vote(forged), 0, 1, 0),
        Uplink("pj/DB/up/vote", b"{broken", 0, 1, 0),
        Uplink("pj/DX/up/hb", json.dumps({"v": 1, "d": "DX"}).encode(), 0, 1, 0),
        Uplink("pj/DB/up/birth", json.dumps({"v": 1, "d": "DB", "lo": 6, "next": 6}).encode(),
               0, 1, 0),
    ])

    async def scenario(c):
        for name in ("anna", "chief"):
            await login(c[name], name)
        whole = await (await c["chief"].get("/dashboard/api/system")).json()
        assert [(r["reason"], r["label"], r["count"]) for r in whole["rejections"]] == [
            ("bad_json", "格式错误", 1), ("bad_mac", "签名不符（疑似伪造）", 1),
            ("unknown_device", "未登记的设备", 1)]
        assert {r["device_id"] for r in whole["recent_rejections"]} == {"DA", "DB", "DX"}
        assert whole["lost_votes"] == 5
        assert [(g["device_id"], g["detail"]["missing"]) for g in whole["gaps"]] == [("DB", 5)]
        assert whole["province"]["unforwarded"] == 0
        # Hall A's manager gets the same counts but lists naming only A's devices.
        own = await (await c["anna"].get("/dashboard/api/system")).json()
        assert own["rejections"] == whole["rejections"]
        assert {r["device_id"] for r in own["recent_rejections"]} == {"DA"}
        assert own["gaps"] == []
        over = await (await c["anna"].get("/dashboard/api/overview")).json()
        assert over["province"]["unforwarded"] == 0 and over["province"]["chain_error"] is False

    run(hall, scenario)


def test_a_window_shows_why_its_device_is_degraded_and_since_when_it_is_offline(hall):
    settings, clock, store, ingestor = hall
    hb = {"v": 1, "fw": "0.1.0", "board": "sim", "up": 500, "rst": "power", "heap": 4000,
          "jd": 0, "old": 0, "rc": 0, "rssi": -50, "stuck": [5], "disp": 0, "mis": 0,
          "clk": 0, "lo": 1, "next": 1}
    for device_id in ("DA", "DB"):
        ingestor.handle_group([Uplink("pj/%s/up/birth" % device_id,
                                      json.dumps(dict(hb, d=device_id)).encode(), 0, 1, 0)])
    ingestor.handle_group([Uplink("pj/DB/up/will", json.dumps(
        {"v": 1, "d": "DB", "online": False}).encode(), 0, 1, 0)])

    async def scenario(c):
        await login(c["chief"], "chief")
        await settle()
        over = await (await c["chief"].get("/dashboard/api/overview")).json()
        cards = {w["window"]: w for w in over["windows"]}
        a = cards["A01"]["devices"][0]
        assert (cards["A01"]["state"], a["reasons"], a["reason_labels"]) == \
            ("degraded", ["stuck_key", "low_memory"], ["按键卡住(5星键)", "内存不足(剩余4000字节)"])
        b = cards["B01"]["devices"][0]
        assert (cards["B01"]["state"], b["since"]) == ("offline", iso(NOON))
        assert over["devices"] == {"online": 0, "degraded": 1, "offline": 1, "never": 0}
        page = await (await c["chief"].get("/dashboard/api/devices/DA")).json()
        assert page["fields"]["stuck"] == [5] and page["state_label"] == "异常"
        assert [e["kind"] for e in page["events"]][:2] == ["state", "birth"]

    run(hall, scenario)


async def read_events(resp, want, timeout=6.0):
    """Server-sent events until one of kind `want` arrives: [(event, data), ...]."""
    events = []
    event = None

    async def reader():
        nonlocal event
        while True:
            line = (await resp.content.readline()).decode("utf-8").rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
                if event == want:
                    return

    await asyncio.wait_for(reader(), timeout)
    return events


def test_the_live_stream_brings_each_manager_their_own_hall_only(hall):
    async def scenario(c):
        for name in ("anna", "bo"):
            await login(c[name], name)
        stream_a = await c["anna"].get("/dashboard/api/stream")
        stream_b = await c["bo"].get("/dashboard/api/stream")
        assert stream_a.headers["Content-Type"].startswith("text/event-stream")
        assert (await read_events(stream_a, "hello"))[-1][1]["hall"] == "hall-a"
        await read_events(stream_b, "hello")
        vote(hall, "DA", 1, 1, "A01", reasons=["S04"])
        got = await read_events(stream_a, "vote")
        assert got[-1][1]["id"] == "DA:1" and got[-1][1]["reasons"][0]["label"] == "推诿扯皮"
        alert = (await read_events(stream_a, "alert"))[-1][1]
        assert alert["kind"] == "bad_rating" and alert["window"] == "A01"
        vote(hall, "DB", 1, 4, "B01")
        seen_b = await read_events(stream_b, "vote")
        assert [d["id"] for e, d in seen_b if e == "vote"] == ["DB:1"]
        assert all(d.get("window") != "A01" for _, d in seen_b)
        # B's acknowledgement of nothing of A's; A's own acknowledgement reaches A's stream.
        resp = await c["anna"].post("/dashboard/api/alerts/%d/ack" % alert["id"], json={})
        assert resp.status == 200
        update = (await read_events(stream_a, "alert"))[-1][1]
        assert update["id"] == alert["id"] and update["acked_by"] == "anna"
        stream_a.close()
        stream_b.close()

    run(hall, scenario)


def test_today_is_the_hall_day_and_charts_take_any_day(hall):
    settings, clock, store, _ = hall
    midnight = NOON - 12 * 3600  # 00:00 in the hall

    async def scenario(c):
        await login(c["chief"], "chief")
        vote(hall, "DA", 1, 5, "A01", t=midnight - 60)       # 23:59 yesterday
        vote(hall, "DA", 2, 2, "A01", t=midnight + 60)       # 00:01 today
        vote(hall, "DA", 3, 4, "A01", t=midnight + 9.5 * 3600)  # 09:30 today
        await settle()
        over = await (await c["chief"].get("/dashboard/api/overview")).json()
        assert over["day"] == "2026-09-21"
        assert (over["totals"]["good"], over["totals"]["bad"]) == (1, 1)
        today = await (await c["chief"].get("/dashboard/api/charts")).json()
        hours = {h["hour"]: (h["good"], h["bad"]) for h in today["hours"] if h["good"] + h["bad"]}
        assert hours == {0: (0, 1), 9: (1, 0)}
        yesterday = await (await c["chief"].get("/dashboard/api/charts?day=2026-09-20")).json()
        assert [(h["hour"], h["good"]) for h in yesterday["hours"] if h["good"]] == [(23, 1)]
        assert (await c["chief"].get("/dashboard/api/charts?day=yesterday")).status == 400

    run(hall, scenario)


def test_the_page_loads_nothing_from_elsewhere():
    web = dashboard.WEB_DIR
    names = sorted(os.listdir(web))
    assert {"index.html", "app.js", "style.css"} <= set(names)
    for name in names:
        if not name.endswith((".html", ".js", ".css")):
            continue
        with open(os.path.join(web, name), encoding="utf-8") as f:
            text = f.read()
        # Only the SVG namespace name, which is an identifier, not a download.
        text = text.replace("http://www.w3.org/2000/svg", "")
        assert not re.search(r"https?://|//cdn|@import|url\(", text), name
    with open(os.path.join(web, "index.html"), encoding="utf-8") as f:
        page = f.read()
    assert re.findall(r'(?:src|href)="([^"#]+)"', page) == ["static/style.css", "static/app.js"]
    assert "<script>" not in page  # no inline script: the CSP forbids it
    assert not re.search(r"\son[a-z]+=", page)  # no inline handlers: the CSP forbids them
