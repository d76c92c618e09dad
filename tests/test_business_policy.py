# Jurisdiction profiles (hub/jurisdictions/*.json, hub/policy.py): the seeds' rules as data,
# working-day arithmetic over weekends, public holidays and 调休 working weekends, the
# checks that name what is wrong in a profile, and catalogues that fit the device and map
# to the province.
import copy
import datetime
import json
import os
import re

import pytest

from firmware.evaluator.rating import Rating
from hub import batch, http_api, policy
from hub.http_api import Downlink
from hub.store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEIJING = datetime.timezone(datetime.timedelta(hours=8))


def at(text):
    """Unix seconds of a Beijing local time "yyyy-mm-dd HH:MM"."""
    moment = datetime.datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=BEIJING)
    return int(moment.timestamp())


def local(t):
    return datetime.datetime.fromtimestamp(t, BEIJING).strftime("%Y-%m-%d %H:%M")


def test_the_five_seed_jurisdictions_and_the_national_fallback_are_shipped():
    assert set(policy.names()) == {"national", "guangdong", "taian", "shanghai", "sanmenxia",
                                   "xilingol"}
    for name, jurisdiction in policy.load_all().items():
        assert jurisdiction.name == name and jurisdiction.cv and jurisdiction.reasons


def test_the_seed_rules_are_in_the_profiles():
    j = policy.load_all()
    gd, ta, sh, smx, xl = (j["guangdong"], j["taian"], j["shanghai"], j["sanmenxia"],
                           j["xilingol"])
    # Default ratings: 基本满意 after 7 natural days (Guangdong, Sanmenxia), 满意 after
    # 1 + 4 working days (Tai'an); none in Shanghai and Xilingol.
    assert (gd.default_stars, gd.default_after.n, gd.default_after.unit) == (3, 7, "natural_days")
    assert (smx.default_stars, smx.default_after.n, smx.default_after.unit) == \
        (3, 7, "natural_days")
    assert (ta.default_stars, ta.default_after.n, ta.default_after.unit) == (4, 5, "working_days")
    assert sh.default_stars is None and xl.default_stars is None
    assert gd.default_applied_by == "province" and not gd.hall_applies_default()
    assert smx.hall_applies_default() and ta.hall_applies_default()
    # Reminders: Tai'an after 1 working day, Xilingol at once.
    assert (ta.reminder_after.n, ta.reminder_after.unit) == (1, "working_days")
    assert (xl.reminder_after.n, xl.reminder_after.unit) == (0, "hours")
    assert gd.reminder_after is None and sh.reminder_after is None
    # Bad-rating handling: Shanghai 1-5-15 working days, Sanmenxia 24 h and 15 days,
    # Xilingol 2 + 10 + 3 working days.
    assert [(s, span.n, span.unit) for s, span in sh.bad_rating] == [
        ("contact", 1, "working_days"), ("fix", 5, "working_days"),
        ("complex", 15, "working_days")]
    assert [(s, span.n, span.unit) for s, span in smx.bad_rating] == [
        ("verify", 24, "hours"), ("fix", 15, "natural_days")]
    assert [(s, span.n) for s, span in xl.bad_rating] == [("dispatch", 2), ("fix", 12),
                                                         ("review", 15)]
    # Appeals: Tai'an 3 working days, Xilingol 5.
    assert (ta.appeal_within.n, ta.appeal_review.n) == (3, 3)
    assert (xl.appeal_within.n, xl.appeal_review.n) == (5, 5)
    assert gd.appeal_within is None
    # Xilingol keeps item and staff indicators apart, and so does every catalogue.
    for jurisdiction in j.values():
        areas = {area for _c, area, _l in jurisdiction.reasons}
        assert areas == {"item", "staff"}, jurisdiction.name


def test_working_days_skip_weekends_holidays_and_count_tiaoxiu_weekends():
    ta = policy.load("taian")
    one = policy.Span(1, "working_days")
    # A Friday afternoon service: within 1 working day is the end of Monday.
    assert local(ta.after(at("2025-03-07 15:00"), one)) == "2025-03-11 00:00"
    # The day before the National Day holidays (1-8 October 2025): the 9th.
    assert local(ta.after(at("2025-09-30 10:00"), one)) == "2025-10-10 00:00"
    # Sunday 28 September 2025 is a 调休 working day.
    assert local(ta.after(at("2025-09-26 16:00"), one)) == "2025-09-29 00:00"
    # Spring Festival 2025: 28 January to 4 February off, Saturday 8 February worked.
    assert local(ta.after(at("2025-01-27 09:00"), policy.Span(3, "working_days"))) == \
        "2025-02-08 00:00"
    assert local(ta.after(at("2025-01-27 09:00"), policy.Span(4, "working_days"))) == \
        "2025-02-09 00:00"
    # Tai'an's default: 5 working days from a Friday service is the next Friday's end.
    assert local(ta.default_due(at("2025-03-07 15:00"))) == "2025-03-15 00:00"
    assert local(ta.reminder_due(at("2025-03-07 15:00"))) == "2025-03-11 00:00"


def test_natural_days_and_hours_are_plain_durations():
    smx = policy.load("sanmenxia")
    t = at("2025-10-01 09:30")   # a holiday changes nothing for natural days
    assert smx.default_due(t) - t == 7 * 86400
    assert smx.after(t, policy.Span(24, "hours")) - t == 86400
    assert smx.after(t, policy.Span(0, "working_days")) == t
    order = smx.work_order(t)
    assert order["steps"] == {"verify": t + 86400, "fix": t + 15 * 86400}
    assert order["appeal_until"] is None and order["appeal_review_until"] is None
    xl = policy.load("xilingol")
    assert xl.reminder_due(t) == t and xl.default_due(t) is None
    order = xl.work_order(at("2025-03-07 15:00"))
    assert local(order["steps"]["dispatch"]) == "2025-03-12 00:00"
    assert local(order["appeal_until"]) == "2025-03-15 00:00"
    assert local(order["appeal_review_until"]) == "2025-03-22 00:00"


def test_an_indicator_code_means_the_same_everywhere():
    seen = {}
    for jurisdiction in policy.load_all().values():
        for code, area, label in jurisdiction.reasons:
            assert seen.setdefault(code, (area, label)) == (area, label), code
    # The hub's built-in fallback codes (docs/rating.md) are not reused for other things.
    assert not {"PJ01", "PJ02", "PJ03", "PJ04", "PJ05", "PJ06"} & set(seen)


def test_guangdong_codes_are_all_known_to_the_guangdong_province_profile():
    codes = batch.load_profile("guangdong")["indicators"]["codes"]
    assert {c for c, _a, _l in policy.load("guangdong").reasons} <= set(codes)


def test_every_catalogue_fits_the_device_and_passes_its_checks():
    with open(os.path.join(ROOT, "firmware", "app.py"), encoding="utf-8") as f:
        limit = int(re.search(r"MAX_DOWNLINK = const\((\d+)\)", f.read()).group(1))
    assert http_api.DEVICE_DOWNLINK_MAX == limit   # the hub knows the device's buffer
    sent = []
    cat = Downlink(lambda *a, **k: sent.append(a))
    for name, jurisdiction in policy.load_all().items():
        cat.set_catalogue(jurisdiction.catalogue())
        payload = cat.cat_payload()
        assert cat.fits(jurisdiction.catalogue()), name
        assert len(payload.encode()) + http_api.PACKET_OVERHEAD <= limit, name
        msg = json.loads(payload)
        assert Rating().set_catalogue(msg), name   # the device's own checks take it
        assert msg["cv"] == jurisdiction.cv and all(r["bm"] for r in msg["rs"])
        assert [r["a"] for r in msg["rs"]] == [a for _c, a, _l in jurisdiction.reasons]
    assert cat.set_catalogue(policy.load("xilingol").catalogue()) is False
    # Twelve long labels would not fit: the hub can tell before it sends them.
    wide = {"cv": "wide-1", "rs": [("X%02d" % i, "staff", "很长的差评指标名称二十字" * 2)
                                   for i in range(12)]}
    assert not cat.fits(wide)


@pytest.mark.parametrize("change, field", [
    (lambda p: p.update(name="Bad Name"), "name"),
    (lambda p: p["default_rating"].update(stars=6), "default_rating.stars"),
    (lambda p: p["default_rating"].update(after={"n": 5, "unit": "weeks"}),
     "default_rating.after"),
    (lambda p: p["default_rating"].update(applied_by="city"), "default_rating.applied_by"),
    (lambda p: p.update(reminder={"after": {"n": -1, "unit": "hours"}}), "reminder.after"),
    (lambda p: p["bad_rating"].append({"step": "revisit", "within": {"n": 1,
                                                                     "unit": "hours"}}),
     "bad_rating[1].step"),
    (lambda p: p["appeal"].update(within=None), "appeal.within"),
    (lambda p: p["catalogue"].update(cv="ta 2020"), "catalogue.cv"),
    (lambda p: p["catalogue"]["reasons"].append(dict(p["catalogue"]["reasons"][0])),
     "catalogue.reasons[9].c"),
    (lambda p: p["catalogue"]["reasons"][0].update(a="hall"), "catalogue.reasons[0].a"),
    (lambda p: p["catalogue"]["reasons"][0].update(label="很长" * 7),
     "catalogue.reasons[0].label"),
    (lambda p: p["catalogue"].update(reasons=[r for r in p["catalogue"]["reasons"]
                                              if r["a"] == "item"]), "staff indicator"),
    (lambda p: p.update(prompt_ttl_s=7200), "prompt_ttl_s"),
    (lambda p: p.update(suspicion={"burst_count": 0}), "suspicion"),
    (lambda p: p.update(calendar={"holidays": ["2025/10/01"]}), "calendar.holidays"),
])
def test_a_broken_profile_is_refused_naming_the_field(change, field):
    with open(os.path.join(policy.JURISDICTION_DIR, "taian.json"), encoding="utf-8") as f:
        profile = json.load(f)
    broken = copy.deepcopy(profile)
    change(broken)
    with pytest.raises(policy.PolicyError) as caught:
        policy.check(broken, "taian")
    assert field in str(caught.value)
    policy.check(profile, "taian")


def test_a_profile_folder_of_ones_own_with_local_holidays(tmp_path):
    with open(os.path.join(policy.JURISDICTION_DIR, "shanghai.json"), encoding="utf-8") as f:
        profile = json.load(f)
    profile.update(name="pudong", calendar={"holidays": ["2025-03-10"]})
    (tmp_path / "pudong.json").write_text(json.dumps(profile), encoding="utf-8")
    (tmp_path / "calendar.json").write_text(json.dumps({"holidays": ["2025-03-11"]}))
    pudong = policy.load("pudong", folder=str(tmp_path))
    assert policy.names(str(tmp_path)) == ["pudong"]
    # Monday (local) and Tuesday (shared) are off: 1 working day from Friday is Wednesday.
    assert local(pudong.after(at("2025-03-07 15:00"), policy.Span(1, "working_days"))) == \
        "2025-03-13 00:00"
    with pytest.raises(policy.PolicyError):
        policy.load("../taian")
    with pytest.raises(policy.PolicyError) as caught:
        policy.load("nowhere")
    assert "no jurisdiction" in str(caught.value)


def test_the_jurisdiction_in_force_is_chosen_else_named_by_the_province_profile(tmp_path):
    store = Store(str(tmp_path / "hub.db"))
    try:
        assert policy.chosen_name(store) == "national"
        assert policy.chosen_name(store, "guangdong") == "guangdong"
        assert policy.chosen_name(store, "zhejiang") == "national"
        assert policy.choose(store, "xilingol").cv == "xl-2021.1"
        assert policy.current(store, "guangdong").name == "xilingol"
        with pytest.raises(policy.PolicyError):
            policy.choose(store, "atlantis")
        assert policy.chosen_name(store) == "xilingol"
    finally:
        store.close()


def test_a_hub_keeps_its_catalogue_when_the_new_one_would_not_reach_the_devices(
        tmp_path, monkeypatch):
    from hub import business

    sent = []
    store = Store(str(tmp_path / "hub.db"))
    try:
        engine = business.Engine(store, Downlink(lambda *a, **k: sent.append(a)))
        assert engine.jurisdiction.name == "national"
        real = policy.load

        def wide_taian(name, folder=policy.JURISDICTION_DIR):
            j = real(name, folder)
            if name == "taian":
                j.reasons = tuple(("X%02d" % i, "staff", "很长的差评指标名称二十字" * 2)
                                  for i in range(12))
            return j

        monkeypatch.setattr(policy, "load", wide_taian)
        with store.transaction():
            store.set_state(policy.STATE_KEY, "taian")
        engine._follow_jurisdiction()
        assert engine.jurisdiction.name == "national" and sent == []
        assert store.counters()["catalogue_too_large"] == 1
        monkeypatch.setattr(policy, "load", real)
        engine._refused = None
        engine._jurisdiction_at = 0
        engine._follow_jurisdiction()
        assert engine.jurisdiction.name == "taian"
        assert {a[0] for a in sent} == set()   # no devices registered: nothing to send
        assert json.loads(engine.downlink.cat_payload())["cv"] == "ta-2020.1"
    finally:
        store.close()
