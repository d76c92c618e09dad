"""The hub's own audit trail and hall statistics.

verify_hub re-checks the hub's batches table the way the province checks its copy:
signatures (with the keyring and the rotation statements in the chain), chain links, gaps,
and every stored vote against the signed record that carries it. It names each batch or
vote that is missing or altered.

Hall statistics (好评率 per window, staff, item and department; counts by level; unrated;
default-rated) come from the stored votes, and can be computed again from the batches'
signed records alone: the two agree unless something was changed after the fact.
docs/province.md "The hub's audit trail" is the reference.
"""
import csv
import datetime
import io
import json

from . import PingjiaError
from . import batch as batchlib

DIMENSIONS = ("hall", "window", "staff", "item", "department")
LEVELS = (5, 4, 3, 2, 1)
CSV_COLUMNS = ("dimension", "key", "name", "votes", "level_5", "level_4", "level_3", "level_2",
               "level_1", "good", "bad", "good_rate", "unrated", "default_rated",
               "default_stars", "good_rate_with_default")
# A default rating the hub applied itself (jurisdictions where the hall applies it) is a
# record under the identity "<device>.default" (hub/business.py derived_device): it counts
# as default-rated, not as a vote, in both the stored votes and the chain.
HALL_DEFAULT_SUFFIX = ".default"
# The signed record fields a stored vote must still agree with.
COMPARED = ("voteId", "deviceNo", "rated", "satisfaction", "evalDetail", "assessTime",
            "projectNo", "proManagerNo", "taskCode", "deptCode", "windowNo")


class AuditError(PingjiaError):
    """The audit cannot run: an unreadable store, profile or time."""


# ---------------------------------------------------------------- verify

class _Profiles:
    """Profiles by the name a batch gives, loaded once each."""

    def __init__(self):
        self._cache = {}

    def get(self, name):
        if name not in self._cache:
            try:
                self._cache[name] = batchlib.load_profile(name)
            except batchlib.ProfileError as exc:
                self._cache[name] = exc
        return self._cache[name]


def verify_hub(store, hub_id, trusted):
    """Re-check the hub's batches and the votes they carry. Returns a report dict.

    trusted: {key_id: public key}, normally hub.keys.keyring_public_keys(path). Problems:
    missing, altered, chain (as the province's verify), and per vote record_missing (the
    vote row names a batch that does not hold it), record_altered (it no longer agrees with
    its signed record), record_deleted (a signed record whose vote row is gone) and
    record_moved (the vote row now names another batch).
    """
    conn = store.conn
    rows = {r["n"]: dict(r) for r in conn.execute(
        "SELECT n, batch_id, prev, hash, body, records FROM batches ORDER BY n")}
    votes = _vote_rows(store, "chained")
    claimed = {}
    for vote in votes:
        claimed.setdefault(vote["batch_n"], []).append(vote)
    top = max(list(rows) + list(claimed) + [0])
    problems, keys, profiles = [], batchlib.ChainKeys(hub_id, dict(trusted).get), _Profiles()
    real_hash, intact = {}, set()
    records_total = 0

    def problem(kind, n, detail, vote_id=None):
        entry = {"problem": kind, "batch_id": "%s-%d" % (hub_id, n), "n": n, "detail": detail}
        if vote_id is not None:
            entry["voteId"] = vote_id
        problems.append(entry)

    for n in range(1, top + 1):
        row = rows.get(n)
        if row is None:
            why = "batch is not in the store"
            if n in claimed:
                why += " (%d stored votes name it)" % len(claimed[n])
            problem("missing", n, why)
            continue
        why, body = _check_batch(row, hub_id, keys)
        if body is not None:
            real_hash[n] = batchlib.batch_hash(body)
        if why is not None:
            problem("altered", n, why)
        else:
            intact.add(n)
        if body is not None:
            prev = body.get("prev")
            if n == 1 and prev != batchlib.GENESIS:
                problem("chain", n, "batch 1 does not start from the genesis hash")
            elif n > 1 and n - 1 in intact and prev != real_hash.get(n - 1):
                problem("chain", n, "prev does not match batch %s-%d as stored" % (hub_id, n - 1))
            records = body.get("records")
            if isinstance(records, list):
                records_total += len(records)
                for record_problem in _check_votes(body, claimed.get(n, []), profiles, store):
                    problem(*record_problem)
    for n in sorted(rows):
        if n < 1:
            problem("chain", n, "batch number outside the chain")
    return {
        "ok": not problems,
        "hub": hub_id,
        "batches": len(rows),
        "records": records_total,
        "votes_in_batches": len(votes),
        "top": top,
        "problems": problems,
    }


def _check_batch(row, hub_id, keys):
    """(reason or None, parsed body or None) for one stored batch."""
    try:
        body = json.loads(row["body"])
    except (TypeError, ValueError):
        return "stored body is not JSON", None
    if not isinstance(body, dict):
        return "stored body is not a JSON object", None
    keys.learn(body.get("rotations"))
    try:
        digest = batchlib.batch_hash(body)
    except batchlib.BatchError:
        return "stored body is not plain JSON", None
    if digest != row["hash"]:
        return "stored body does not match its recorded hash", body
    if (body.get("batch_id"), body.get("n"), body.get("prev"), body.get("hub")) != \
            (row["batch_id"], row["n"], row["prev"], hub_id):
        return "batch columns disagree with the signed body", body
    if not isinstance(body.get("records"), list) or len(body["records"]) != row["records"]:
        return "record count disagrees with the batches table", body
    kid = body.get("key_id")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        return "signed by key %s, which is not in the keyring or the chain" % kid, body
    if kid in keys.retired:
        return "signed by key %s, retired by the rotation in %s" % (kid, keys.retired[kid]), body
    if not batchlib.verify_batch(body, key):
        return "signature does not verify", body
    keys.signed(kid, body["batch_id"])
    return None, body


def _check_votes(body, votes, profiles, store):
    """Problems (kind, n, detail, voteId) between a signed batch and the votes naming it."""
    n = body.get("n")
    profile = profiles.get(body.get("profile"))
    if isinstance(profile, Exception):
        return [("altered", n, "its profile %r cannot be read: %s" % (body.get("profile"),
                                                                     profile))]
    signed = {}
    for record in body["records"]:
        national = batchlib.national_form(record, profile)
        if isinstance(national, dict) and isinstance(national.get("voteId"), str):
            signed[national["voteId"]] = national
    out = []
    prompts = store.prompts_by_pid([v["pid"] for v in votes])
    seen = set()
    for vote in votes:
        vote_id = "%s:%s" % (vote["device_id"], vote["seq"])
        seen.add(vote_id)
        record = signed.get(vote_id)
        if record is None:
            out.append(("record_missing", n, "the vote names this batch, which does not hold it",
                        vote_id))
            continue
        prompt = prompts.get(vote["pid"])
        if prompt is not None and prompt["device_id"] != vote["device_id"]:
            prompt = None
        try:
            expected = batchlib.national_form(batchlib.map_record(vote, prompt, profile), profile)
        except batchlib.MappingError as exc:
            out.append(("record_altered", n, "the stored vote no longer maps: %s" % exc, vote_id))
            continue
        differ = [f for f in COMPARED if (f in expected or f in record)
                  and expected.get(f) != record.get(f)]
        if differ:
            out.append(("record_altered", n, "stored vote differs from its signed record in %s"
                        % ", ".join(differ), vote_id))
    for vote_id in signed:
        if vote_id in seen:
            continue
        device_id, _, seq = vote_id.rpartition(":")
        row = store.conn.execute("SELECT batch_n FROM votes WHERE device_id = ? AND seq = ?",
                                 (device_id, int(seq) if seq.isdigit() else -1)).fetchone()
        if row is None:
            out.append(("record_deleted", n, "signed record whose vote is not in the store",
                        vote_id))
        else:
            out.append(("record_moved", n, "its vote now names batch %s" % row[0], vote_id))
    return out


# ---------------------------------------------------------------- statistics

def _vote_rows(store, scope):
    where = {"stored": "1", "chained": "v.batch_n > 0"}[scope]
    return [dict(r) for r in store.conn.execute(
        "SELECT v.device_id, v.seq, v.t, v.kind, v.pid, v.case_no, v.stars, v.reasons, "
        "v.window, v.staff_no, v.batch_n FROM votes v WHERE %s ORDER BY v.rowid" % where)]


def services_from_votes(store, scope="stored"):
    """One neutral service record per stored vote (scope "stored": every vote; "chained":
    only votes in a batch), with the prompt's item, department and staff name."""
    votes = _vote_rows(store, scope)
    prompts = store.prompts_by_pid([v["pid"] for v in votes])
    out = []
    for vote in votes:
        prompt = prompts.get(vote["pid"])
        if prompt is not None and prompt["device_id"] != vote["device_id"]:
            prompt = None
        prompt = prompt or {}
        out.append({
            "vote_id": "%s:%s" % (vote["device_id"], vote["seq"]),
            "hall_default": vote["device_id"].endswith(HALL_DEFAULT_SUFFIX),
            "device": vote["device_id"],
            "case_no": vote["case_no"] or "",
            "rated": vote["kind"] == "v",
            "stars": vote["stars"] if vote["kind"] == "v" else None,
            "t": vote["t"],
            "window": vote["window"] or "",
            "staff_no": vote["staff_no"] or "",
            "staff_name": prompt.get("staff_name") or "",
            "task_code": prompt.get("task_code") or "",
            "task_name": prompt.get("task_name") or "",
            "dept_code": prompt.get("dept_code") or "",
        })
    return out


def services_from_chain(store, device_windows=None):
    """The same neutral records read from the batches' signed records alone.

    A profile without a window field (national) gives no window: device_windows
    ({device_id: window}, e.g. the hub's device registry) fills it in from deviceNo.
    """
    device_windows = device_windows or {}
    profiles, out, seen = _Profiles(), [], set()
    for (body_text,) in store.conn.execute("SELECT body FROM batches ORDER BY n"):
        try:
            body = json.loads(body_text)
        except (TypeError, ValueError):
            continue
        if not isinstance(body, dict) or not isinstance(body.get("records"), list):
            continue
        profile = profiles.get(body.get("profile"))
        if isinstance(profile, Exception):
            raise AuditError("batch %s: profile %r cannot be read: %s"
                             % (body.get("batch_id"), body.get("profile"), profile))
        for record in body["records"]:
            national = batchlib.national_form(record, profile)
            if not isinstance(national, dict) or national.get("voteId") in seen:
                continue
            seen.add(national.get("voteId"))
            out.append(_service(national, profile, device_windows))
    return out


def _service(national, profile, device_windows):
    rated = national.get("rated") == 1
    stars = None
    if rated:
        try:
            stars = int(national.get("satisfaction"))
        except (TypeError, ValueError):
            stars = None
    device = national.get("deviceNo")
    device = device if isinstance(device, str) else ""
    window = national.get("windowNo")
    if window is None:
        # Records the hub derived ("<device>.<why>") stand at their device's window.
        window = device_windows.get(device)
        if window is None:
            window = device_windows.get(device.rpartition(".")[0], "")
    return {
        "vote_id": national.get("voteId"),
        "hall_default": device.endswith(HALL_DEFAULT_SUFFIX),
        "device": device,
        "case_no": national.get("projectNo") or "",
        "rated": rated,
        "stars": stars,
        "t": batchlib.record_time(national, profile),
        "window": window or "",
        "staff_no": national.get("proManagerNo") or "",
        "staff_name": national.get("proManager") or "",
        "task_code": national.get("taskCode") or "",
        "task_name": national.get("taskName") or "",
        "dept_code": national.get("deptCode") or "",
    }


def _keys(service, hub_id):
    return {
        "hall": (hub_id, ""),
        "window": (service["window"], ""),
        "staff": (service["staff_no"], service["staff_name"]),
        "item": (service["task_code"], service["task_name"]),
        "department": (service["dept_code"], ""),
    }


def hall_stats(services, jurisdiction, hub_id, at, dimensions=DIMENSIONS, bad_max_stars=2):
    """Rows of statistics per dimension and key, computed at unix time `at`.

    jurisdiction: the hub's counter rules (a hub.policy.Jurisdiction: default_due(t) and
    default_stars), or None when unrated services never count as rated.
    votes: rated on site; level_N: votes with N stars; good/bad split at bad_max_stars;
    unrated: not rated and still inside the default-rating period; default_rated: not rated
    and past it, counted at the jurisdiction's default level (default_stars), plus default
    ratings the hub recorded itself (HALL_DEFAULT_SUFFIX);
    good_rate = good / votes; good_rate_with_default counts default ratings as ratings at
    their level.
    """
    for dim in dimensions:
        if dim not in DIMENSIONS:
            raise AuditError("unknown dimension %r (one of %s)" % (dim, ", ".join(DIMENSIONS)))
    bad_max = bad_max_stars
    default_stars = getattr(jurisdiction, "default_stars", None)
    # The device's own unrated record of a service the hub then default-rated is the same
    # service: count it once, as default-rated.
    superseded = {(s["device"][:-len(HALL_DEFAULT_SUFFIX)], s["case_no"]) for s in services
                  if s.get("hall_default") and s.get("case_no")}
    table = {}
    for service in services:
        if not service["rated"] and (service.get("device"), service.get("case_no")) in superseded:
            continue
        keys = _keys(service, hub_id)
        if service.get("hall_default"):
            outcome = "default"
        elif service["rated"]:
            outcome = service["stars"]
        else:
            deadline = jurisdiction.default_due(service["t"]) \
                if jurisdiction is not None and service["t"] is not None else None
            outcome = "default" if deadline is not None and at >= deadline else "unrated"
        for dim in dimensions:
            key, name = keys[dim]
            row = table.get((dim, key))
            if row is None:
                row = table[(dim, key)] = dict(
                    {c: 0 for c in CSV_COLUMNS[3:]}, dimension=dim, key=key, name="")
            if name:
                row["name"] = name
            if outcome == "unrated":
                row["unrated"] += 1
            elif outcome == "default":
                row["default_rated"] += 1
            elif isinstance(outcome, int) and 1 <= outcome <= 5:
                row["votes"] += 1
                row["level_%d" % outcome] += 1
                row["good" if outcome > bad_max else "bad"] += 1
    rows = []
    order = {dim: i for i, dim in enumerate(DIMENSIONS)}
    for (dim, key), row in sorted(table.items(), key=lambda item: (order[item[0][0]],
                                                                    item[0][1])):
        row["default_stars"] = default_stars
        row["good_rate"] = _rate(row["good"], row["votes"])
        default_good = row["default_rated"] if default_stars and default_stars > bad_max else 0
        row["good_rate_with_default"] = _rate(row["good"] + default_good,
                                              row["votes"] + row["default_rated"])
        rows.append({c: row[c] for c in CSV_COLUMNS})
    return rows


def _rate(good, total):
    return round(good / total, 4) if total else None


def stats_csv(rows):
    """The rows as CSV text (rates with four decimals, empty when there is nothing to rate)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(["" if row[c] is None else
                         ("%.4f" % row[c] if c.startswith("good_rate") else row[c])
                         for c in CSV_COLUMNS])
    return buffer.getvalue()


def device_windows(store):
    """{device_id: window} from the hub's device registry."""
    return {r[0]: r[1] or "" for r in store.conn.execute("SELECT device_id, window FROM devices")}


def parse_at(text):
    """Unix seconds from unix seconds or an ISO 8601 time (a time without zone is UTC)."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise AuditError("--at: %r is neither unix seconds nor an ISO 8601 time" % text) \
            from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp())
