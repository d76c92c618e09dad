# The rating state machine: context, prompts, one prompt one record, good ratings.
# Runs under CPython (pytest) and MicroPython (tests/core/run.py).
from evaluator import rating
from evaluator.rating import (IDLE, OFF, PROMPT, SAVING, THANKS, Rating)

import rating_samples as s


# ---- context -----------------------------------------------------------------------------
def test_starts_off_and_follows_who_is_signed_in():
    r = Rating()
    assert r.state == OFF and r.view()["state"] == OFF
    assert r.set_context(s.ctx())
    assert r.state == IDLE
    assert r.view()["ctx"]["sn"] == "10234"
    assert r.set_context(s.ctx(sn=""))
    assert r.state == OFF
    assert r.set_context({"w": "W03"})  # no sn at all: nobody signed in
    assert r.state == OFF


def test_malformed_context_is_refused_counted_and_changes_nothing():
    r = Rating()
    r.set_context(s.ctx())
    for bad in ("x", {"sn": "工号"}, {"w": 3}, {"sn": "1", "name": {"w": 8, "h": 1, "b": "AA"}},
                {"sn": "1", "win": [1]}):
        assert not r.set_context(bad)
    assert r.bad == 5
    assert r.state == IDLE and r.ctx["sn"] == "10234"


def test_new_context_during_a_prompt_keeps_the_prompt_and_the_staff_who_served():
    r = s.shown()
    assert r.set_context(s.ctx(sn="20001"))
    assert r.state == PROMPT
    assert r.view()["ctx"]["sn"] == "10234"
    rec = r.press(5, 2000)
    assert rec["sn"] == "10234" and rec["w"] == "W03"
    r.saved(True, 2000)
    assert r.view()["ctx"]["sn"] == "20001"  # THANKS already shows who is at the window now
    r.tick(5000)
    assert r.state == IDLE and r.view()["ctx"]["sn"] == "20001"


def test_staff_signing_out_during_a_prompt_goes_off_after_thanks():
    r = s.shown()
    r.set_context(s.ctx(sn=""))
    r.press(4, 2000)
    r.saved(True, 2100)
    assert r.state == THANKS
    r.tick(5099)
    assert r.state == THANKS
    r.tick(5100)
    assert r.state == OFF


# ---- prompts -----------------------------------------------------------------------------
def test_prompt_is_shown_in_idle_with_item_case_staff_and_time_left():
    r = s.shown(now=1000)
    v = r.view()
    assert v["state"] == PROMPT
    assert v["prompt"]["pid"] == "P1" and v["prompt"]["case"] == "GD2026-0001"
    assert v["ctx"]["sn"] == "10234"
    assert v["staff_only"] is False
    assert v["left_s"] == 60
    r.tick(1500)
    assert r.view()["left_s"] == 60  # rounded up: never shows 0 while time is left
    r.tick(2000)
    assert r.view()["left_s"] == 59


def test_prompt_in_off_is_shown_and_the_record_has_no_staff():
    r = Rating()
    assert r.offer(s.prompt(), 0) == "shown"
    rec = r.press(3, 1000)
    assert rec["sn"] == "" and rec["w"] == "" and rec["stars"] == 3


def test_malformed_prompts_are_refused_as_bad_and_counted():
    r = Rating()
    r.set_context(s.ctx())
    bads = [None, [], {"kind": "ji"}, s.prompt(pid=""), s.prompt(pid="P 1"), s.prompt(kind="zz"),
            s.prompt(n=0), s.prompt(n=True), s.prompt(ttl=0), s.prompt(ttl=3601),
            s.prompt(ttl="60"),
            s.prompt(case="案"), dict(s.prompt(), item={"w": 96, "h": 16, "b": "AAAA"}),
            dict(s.prompt(), item="bitmap")]
    for bad in bads:
        assert r.offer(bad, 0) == "bad", bad
    assert r.bad == len(bads)
    assert r.state == IDLE


def test_prompt_without_case_or_n_is_fine():
    r = Rating()
    r.set_context(s.ctx())
    assert r.offer({"pid": "P9", "kind": "cn_dlv"}, 0) == "shown"
    rec = r.press(5, 1000)
    assert rec["case"] == ""


def test_offers_while_a_citizen_is_busy_are_refused_busy():
    r = s.shown()
    assert r.offer(s.prompt(pid="P2"), 1100) == "busy"
    r.press(2, 2000)
    assert r.offer(s.prompt(pid="P2"), 2100) == "busy"
    r.press(3, 3000)
    r.press(1, 4000)
    assert r.state == SAVING
    assert r.offer(s.prompt(pid="P2"), 4100) == "busy"
    r.saved(True, 4200)
    assert r.state == THANKS
    assert r.offer(s.prompt(pid="P2"), 4300) == "busy"
    assert r.offer(s.prompt(pid="P2"), 7200) == "shown"  # thanks over, even without a tick
    assert r.prompt["pid"] == "P2"


def test_redelivery_of_the_prompt_on_screen_is_shown_and_changes_nothing():
    r = s.shown(now=1000)
    assert r.offer(s.prompt(), 30000) == "shown"
    assert r.bad == 0
    assert r.tick(61000) is not None  # ttl still counts from the first delivery


def test_one_prompt_one_record():
    r = s.shown()
    r.press(5, 2000)
    r.saved(True, 2000)
    r.tick(9000)
    assert r.offer(s.prompt(), 9000) == "bad"
    assert "answered" in r.why
    assert r.offer(s.prompt(pid="P2"), 9000) == "shown"
    r.tick(100000)  # P2 times out: unrated is a record too
    r.saved(True, 100000)
    assert r.offer(s.prompt(pid="P2"), 100001) == "bad"


def test_answered_prompts_are_remembered_for_the_last_sixteen():
    r = Rating(rapid_ms=0)
    r.set_context(s.ctx())
    now = 0
    for i in range(rating.ANSWERED_MEMORY + 1):
        assert r.offer(s.prompt(pid="P%d" % i), now) == "shown"
        r.press(5, now)
        r.saved(True, now)
        now += 5000
        r.tick(now)
    assert r.offer(s.prompt(pid="P1"), now) == "bad"
    assert r.offer(s.prompt(pid="P0"), now) == "shown"  # the oldest has been forgotten


# ---- good ratings --------------------------------------------------------------------------
def test_good_rating_submits_at_once_and_thanks_only_after_the_durable_write():
    for stars in (3, 4, 5):
        r = s.shown(cat=s.cat())
        rec = r.press(stars, 2000)
        assert rec == {"k": "v", "pid": "P1", "case": "GD2026-0001", "stars": stars, "rs": [],
                       "cv": "", "w": "W03", "sn": "10234", "t_ms": 2000}
        assert r.state == SAVING
        assert r.view()["state"] == SAVING
        r.tick(100000)
        assert r.state == SAVING  # no timeout: only the journal decides
        assert r.saved(True, 100000)
        assert r.state == THANKS and r.votes == 1
        assert r.view()["stars"] == stars  # the thanks screen may echo the rating
        assert r.view()["prompt"] is None
        r.tick(102999)
        assert r.state == THANKS
        r.tick(103000)
        assert r.state == IDLE
        assert r.view()["stars"] == 0
