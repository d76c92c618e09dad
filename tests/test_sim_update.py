# A fleet update with faults, end to end: the real firmware's updater and boot selector on
# simulated devices, the hub's rollout engine, citizens voting all along. A crashing image
# and a corrupted one must stop at the canaries (which keep working firmware); the good one
# must reach every device through power cuts during download and during install; and no
# vote may be lost, doubled or altered on the way.
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 6
VISITS = 24


def _pingjia(*args):
    return [sys.executable, "-c", "from hub.cli import main; main()", *args]


@pytest.mark.slow
def test_fleet_update_with_faults_leaves_every_device_working_and_loses_no_vote(tmp_path):
    workdir = tmp_path / "update"
    cmd = _pingjia("sim", "update", "--devices", str(DEVICES), "--votes", str(VISITS),
                   "--seed", "7", "--canary", "2", "--batch", "4", "--download-cuts", "2",
                   "--install-cuts", "2", "--deadline", "600", "--workdir", str(workdir),
                   "--json")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=700)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    summary = json.loads(lines[-1])
    context = json.dumps(summary, indent=1, ensure_ascii=False) + proc.stderr[-2000:]
    rollouts = {r["name"]: r for r in summary["rollouts"]}

    # The crashing image: tried by the canaries only, who fell back by themselves.
    crash = rollouts["crash"]
    assert crash["state"] == "halted", context
    # (A canary still downloading when the other failed has its offer withdrawn instead.)
    assert len(crash["offered"]) == 2 and crash["failures"], context
    assert set(crash["failures"]) | set(crash["withdrawn"]) == set(crash["offered"]), context
    assert all("rolled back" in why for why in crash["failures"].values()), context
    # The damaged image: refused on its hash, never installed.
    corrupt = rollouts["corrupt"]
    assert corrupt["state"] == "halted", context
    assert len(corrupt["offered"]) == 2 and corrupt["failures"], context
    assert set(corrupt["failures"]) | set(corrupt["withdrawn"]) == set(corrupt["offered"]), context
    assert all(why == "hash" for why in corrupt["failures"].values()), context
    # The good image reached every device, through the power cuts.
    good = rollouts["good"]
    assert good["state"] == "done" and good["counts"].get("done") == DEVICES, context
    during = [c["during"] for c in good["power_cuts"]]
    assert during.count("download") == 2 and during.count("install") == 2, context
    for device_id, fw in summary["firmware"].items():
        assert fw["fw"] == summary["version_after"], (device_id, context)
        assert fw["trial"] is None and fw["online"], (device_id, context)
    assert summary["update_problems"] == [], context
    # The votes.
    assert summary["votes_cast"] >= VISITS // 2, context
    assert summary["votes_at_province"] == summary["votes_cast"], context
    assert summary["unrated_at_province"] == summary["unrated"], context
    assert summary["lost"] == 0 and summary["duplicates_at_province"] == 0, context
    assert summary["altered_at_province"] == 0 and summary["forged_accepted"] == 0, context
    assert summary["device_crashes"] == 0 and summary["seq_conflicts"] == 0, context
    assert summary["ok"] is True and proc.returncode == 0, context
