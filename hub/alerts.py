"""Alerts for the hall manager: bad ratings and devices going offline or degraded.

An alert is a row in `alerts`, raised once per cause (`kind`, `ref` is unique: a vote
"<device>:<seq>", a state event "state:<id>"), so the watcher may see the same vote twice
(a hub restart) without alerting twice. Alerts show on the dashboard until a manager
acknowledges them (who and when are recorded) or, for device alerts, until the device is
back. When `dashboard.webhook_url` is set each alert is also POSTed there; the delivery
state lives in the same row, so retries (back-off 2 s doubling to 5 min, up to
`dashboard.webhook_attempts` tries) carry on after a hub restart.

Nothing here identifies the citizen: votes carry no evaluator identity. The webhook, which
may leave the hall's network, carries the window, staff number, item, stars and reasons,
but never the staff member's name or the case number (those stay on the dashboard).
"""
import asyncio
import hashlib
import hmac
import json
import logging
import time

from . import PingjiaError
from .health import DEGRADED, NEVER, OFFLINE, ONLINE, describe_reason
from .store import iso

log = logging.getLogger("pingjia.hub.alerts")

BAD_RATING = "bad_rating"
DEVICE_OFFLINE = "offline"
DEVICE_DEGRADED = "degraded"
RECOVERED = "recovered"
KINDS = (BAD_RATING, DEVICE_OFFLINE, DEVICE_DEGRADED, RECOVERED)
KIND_LABELS = {BAD_RATING: "差评", DEVICE_OFFLINE: "设备离线", DEVICE_DEGRADED: "设备异常",
               RECOVERED: "设备恢复"}
STAR_LABELS = {5: "非常满意", 4: "满意", 3: "基本满意", 2: "不满意", 1: "非常不满意"}

HOOK_OFF, HOOK_PENDING, HOOK_SENT, HOOK_FAILED = "off", "pending", "sent", "failed"
HOOK_BACKOFF_S = 2.0
HOOK_BACKOFF_MAX_S = 300.0
HOOK_TIMEOUT_S = 5.0
HOOK_BATCH = 10


class AlertError(PingjiaError):
    """An alert that does not exist or is not this manager's to see."""


def local_clock(offset_s):
    """"HH:MM" of unix seconds in the hall's time zone."""
    def hhmm(t):
        return time.strftime("%H:%M", time.gmtime(t + offset_s))
    return hhmm


def alert_view(row):
    """An alerts row as the dashboard and the webhook see it."""
    out = dict(row)
    out["detail"] = json.loads(out["detail"]) if out.get("detail") else {}
    out["open"] = out["acked_at"] is None and out["resolved_at"] is None and \
        out["kind"] != RECOVERED
    out["kind_label"] = KIND_LABELS.get(out["kind"], out["kind"])
    return out


class AlertBook:
    """Raises, lists and acknowledges alerts over one Store.

    hall_of(window) names the hall a window belongs to; webhook says whether new alerts
    are queued for the webhook."""

    def __init__(self, store, hall_of, clock=time.time, webhook=False):
        self.store = store
        self.hall_of = hall_of
        self.clock = clock
        self.webhook = webhook

    # -- raising ----------------------------------------------------------------------------
    def _insert(self, kind, ref, device_id, window, detail, resolved=False):
        """Insert once; returns the new alert, or None if this cause was raised before.
        Caller holds a transaction."""
        at = iso(self.clock())
        cur = self.store.conn.execute(
            "INSERT OR IGNORE INTO alerts (at, hall, kind, ref, device_id, window, detail,"
            " resolved_at, hook_state, hook_attempts, hook_next_at) VALUES (?,?,?,?,?,?,?,?,?,0,?)",
            (at, self.hall_of(window), kind, ref, device_id, window,
             json.dumps(detail, ensure_ascii=False, sort_keys=True), at if resolved else None,
             HOOK_PENDING if self.webhook else HOOK_OFF, self.clock()))
        if not cur.rowcount:
            return None
        return self.get(cur.lastrowid)

    def for_votes(self, votes):
        """Alerts for the bad ratings among these votes (dicts as dashboard.vote_view makes
        them). Caller holds a transaction."""
        raised = []
        for vote in votes:
            if vote["kind"] != "v" or not 1 <= vote["stars"] <= 2:
                continue
            detail = {key: vote.get(key) for key in (
                "seq", "t", "stars", "stars_label", "reasons", "cat_ver", "staff_no",
                "staff_name", "item", "case_no")}
            alert = self._insert(BAD_RATING, "%s:%d" % (vote["device_id"], vote["seq"]),
                                 vote["device_id"], vote["window"], detail)
            if alert is not None:
                raised.append(alert)
        return raised

    def for_change(self, change):
        """Alerts for a device's change of state (health.Change). Caller holds a transaction.
        Returns the alerts raised or updated."""
        if change.old is None or change.new == NEVER:
            return []  # the first verdict on a device, or a new registration: not news
        touched = []
        verdict = change.detail
        detail = {"from": change.old, "to": change.new, "since": verdict.since,
                  "reasons": verdict.reason_codes,
                  "reason_labels": [describe_reason(r, verdict.reasons[r])
                                    for r in verdict.reason_codes],
                  "cause": verdict.cause}
        if change.new == OFFLINE:
            touched += self._resolve(change.device_id, (DEVICE_DEGRADED,))
            alert = self._insert(DEVICE_OFFLINE, "state:%d" % change.event_id, change.device_id,
                                 change.window, detail)
            touched += [alert] if alert else []
        elif change.new == DEGRADED:
            touched += self._resolve(change.device_id, (DEVICE_OFFLINE,))
            current = self._open_for(change.device_id, DEVICE_DEGRADED)
            if current is not None:
                # Still the same trouble in other words: one alert, kept up to date.
                self.store.conn.execute("UPDATE alerts SET detail = ? WHERE id = ?",
                                        (json.dumps(detail, ensure_ascii=False, sort_keys=True),
                                         current["id"]))
                touched.append(self.get(current["id"]))
            else:
                alert = self._insert(DEVICE_DEGRADED, "state:%d" % change.event_id,
                                     change.device_id, change.window, detail)
                touched += [alert] if alert else []
        elif change.new == ONLINE:
            resolved = self._resolve(change.device_id, (DEVICE_OFFLINE, DEVICE_DEGRADED))
            touched += resolved
            if change.old in (OFFLINE, DEGRADED):
                alert = self._insert(RECOVERED, "state:%d" % change.event_id, change.device_id,
                                     change.window, detail, resolved=True)
                touched += [alert] if alert else []
        return touched

    def _open_for(self, device_id, kind):
        row = self.store.conn.execute(
            "SELECT * FROM alerts WHERE device_id = ? AND kind = ? AND acked_at IS NULL AND "
            "resolved_at IS NULL ORDER BY id DESC LIMIT 1", (device_id, kind)).fetchone()
        return alert_view(row) if row else None

    def _resolve(self, device_id, kinds):
        rows = self.store.conn.execute(
            "SELECT id FROM alerts WHERE device_id = ? AND resolved_at IS NULL AND kind IN (%s)"
            % ",".join("?" * len(kinds)), (device_id,) + tuple(kinds)).fetchall()
        at = iso(self.clock())
        for (alert_id,) in rows:
            self.store.conn.execute("UPDATE alerts SET resolved_at = ? WHERE id = ?",
                                    (at, alert_id))
        return [self.get(alert_id) for (alert_id,) in rows]

    # -- reading and acknowledging ---------------------------------------------------------
    def get(self, alert_id):
        row = self.store.conn.execute("SELECT * FROM alerts WHERE id = ?",
                                      (alert_id,)).fetchone()
        return alert_view(row) if row else None

    def listing(self, hall=None, open_only=False, since=None, limit=100):
        """Alerts newest first; hall=None means every hall."""
        sql = "SELECT * FROM alerts WHERE 1"
        params = []
        if hall is not None:
            sql += " AND hall = ?"
            params.append(hall)
        if open_only:
            sql += " AND acked_at IS NULL AND resolved_at IS NULL AND kind != ?"
            params.append(RECOVERED)
        if since is not None:
            sql += " AND (at >= ? OR (acked_at IS NULL AND resolved_at IS NULL AND kind != ?))"
            params += [since, RECOVERED]
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        return [alert_view(r) for r in self.store.conn.execute(sql, params).fetchall()]

    def ack(self, alert_id, manager, hall=None):
        """A manager acknowledges an alert: who and when are recorded once; acknowledging
        again changes nothing. hall=None: a manager who sees every hall."""
        alert = self.get(alert_id)
        if alert is None or (hall is not None and alert["hall"] != hall):
            raise AlertError("alert %s: no such alert in this hall" % alert_id)
        if alert["acked_at"] is None:
            with self.store.transaction():
                self.store.conn.execute(
                    "UPDATE alerts SET acked_by = ?, acked_at = ? "
                    "WHERE id = ? AND acked_at IS NULL", (manager, iso(self.clock()), alert_id))
            alert = self.get(alert_id)
            log.info("alert %d (%s) acknowledged", alert_id, alert["kind"])
        return alert

    def counts(self):
        """(kind, open count) and webhook delivery counts, for /metrics."""
        conn = self.store.conn
        open_by_kind = dict(conn.execute(
            "SELECT kind, count(*) FROM alerts WHERE acked_at IS NULL AND resolved_at IS NULL "
            "AND kind != ? GROUP BY kind", (RECOVERED,)).fetchall())
        raised = dict(conn.execute("SELECT kind, count(*) FROM alerts GROUP BY kind").fetchall())
        hooks = dict(conn.execute("SELECT hook_state, count(*) FROM alerts GROUP BY hook_state")
                     .fetchall())
        attempts = conn.execute("SELECT coalesce(sum(hook_attempts), 0) FROM alerts").fetchone()[0]
        return {"open": open_by_kind, "raised": raised, "hooks": hooks, "hook_attempts": attempts}


# -- the webhook -----------------------------------------------------------------------------

def alert_text(alert, hhmm):
    """The one message a webhook carries: Chinese, without names or case numbers."""
    d = alert["detail"]
    where = "窗口 %s" % alert["window"] if alert["window"] else "未分配窗口"
    if alert["kind"] == BAD_RATING:
        parts = ["【差评】%s" % where]
        if d.get("staff_no"):
            parts.append("工号 %s" % d["staff_no"])
        parts.append("%s(%d星)" % (STAR_LABELS.get(d.get("stars"), ""), d.get("stars") or 0))
        labels = [r.get("label") or r.get("code") for r in d.get("reasons") or []]
        if labels:
            parts.append("原因：" + "、".join(labels))
        if d.get("item"):
            parts.append("事项：" + d["item"])
        if d.get("t"):
            parts.append(hhmm(d["t"]))
        return " · ".join(parts)
    device = "评价器 %s" % alert["device_id"]
    if alert["kind"] == DEVICE_OFFLINE:
        why = "（未收到心跳）" if d.get("cause") == "silent" else ""
        return "【设备离线】%s %s 已离线%s" % (where, device, why)
    if alert["kind"] == DEVICE_DEGRADED:
        return "【设备异常】%s %s：%s" % (where, device, "、".join(d.get("reason_labels") or []))
    return "【设备恢复】%s %s 已恢复%s" % (where, device,
                                      "正常" if d.get("to") == ONLINE else "连接")


class Webhook:
    """POSTs pending alerts to `url`; `deliver_due()` is called by the dashboard about once
    a second and sends what is due, each with its own retry schedule."""

    def __init__(self, url, fmt="json", secret="", attempts=8, hub_id="", hhmm=None,
                 clock=time.time, timeout_s=HOOK_TIMEOUT_S):
        self.url = url
        self.fmt = fmt
        self._secret = secret.encode() if secret else b""
        self.attempts = attempts
        self.hub_id = hub_id
        self.hhmm = hhmm or local_clock(8 * 3600)
        self.clock = clock
        self.timeout_s = timeout_s

    def body(self, alert):
        text = alert_text(alert, self.hhmm)
        if self.fmt == "text":
            message = {"msgtype": "text", "text": {"content": text}}
        else:
            d = alert["detail"]
            message = {"id": alert["id"], "kind": alert["kind"], "title": alert["kind_label"],
                       "text": text, "hub": self.hub_id, "hall": alert["hall"],
                       "at": alert["at"], "window": alert["window"],
                       "device_id": alert["device_id"]}
            if alert["kind"] == BAD_RATING:
                message.update(stars=d.get("stars"), staff_no=d.get("staff_no"),
                               item=d.get("item"), rated_at=d.get("t"),
                               reasons=[{"code": r.get("code"), "label": r.get("label")}
                                        for r in d.get("reasons") or []])
            else:
                message.update(state=d.get("to"), reasons=d.get("reasons") or [],
                               reason_labels=d.get("reason_labels") or [])
        return json.dumps(message, ensure_ascii=False, sort_keys=True).encode("utf-8")

    def headers(self, body):
        out = {"Content-Type": "application/json; charset=utf-8",
               "User-Agent": "pingjia-hub"}
        if self._secret:
            digest = hmac.new(self._secret, body, hashlib.sha256).hexdigest()
            out["X-Pingjia-Signature"] = "sha256=" + digest
        return out

    def backoff(self, attempts):
        return min(HOOK_BACKOFF_S * (2 ** max(attempts - 1, 0)), HOOK_BACKOFF_MAX_S)

    async def deliver_due(self, store, session):
        """Send every alert whose next try is due; returns (sent, failed for good, retrying)."""
        import aiohttp

        now = self.clock()
        rows = store.conn.execute(
            "SELECT * FROM alerts WHERE hook_state = ? AND coalesce(hook_next_at, 0) <= ? "
            "ORDER BY id LIMIT ?", (HOOK_PENDING, now, HOOK_BATCH)).fetchall()
        sent = failed = retrying = 0
        for row in rows:
            alert = alert_view(row)
            body = self.body(alert)
            error = None
            try:
                async with session.post(self.url, data=body, headers=self.headers(body),
                                        timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                        allow_redirects=False) as resp:
                    await resp.read()
                    if not 200 <= resp.status < 300:
                        error = "HTTP %d" % resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                error = exc.__class__.__name__
            attempts = alert["hook_attempts"] + 1
            if error is None:
                state, next_at = HOOK_SENT, None
                sent += 1
            elif attempts >= self.attempts:
                state, next_at = HOOK_FAILED, None
                failed += 1
                log.warning("webhook: alert %d not delivered after %d tries: %s",
                            alert["id"], attempts, error)
            else:
                state, next_at = HOOK_PENDING, self.clock() + self.backoff(attempts)
                retrying += 1
            with store.transaction():
                store.conn.execute(
                    "UPDATE alerts SET hook_state = ?, hook_attempts = ?, hook_next_at = ?,"
                    " hook_error = ? WHERE id = ?", (state, attempts, next_at, error, alert["id"]))
        return sent, failed, retrying

