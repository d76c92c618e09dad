# /metrics: valid Prometheus text (each family typed once before its samples, names and
# escaped labels a scraper accepts, cumulative histograms) whose numbers are the store's:
# votes by stars, rejections by reason, backlogs, forward latency from accepted batches,
# device states and reasons, alerts and webhook deliveries.
import asyncio
import json
import re

import pytest
from aiohttp.test_utils import TestClient, TestServer

from firmware.evaluator import codec
from hub import metrics
from hub.dashboard import Halls, Watcher, setup_dashboard
from hub.health import Limits
from hub.http_api import make_app
from hub.ingest import Ingestor, Uplink
from hub.settings import Settings
from hub.store import Store

KEY = bytes(range(32))
T0 = 1_790_000_000.0
NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t


def parse(text):
    """A strict reader of the text format: {family: {"type", "help", "samples"}} where
    samples are (name, labels dict, float). Fails on anything a scraper would refuse."""
    assert text.endswith("\n")
    families = {}
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert NAME.match(name) and name not in families, line
            families[name] = {"help": help_text, "type": None, "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current and kind in ("counter", "gauge", "histogram"), line
            families[name]["type"] = kind
        else:
            m = SAMPLE.match(line)
            assert m, line
            name, labels_text, value = m.group(1), m.group(3), m.group(4)
            family = families[current]
            assert family["type"], "sample before TYPE: " + line
            if family["type"] == "histogram":
                assert name in (current + "_bucket", current + "_sum", current + "_count"), line
            else:
                assert name == current, line
            labels = {}
            if labels_text:
                consumed = 0
                for lm in LABEL.finditer(labels_text):
                    assert lm.start() == consumed, line
                    labels[lm.group(1)] = re.sub(r"\\(.)", lambda e: {"n": "\n"}.get(
                        e.group(1), e.group(1)), lm.group(2))
                    consumed = lm.end()
                assert consumed == len(labels_text), line
            family["samples"].append((name, labels, float(value)))
    return families


def value(families, family, **labels):
    found = [v for n, lab, v in families[family]["samples"]
             if n == family and all(lab.get(k) == str(x) for k, x in labels.items())]
    assert len(found) == 1, (family, labels, families[family]["samples"])
    return found[0]


@pytest.fixture
def hall(tmp_path):
    clock = Clock()
    path = str(tmp_path / "hub.db")
    store = Store(path, clock=clock)
    for device_id in ("D1", "D2"):
        store.conn.execute("INSERT INTO devices (device_id, key_hex, window, label, created_at)"
                           " VALUES (?,?,?,?,?)", (device_id, KEY.hex(), "W" + device_id, "", ""))
    watcher = Watcher(path, Halls("hall-1"), Limits(), clock, webhook_on=False)
    yield clock, store, Ingestor(store), watcher
    watcher.close()
    store.close()


def up(device_id, kind, payload):
    if isinstance(payload, dict):
        payload = json.dumps(dict(payload, v=1, d=device_id)).encode()
    return Uplink("pj/%s/up/%s" % (device_id, kind), payload, 0, 1, 0)


def vote_up(seq, stars, kind="v"):
    reasons = ["S01"] if kind == "v" and stars <= 2 else []
    v = codec.make_vote(KEY, "D1", seq, int(T0), kind, "P%d" % seq, "", stars, reasons, "nat",
                        "WD1", "")
    return up("D1", "vote", codec.encode_vote(v))


HB = {"fw": "0.1.0", "board": "sim", "up": 40, "rst": "power", "heap": 21000, "jd": 2,
      "old": 7, "rc": 1, "rssi": -61, "stuck": [4], "disp": 0, "mis": 3, "clk": 0}


def test_the_page_is_valid_and_its_numbers_are_the_stores(hall):
    clock, store, ingestor, watcher = hall
    ingestor.handle_group([vote_up(1, 5), vote_up(2, 5), vote_up(3, 1), vote_up(4, 0, "u")])
    ingestor.handle_group([up("D1", "vote", b"{not json"), up("D9", "hb", HB),
                           up("D2", "birth", dict(HB, stuck=[], lo=1, next=1))])
    ingestor.handle_group([up("D1", "birth", dict(HB, lo=1, next=1))])
    with store.transaction():
        store.count_rejection('odd "reason"\\ with\nnewline')
    watcher.tick()
    from hub.alerts import AlertBook
    book = AlertBook(store, watcher.halls.hall_of, clock)
    text = metrics.render(store, "hall-1", states=_states(store), alert_counts=book.counts(),
                          hub_health={"mqtt": True, "broker": False})
    fam = parse(text)
    assert value(fam, "pingjia_votes_total", kind="vote", stars=5) == 2
    assert value(fam, "pingjia_votes_total", kind="vote", stars=1) == 1
    assert value(fam, "pingjia_votes_total", kind="unrated", stars=0) == 1
    assert fam["pingjia_votes_total"]["type"] == "counter"
    assert value(fam, "pingjia_rejections_total", reason="bad_json") == 1
    assert value(fam, "pingjia_rejections_total", reason="unknown_device") == 1
    # Label values with quotes, backslashes and newlines come back exactly.
    assert value(fam, "pingjia_rejections_total", reason='odd "reason"\\ with\nnewline') == 1
    status = store.status()
    for queue, n in status["backlog"].items():
        assert value(fam, "pingjia_backlog", queue=queue) == n
    assert value(fam, "pingjia_hub_up", part="broker") == 0
    assert value(fam, "pingjia_devices", state="degraded") == 1
    assert value(fam, "pingjia_devices", state="online") == 1
    assert value(fam, "pingjia_device_state", device="D1", window="WD1", state="degraded") == 1
    assert value(fam, "pingjia_device_state", device="D1", window="WD1", state="online") == 0
    assert value(fam, "pingjia_device_degraded", device="D1", reason="stuck_key") == 1
    assert value(fam, "pingjia_device_journal_depth", device="D1") == 2
    assert value(fam, "pingjia_device_rssi_dbm", device="D2") == -61
    assert value(fam, "pingjia_alerts_total", kind="bad_rating") == 1
    assert value(fam, "pingjia_alerts_open", kind="bad_rating") == 1
    assert value(fam, "pingjia_webhook_alerts", state="off") == 1


def _states(store):
    out = {}
    for row in store.conn.execute("SELECT d.device_id, d.window, s.state, s.reasons FROM "
                                  "devices d JOIN device_state s ON s.device_id = d.device_id"):
        out[row["device_id"]] = {"window": row["window"], "state": row["state"],
                                 "reasons": sorted(json.loads(row["reasons"]))}
    return out


def test_forward_latency_is_counted_once_per_accepted_batch_in_order(hall):
    clock, store, ingestor, watcher = hall
    ingestor.handle_group([vote_up(s, 5) for s in range(1, 6)])  # received at T0
    with store.transaction():
        store.save_batch(1, "B1", "", "h1", "{}", [("D1", 1), ("D1", 2), ("D1", 3)])
        store.save_batch(2, "B2", "h1", "h2", "{}", [("D1", 4)])
        store.save_batch(3, "B3", "h2", "h3", "{}", [("D1", 5)])
    clock.t = T0 + 2
    with store.transaction():
        store.accept_batch(1, {}, [("D1", 1), ("D1", 2), ("D1", 3)], [])
        # Batch 3 accepted before batch 2 is not counted until batch 2 is.
        store.accept_batch(3, {}, [("D1", 5)], [])
    watcher.tick()
    watcher.tick()

    def hist(name):
        fam = parse(metrics.render(store, "hall-1"))[name]
        buckets = [(lab["le"], v) for n, lab, v in fam["samples"] if n.endswith("_bucket")]
        count = [v for n, _, v in fam["samples"] if n.endswith("_count")][0]
        total = [v for n, _, v in fam["samples"] if n.endswith("_sum")][0]
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and buckets[-1] == ("+Inf", count)
        return dict(buckets), count, total

    buckets, count, total = hist("pingjia_forward_latency_seconds")
    assert (count, total) == (3, 6.0)
    assert buckets["1"] == 0 and buckets["2.5"] == 3
    clock.t = T0 + 100
    with store.transaction():
        store.accept_batch(2, {}, [("D1", 4)], [])
    watcher.tick()
    buckets, count, total = hist("pingjia_forward_latency_seconds")
    assert (count, total) == (5, 6.0 + 100 + 2)
    assert buckets["60"] == 4 and buckets["300"] == 5  # batch 3 took 2 s, batch 2 100 s
    watcher.tick()  # nothing new: nothing counted twice
    assert hist("pingjia_forward_latency_seconds")[1] == 5
    # The press-to-province clock starts at the key press (t = T0 here).
    assert hist("pingjia_press_to_province_seconds")[1] == 5


def test_metrics_over_http_need_no_login_and_say_their_format(tmp_path):
    settings = Settings(base_dir=str(tmp_path))
    store = Store(settings.db_path)

    async def main():
        app = make_app(store, None, settings.hub.id)
        setup_dashboard(app, settings, health=lambda: {"mqtt": True, "broker": True})
        async with TestClient(TestServer(app)) as client:
            resp = await client.get("/metrics")
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            fam = parse(await resp.text())
            assert value(fam, "pingjia_hub_up", part="mqtt") == 1
            assert value(fam, "pingjia_hub_info", hub="hall-1") == 1
            assert value(fam, "pingjia_dashboard_streams") == 0

    try:
        asyncio.run(main())
    finally:
        store.close()
