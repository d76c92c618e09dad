# Device health: what the hub concludes from births, heartbeats and wills. First the pure
# verdict (every degraded reason, and what must NOT count as one), then the Monitor on a
# real store fed through the real Ingestor: state changes become events with their time,
# boots are recorded once, samples stay bounded, and a restarted hub does not call every
# device offline just because it was not listening.
import json

import pytest

from hub import health
from hub.health import DEGRADED, NEVER, OFFLINE, ONLINE, Limits, Monitor, assess
from hub.ingest import Ingestor, Uplink
from hub.store import Store, iso

T0 = 1_790_000_000.0


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t

    def advance(self, s):
        self.t += s


def fields(**over):
    base = {"v": 1, "d": "D1", "fw": "0.1.0", "board": "sim", "up": 600, "rst": "power",
            "heap": 30000, "jd": 0, "old": 0, "rc": 0, "rssi": -55, "stuck": [], "disp": 0,
            "mis": 0, "clk": 0}
    base.update(over)
    return base


def online(hb=None, seen=T0):
    return {"online": 1, "last_seen": iso(seen), "birth": None, "hb": hb or fields()}


def sample(t, **over):
    s = {k: v for k, v in fields(**over).items() if k in health.SAMPLE_FIELDS}
    s.update(t=t, stuck=over.get("stuck", []), disp=over.get("disp", 0))
    return s


# -- the pure verdict -----------------------------------------------------------------------

def test_never_online_and_offline_by_will_or_by_silence():
    assert assess("D1", None, [], [], T0).state == NEVER
    assert assess("D1", online(), [], [], T0 + 10).state == ONLINE
    gone = assess("D1", dict(online(), online=0), [], [], T0 + 10)
    assert (gone.state, gone.cause, gone.since) == (OFFLINE, "will", iso(T0))
    # No will yet, but nothing heard for longer than offline_after_s: offline since then.
    silent = assess("D1", online(), [], [], T0 + 91, Limits(offline_after_s=90))
    assert (silent.state, silent.cause, silent.since) == (OFFLINE, "silent", iso(T0))
    assert assess("D1", online(), [], [], T0 + 89, Limits(offline_after_s=90)).state == ONLINE


def test_a_hub_that_just_started_does_not_call_its_devices_silent():
    long_ago = online(seen=T0 - 3600)
    assert assess("D1", long_ago, [], [], T0 + 30, heard_floor=T0).state == ONLINE
    assert assess("D1", long_ago, [], [], T0 + 120, heard_floor=T0).state == OFFLINE


@pytest.mark.parametrize("over,reason,detail", [
    ({"stuck": [3]}, "stuck_key", {"keys": [3]}),
    ({"disp": 1}, "display", {}),
    ({"heap": 5000}, "low_memory", {"heap": 5000}),
    ({"rssi": -90}, "weak_signal", {"rssi": -90}),
    ({"jd": 4, "old": 300}, "backlog", {"jd": 4, "old": 300}),
])
def test_each_reported_trouble_is_a_degraded_reason(over, reason, detail):
    verdict = assess("D1", online(fields(**over)), [], [], T0 + 5)
    assert verdict.state == DEGRADED
    assert verdict.reasons == {reason: detail}
    assert verdict.describe().startswith("异常：")


def test_fine_values_are_not_trouble():
    fine = fields(heap=8192, rssi=-84, jd=3, old=119)
    assert assess("D1", online(fine), [], [], T0 + 5).state == ONLINE
    # A device that cannot tell (null fields) is not degraded for it.
    unknown = fields(heap=None, rssi=None, jd=None, old=None, stuck=None, disp=None)
    assert assess("D1", online(unknown), [], [], T0 + 5).state == ONLINE


def test_a_backlog_that_is_draining_is_not_growing():
    older = [sample(T0 - 60, jd=9, old=250), sample(T0 - 30, jd=6, old=280)]
    draining = online(fields(jd=5, old=300))
    assert assess("D1", draining, older, [], T0).state == ONLINE
    growing = [sample(T0 - 60, jd=3, old=250), sample(T0 - 30, jd=5, old=280)]
    assert assess("D1", online(fields(jd=5, old=300)), growing, [], T0).reason_codes == \
        ["backlog"]


def test_clock_drift_is_a_correction_after_the_first_one_of_a_boot():
    boot = [sample(T0, up=5, clk=0), sample(T0 + 30, up=35, clk=-946684800)]
    assert assess("D1", online(), boot, [], T0 + 40).state == ONLINE  # the clock being set
    drifted = boot + [sample(T0 + 3600, up=3605, clk=25)]
    later = online(seen=T0 + 3600)
    verdict = assess("D1", later, drifted, [], T0 + 3610)
    assert verdict.reasons == {"clock_drift": {"clk": 25}}
    # Small corrections are fine, and the verdict is forgotten after drift_memory_s.
    small = boot + [sample(T0 + 3600, up=3605, clk=4)]
    assert assess("D1", later, small, [], T0 + 3610).state == ONLINE
    much_later = online(seen=T0 + 3600 + 1800)
    assert assess("D1", much_later, drifted, [], T0 + 3600 + 1801).state == ONLINE
    # A big first correction after a reboot is the clock being set again, not drift.
    reboot = [sample(T0, up=5000, clk=3), sample(T0 + 30, up=4, clk=0),
              sample(T0 + 60, up=34, clk=-946684800)]
    assert assess("D1", online(), reboot, [], T0 + 70).state == ONLINE


def test_repeated_resets_or_one_watchdog_reset_within_the_hour():
    two = [(T0 - 100, "power"), (T0 - 50, "power")]
    assert assess("D1", online(), [], two, T0).state == ONLINE
    three = two + [(T0 - 10, "soft")]
    assert assess("D1", online(), [], three, T0).reasons == {"resets": {"boots": 3, "wdt": 0}}
    an_hour_later = online(seen=T0 + 3600)
    assert assess("D1", an_hour_later, [], three, T0 + 3600).state == ONLINE
    assert assess("D1", online(), [], [(T0 - 10, "wdt")], T0).reason_codes == ["resets"]


def test_a_misuse_spike_counts_presses_within_ten_minutes_across_a_reboot():
    calm = [sample(T0 + i * 30, up=600 + i * 30, mis=i // 4) for i in range(20)]
    assert assess("D1", online(seen=T0 + 600), calm, [], T0 + 600).state == ONLINE
    spike = [sample(T0, up=600, mis=2), sample(T0 + 30, up=630, mis=8),
             sample(T0 + 60, up=3, mis=0), sample(T0 + 90, up=33, mis=6)]
    verdict = assess("D1", online(seen=T0 + 90), spike, [], T0 + 100)
    assert verdict.reasons == {"misuse": {"presses": 12, "minutes": 10}}
    assert assess("D1", online(seen=T0 + 690), spike, [], T0 + 700).state == ONLINE


def test_several_reasons_are_listed_in_the_order_a_manager_reads_them():
    verdict = assess("D1", online(fields(heap=100, stuck=[1, 5], jd=3, old=500)), [], [],
                     T0)
    assert verdict.reason_codes == ["backlog", "stuck_key", "low_memory"]
    assert verdict.describe() == "异常：积压未确认(3条，最早8分钟前)、按键卡住(1、5星键)、" \
                                 "内存不足(剩余100字节)"


# -- the Monitor on a real store -----------------------------------------------------------

@pytest.fixture
def hall(tmp_path):
    clock = Clock()
    store = Store(str(tmp_path / "hub.db"), clock=clock)
    for device_id, window in (("D1", "W01"), ("D2", "W02")):
        store.conn.execute("INSERT INTO devices (device_id, key_hex, window, label, created_at)"
                           " VALUES (?,?,?,?,?)", (device_id, "00" * 32, window, "", iso(T0)))
    yield clock, store, Ingestor(store)
    store.close()


def send(ingestor, device_id, kind, obj):
    obj = dict(obj, v=1, d=device_id)
    ingestor.handle_group([Uplink("pj/%s/up/%s" % (device_id, kind),
                                  json.dumps(obj).encode(), 0, 1, 0)])


def birth(up=3, **over):
    return dict(fields(up=up, **over), lo=1, next=1)


def states(store):
    return [(e["device_id"], e["detail"]["from"], e["detail"]["to"], e["at"])
            for e in reversed(store.events(kind="state"))]


def test_state_changes_are_events_with_their_time_and_since(hall):
    clock, store, ingestor = hall
    monitor = Monitor(store, Limits(offline_after_s=90), clock)
    send(ingestor, "D1", "birth", birth())
    assert [(c.device_id, c.old, c.new) for c in monitor.tick()] == [("D1", None, ONLINE)]
    clock.advance(1)
    assert monitor.tick() == []  # nothing changed, nothing recorded
    clock.advance(29)
    send(ingestor, "D1", "hb", fields(up=33, stuck=[2]))
    change, = monitor.tick()
    assert (change.old, change.new, sorted(change.reasons)) == (ONLINE, DEGRADED, ["stuck_key"])
    clock.advance(5)
    went = T0 + 35
    send(ingestor, "D1", "will", {"online": False})
    clock.advance(3)
    change, = monitor.tick()
    assert (change.old, change.new) == (DEGRADED, OFFLINE)
    assert change.detail.since == iso(went)  # offline since it went, not since we noticed
    assert states(store) == [("D1", None, ONLINE, iso(T0)), ("D1", ONLINE, DEGRADED, iso(T0 + 30)),
                             ("D1", DEGRADED, OFFLINE, iso(T0 + 38))]
    row = health.stored_state(store, "D1")
    assert (row["state"], row["since"]) == (OFFLINE, iso(went))
    # D2 never spoke: no event for it, and the CLI's reading agrees with the monitor.
    assert health.current(store, "D2", clock()).state == NEVER
    assert health.current(store, "D1", clock()).since == iso(went)


def test_a_silent_device_goes_offline_without_a_will(hall):
    clock, store, ingestor = hall
    monitor = Monitor(store, Limits(offline_after_s=90), clock)
    send(ingestor, "D1", "birth", birth())
    monitor.tick()
    clock.advance(60)
    assert monitor.tick() == []
    clock.advance(31)
    change, = monitor.tick()
    assert (change.new, change.detail.cause) == (OFFLINE, "silent")
    clock.advance(5)
    send(ingestor, "D1", "hb", fields(up=100))
    change, = monitor.tick()
    assert (change.old, change.new) == (OFFLINE, ONLINE)


def test_same_reasons_with_new_numbers_update_the_state_but_add_no_event(hall):
    clock, store, ingestor = hall
    monitor = Monitor(store, clock=clock)
    send(ingestor, "D1", "birth", birth(jd=2, old=200))
    monitor.tick()
    events = len(store.events(kind="state"))
    clock.advance(30)
    send(ingestor, "D1", "hb", fields(up=33, jd=5, old=230))
    assert monitor.tick() == []
    assert len(store.events(kind="state")) == events
    assert health.stored_state(store, "D1")["reasons"] == {"backlog": {"jd": 5, "old": 230}}


def test_boots_are_recorded_once_and_three_in_an_hour_degrade(hall):
    clock, store, ingestor = hall
    monitor = Monitor(store, clock=clock)
    for i in range(3):
        send(ingestor, "D1", "birth", birth(up=2 + i))
        monitor.tick()
        # A reconnect of a running device is not a boot.
        clock.advance(300)
        send(ingestor, "D1", "birth", birth(up=300 + i))
        monitor.tick()
        clock.advance(300)
    boots = store.events(kind="boot", device_id="D1")
    assert len(boots) == 3
    assert health.stored_state(store, "D1")["reasons"] == {"resets": {"boots": 3, "wdt": 0}}
    # A restarted hub (a new Monitor) neither records the last boot again nor forgets them.
    again = Monitor(store, clock=clock)
    send(ingestor, "D1", "hb", fields(up=330))
    again.tick()
    assert len(store.events(kind="boot", device_id="D1")) == 3
    assert health.current(store, "D1", clock()).reason_codes == ["resets"]


def test_a_restarted_hub_waits_for_heartbeats_before_calling_devices_offline(hall):
    clock, store, ingestor = hall
    monitor = Monitor(store, Limits(offline_after_s=90), clock)
    send(ingestor, "D1", "birth", birth())
    monitor.tick()
    clock.advance(3600)  # the hub was down for an hour
    restarted = Monitor(store, Limits(offline_after_s=90), clock)
    assert restarted.tick() == []
    clock.advance(30)
    send(ingestor, "D1", "hb", fields(up=3700))
    clock.advance(80)
    assert restarted.tick() == []
    assert health.stored_state(store, "D1")["state"] == ONLINE


def test_samples_are_taken_per_report_and_bounded_per_device(hall, monkeypatch):
    clock, store, ingestor = hall
    monkeypatch.setattr(health, "SAMPLES_KEPT", 20)
    monitor = Monitor(store, clock=clock)
    send(ingestor, "D1", "birth", birth())
    send(ingestor, "D2", "birth", birth())
    monitor.tick()
    for i in range(1, 120):
        clock.advance(30)
        # Two devices taking turns: each is pruned on its own count, whatever the row ids.
        send(ingestor, "D1", "hb", fields(up=3 + 30 * i, heap=30000 - i))
        send(ingestor, "D2", "hb", fields(up=3 + 30 * i, heap=20000 - i))
        monitor.tick()
        monitor.tick()  # the same report seen twice is sampled once
    for device_id in ("D1", "D2"):
        count = store.conn.execute("SELECT count(*) FROM health_samples WHERE device_id = ?",
                                   (device_id,)).fetchone()[0]
        assert 20 <= count < 20 + health.PRUNE_EVERY
    history = health.sample_history(store, "D1", limit=5)
    assert [s["heap"] for s in history] == [30000 - i for i in range(115, 120)]
    assert history[-1]["kind"] == "hb"
    assert len(store.events(kind="state")) == 2  # each came online once, nothing else
