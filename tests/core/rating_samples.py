# Sample downlinks and a ready Rating for the rating tests (imported by tests/core/test_rating*.py).
from evaluator.rating import Rating


def bm(w, h):
    # A wire bitmap of the right padded base64 length (content does not matter here).
    return {"w": w, "h": h, "b": "A" * (((w + 7) // 8 * h + 2) // 3 * 4)}


def ctx(sn="10234", w="W03"):
    return {"w": w, "sn": sn, "name": bm(48, 16), "win": None, "t": 1700000000}


def prompt(pid="P1", kind="ji", ttl=None, n=1, case="GD2026-0001"):
    p = {"pid": pid, "case": case, "kind": kind, "n": n, "item": bm(96, 16), "t": 1700000000}
    if ttl is not None:
        p["ttl"] = ttl
    return p


def cat(codes=("I01", "I02", "S01", "S02"), cv="gd-2024.1"):
    entries = []
    for code in codes:
        area = "item" if code[0] == "I" else ("staff" if code[0] == "S" else None)
        entry = {"c": code, "bm": bm(64, 16)}
        if area:
            entry["a"] = area
        entries.append(entry)
    return {"cv": cv, "rs": entries}


def shown(kind="ji", cat=None, now=1000, **kw):
    r = Rating(**kw)
    assert r.set_context(ctx())
    if cat is not None:
        assert r.set_catalogue(cat)
    assert r.offer(prompt(kind=kind), now) == "shown"
    return r


def raises(exc_type, fn, *args):
    try:
        fn(*args)
    except exc_type:
        return
    raise AssertionError("no " + exc_type.__name__)
