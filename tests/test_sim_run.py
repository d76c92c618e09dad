# End to end: `pingjia sim run` with 20 simulated evaluators (real firmware under MicroPython
# with a 64 KB-of-32-bit-words heap), the real hub supervising a real mosquitto, and the
# reference provincial receiver. Every vote a device made durable must be at the province
# exactly once and unaltered; forged and replayed votes must not be.
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEVICES = 20
VISITS = 60


@pytest.mark.slow
def test_twenty_devices_every_durable_vote_reaches_the_province_once(tmp_path):
    cmd = [sys.executable, "-c", "from hub.cli import main; main()", "sim", "run",
           "--devices", str(DEVICES), "--votes", str(VISITS), "--seed", "2", "--deadline", "200",
           "--workdir", str(tmp_path / "run"), "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    summary = json.loads(lines[-1])
    context = json.dumps(summary, indent=1, ensure_ascii=False) + proc.stderr[-2000:]

    assert summary["devices"] == DEVICES
    assert summary["visits"] == VISITS
    assert summary["visit_errors"] == 0, context
    # One visit, one durable record: misuse presses never made one, none went missing.
    assert summary["votes_cast"] + summary["unrated"] == VISITS, context
    assert summary["votes_cast"] > 0 and summary["bad_ratings"] > 0, context
    assert summary["votes_at_province"] == summary["votes_cast"], context
    assert summary["unrated_at_province"] == summary["unrated"], context
    assert summary["duplicates_at_province"] == 0, context
    assert summary["lost"] == 0, context
    assert summary["altered_at_province"] == 0, context
    assert summary["forged_sent"] >= 5 and summary["forged_accepted"] == 0, context
    # The forged and tampered ones were refused by MAC at the hub (replays are duplicates).
    assert summary["hub_rejections"].get("bad_mac", 0) >= 5, context
    assert summary["misuse_presses"] >= summary["misuse_presses_made"] > 0, context
    assert summary["device_crashes"] == 0, context
    assert 0 < summary["device_heap_peak_bytes"] < summary["device_heap_bytes"], context
    assert summary["latency_ms"]["p50"] is not None and summary["latency_ms"]["p99"] >= \
        summary["latency_ms"]["p50"], context
    assert summary["ok"] is True and proc.returncode == 0, context


def test_firmware_build_is_incremental_and_packs_a_mountable_romfs(tmp_path, micropython):
    import shutil

    from simulator import build

    root = tmp_path / "tree"
    shutil.copytree(os.path.join(ROOT, "firmware"), root / "firmware",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / "simulator").mkdir()
    for name in build.SIM_MODULES:
        shutil.copy(os.path.join(ROOT, "simulator", name), root / "simulator" / name)
    out = str(tmp_path / "out")
    first = build.build(out, root=str(root))
    wanted = build.sources(str(root))
    assert sorted(first.compiled) == sorted(wanted) and "app.mpy" in wanted
    assert "evaluator/journal.mpy" in wanted and "simdevice.mpy" in wanted
    assert "build_ui.mpy" not in wanted  # a host-side tool never goes to a device
    again = build.build(out, root=str(root))
    assert again.compiled == [] and again.unchanged == len(wanted)
    with open(root / "firmware" / "app.py", "a") as f:
        f.write("\n# touched\n")
    os.unlink(root / "firmware" / "evaluator" / "keys.py")
    third = build.build(out, root=str(root))
    assert third.compiled == ["app.mpy"] and third.removed == ["evaluator/keys.mpy"]
    assert not os.path.exists(os.path.join(out, "evaluator", "keys.mpy"))
    # The image mounts as MicroPython's VfsRom and holds exactly the compiled modules.
    script = ("import os, vfs\n"
              "vfs.mount(vfs.VfsRom(open(%r, 'rb').read()), '/rom')\n"
              "print(sorted(os.listdir('/rom')), sorted(os.listdir('/rom/evaluator')))\n"
              % third.romfs)
    proc = subprocess.run([micropython, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    top = sorted(k for k in wanted if "/" not in k and k != "evaluator/keys.mpy")
    inner = sorted(k.split("/", 1)[1] for k in wanted if k.startswith("evaluator/")
                   and k != "evaluator/keys.mpy")
    listed = proc.stdout.strip()
    assert listed == "%r %r" % (sorted(top + [d for d in ("board", "evaluator")
                                              if any(k.startswith(d + "/") for k in wanted)]),
                               inner), listed
