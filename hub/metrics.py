"""/metrics: the hub in the Prometheus text exposition format (version 0.0.4).

Everything is read from the store at scrape time, so the numbers survive hub restarts and
agree with `pingjia hub status`: votes by kind and stars, rejections by reason, backlogs,
the province link, forward latency (histograms the dashboard's watcher fills as batches
are accepted), device states and what devices report, alerts and webhook deliveries.
No label ever carries personal data: devices, windows, reasons and states only.
"""
import math

from . import health as healthlib

# Seconds. A healthy path takes well under a second; an outage of the province hours.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)

LATENCY_HELP = {
    "forward": ("pingjia_forward_latency_seconds",
                "From the hub storing a record to the province accepting its batch."),
    "press_to_province": ("pingjia_press_to_province_seconds",
                          "From the citizen's key press (device clock) to the province "
                          "accepting the record."),
}
DEVICE_GAUGES = (
    ("jd", "pingjia_device_journal_depth", "Records in the device journal not yet acked."),
    ("old", "pingjia_device_oldest_unacked_seconds", "Age of the oldest unacked record."),
    ("heap", "pingjia_device_free_heap_bytes", "Free heap the device reported."),
    ("rssi", "pingjia_device_rssi_dbm", "Wi-Fi signal strength the device reported."),
    ("rc", "pingjia_device_reconnects", "Broker reconnects since the device booted."),
    ("mis", "pingjia_device_misuse_presses", "Misuse key presses since the device booted."),
    ("up", "pingjia_device_uptime_seconds", "Seconds since the device booted."),
)


def escape(value):
    """A label value as the text format wants it."""
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value):
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(value)


class Exposition:
    """Collects metric families; each family's HELP and TYPE come once, before its samples."""

    def __init__(self):
        self.lines = []

    def family(self, name, kind, help_text, samples):
        """samples: iterable of (labels dict or None, value[, name suffix])."""
        self.lines.append("# HELP %s %s" % (name, help_text.replace("\\", "\\\\")
                                            .replace("\n", " ")))
        self.lines.append("# TYPE %s %s" % (name, kind))
        for sample in samples:
            labels, value = sample[0], sample[1]
            suffix = sample[2] if len(sample) > 2 else ""
            if labels:
                text = ",".join('%s="%s"' % (k, escape(v)) for k, v in labels.items())
                self.lines.append("%s%s{%s} %s" % (name, suffix, text, _number(value)))
            else:
                self.lines.append("%s%s %s" % (name, suffix, _number(value)))

    def text(self):
        return "\n".join(self.lines) + "\n"


def bucket_label(le):
    return "%g" % le


def observe(buckets, seconds):
    """Count one latency into a cumulative histogram held as {bucket label: value}, with
    "+Inf" the count and "_sum" the sum (the rows of `latency_hist`)."""
    for le in LATENCY_BUCKETS:
        if seconds <= le:
            label = bucket_label(le)
            buckets[label] = buckets.get(label, 0) + 1
    buckets["+Inf"] = buckets.get("+Inf", 0) + 1
    buckets["_sum"] = buckets.get("_sum", 0.0) + seconds


def _histogram(store, name):
    rows = dict(store.conn.execute("SELECT bucket, value FROM latency_hist WHERE name = ?",
                                   (name,)).fetchall())
    samples = []
    for le in LATENCY_BUCKETS:
        label = bucket_label(le)
        samples.append(({"le": label}, int(rows.get(label, 0)), "_bucket"))
    total = int(rows.get("+Inf", 0))
    samples.append(({"le": "+Inf"}, total, "_bucket"))
    samples.append((None, float(rows.get("_sum", 0.0)), "_sum"))
    samples.append((None, total, "_count"))
    return samples


def render(store, hub_id, states=None, alert_counts=None, hub_health=None, dashboard=None,
           now=None):
    """The /metrics page. states: device_id -> state dict (dashboard._states());
    alert_counts: AlertBook.counts(); hub_health: {"mqtt": bool, "broker": bool}."""
    out = Exposition()
    status = store.status()
    conn = store.conn

    out.family("pingjia_hub_info", "gauge", "This hub.", [({"hub": hub_id}, 1)])
    if hub_health:
        out.family("pingjia_hub_up", "gauge", "1 when this part of the hub works.",
                   [({"part": part}, bool(ok)) for part, ok in sorted(hub_health.items())])

    votes = []
    for kind, stars, count in conn.execute(
            "SELECT kind, stars, count(*) FROM votes GROUP BY kind, stars ORDER BY kind, stars"):
        votes.append(({"kind": "vote" if kind == "v" else "unrated", "stars": stars}, count))
    out.family("pingjia_votes_total", "counter",
               "Records stored by the hub, by kind (vote or unrated) and stars.", votes)
    out.family("pingjia_votes_forwarded_total", "counter",
               "Records the province holds.", [(None, status["votes"]["forwarded"])])
    out.family("pingjia_rejections_total", "counter",
               "Inputs turned away, by reason (nothing is dropped silently).",
               [({"reason": r}, n) for r, n in sorted(status["rejections"].items())])
    out.family("pingjia_hub_counter_total", "counter",
               "Hub counters: stored, duplicate, gap_seqs, chain_errors, store_failed.",
               [({"name": k}, n) for k, n in sorted(status["counters"].items())])
    out.family("pingjia_gap_events_total", "counter",
               "Sequence gaps recorded (votes lost on a device before reaching the hub).",
               [(None, status["gap_events"])])

    backlog = status["backlog"]
    out.family("pingjia_backlog", "gauge",
               "Records or batches waiting: unacked, unforwarded, unbatched, unaccepted_batches.",
               [({"queue": q}, backlog[q]) for q in sorted(backlog)])
    province = status["province"]
    last_success = healthlib.parse_iso(province["last_success"])
    out.family("pingjia_province_last_success_timestamp_seconds", "gauge",
               "When the province last accepted a batch (0: never).",
               [(None, last_success or 0)])
    out.family("pingjia_province_pending_attempts", "gauge",
               "Tries so far of the batch the province has not accepted yet.",
               [(None, province["pending_attempts"])])
    out.family("pingjia_province_chain_error", "gauge",
               "1 while the province refuses the hub's chain.",
               [(None, bool(province["chain_error"]))])
    out.family("pingjia_province_records", "gauge",
               "Records the province refused, and records held back as unmappable.",
               [({"kind": "refused"}, province["refused_records"]),
                ({"kind": "held"}, province["held_records"])])
    for name, (metric, help_text) in LATENCY_HELP.items():
        out.family(metric, "histogram", help_text, _histogram(store, name))

    states = states or {}
    by_state = {s: 0 for s in healthlib.STATES}
    for state in states.values():
        by_state[state["state"]] = by_state.get(state["state"], 0) + 1
    out.family("pingjia_devices", "gauge", "Active devices by state.",
               [({"state": s}, n) for s, n in sorted(by_state.items())])
    out.family("pingjia_device_state", "gauge",
               "1 for the state each device is in (online, degraded, offline, never).",
               [({"device": d, "window": s["window"], "state": st}, s["state"] == st)
                for d, s in sorted(states.items()) for st in healthlib.STATES])
    out.family("pingjia_device_degraded", "gauge", "1 for each reason a device is degraded.",
               [({"device": d, "reason": r}, 1) for d, s in sorted(states.items())
                for r in s["reasons"]])
    fields = {}
    seen = {}
    for row in conn.execute("SELECT h.device_id, h.last_seen, h.birth, h.hb FROM device_health h"
                            " JOIN devices d ON d.device_id = h.device_id WHERE NOT d.retired "
                            "ORDER BY h.device_id"):
        health = store.health(row["device_id"])
        fields[row["device_id"]] = healthlib.latest_fields(health)
        seen[row["device_id"]] = healthlib.parse_iso(row["last_seen"])
    out.family("pingjia_device_last_seen_timestamp_seconds", "gauge",
               "When the hub last heard from each device.",
               [({"device": d}, t) for d, t in sorted(seen.items()) if t is not None])
    for key, metric, help_text in DEVICE_GAUGES:
        out.family(metric, "gauge", help_text,
                   [({"device": d}, f[key]) for d, f in sorted(fields.items())
                    if isinstance(f.get(key), int) and not isinstance(f.get(key), bool)])

    if alert_counts is not None:
        from .alerts import KINDS
        out.family("pingjia_alerts_open", "gauge",
                   "Alerts neither acknowledged nor resolved, by kind.",
                   [({"kind": k}, alert_counts["open"].get(k, 0)) for k in KINDS
                    if k != "recovered"])
        out.family("pingjia_alerts_total", "counter", "Alerts raised, by kind.",
                   [({"kind": k}, alert_counts["raised"].get(k, 0)) for k in KINDS])
        out.family("pingjia_webhook_alerts", "gauge",
                   "Alerts by webhook delivery state (off, pending, sent, failed).",
                   [({"state": s}, alert_counts["hooks"].get(s, 0))
                    for s in ("off", "pending", "sent", "failed")])
        out.family("pingjia_webhook_attempts_total", "counter", "Webhook POSTs tried.",
                   [(None, alert_counts["hook_attempts"])])
    if dashboard is not None:
        out.family("pingjia_dashboard_streams", "gauge", "Browsers on the live stream.",
                   [(None, dashboard["streams"])])
        out.family("pingjia_dashboard_stream_resyncs_total", "counter",
                   "Live streams that fell behind and were told to reload.",
                   [(None, dashboard["stream_resyncs"])])
        out.family("pingjia_dashboard_watch_errors_total", "counter",
                   "Watcher ticks that failed (retried a second later).",
                   [(None, dashboard["watch_errors"])])
    return out.text()
