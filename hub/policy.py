"""Jurisdiction policies as data: the counter rules of one place (hub/jurisdictions/*.json).

The seeds (../shared/DOMAIN.md) disagree on every rule that matters at the counter: what an
unrated service counts as and after how long (natural or working days), who applies that
default (the hall or the province's own system), when a reminder goes out, how fast a bad
rating must be handled, how long staff may appeal, and which bad-rating indicators
(separate item and staff indicators) a citizen may pick. Each is a field of a jurisdiction
profile here, never a constant in code. docs/integration.md ("Jurisdictions") lists them.

Times are unix seconds; calendar days are counted in the profile's fixed UTC offset
(China has no daylight saving, so +08:00 is exact). Working days are Monday to Friday,
minus the public holidays and plus the 调休 working weekends of calendar.json and of the
profile's own "calendar".
"""
import datetime
import json
import os
import re

from firmware.evaluator import codec

from . import PingjiaError

JURISDICTION_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jurisdictions")
CALENDAR_FILE = "calendar.json"   # shared holidays; not a jurisdiction
STATE_KEY = "jurisdiction"        # hub_state key holding the chosen jurisdiction's name
FALLBACK = "national"

UNITS = ("natural_days", "working_days", "hours")
APPLIED_BY = ("hall", "province")
AREAS = ("item", "staff")
MAX_REASONS = 12      # the device takes 16; the rendered list must fit its 5 KB downlink buffer
MAX_LABEL = 12        # characters: one line of the reasons list, scrolling for the rest
SUSPICION_DEFAULTS = {
    "top_stars": 5,          # what counts as a top rating
    "burst_count": 10,       # this many top ratings ...
    "burst_window_s": 600,   # ... within this long at one window is a burst
    "rate_max": 3,           # more ratings than this (from separate visits) ...
    "rate_window_s": 60,     # ... within this long at one window is an impossible rate
    "clock_slack_s": 120,    # a vote earlier than its prompt by more than this is impossible
}

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class PolicyError(PingjiaError):
    """A jurisdiction profile that is missing or malformed."""


class Span:
    """An amount of time in one unit: {"n": 5, "unit": "working_days"}."""

    __slots__ = ("n", "unit")

    def __init__(self, n, unit):
        self.n = n
        self.unit = unit

    def as_json(self):
        return {"n": self.n, "unit": self.unit}


class Jurisdiction:
    """One checked profile. `raw` is the JSON as loaded (served by GET /api/v1/policy)."""

    def __init__(self, raw, holidays, workdays):
        self.raw = raw
        self.name = raw["name"]
        self.title = raw.get("title", self.name)
        self.offset_minutes = raw.get("utc_offset_minutes", 480)
        self.prompt_ttl_s = raw.get("prompt_ttl_s", 60)
        self.holidays = frozenset(holidays)
        self.workdays = frozenset(workdays)
        rule = raw.get("default_rating")
        self.default_stars = rule["stars"] if rule else None
        self.default_after = _span(rule["after"]) if rule else None
        self.default_applied_by = rule["applied_by"] if rule else None
        reminder = raw.get("reminder")
        self.reminder_after = _span(reminder["after"]) if reminder else None
        self.bad_rating = [(step["step"], _span(step["within"]))
                           for step in raw.get("bad_rating", [])]
        appeal = raw.get("appeal")
        self.appeal_within = _span(appeal["within"]) if appeal else None
        self.appeal_review = _span(appeal["review_within"]) \
            if appeal and appeal.get("review_within") else None
        cat = raw["catalogue"]
        self.cv = cat["cv"]
        self.reasons = tuple((r["c"], r["a"], r["label"]) for r in cat["reasons"])
        self.suspicion = dict(SUSPICION_DEFAULTS, **raw.get("suspicion", {}))

    # -- calendar ---------------------------------------------------------------------------
    def _zone(self):
        return datetime.timezone(datetime.timedelta(minutes=self.offset_minutes))

    def is_working_day(self, day):
        text = day.isoformat()
        if text in self.workdays:
            return True
        return day.weekday() < 5 and text not in self.holidays

    def after(self, t, span):
        """Unix seconds `span` after t. Working days end at midnight local time: "within 1
        working day" of a Friday-afternoon service is the end of Monday."""
        if span.unit == "hours":
            return int(t) + span.n * 3600
        if span.unit == "natural_days":
            return int(t) + span.n * 86400
        if span.n == 0:
            return int(t)
        zone = self._zone()
        day = datetime.datetime.fromtimestamp(t, zone).date()
        counted = 0
        while counted < span.n:
            day += datetime.timedelta(days=1)
            if self.is_working_day(day):
                counted += 1
        end = datetime.datetime.combine(day + datetime.timedelta(days=1), datetime.time(), zone)
        return int(end.timestamp())

    # -- the rules --------------------------------------------------------------------------
    def default_due(self, service_t):
        """When an unrated service counts at the default level, or None (no default)."""
        if self.default_after is None:
            return None
        return self.after(service_t, self.default_after)

    def hall_applies_default(self):
        return self.default_applied_by == "hall"

    def reminder_due(self, service_t):
        if self.reminder_after is None:
            return None
        return self.after(service_t, self.reminder_after)

    def work_order(self, rated_t):
        """Deadlines of a bad rating's handling steps, and of the staff's appeal:
        {"steps": {name: unix}, "appeal_until": unix|None, "appeal_review_until": …}."""
        steps = {name: self.after(rated_t, span) for name, span in self.bad_rating}
        appeal = self.after(rated_t, self.appeal_within) if self.appeal_within else None
        review = self.after(appeal, self.appeal_review) if appeal and self.appeal_review \
            else None
        return {"steps": steps, "appeal_until": appeal, "appeal_review_until": review}

    def catalogue(self):
        """{"cv", "rs": [(code, area, label)]}: what hub/http_api.Downlink sends as cat."""
        return {"cv": self.cv, "rs": list(self.reasons)}

    def area_of(self, code):
        for c, area, _label in self.reasons:
            if c == code:
                return area
        return None


def _span(obj):
    return Span(obj["n"], obj["unit"])


# -- loading and checking -----------------------------------------------------------------

def _read(path, label):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise PolicyError("no jurisdiction %r" % label) from None
    except (OSError, ValueError) as exc:
        raise PolicyError("jurisdiction %r unreadable: %s" % (label, exc)) from None


def _calendar(folder):
    path = os.path.join(folder, CALENDAR_FILE)
    if not os.path.exists(path):
        return [], []
    cal = _read(path, CALENDAR_FILE)
    bad = _checker(CALENDAR_FILE)
    _check_dates(cal.get("holidays", []), "holidays", bad)
    _check_dates(cal.get("workdays", []), "workdays", bad)
    return cal.get("holidays", []), cal.get("workdays", [])


def names(folder=JURISDICTION_DIR):
    """Names of the shipped jurisdictions, sorted."""
    return sorted(entry[:-5] for entry in os.listdir(folder)
                  if entry.endswith(".json") and entry != CALENDAR_FILE)


def load(name, folder=JURISDICTION_DIR):
    """A jurisdiction by name (hub/jurisdictions/<name>.json), checked."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise PolicyError("jurisdiction name %r: lower-case letters, digits, _ and -" % (name,))
    raw = _read(os.path.join(folder, name + ".json"), name)
    check(raw, name)
    if raw["name"] != name:
        raise PolicyError("jurisdiction %r: its file says it is %r" % (name, raw["name"]))
    holidays, workdays = _calendar(folder)
    own = raw.get("calendar", {})
    return Jurisdiction(raw, list(holidays) + own.get("holidays", []),
                        list(workdays) + own.get("workdays", []))


def load_all(folder=JURISDICTION_DIR):
    return {name: load(name, folder) for name in names(folder)}


def _checker(label):
    def bad(why):
        raise PolicyError("jurisdiction %r: %s" % (label, why))
    return bad


def _is_int(value, lo, hi):
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _check_span(obj, where, bad):
    if not isinstance(obj, dict) or obj.get("unit") not in UNITS or \
            not _is_int(obj.get("n"), 0, 1000):
        bad("%s must be {\"n\": 0..1000, \"unit\": %s}" % (where, " | ".join(UNITS)))


def _check_dates(dates, where, bad):
    if not isinstance(dates, list) or not all(isinstance(d, str) and _DATE.match(d)
                                              for d in dates):
        bad("%s must list yyyy-mm-dd dates" % where)


def check(raw, label="profile"):
    """Raise PolicyError naming the first field that is wrong."""
    bad = _checker(label)
    if not isinstance(raw, dict):
        bad("not a JSON object")
    if not isinstance(raw.get("name"), str) or not _NAME.match(raw["name"]):
        bad("name must be lower-case letters, digits, _ and -")
    if not _is_int(raw.get("utc_offset_minutes", 480), -840, 840):
        bad("utc_offset_minutes must be within +-14 hours")
    if not _is_int(raw.get("prompt_ttl_s", 60), 1, 3600):
        bad("prompt_ttl_s must be 1..3600 (the device's limit)")
    rule = raw.get("default_rating")
    if rule is not None:
        if not isinstance(rule, dict) or not _is_int(rule.get("stars"), 1, 5):
            bad("default_rating.stars must be 1..5")
        _check_span(rule.get("after"), "default_rating.after", bad)
        if rule.get("applied_by") not in APPLIED_BY:
            bad("default_rating.applied_by must be hall or province")
    reminder = raw.get("reminder")
    if reminder is not None:
        if not isinstance(reminder, dict):
            bad("reminder must be an object or null")
        _check_span(reminder.get("after"), "reminder.after", bad)
    steps = raw.get("bad_rating", [])
    if not isinstance(steps, list):
        bad("bad_rating must list handling steps")
    seen = set()
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or not isinstance(step.get("step"), str) or \
                not re.match(r"^[a-z_]{1,32}$", step["step"]) or step["step"] in seen:
            bad("bad_rating[%d].step must be a new lower-case name" % i)
        seen.add(step["step"])
        _check_span(step.get("within"), "bad_rating[%d].within" % i, bad)
    appeal = raw.get("appeal")
    if appeal is not None:
        if not isinstance(appeal, dict):
            bad("appeal must be an object or null")
        _check_span(appeal.get("within"), "appeal.within", bad)
        if appeal.get("review_within") is not None:
            _check_span(appeal["review_within"], "appeal.review_within", bad)
    _check_catalogue(raw.get("catalogue"), bad)
    suspicion = raw.get("suspicion", {})
    if not isinstance(suspicion, dict) or not set(suspicion) <= set(SUSPICION_DEFAULTS) or \
            not all(_is_int(v, 1, 86400) for v in suspicion.values()):
        bad("suspicion may set %s to 1..86400" % ", ".join(sorted(SUSPICION_DEFAULTS)))
    cal = raw.get("calendar", {})
    if not isinstance(cal, dict) or not set(cal) <= {"holidays", "workdays"}:
        bad("calendar may hold holidays and workdays")
    _check_dates(cal.get("holidays", []), "calendar.holidays", bad)
    _check_dates(cal.get("workdays", []), "calendar.workdays", bad)


def _check_catalogue(cat, bad):
    if not isinstance(cat, dict):
        bad("catalogue must be an object")
    try:
        codec.check_id(cat.get("cv"), "cv")
    except codec.CodecError:
        bad("catalogue.cv must be an identifier (the version votes record)")
    reasons = cat.get("reasons")
    if not isinstance(reasons, list) or not 1 <= len(reasons) <= MAX_REASONS:
        bad("catalogue.reasons must list 1..%d reasons" % MAX_REASONS)
    codes = set()
    for i, reason in enumerate(reasons):
        if not isinstance(reason, dict):
            bad("catalogue.reasons[%d] must be an object" % i)
        try:
            codec.check_id(reason.get("c"), "c")
        except codec.CodecError:
            bad("catalogue.reasons[%d].c must be an identifier" % i)
        if reason["c"] in codes:
            bad("catalogue.reasons[%d].c repeats %s" % (i, reason["c"]))
        codes.add(reason["c"])
        if reason.get("a") not in AREAS:
            bad("catalogue.reasons[%d].a must be item or staff" % i)
        label = reason.get("label")
        if not isinstance(label, str) or not 1 <= len(label.strip()) <= MAX_LABEL:
            bad("catalogue.reasons[%d].label must be 1..%d characters" % (i, MAX_LABEL))
    if not any(r["a"] == "staff" for r in reasons):
        # 承诺件 acceptance rates the staff member only: with no staff indicator the
        # device would fall back to its built-in list.
        bad("catalogue must hold at least one staff indicator")


# -- the jurisdiction in force ------------------------------------------------------------

def chosen_name(store, province_profile=None):
    """The hub's jurisdiction: set with `pingjia hub jurisdiction set`, else the one named
    like the province profile (guangdong), else national."""
    name = store.get_state(STATE_KEY)
    if isinstance(name, str) and name:
        return name
    if province_profile and province_profile in names():
        return province_profile
    return FALLBACK


def current(store, province_profile=None):
    return load(chosen_name(store, province_profile))


def choose(store, name):
    """Make `name` the hub's jurisdiction (checked first); the running hub follows within
    a few seconds, sending the new catalogue to every device."""
    jurisdiction = load(name)
    with store.transaction():
        store.set_state(STATE_KEY, name)
    return jurisdiction
