# The rating state machine: bad ratings, the reasons soft keys, catalogues, 承诺件 acceptance.
# Runs under CPython (pytest) and MicroPython (tests/core/run.py).
from evaluator import rating
from evaluator.rating import (PROMPT, REASONS, SAVING, THANKS, Rating)

import rating_samples as s


# ---- bad ratings ---------------------------------------------------------------------------
def test_bad_rating_needs_a_reason_chosen_with_the_soft_keys():
    r = s.shown(cat=s.cat())
    assert r.press(2, 2000) is None
    v = r.view()
    assert v["state"] == REASONS and v["stars"] == 2
    assert [e["c"] for e in v["reasons"]] == ["I01", "I02", "S01", "S02"]
    assert v["cv"] == "gd-2024.1" and v["cursor"] == 0 and v["selected"] == []
    assert r.press(rating.KEY_DOWN, 3000) is None
    assert r.press(rating.KEY_DOWN, 4000) is None
    assert r.view()["cursor"] == 2
    assert r.press(rating.KEY_TOGGLE, 5000) is None
    assert r.view()["selected"] == ["S01"]
    rec = r.press(rating.KEY_SUBMIT, 6000)
    assert rec == {"k": "v", "pid": "P1", "case": "GD2026-0001", "stars": 2, "rs": ["S01"],
                   "cv": "gd-2024.1", "w": "W03", "sn": "10234", "t_ms": 6000}
    assert r.state == SAVING
    r.saved(True, 6000)
    assert r.state == THANKS and r.votes == 1


def test_submit_without_a_reason_is_ignored_and_flagged():
    r = s.shown(cat=s.cat())
    r.press(1, 2000)
    assert r.press(rating.KEY_SUBMIT, 3000) is None
    v = r.view()
    assert v["state"] == REASONS and v["hint"] == rating.HINT_NEED_REASON
    assert r.misuse == 0
    r.press(rating.KEY_TOGGLE, 4000)
    assert r.view()["hint"] is None  # the next key clears the hint
    rec = r.press(rating.KEY_SUBMIT, 5000)
    assert rec["stars"] == 1 and rec["rs"] == ["I01"]


def test_cancel_goes_back_to_the_prompt_and_records_nothing():
    r = s.shown(cat=s.cat())
    r.press(2, 2000)
    r.press(rating.KEY_TOGGLE, 3000)
    assert r.press(rating.KEY_BACK, 4000) is None
    v = r.view()
    assert v["state"] == PROMPT and v["stars"] == 0 and v["selected"] == [] and v["reasons"] == ()
    assert r.votes == 0 and r.unrated == 0
    rec = r.press(4, 5000)
    assert rec["stars"] == 4 and rec["rs"] == [] and rec["cv"] == ""


def test_cursor_wraps_and_pages_and_choices_come_out_in_catalogue_order():
    codes = ("I01", "I02", "I03", "S01", "S02", "S03", "X1")
    r = s.shown(cat=s.cat(codes), rapid_ms=0)
    r.press(1, 0)
    r.press(rating.KEY_UP, 0)
    v = r.view()
    assert v["cursor"] == 6 and v["page"] == 2 and v["pages"] == 3 and v["per_page"] == 3
    r.press(rating.KEY_TOGGLE, 0)  # X1
    r.press(rating.KEY_DOWN, 0)
    assert r.view()["cursor"] == 0 and r.view()["page"] == 0
    r.press(rating.KEY_TOGGLE, 0)  # I01
    r.press(rating.KEY_DOWN, 0)
    r.press(rating.KEY_TOGGLE, 0)  # I02
    r.press(rating.KEY_TOGGLE, 0)  # I02 again: unchosen
    assert r.view()["selected"] == ["I01", "X1"]
    rec = r.press(rating.KEY_SUBMIT, 0)
    assert rec["rs"] == ["I01", "X1"]


def test_at_most_eight_reasons_can_be_chosen():
    codes = ["R%02d" % i for i in range(10)]
    r = s.shown(cat=s.cat(codes), rapid_ms=0)
    r.press(1, 0)
    for _ in range(9):
        r.press(rating.KEY_TOGGLE, 0)
        r.press(rating.KEY_DOWN, 0)
    v = r.view()
    assert len(v["selected"]) == 8 and "R08" not in v["selected"]
    r.press(rating.KEY_UP, 0)
    r.press(rating.KEY_TOGGLE, 0)
    assert r.view()["hint"] == rating.HINT_MAX_REASONS
    rec = r.press(rating.KEY_SUBMIT, 0)
    assert rec["rs"] == codes[:8]


def test_without_a_catalogue_the_builtin_reasons_let_a_bad_rating_complete():
    for cat in (None, {"cv": "empty-1", "rs": []}):
        r = s.shown(cat=cat)
        r.press(2, 2000)
        v = r.view()
        assert v["cv"] == rating.FALLBACK_CV
        assert [e["c"] for e in v["reasons"]] == [e["c"] for e in rating.FALLBACK_REASONS]
        r.press(rating.KEY_TOGGLE, 3000)
        rec = r.press(rating.KEY_SUBMIT, 4000)
        assert rec["rs"] == ["PJ01"] and rec["cv"] == rating.FALLBACK_CV


def test_acceptance_of_a_promise_item_rates_the_staff_only():
    r = s.shown(kind="cn_acc", cat=s.cat(("I01", "S01", "X1", "I02", "S02")))
    assert r.view()["staff_only"] is True
    r.press(1, 2000)
    v = r.view()
    assert v["staff_only"] is True
    # Item reasons are left out; a reason without an area counts for both.
    assert [e["c"] for e in v["reasons"]] == ["S01", "X1", "S02"]
    r.press(rating.KEY_TOGGLE, 3000)
    assert r.press(rating.KEY_SUBMIT, 4000)["rs"] == ["S01"]


def test_acceptance_with_only_item_reasons_falls_back_to_builtin_staff_reasons():
    r = s.shown(kind="cn_acc", cat=s.cat(("I01", "I02")))
    r.press(1, 2000)
    v = r.view()
    assert v["cv"] == rating.FALLBACK_CV
    assert v["reasons"] and all(e["a"] == "staff" for e in v["reasons"])


def test_delivery_and_instant_items_offer_item_and_staff_reasons():
    for kind in ("cn_dlv", "ji"):
        r = s.shown(kind=kind, cat=s.cat())
        assert r.view()["staff_only"] is False
        r.press(1, 2000)
        assert [e["c"] for e in r.view()["reasons"]] == ["I01", "I02", "S01", "S02"]


def test_a_new_catalogue_applies_from_the_next_bad_rating():
    r = s.shown(cat=s.cat(("I01", "I02")))
    r.press(1, 2000)
    assert r.set_catalogue(s.cat(("S09",), cv="gd-2025.1"))
    assert [e["c"] for e in r.view()["reasons"]] == ["I01", "I02"]
    r.press(rating.KEY_TOGGLE, 3000)
    rec = r.press(rating.KEY_SUBMIT, 4000)
    assert rec["cv"] == "gd-2024.1" and rec["rs"] == ["I01"]
    r.saved(True, 4000)
    r.tick(8000)
    r.offer(s.prompt(pid="P2"), 8000)
    r.press(2, 9000)
    assert r.view()["cv"] == "gd-2025.1"


def test_malformed_catalogues_are_refused_and_the_old_one_kept():
    r = Rating()
    assert r.set_catalogue(s.cat())
    too_many = s.cat(["R%02d" % i for i in range(17)])
    dup = s.cat(("I01", "I01"))
    bad_area = {"cv": "x", "rs": [{"c": "I01", "a": "window"}]}
    bad_bm = {"cv": "x", "rs": [{"c": "I01", "bm": {"w": 8, "h": 8}}]}
    for bad in (None, {"rs": []}, {"cv": "x", "rs": {}}, too_many, dup, bad_area, bad_bm,
                {"cv": "x", "rs": ["I01"]}, {"cv": "x", "rs": [{"c": "不满"}]}):
        assert not r.set_catalogue(bad)
    assert r.bad == 9
    assert r.cat["cv"] == "gd-2024.1"
