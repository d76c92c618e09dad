"""Device health: which state each counter evaluator is in, why, and since when.

Devices report on connect (birth), every 30 s (heartbeat) and through their last will
(docs/protocol.md). Ingest stores the latest of each in `device_health`; this module turns
them into a state a hall manager can act on:

- `never`    registered but never heard from;
- `online`   heard from recently and nothing wrong;
- `degraded` online, but with reasons (backlog growing, stuck key, low memory, clock
             drift, repeated resets, misuse spike, display fault, weak signal);
- `offline`  its last will arrived, or nothing was heard for `offline_after_s`.

`assess()` is a pure function of what the device reported, its recent heartbeat samples
and its recent boots, so the hub's monitor and `pingjia hub devices` (which may run while
the hub does not) reach the same verdict. The `Monitor` runs inside the hub: it samples
every new birth and heartbeat into `health_samples` (bounded per device), records boots,
keeps the current state in `device_state` and stores every change of state as an event
(kind `state`) with its time, which the dashboard and alerts pick up.
"""
import collections
import json
import time
from dataclasses import dataclass, field

from .store import iso

NEVER = "never"
ONLINE = "online"
DEGRADED = "degraded"
OFFLINE = "offline"
STATES = (ONLINE, DEGRADED, OFFLINE, NEVER)

STATE_LABELS = {ONLINE: "在线", DEGRADED: "异常", OFFLINE: "离线", NEVER: "未上线"}

# Reasons in the order a manager should read them: the ones that lose or block ratings first.
REASONS = ("backlog", "stuck_key", "display", "resets", "low_memory", "clock_drift", "misuse",
           "weak_signal")
REASON_LABELS = {
    "backlog": "积压未确认",
    "stuck_key": "按键卡住",
    "display": "显示屏故障",
    "resets": "频繁重启",
    "low_memory": "内存不足",
    "clock_drift": "时钟漂移",
    "misuse": "误按激增",
    "weak_signal": "信号弱",
}

SAMPLE_FIELDS = ("up", "heap", "jd", "old", "rc", "rssi", "mis", "clk")
SAMPLES_KEPT = 720          # per device: six hours of 30 s heartbeats for the device page
PRUNE_EVERY = 50            # samples of a device between two prunings
RECENT_S = 3600             # samples and boots that matter for a verdict
BOOT_UP_S = 120             # a birth this soon after power-up is a boot, not a reconnect
FULL_CHECK_S = 5.0          # re-judge every device this often (timeouts need no uplink)


@dataclass(frozen=True)
class Limits:
    """Where a device stops being fine. offline_after_s comes from the settings
    (dashboard.offline_after_s); the others are documented in docs/dashboard.md."""
    offline_after_s: int = 90
    backlog_age_s: int = 120      # oldest unacked record older than this, and not shrinking
    low_heap_bytes: int = 8192    # free heap below this (of a 64 KB heap on the MCU)
    clock_drift_s: int = 10       # a correction this large after the first one of a boot
    drift_memory_s: int = 1800    # ... keeps the device degraded this long
    resets_per_hour: int = 3      # boots within an hour; one watchdog reset is enough
    misuse_spike: int = 10        # misuse presses within misuse_window_s
    misuse_window_s: int = 600
    weak_rssi_dbm: int = -85      # Wi-Fi signal at or below this


@dataclass
class Assessment:
    """A device's state now. `reasons` maps reason code -> detail (a small dict)."""
    device_id: str
    state: str
    reasons: dict = field(default_factory=dict)
    last_seen: str = None
    since: str = None
    fields: dict = field(default_factory=dict)
    cause: str = None  # offline: "will" (the broker said so) or "silent" (nothing heard)

    @property
    def reason_codes(self):
        return [r for r in REASONS if r in self.reasons]

    def describe(self):
        """One line in Chinese: 异常：按键卡住(3星键)、内存不足."""
        text = STATE_LABELS[self.state]
        if self.reasons:
            text += "：" + "、".join(describe_reason(r, self.reasons[r]) for r in self.reason_codes)
        return text

    def as_dict(self):
        return {"device_id": self.device_id, "state": self.state,
                "state_label": STATE_LABELS[self.state], "reasons": self.reason_codes,
                "reason_detail": {r: self.reasons[r] for r in self.reason_codes},
                "reason_labels": [describe_reason(r, self.reasons[r]) for r in self.reason_codes],
                "since": self.since, "last_seen": self.last_seen, "cause": self.cause,
                "fields": self.fields}


def describe_reason(reason, detail):
    label = REASON_LABELS.get(reason, reason)
    detail = detail or {}
    if reason == "stuck_key" and detail.get("keys"):
        return "%s(%s星键)" % (label, "、".join(str(k) for k in detail["keys"]))
    if reason == "backlog" and detail.get("jd") is not None:
        return "%s(%d条，最早%d分钟前)" % (label, detail["jd"], detail.get("old", 0) // 60)
    if reason == "low_memory" and detail.get("heap") is not None:
        return "%s(剩余%d字节)" % (label, detail["heap"])
    if reason == "clock_drift" and detail.get("clk") is not None:
        return "%s(校正%d秒)" % (label, detail["clk"])
    if reason == "resets" and detail.get("boots") is not None:
        return "%s(1小时内%d次)" % (label, detail["boots"])
    if reason == "misuse" and detail.get("presses") is not None:
        return "%s(%d分钟内%d次)" % (label, detail.get("minutes", 10), detail["presses"])
    if reason == "weak_signal" and detail.get("rssi") is not None:
        return "%s(%d dBm)" % (label, detail["rssi"])
    return label


def parse_iso(text):
    """Unix seconds of a store timestamp (store.iso), or None."""
    if not text:
        return None
    import datetime
    try:
        moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        try:
            moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            return None
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()


def _num(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def assess(device_id, health, samples, boots, now, limits=Limits(), latest=None,
           heard_floor=None):
    """The state of one device.

    health: its `device_health` row (store.health()) or None; samples: recent heartbeat
    samples, oldest first, each a dict of SAMPLE_FIELDS plus `t` (unix s), `stuck`, `disp`;
    boots: recent boots as (unix s, reset cause), any order; latest: the newest reported
    fields if the caller knows them better than the samples do. heard_floor: judge silence
    as if the device was heard at least then (a hub that was itself down was not listening,
    so its devices' silence proves nothing yet)."""
    if health is None:
        return Assessment(device_id, NEVER)
    last_seen = health.get("last_seen")
    seen_t = parse_iso(last_seen)
    fields = dict(latest) if latest is not None else latest_fields(health, samples)
    if not health.get("online"):
        return Assessment(device_id, OFFLINE, {}, last_seen, last_seen, fields, "will")
    heard = seen_t
    if heard_floor is not None:
        heard = max(heard or heard_floor, heard_floor)
    if heard is None or now - heard > limits.offline_after_s:
        # Silent without a will: the broker has not noticed yet, or lost it.
        return Assessment(device_id, OFFLINE, {}, last_seen, last_seen, fields, "silent")
    reasons = {}
    jd, old = _num(fields.get("jd")), _num(fields.get("old"))
    if jd and old is not None and old >= limits.backlog_age_s:
        earlier = [s for s in samples[:-1] if _num(s.get("jd")) is not None]
        if not earlier or jd >= earlier[-1]["jd"]:
            reasons["backlog"] = {"jd": jd, "old": old}
    stuck = fields.get("stuck")
    if stuck:
        reasons["stuck_key"] = {"keys": sorted(stuck)}
    if fields.get("disp") == 1:
        reasons["display"] = {}
    recent_boots = [b for b in boots if now - b[0] <= RECENT_S]
    watchdog = [b for b in recent_boots if b[1] == "wdt"]
    if len(recent_boots) >= limits.resets_per_hour or watchdog:
        reasons["resets"] = {"boots": len(recent_boots), "wdt": len(watchdog)}
    heap = _num(fields.get("heap"))
    if heap is not None and heap < limits.low_heap_bytes:
        reasons["low_memory"] = {"heap": heap}
    drift = _clock_drift(samples, now, limits)
    if drift is not None:
        reasons["clock_drift"] = {"clk": drift}
    spike = _misuse_spike(samples, now, limits)
    if spike is not None:
        reasons["misuse"] = {"presses": spike, "minutes": limits.misuse_window_s // 60}
    rssi = _num(fields.get("rssi"))
    if rssi is not None and rssi <= limits.weak_rssi_dbm:
        reasons["weak_signal"] = {"rssi": rssi}
    return Assessment(device_id, DEGRADED if reasons else ONLINE, reasons, last_seen, None,
                      fields)


def _same_boot(earlier, later):
    # Uptime only grows within one boot; a smaller one means the device restarted between.
    a, b = _num(earlier.get("up")), _num(later.get("up"))
    return a is not None and b is not None and b >= a


def _clock_drift(samples, now, limits):
    """The largest clock correction made after the first one of its boot, within
    drift_memory_s. The first correction after power-up is the clock being set (a board
    without a battery-backed clock starts at 2000-01-01), not drift."""
    worst = None
    for prev, cur in zip(samples, samples[1:]):
        if now - cur["t"] > limits.drift_memory_s or not _same_boot(prev, cur):
            continue
        clk, before = _num(cur.get("clk")), _num(prev.get("clk"))
        if clk is None or clk == before or before in (None, 0):
            continue
        if abs(clk) >= limits.clock_drift_s and (worst is None or abs(clk) > abs(worst)):
            worst = clk
    return worst


def _misuse_spike(samples, now, limits):
    """Misuse presses within the window (the counter restarts at every boot)."""
    window = [s for s in samples if now - s["t"] <= limits.misuse_window_s
              and _num(s.get("mis")) is not None]
    if len(window) < 2:
        return None
    presses = 0
    for prev, cur in zip(window, window[1:]):
        if _same_boot(prev, cur) and cur["mis"] > prev["mis"]:
            presses += cur["mis"] - prev["mis"]
        elif not _same_boot(prev, cur):
            presses += cur["mis"]
    return presses if presses >= limits.misuse_spike else None


def latest_fields(health, samples=()):
    """The newest reported fields: the newest sample when there is one (with the text
    fields from the stored birth/heartbeat), else whichever of birth and heartbeat is newer."""
    birth, hb = health.get("birth"), health.get("hb")
    if hb and birth:
        newest = hb if (_num(hb.get("up")) or 0) >= (_num(birth.get("up")) or 0) else birth
    else:
        newest = hb or birth or {}
    fields = dict(newest)
    if samples:
        last = samples[-1]
        for key in SAMPLE_FIELDS + ("stuck", "disp"):
            if key in last:
                fields[key] = last[key]
    return fields


# -- the store side ------------------------------------------------------------------------

def _sample_row(row):
    out = dict(row)
    out["stuck"] = [int(k) for k in out["stuck"].split(",") if k] if out.get("stuck") else []
    return out


def recent_samples(store, device_id, now, seconds=RECENT_S, limit=200):
    rows = store.conn.execute(
        "SELECT * FROM (SELECT * FROM health_samples WHERE device_id = ? AND t >= ? "
        "ORDER BY id DESC LIMIT ?) ORDER BY id", (device_id, now - seconds, limit)).fetchall()
    return [_sample_row(r) for r in rows]


def sample_history(store, device_id, limit=SAMPLES_KEPT):
    rows = store.conn.execute(
        "SELECT * FROM (SELECT * FROM health_samples WHERE device_id = ? "
        "ORDER BY id DESC LIMIT ?) ORDER BY id", (device_id, limit)).fetchall()
    return [_sample_row(r) for r in rows]


def recent_boots(store, device_id, now, seconds=RECENT_S):
    boots = []
    for event in store.events(kind="boot", device_id=device_id, limit=50):
        t = parse_iso(event["at"])
        if t is not None and now - t <= seconds:
            boots.append((t, (event["detail"] or {}).get("rst")))
    return boots


def stored_state(store, device_id):
    row = store.conn.execute("SELECT * FROM device_state WHERE device_id = ?",
                             (device_id,)).fetchone()
    if row is None:
        return None
    out = dict(row)
    out["reasons"] = json.loads(out["reasons"]) if out["reasons"] else {}
    return out


def current(store, device_id, now, limits=Limits()):
    """Judge one device from the store alone (what the CLI uses). `since` comes from the
    hub's recorded state when it agrees, else from the last time it was heard from."""
    health = store.health(device_id)
    samples = recent_samples(store, device_id, now)
    verdict = assess(device_id, health, samples, recent_boots(store, device_id, now), now,
                     limits)
    saved = stored_state(store, device_id)
    if saved and saved["state"] == verdict.state and saved["since"]:
        verdict.since = saved["since"]
    elif verdict.since is None and verdict.state != NEVER:
        verdict.since = verdict.last_seen
    return verdict


Change = collections.namedtuple("Change", "device_id window old new reasons at event_id detail")


class Monitor:
    """Samples births and heartbeats, records boots, and stores state changes as events.

    One per hub, on its own Store connection; `tick()` is called about once a second and
    returns the changes it recorded (already committed)."""

    def __init__(self, store, limits=Limits(), clock=time.time):
        self.store = store
        self.limits = limits
        self.clock = clock
        self._seen = {}          # device_id -> (last_seen, birth json, hb json)
        self._samples = {}       # device_id -> deque of recent samples
        self._boots = {}         # device_id -> list of (t, rst)
        self._latest = {}        # device_id -> newest reported fields
        self._unpruned = {}      # device_id -> samples written since its last pruning
        self._states = None      # device_id -> stored_state
        self._next_full = 0.0
        self._started = clock()

    def tick(self):
        now = self.clock()
        store = self.store
        if self._states is None:
            self._states = {r["device_id"]: stored_state(store, r["device_id"]) for r in
                            store.conn.execute("SELECT device_id FROM device_state").fetchall()}
        devices = store.conn.execute(
            "SELECT d.device_id, d.window, h.online, h.last_seen, h.last_birth, h.birth, h.hb "
            "FROM devices d LEFT JOIN device_health h ON h.device_id = d.device_id "
            "WHERE NOT d.retired ORDER BY d.device_id").fetchall()
        full = now >= self._next_full
        if full:
            self._next_full = now + FULL_CHECK_S
        work = []
        for row in devices:
            key = (row["online"], row["last_seen"], row["birth"], row["hb"])
            moved = self._seen.get(row["device_id"]) != key
            if moved or full or row["device_id"] not in self._states:
                work.append((row, key, moved))
        if not work:
            return []  # nothing new: no write transaction at all
        changes = []
        try:
            with store.transaction():
                for row, key, moved in work:
                    if moved:
                        self._observe(row["device_id"], row, now)
                    change = self._judge(row["device_id"], row, now)
                    if change is not None:
                        changes.append(change)
        except BaseException:
            # Rolled back: forget what was cached meanwhile, and read it again from the
            # store next time, so memory never runs ahead of what is committed.
            self._states = None
            self._samples.clear()
            self._boots.clear()
            self._latest.clear()
            raise
        # Marked seen only once committed: a failed tick is observed again next time.
        for row, key, moved in work:
            self._seen[row["device_id"]] = key
        return changes

    # -- samples and boots ------------------------------------------------------------------
    def _load(self, device_id, now):
        if device_id not in self._samples:
            self._samples[device_id] = collections.deque(
                recent_samples(self.store, device_id, now), maxlen=200)
            self._boots[device_id] = recent_boots(self.store, device_id, now)

    def _observe(self, device_id, row, now):
        self._load(device_id, now)
        old = self._seen.get(device_id)
        birth = json.loads(row["birth"]) if row["birth"] else None
        hb = json.loads(row["hb"]) if row["hb"] else None
        fresh = []
        if birth is not None and (old is None or old[2] != row["birth"]):
            fresh.append(("birth", birth))
            self._note_boot(device_id, birth, row["last_birth"], now)
        if hb is not None and (old is None or old[3] != row["hb"]):
            fresh.append(("hb", hb))
        # Both changed since the last look: the one with the longer uptime came last.
        fresh.sort(key=lambda kv: (_num(kv[1].get("up")) or 0, kv[0] == "hb"))
        for kind, fields in fresh:
            self._sample(device_id, kind, fields, now)
            self._latest[device_id] = fields

    def _note_boot(self, device_id, birth, last_birth, now):
        up = _num(birth.get("up"))
        if up is None or up > BOOT_UP_S:
            return  # a reconnect of a device that kept running
        # Recorded once per birth, across hub restarts too.
        done = self.store.conn.execute(
            "SELECT 1 FROM events WHERE device_id = ? AND kind = 'boot' AND at >= ?",
            (device_id, last_birth or "")).fetchone()
        if done:
            return
        rst = birth.get("rst")
        self.store.add_event(device_id, "boot", {"rst": rst, "fw": birth.get("fw"), "up": up})
        self._boots[device_id].append((now, rst))
        self._boots[device_id] = [b for b in self._boots[device_id] if now - b[0] <= RECENT_S]

    def _sample(self, device_id, kind, fields, now):
        samples = self._samples[device_id]
        if samples and samples[-1].get("kind") == kind and \
                samples[-1].get("up") == _num(fields.get("up")):
            return  # the same report seen again after a hub restart
        sample = {key: _num(fields.get(key)) for key in SAMPLE_FIELDS}
        stuck = fields.get("stuck") or []
        sample.update(t=now, kind=kind, stuck=list(stuck), disp=_num(fields.get("disp")))
        self.store.conn.execute(
            "INSERT INTO health_samples (device_id, at, t, up, heap, jd, old, rc, rssi, mis, clk,"
            " kind, stuck, disp) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (device_id, iso(now), now, sample["up"], sample["heap"], sample["jd"], sample["old"],
             sample["rc"], sample["rssi"], sample["mis"], sample["clk"], kind,
             ",".join(str(k) for k in stuck), sample["disp"]))
        samples.append(sample)
        self._unpruned[device_id] = self._unpruned.get(device_id, 0) + 1
        if self._unpruned[device_id] >= PRUNE_EVERY:
            # Bounded per device: drop what lies beyond the newest SAMPLES_KEPT.
            self._unpruned[device_id] = 0
            self.store.conn.execute(
                "DELETE FROM health_samples WHERE device_id = ? AND id <= (SELECT id FROM "
                "health_samples WHERE device_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (device_id, device_id, SAMPLES_KEPT))

    # -- verdicts ---------------------------------------------------------------------------
    def _judge(self, device_id, row, now):
        store = self.store
        if row["last_seen"] is None:
            health = None
        else:
            health = {"online": row["online"], "last_seen": row["last_seen"],
                      "birth": json.loads(row["birth"]) if row["birth"] else None,
                      "hb": json.loads(row["hb"]) if row["hb"] else None}
        self._load(device_id, now)
        samples = [s for s in self._samples[device_id] if now - s["t"] <= RECENT_S]
        verdict = assess(device_id, health, samples, self._boots[device_id], now, self.limits,
                         latest=self._latest.get(device_id), heard_floor=self._started)
        before = self._states.get(device_id)
        codes = verdict.reason_codes
        if before is not None and before["state"] == verdict.state and \
                sorted(before["reasons"]) == sorted(codes):
            if before["reasons"] != verdict.reasons:
                # Same verdict, new numbers (a deeper backlog): kept current, no event.
                store.conn.execute("UPDATE device_state SET reasons = ?, checked_at = ? "
                                   "WHERE device_id = ?",
                                   (json.dumps(verdict.reasons, sort_keys=True), iso(now),
                                    device_id))
                before["reasons"] = verdict.reasons
            return None
        at = iso(now)
        if verdict.state == OFFLINE and verdict.last_seen:
            # Offline since the device was last heard from, not since we noticed.
            since = verdict.last_seen
        elif before is not None and before["state"] == verdict.state:
            since = before["since"]  # only the reasons changed
        else:
            since = at
        store.conn.execute(
            "INSERT INTO device_state (device_id, state, reasons, since, checked_at) "
            "VALUES (?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET state = excluded.state,"
            " reasons = excluded.reasons, since = excluded.since, checked_at = excluded.checked_at",
            (device_id, verdict.state, json.dumps(verdict.reasons, sort_keys=True), since, at))
        old_state = before["state"] if before else None
        self._states[device_id] = {"device_id": device_id, "state": verdict.state,
                                   "reasons": verdict.reasons, "since": since, "checked_at": at}
        if old_state is None and verdict.state == NEVER:
            return None  # a new registration is not news
        detail = {"from": old_state, "to": verdict.state, "reasons": codes, "since": since}
        store.add_event(device_id, "state", detail)
        event_id = store.conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        return Change(device_id, row["window"] or "", old_state, verdict.state, verdict.reasons,
                      at, event_id, verdict)


EVENT_LABELS = {
    "birth": "连接上线", "will": "断开（遗嘱消息）", "state": "状态变化", "boot": "启动",
    "gap": "序号缺口（设备上有记录丢失）", "seq_reset": "序号回退", "bad_prompt": "无法解析评价请求",
}


def report(store, device_id, now, limits=Limits(), history=True):
    """Everything about one device for `pingjia hub device ID` and the device page: the
    registry row, the verdict, the newest fields and, with history, its events and samples.
    None when no such device is registered."""
    device = store.device(device_id)
    if device is None:
        return None
    verdict = current(store, device_id, now, limits)
    health = store.health(device_id) or {}
    out = {"device_id": device_id, "window": device["window"] or "", "label": device["label"],
           "retired": bool(device["retired"]), "last_birth": health.get("last_birth")}
    out.update(verdict.as_dict())
    if history:
        events = []
        for event in store.events(device_id=device_id, limit=100):
            event["label"] = EVENT_LABELS.get(event["kind"], event["kind"])
            events.append(event)
        out["events"] = events
        out["samples"] = [{k: s.get(k) for k in ("t", "at", "kind") + SAMPLE_FIELDS}
                          for s in sample_history(store, device_id)]
    return out
