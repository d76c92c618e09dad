"""Votes that look wrong at the hub: flagged and counted for the hall manager, never deleted.

The device already refuses what it can see (repeated presses, presses with no prompt, rapid
series: docs/rating.md, "Misuse"). What only the hub can see is the pattern across votes:

- `burst`: `burst_count` top ratings within `burst_window_s` at one window. 刷好评: a run
  of top ratings nobody could have earned that fast.
- `rate`: more than `rate_max` ratings from separate visits within `rate_window_s` at one
  window. No counter serves citizens that fast; one visit's batch or per-item ratings
  count once.
- `no_prompt`: a vote answering a prompt the hub never sent to that device.
- `before_prompt`: pressed more than `clock_slack_s` before its prompt was created.
- `repeat_pid`: a second record for a prompt that already has one (one service, one
  rating).

Thresholds come from the jurisdiction profile's "suspicion" section (hub/policy.py
SUSPICION_DEFAULTS). A flag is a row in `vote_flags` (detail, window, staff, stars, time) and
a mark "suspect:<kind>" in the vote's `flags` column; the vote itself is stored and forwarded
as it came, so the province still has every rating and the hall manager decides.
"""
import datetime

KINDS = ("burst", "rate", "no_prompt", "before_prompt", "repeat_pid")
FLAG_PREFIX = "suspect:"


def _iso(t):
    moment = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class Checker:
    """Checks each new vote against the votes before it, over one store connection.

    `visit_of(device_id, pid)` names the visit a prompt belongs to (a batch or a themed
    visit's prompts share one), so one citizen's several ratings count as one for `rate`.
    """

    def __init__(self, store, rules, visit_of=None, is_derived=None):
        self.store = store
        self.rules = rules
        self.visit_of = visit_of or (lambda device_id, pid: (device_id, pid))
        self.is_derived = is_derived or (lambda device_id: False)

    def check(self, vote, prompt):
        """[(kind, detail, [(device_id, seq), …])] for one stored vote row (a dict with the
        votes table's columns); prompt is its prompts row (or None)."""
        found = []
        if vote["kind"] != "v":
            return found
        key = (vote["device_id"], vote["seq"])
        rules = self.rules
        if prompt is None or prompt["device_id"] != vote["device_id"]:
            found.append(("no_prompt", "prompt %s was never sent to this device" % vote["pid"],
                          [key]))
        else:
            created = _unix(prompt.get("created_at"))
            if created is not None and vote["t"] < created - rules["clock_slack_s"]:
                found.append(("before_prompt", "pressed %d s before prompt %s was created"
                              % (created - vote["t"], vote["pid"]), [key]))
            earlier = self.store.conn.execute(
                "SELECT count(*) FROM votes WHERE device_id = ? AND pid = ? AND seq < ?",
                (vote["device_id"], vote["pid"], vote["seq"])).fetchone()[0]
            if earlier:
                found.append(("repeat_pid", "prompt %s already had a record" % vote["pid"],
                              [key]))
        window = vote.get("window") or ""
        if window:
            found.extend(self._window_patterns(vote, window))
        return found

    def _recent(self, window, since, until):
        rows = self.store.conn.execute(
            "SELECT device_id, seq, pid, stars, t FROM votes WHERE window = ? AND kind = 'v' "
            "AND t >= ? AND t <= ? ORDER BY t, seq", (window, since, until)).fetchall()
        return [dict(r) for r in rows if not self.is_derived(r["device_id"])]

    def _window_patterns(self, vote, window):
        rules = self.rules
        found = []
        top = rules["top_stars"]
        if vote["stars"] >= top:
            span = rules["burst_window_s"]
            run = [r for r in self._recent(window, vote["t"] - span, vote["t"])
                   if r["stars"] >= top]
            if len(run) >= rules["burst_count"]:
                found.append(("burst", "%d top ratings within %d s at window %s"
                              % (len(run), span, window),
                              [(r["device_id"], r["seq"]) for r in run]))
        span = rules["rate_window_s"]
        recent = self._recent(window, vote["t"] - span, vote["t"])
        visits = {}
        for r in recent:
            visits.setdefault(self.visit_of(r["device_id"], r["pid"]), []).append(r)
        if len(visits) > rules["rate_max"]:
            found.append(("rate", "ratings from %d visits within %d s at window %s"
                          % (len(visits), span, window),
                          [(r["device_id"], r["seq"]) for r in recent]))
        return found

    def record(self, findings, now):
        """Write the flags (caller holds a transaction); returns how many were new."""
        conn = self.store.conn
        new = 0
        for kind, detail, keys in findings:
            for device_id, seq in keys:
                row = conn.execute("SELECT window, staff_no, stars, t, flags FROM votes "
                                   "WHERE device_id = ? AND seq = ?", (device_id, seq)).fetchone()
                if row is None:
                    continue
                cur = conn.execute(
                    "INSERT OR IGNORE INTO vote_flags (device_id, seq, kind, detail, window,"
                    " staff_no, stars, t, flagged_at) VALUES (?,?,?,?,?,?,?,?,?)",
                    (device_id, seq, kind, detail, row["window"] or "", row["staff_no"] or "",
                     row["stars"], row["t"], _iso(now)))
                if not cur.rowcount:
                    continue
                new += 1
                self.store.bump("suspect_" + kind)
                marks = [m for m in (row["flags"] or "").split(",") if m]
                mark = FLAG_PREFIX + kind
                if mark not in marks:
                    marks.append(mark)
                    conn.execute("UPDATE votes SET flags = ? WHERE device_id = ? AND seq = ?",
                                 (",".join(marks), device_id, seq))
        return new


def _unix(iso_text):
    if not iso_text:
        return None
    try:
        moment = datetime.datetime.strptime(iso_text[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return None
    return int(moment.replace(tzinfo=datetime.timezone.utc).timestamp())


def counts(store):
    """{kind: number of flagged votes} for every kind (zeros included)."""
    out = {kind: 0 for kind in KINDS}
    for kind, n in store.conn.execute("SELECT kind, count(*) FROM vote_flags GROUP BY kind"):
        out[kind] = n
    return out


def listing(store, kind=None, window=None, limit=100, before_id=None):
    """Newest flags first, each with its vote's identity; for GET /api/v1/flags."""
    sql = "SELECT * FROM vote_flags WHERE 1"
    params = []
    if kind:
        sql += " AND kind = ?"
        params.append(kind)
    if window:
        sql += " AND window = ?"
        params.append(window)
    if before_id:
        sql += " AND id < ?"
        params.append(before_id)
    sql += " ORDER BY id DESC LIMIT ?"
    params.append(limit)
    out = []
    for row in store.conn.execute(sql, params):
        out.append({"id": row["id"], "kind": row["kind"], "detail": row["detail"],
                    "vote_id": "%s:%d" % (row["device_id"], row["seq"]),
                    "device_id": row["device_id"], "seq": row["seq"], "window": row["window"],
                    "staff_no": row["staff_no"], "stars": row["stars"],
                    "pressed_at": _iso(row["t"]) if row["t"] is not None else None,
                    "flagged_at": row["flagged_at"]})
    return out
