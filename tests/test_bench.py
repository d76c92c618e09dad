# `pingjia bench` smoke test: the benchmarks run at their smallest size (--quick) against the
# real hub, broker, province and MicroPython firmware, and print one well-formed JSON report
# with every figure, baseline and ratio. Benchmarks are not tests: no timing is asserted
# here, only that every number is there and is a number.
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# About 30 s on an idle 2-core machine; the limits are for one crowded by other test runs.
@pytest.mark.timeout(480)
def test_quick_bench_prints_every_figure_with_its_baseline_and_ratio(tmp_path):
    cmd = [sys.executable, "-c", "from hub.cli import main; main()", "bench", "--quick",
           "--json", "--workdir", str(tmp_path / "bench")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        stdout, stderr = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the bench then stops its hubs, brokers and workers.
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=60)
        raise AssertionError("bench --quick did not finish: " + stderr[-2000:])
    lines = stdout.strip().splitlines()
    assert lines, stderr[-3000:]
    report = json.loads(lines[-1])
    context = json.dumps(report.get("figures", {}), ensure_ascii=False)[:4000] + stderr[-2000:]
    assert proc.returncode == 0 and report["ok"] is True, context

    machine = report["machine"]
    assert machine["nproc"] >= 1 and machine["memory_mb"] > 0 and machine["cpu"], machine
    assert machine["date"].endswith("Z")
    assert report["plan"]["name"] == "quick" and report["plan"]["repeat"] == 1
    figures = report["figures"]
    assert set(figures) == {"ingest", "latency", "drain", "device", "scale"}, context

    ingest = figures["ingest"]
    for key in ("value", "baseline", "ratio"):
        assert _number(ingest[key]) and ingest[key] > 0, (key, ingest)
    assert ingest["ratio"] == round(ingest["value"] / ingest["baseline"], 3)
    assert isinstance(ingest["met"], bool)
    assert ingest["runs"][0]["finished"] and ingest["runs"][0]["votes"] == \
        ingest["votes_per_run"]

    sizes = figures["latency"]["sizes"]
    assert set(sizes) == {"real_1", "emulated_20"}, sizes.keys()
    for name, size in sizes.items():
        for key in ("p50_ms", "p99_ms", "ratio_p50", "ratio_p99"):
            assert _number(size[key]), (name, key, size)
        assert size["p99_ms"] >= size["p50_ms"] > 0
        assert _number(size["baseline"]["p50_ms"]) and _number(size["baseline"]["p99_ms"])
        assert size["at_province"] == size["votes"] > 0, size
        assert isinstance(size["met"], bool)
    assert sizes["emulated_20"]["guarantees_kept"] is True, sizes["emulated_20"]
    assert sizes["emulated_20"]["lost"] == 0 and sizes["emulated_20"]["duplicates_at_province"] == 0
    assert "emulated" in sizes["emulated_20"]["kind"] and "real" in sizes["real_1"]["kind"]

    drain = figures["drain"]
    for key in ("value", "drain_votes_per_s", "baseline", "ratio"):
        assert _number(drain[key]) and drain[key] > 0, (key, drain)
    assert drain["votes"] == report["plan"]["drain_votes"]
    assert drain["baseline_runs"][0]["records"] == drain["votes"]

    device = figures["device"]
    heap = device["heap"]
    assert 0 < heap["peak_bytes"] < heap["heap_bytes"] and _number(heap["ratio"]), heap
    assert 0 < device["bytecode"]["mpy_bytes"] < device["bytecode"]["source_bytes"]
    for key in ("append_sync_us", "recover_full_journal_us"):
        entry = device[key]
        assert _number(entry["value"]) and _number(entry["baseline"]) and \
            _number(entry["ratio"]), (key, entry)
    assert device["recover_full_journal_us"]["records"] > 0

    scale = figures["scale"]
    assert scale["value"] == 20 and _number(scale["ratio"]), scale
    assert scale["steps"] and scale["limited_by"]

    # The summary table carries a row per number, each with its baseline and ratio.
    rows = report["summary"]
    assert {row["figure"] for row in rows} == set(figures)
    assert all(row["ratio"] is None or _number(row["ratio"]) for row in rows)
    assert sum(1 for row in rows if row["baseline"] is not None) >= 8


def test_bench_help_names_every_option():
    proc = subprocess.run([sys.executable, "-c", "from hub.cli import main; main()", "bench",
                           "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for option in ("--json", "--repeat", "--quick", "--full", "--only"):
        assert option in proc.stdout
