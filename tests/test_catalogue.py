# The device's catalogue on flash (firmware/catalogue.py) under the MicroPython unix port:
# compare-or-write (a reconnect rewrites nothing), one reason at a time from cat.json,
# bitmaps from cat.bin equal to the hub's, refusals that leave the catalogue in use alone,
# and the reasons a bad rating opens costing about 2 KB of heap. The app side (spooling
# past the receive buffer, the reasons screen) is in tests/test_app.py.
import json
import os
import subprocess

import pytest

from conftest import ROOT, micropython_cmd

SCRIPT = os.path.join(ROOT, "tests", "mp_device", "catalogue_check.py")


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    from hub.http_api import Downlink

    work = tmp_path_factory.mktemp("flash")
    cat = work / "hub-cat.json"
    cat.write_text(Downlink(lambda *a, **k: None).cat_payload())  # the hub's own, rendered
    proc = subprocess.run([micropython_cmd(), "-X", "heapsize=256K", SCRIPT,
                           os.path.join(ROOT, "firmware"), str(work), str(cat)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wire"] = json.loads(cat.read_text())
    return out


def test_compare_or_write_replaces_only_what_differs_and_can_drop_it(checked):
    # [changed, file holds the new bytes, nothing left pending]
    assert checked["spool"] == [[True, True, True], [False, True, True], [True, True, True],
                                [False, True, True], [True, True, True], [True, True, True],
                                [True, True, True]]
    assert checked["spool_dropped"] is True


def test_a_catalogue_is_read_one_reason_at_a_time_with_its_bitmaps_on_flash(checked):
    wire = checked["wire"]
    index = checked["index"]
    assert index["changed"] and index["fresh"] and index["no_bitmaps"]
    assert index["cv"] == index["cv_store"] == wire["cv"]
    assert index["codes"] == [r["c"] for r in wire["rs"]]
    assert index["areas"] == [r["a"] for r in wire["rs"]]
    # Read from flash when a bad rating opens them: twelve small dicts, no bitmaps.
    assert checked["reasons_codes"] == index["codes"]
    assert 0 < checked["reasons_bytes"] <= 2560
    assert checked["loaded_equal"] == [True] * len(wire["rs"])
    assert checked["again_changed"] is False  # the hub's resend on reconnect: no write


def test_a_new_catalogue_retires_the_old_bitmaps(checked):
    other = checked["other"]
    assert other["changed"] and other["cv"] == "other-1"
    assert other["first"] == checked["wire"]["rs"][1]["c"]
    assert other["old_ref"] is True and other["new_ref"] is True


def test_what_is_not_a_catalogue_is_refused_and_the_one_in_use_stays(checked):
    assert checked["refused"] == ["refused"] * 8
    after = checked["after_refusals"]
    assert after["cv"] == "other-1" and after["json_is_other"] is True
    assert after["no_pending"] == []
