# The rating state machine: timeouts, misuse presses, journal full, the view dict.
# Runs under CPython (pytest) and MicroPython (tests/core/run.py).
from evaluator import rating
from evaluator.rating import (FULL, IDLE, OFF, PROMPT, REASONS, SAVING, THANKS, Rating)

import rating_samples as s


# ---- timeouts ------------------------------------------------------------------------------
def test_unanswered_prompt_becomes_an_unrated_record_and_no_thanks():
    r = s.shown(now=1000)
    assert r.tick(60999) is None
    rec = r.tick(61000)
    assert rec == {"k": "u", "pid": "P1", "case": "GD2026-0001", "stars": 0, "rs": [], "cv": "",
                   "w": "W03", "sn": "10234", "t_ms": 61000}
    assert r.state == SAVING
    assert r.tick(62000) is None  # one record only
    r.saved(True, 61000)
    assert r.state == IDLE and r.unrated == 1 and r.votes == 0


def test_prompt_ttl_overrides_the_default_timeout():
    r = Rating()
    r.set_context(s.ctx())
    r.offer(s.prompt(ttl=5), 0)
    assert r.view()["left_s"] == 5
    assert r.tick(4999) is None
    assert r.tick(5000)["k"] == "u"


def test_abandoned_reasons_screen_becomes_unrated_timed_from_the_last_key():
    r = s.shown(now=0, reasons_timeout_ms=10000)
    r.press(1, 1000)
    r.press(rating.KEY_TOGGLE, 8000)
    assert r.tick(17999) is None
    assert r.view()["left_s"] == 1
    rec = r.tick(18000)
    assert rec["k"] == "u" and rec["stars"] == 0 and rec["rs"] == [] and rec["cv"] == ""
    r.saved(True, 18000)
    assert r.unrated == 1 and r.state == IDLE


def test_going_back_from_reasons_restarts_the_prompt_ttl():
    r = s.shown(now=0)
    r.press(2, 50000)
    r.press(rating.KEY_BACK, 55000)
    assert r.tick(114999) is None
    assert r.tick(115000)["k"] == "u"


def test_a_press_after_the_ttl_gets_the_unrated_record_not_a_vote():
    r = s.shown(now=0)
    rec = r.press(5, 60000)  # the app's tick has not run yet
    assert rec["k"] == "u" and rec["stars"] == 0
    assert r.misuse == 1


def test_timeouts_survive_the_tick_counter_wrapping():
    period = 1 << 16

    def diff(a, b):  # like MicroPython's time.ticks_diff with a small period
        return ((a - b + period // 2) & (period - 1)) - period // 2

    r = Rating(diff=diff)
    r.set_context(s.ctx())
    r.offer(s.prompt(ttl=10), period - 4000)
    assert r.tick(1000) is None  # 5 s after the offer, past the wrap
    assert r.view()["left_s"] == 5
    assert r.tick(5999) is None
    assert r.tick(6000)["k"] == "u"


# ---- misuse --------------------------------------------------------------------------------
def test_presses_when_nothing_is_asked_count_as_misuse_and_make_nothing():
    r = Rating()
    assert r.press(5, 1000) is None  # OFF
    r.set_context(s.ctx())
    assert r.press(1, 2000) is None  # IDLE
    r.offer(s.prompt(), 3000)
    r.press(5, 4000)
    assert r.press(4, 5000) is None  # SAVING
    r.saved(True, 5000)
    assert r.press(3, 6000) is None  # THANKS
    r.tick(9000)
    r.set_full(True)
    assert r.press(2, 10000) is None  # FULL
    assert r.misuse == 5 and r.rapid == 0 and r.votes == 1
    assert r.state == FULL


def test_rapid_presses_never_make_a_vote():
    r = Rating()
    r.set_context(s.ctx())
    now = 0
    for _ in range(5):  # drumming on the keys before the prompt arrives
        r.press(5, now)
        now += 100
    r.offer(s.prompt(), now)
    for _ in range(10):  # ... and on after it appears
        assert r.press(5, now) is None
        now += 100
    assert r.state == PROMPT
    assert r.rapid == 14 and r.misuse == 15
    rec = r.press(4, now + 300)  # a calm press after a pause counts
    assert rec["stars"] == 4


def test_rapid_soft_keys_are_ignored_too():
    r = s.shown(cat=s.cat())
    r.press(2, 2000)
    assert r.press(rating.KEY_BACK, 2100) is None  # a double press of 不满意 must not cancel
    assert r.state == REASONS and r.rapid == 1


def test_press_rejects_keys_that_do_not_exist():
    r = s.shown()
    for stars in (0, 6, True, "5"):
        s.raises(ValueError, r.press, stars, 2000)


# ---- journal full --------------------------------------------------------------------------
def test_journal_full_refuses_ratings_and_shows_the_fallback():
    r = s.shown()
    r.qr = s.bm(64, 64)
    r.press(5, 2000)
    assert r.saved(False, 2000)
    v = r.view()
    assert v["state"] == FULL and v["full"] is True and v["qr"]["w"] == 64
    assert r.refused == 1 and r.votes == 0
    assert r.offer(s.prompt(pid="P2"), 3000) == "full"
    assert r.press(5, 4000) is None and r.misuse == 1
    r.set_full(False)
    assert r.state == IDLE
    # The refused record never reached flash, so the prompt may come again.
    assert r.offer(s.prompt(), 5000) == "shown"


def test_set_full_takes_effect_when_no_citizen_is_busy():
    r = Rating()
    r.set_context(s.ctx())
    r.set_full(True)
    assert r.state == FULL
    r.set_full(False)
    assert r.state == IDLE
    r.offer(s.prompt(), 0)
    r.set_full(True)
    assert r.state == PROMPT  # the citizen on screen may still finish
    r.press(5, 1000)
    r.saved(True, 1000)
    assert r.state == THANKS
    r.tick(4000)
    assert r.state == FULL
    r.set_full(False)
    r.set_context(s.ctx(sn=""))
    assert r.state == OFF


def test_saved_without_a_record_is_ignored():
    r = s.shown()
    assert not r.saved(True, 2000)
    assert r.state == PROMPT and r.votes == 0


# ---- the view ------------------------------------------------------------------------------
def test_view_has_every_documented_key_and_is_stable_between_changes():
    keys = ["state", "ctx", "prompt", "stars", "staff_only", "reasons", "cv", "cursor",
            "selected", "page", "pages", "per_page", "hint", "left_s", "full", "qr"]
    r = s.shown(cat=s.cat())
    for state_press in (None, 1):
        if state_press:
            r.press(state_press, 2000)
        v = r.view()
        assert sorted(v) == sorted(keys)
        assert r.view() == v  # the app redraws only when the view differs
    before = r.changes
    r.press(rating.KEY_DOWN, 3000)
    assert r.changes > before


def test_fallback_reasons_are_built_on_request_staff_first():
    entries = rating.FALLBACK_REASONS
    assert [e["c"] for e in entries] == list(rating.FALLBACK_CODES)
    assert [e["a"] for e in entries] == ["staff"] * 3 + ["item"] * 3
    assert all(e["bm"] is None for e in entries)
    assert rating.fallback(True) == list(entries[:3])
    assert rating.FALLBACK_REASONS is not entries  # nothing kept between requests
