# firmware/catalogue.py under the MicroPython unix port: compare-or-write, the one-reason-
# at-a-time reading of cat.json, refusals, bitmaps from cat.bin. Prints one JSON object of
# observations; tests/test_catalogue.py makes the assertions.
# Usage (from anywhere): micropython catalogue_check.py FIRMWARE_DIR SCRATCH_DIR CAT_JSON
import gc
import json
import os
import sys

sys.path.insert(0, sys.argv[1])

import catalogue  # noqa: E402
from display import bitmap  # noqa: E402

work = sys.argv[2]
with open(sys.argv[3], "rb") as f:
    payload = f.read()
out = {}


def content(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def spool(path, data, step):
    sp = catalogue.Spool(path)
    for i in range(0, len(data), step):
        sp.write(memoryview(data)[i:i + step])
    changed = sp.close()
    if changed:
        catalogue.settle(path, True)
    return changed


# Compare-or-write: the file ends up with the new bytes; only differing bytes are written.
results = []
path = work + "/s.bin"
for old, new in ((None, b"abc"), (b"abc", b"abc"), (b"abc", b"abd"), (b"ab" * 100, b"ab" * 100),
                 (b"ab" * 100, b"ab" * 60), (b"abc", b"abc" * 90),
                 (b"x" * 200, b"x" * 100 + b"y" + b"x" * 99)):
    for name in (path, path + ".new"):
        try:
            os.remove(name)
        except OSError:
            pass
    if old is not None:
        with open(path, "wb") as f:
            f.write(old)
    changed = spool(path, new, 70)
    results.append([changed, content(path) == new, content(path + ".new") is None])
out["spool"] = results
sp = catalogue.Spool(path)
sp.write(b"zzz")
if sp.close():
    catalogue.settle(path, False)
out["spool_dropped"] = content(path) == b"x" * 100 + b"y" + b"x" * 99

# A catalogue: spooled, read one reason at a time, its bitmaps decoded into cat.bin.
store = catalogue.Catalogue(work)
sp = store.spool()
for i in range(0, len(payload), 700):
    sp.write(memoryview(payload)[i:i + 700])
changed = sp.close()
cat, fresh = store.index(changed)
store.commit(True, changed, fresh, cat)
wire = json.loads(payload)
out["index"] = {"changed": changed, "fresh": fresh, "cv": cat["cv"], "cv_store": store["cv"],
                "codes": [e["c"] for e in cat["rs"]], "areas": [e["a"] for e in cat["rs"]],
                "no_bitmaps": all(e["bm"] is None for e in cat["rs"])}
gc.collect()
before = gc.mem_alloc()
reasons = store["rs"]
gc.collect()
out["reasons_bytes"] = gc.mem_alloc() - before
out["reasons_codes"] = [e["c"] for e in reasons]
out["loaded_equal"] = [store.load(e["f"]) == bitmap(w["bm"])
                       for e, w in zip(reasons, wire["rs"])]
# The same catalogue again (a reconnect): nothing rewritten, nothing to read.
sp = store.spool()
sp.write(payload)
out["again_changed"] = sp.close()
# Another catalogue: older refs no longer load (their bitmaps may have moved).
other = dict(wire, cv="other-1", rs=wire["rs"][1:])
sp = store.spool()
sp.write(json.dumps(other).encode())
changed = sp.close()
cat2, fresh = store.index(changed)
store.commit(True, changed, fresh, cat2)
out["other"] = {"changed": changed, "cv": store["cv"], "first": cat2["rs"][0]["c"],
                "old_ref": store.load(reasons[0]["f"]) is None,
                "new_ref": store.load(store["rs"][0]["f"]) == bitmap(wire["rs"][1]["bm"])}
# Not a catalogue: refused, pending files dropped, the one in use untouched.
refused = []
for bad in (b"[1, 2]", b'{"cv": "x", "rs": {}}', b'{"cv": "x"}', b'{"cv": "x", "rs": ["a"]}',
            b'{"cv": "x", "rs": []} trailing', b'{"cv": "x", "rs": [{"c": "A"',
            b'{"cv": "x", "rs": [{"c": "A", "bm": {"w": 8, "h": 1, "b": "!!!!"}}]}',
            b'{"cv": "x", "rs": [{}]}x'):
    sp = store.spool()
    sp.write(bad)
    changed = sp.close()
    try:
        store.index(changed)
        refused.append("accepted")
    except ValueError:
        refused.append("refused")
out["refused"] = refused
out["after_refusals"] = {"cv": store["cv"], "json_is_other": content(work + "/cat.json")
                         == json.dumps(other).encode(),
                         "no_pending": sorted(n for n in os.listdir(work) if n.endswith(".new"))}
print(json.dumps(out))
