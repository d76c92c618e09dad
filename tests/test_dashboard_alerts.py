# Alerts: a bad rating or a device going offline/degraded raises exactly one alert, shown
# until a manager acknowledges it (who and when recorded once) or the device is back; the
# webhook gets each alert, retried with back-off until the receiver takes it, signed when a
# secret is set, and never carrying the staff member's name or the case number.
import asyncio
import hashlib
import hmac
import json
import socket

import pytest
from aiohttp import web

from firmware.evaluator import codec
from hub import alerts as alertlib
from hub.dashboard import Halls, Watcher
from hub.health import Limits
from hub.ingest import Ingestor, Uplink
from hub.store import Store, iso

KEY = bytes(range(32))
T0 = 1_790_000_000.0


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hall(tmp_path):
    clock = Clock()
    path = str(tmp_path / "hub.db")
    store = Store(path, clock=clock)
    for device_id, window in (("D1", "A01"), ("D2", "B01")):
        store.conn.execute("INSERT INTO devices (device_id, key_hex, window, label, created_at)"
                           " VALUES (?,?,?,?,?)", (device_id, KEY.hex(), window, "", iso(T0)))
    with store.transaction():
        store.sign_in("A01", "10234", "王芳")
    halls = Halls("center", {"hall-a": ["A*"], "hall-b": ["B*"]})
    watcher = Watcher(path, halls, Limits(offline_after_s=90), clock, webhook_on=True)
    yield clock, store, Ingestor(store), watcher
    watcher.close()
    store.close()


def vote(ingestor, store, device_id, seq, stars, reasons=(), window="A01"):
    with store.transaction():
        pid = store.create_prompt(device_id, window, "GD-%d" % seq, "T1", "居民身份证换领", "",
                                  "ji", 1, "10234", "王芳")
    v = codec.make_vote(KEY, device_id, seq, int(T0) + seq, "v", pid, "GD-%d" % seq, stars,
                        list(reasons), "nat-2024.1", window, "10234")
    result = ingestor.handle_group([Uplink("pj/%s/up/vote" % device_id, codec.encode_vote(v),
                                           0, 1, 0)])
    assert result.stored == 1


def uplink(ingestor, device_id, kind, obj):
    obj = dict(obj, v=1, d=device_id)
    ingestor.handle_group([Uplink("pj/%s/up/%s" % (device_id, kind), json.dumps(obj).encode(),
                                  0, 1, 0)])


def birth(up=3, **over):
    out = {"fw": "0.1.0", "board": "sim", "up": up, "rst": "power", "heap": 30000, "jd": 0,
           "old": 0, "rc": 0, "rssi": -55, "stuck": [], "disp": 0, "mis": 0, "clk": 0,
           "lo": 1, "next": 1}
    out.update(over)
    return out


def test_a_bad_rating_raises_one_alert_even_when_seen_again(hall):
    clock, store, ingestor, watcher = hall
    vote(ingestor, store, "D1", 1, 5)
    vote(ingestor, store, "D1", 2, 1, ["S01", "I03"])
    update = watcher.tick()
    assert [v["stars"] for v in update.votes] == [5, 1]
    alert, = update.alerts
    assert (alert["kind"], alert["hall"], alert["window"], alert["ref"]) == \
        ("bad_rating", "hall-a", "A01", "D1:2")
    d = alert["detail"]
    assert (d["stars"], d["staff_no"], d["staff_name"], d["item"], d["case_no"]) == \
        (1, "10234", "王芳", "居民身份证换领", "GD-2")
    assert [r["label"] for r in d["reasons"]] == ["服务态度差", "办理时间过长"]
    assert alert["open"] and alert["hook_state"] == "pending"
    # The watcher's cursor lost (a restore, a restart mid-tick): the vote comes again, the
    # alert does not.
    with store.transaction():
        store.set_state("dashboard_vote_rowid", 0)
    again = watcher.tick()
    assert len(again.votes) == 2 and again.alerts == []
    assert store.conn.execute("SELECT count(*) FROM alerts").fetchone()[0] == 1


def test_acknowledgement_records_who_and_when_once_and_only_in_the_own_hall(hall):
    clock, store, ingestor, watcher = hall
    vote(ingestor, store, "D1", 1, 2, ["S02"])
    alert, = watcher.tick().alerts
    book = alertlib.AlertBook(store, watcher.halls.hall_of, clock)
    with pytest.raises(alertlib.AlertError):
        book.ack(alert["id"], "li", hall="hall-b")
    assert book.get(alert["id"])["acked_at"] is None
    clock.t += 60
    acked = book.ack(alert["id"], "zhang", hall="hall-a")
    assert (acked["acked_by"], acked["acked_at"], acked["open"]) == ("zhang", iso(T0 + 60), False)
    clock.t += 60
    # A second manager acknowledging later changes nothing: the first one is on record.
    assert book.ack(alert["id"], "wang", hall=None)["acked_by"] == "zhang"
    assert book.listing("hall-a", open_only=True) == []
    assert book.listing("hall-b") == []
    with pytest.raises(alertlib.AlertError):
        book.ack(999, "zhang")


def test_device_alerts_follow_its_state_and_resolve_when_it_is_back(hall):
    clock, store, ingestor, watcher = hall
    uplink(ingestor, "D2", "birth", birth())
    assert watcher.tick().alerts == []  # first verdict: not news
    clock.t += 30
    uplink(ingestor, "D2", "hb", birth(up=33, stuck=[3]))
    degraded, = watcher.tick().alerts
    assert (degraded["kind"], degraded["hall"], degraded["detail"]["reason_labels"]) == \
        ("degraded", "hall-b", ["按键卡住(3星键)"])
    clock.t += 30
    uplink(ingestor, "D2", "hb", birth(up=63, stuck=[3], heap=100))
    same, = watcher.tick().alerts  # more trouble: the same alert, brought up to date
    assert same["id"] == degraded["id"]
    assert same["detail"]["reasons"] == ["stuck_key", "low_memory"]
    clock.t += 5
    uplink(ingestor, "D2", "will", {"online": False})
    touched = watcher.tick().alerts
    assert sorted((a["kind"], a["open"]) for a in touched) == [("degraded", False),
                                                              ("offline", True)]
    offline = [a for a in touched if a["kind"] == "offline"][0]
    assert offline["detail"]["cause"] == "will"
    clock.t += 120
    uplink(ingestor, "D2", "birth", birth(up=2))
    touched = watcher.tick().alerts
    assert sorted((a["kind"], a["open"]) for a in touched) == [("offline", False),
                                                              ("recovered", False)]
    book = alertlib.AlertBook(store, watcher.halls.hall_of, clock)
    assert book.listing(None, open_only=True) == []
    assert {a["kind"] for a in book.listing(None)} == {"degraded", "offline", "recovered"}


def test_webhook_texts_carry_no_names_or_case_numbers(hall):
    clock, store, ingestor, watcher = hall
    vote(ingestor, store, "D1", 1, 1, ["S01"])
    alert, = watcher.tick().alerts
    hook = alertlib.Webhook("http://127.0.0.1:1/x", hhmm=alertlib.local_clock(8 * 3600))
    body = json.loads(hook.body(alert))
    assert body["kind"] == "bad_rating" and body["stars"] == 1 and body["window"] == "A01"
    assert body["reasons"] == [{"code": "S01", "label": "服务态度差"}]
    assert body["text"].startswith("【差评】窗口 A01 · 工号 10234 · 非常不满意(1星) · 原因：服务态度差")
    raw = hook.body(alert).decode("utf-8")
    assert "王芳" not in raw and "GD-1" not in raw
    text = alertlib.Webhook("http://127.0.0.1:1/x", fmt="text")
    assert json.loads(text.body(alert)) == {"msgtype": "text",
                                            "text": {"content": body["text"]}}


def test_webhook_retries_with_backoff_until_delivered_and_signs_each_post(hall):
    clock, store, ingestor, watcher = hall
    vote(ingestor, store, "D1", 1, 2, ["S03"])
    watcher.tick()
    received = []
    answers = [500, 503, 200]

    async def receive(request):
        body = await request.read()
        received.append((dict(request.headers), body))
        return web.Response(status=answers[len(received) - 1])

    async def main():
        import aiohttp

        app = web.Application()
        app.router.add_post("/hook", receive)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        hook = alertlib.Webhook("http://127.0.0.1:%d/hook" % port, secret="s3cret",
                                attempts=5, clock=clock)
        results = []
        try:
            async with aiohttp.ClientSession() as session:
                for step in (0, 1, 1, 2, 4):
                    clock.t += step
                    results.append(await hook.deliver_due(store, session))
        finally:
            await runner.cleanup()
        return results

    results = asyncio.run(main())
    # Tries at 0 s, 2 s later (first back-off), then 4 s after that; 1 s early is too soon.
    assert results == [(0, 0, 1), (0, 0, 0), (0, 0, 1), (0, 0, 0), (1, 0, 0)]
    assert len(received) == 3
    for headers, body in received:
        expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        assert headers["X-Pingjia-Signature"] == "sha256=" + expected
    row = store.conn.execute("SELECT hook_state, hook_attempts, hook_error FROM alerts").fetchone()
    assert tuple(row) == ("sent", 3, None)


def test_an_unreachable_webhook_gives_up_after_its_attempts_and_counts_it(hall):
    clock, store, ingestor, watcher = hall
    vote(ingestor, store, "D1", 1, 1, ["S01"])
    watcher.tick()
    hook = alertlib.Webhook("http://127.0.0.1:%d/none" % free_port(), attempts=3, clock=clock,
                            timeout_s=2)

    async def main():
        import aiohttp

        out = []
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                out.append(await hook.deliver_due(store, session))
                clock.t += alertlib.HOOK_BACKOFF_MAX_S
        return out

    assert asyncio.run(main()) == [(0, 0, 1), (0, 0, 1), (0, 1, 0)]
    book = alertlib.AlertBook(store, watcher.halls.hall_of, clock)
    counts = book.counts()
    assert counts["hooks"] == {"failed": 1} and counts["hook_attempts"] == 3
    # Delivery failing does not hide the alert from the page.
    assert len(book.listing(None, open_only=True)) == 1
