"""`pingjia bench`: the path measured against its limits, each figure beside its baseline.

Five figures (docs/benchmarks.md explains each and what it means for a hall):

1. `ingest`  — hub durable ingest, votes/s, vs mosquitto's own QoS 1 rate (bench_ingest.py)
2. `latency` — press-to-province p50/p99 at 1, 100 and 500 devices, vs the broker hop
   (bench_latency.py)
3. `drain`   — a province outage's backlog released, vs the receiver's raw accept rate
   (bench_drain.py)
4. `device`  — heap, bytecode, append+sync, recovery at boot, vs plain-VM baselines
   (bench_device.py)
5. `scale`   — the largest hall one hub holds with every guarantee kept (bench_latency.py)

Every figure runs its baseline in the same run, repeats `--repeat` times and reports the
median and the ratio to the baseline. Benchmarks are not tests: nothing here asserts a
timing; a missed target is reported, not raised. Plans (`Plan`) size the runs: the default
fits in about 10 minutes on 2 cores, `--quick` in well under a minute (a smoke run),
`--full` adds the stepped scale search and real MicroPython devices at 250.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import click

FIGURES = ("ingest", "latency", "drain", "device", "scale")


@dataclass
class Plan:
    """How big each figure's runs are. The defaults are `pingjia bench` without options."""

    name: str = "default"
    repeat: int = 3
    seed: int = 1
    workers: int = 2  # load worker processes (the machine has 2 cores)
    # 1. ingest: a busy hall's 200 devices, each streaming 100 votes, 20 unacked at most
    devices: int = 200
    votes_per_device: int = 100
    window: int = 20
    timeout_s: float = 300.0
    # 2. latency: sizes with real firmware devices and with emulated ones
    real_sizes: tuple[int, ...] = (1, 100)
    emulated_sizes: tuple[int, ...] = (500,)
    period_s: float = 20.0  # one citizen per window about this often (a busy hall's peak)
    single_period_s: float = 1.0  # the lone device: citizens back to back
    stretch_s: float = 20.0  # one measured stretch; `repeat` of them
    # 3. drain
    drain_devices: int = 200
    drain_votes: int = 100_000
    drain_repeat: int = 1
    drain_timeout_s: float = 600.0
    # 4. device
    device_appends: int = 300
    # 5. scale: hall sizes tried after the latency runs' emulated sizes
    scale_steps: tuple[int, ...] = (1000,)
    scale_stretch_s: float = 30.0


QUICK = dict(name="quick", repeat=1, devices=10, votes_per_device=30, timeout_s=60.0,
             real_sizes=(1,), emulated_sizes=(20,), period_s=4.0, stretch_s=4.0,
             drain_devices=10, drain_votes=2000, drain_timeout_s=60.0, device_appends=50,
             scale_steps=(), scale_stretch_s=5.0)
# Real devices stop at 250 here: each MicroPython process idles at ~0.7 % of a core and holds
# ~25 MB, so 500 of them want ~3.5 cores just to stand still (`--real 1,100,500` on a bigger
# machine).
FULL = dict(name="full", repeat=5, real_sizes=(1, 100, 250), emulated_sizes=(100, 500),
            stretch_s=30.0, drain_repeat=3, scale_steps=(1000, 2000, 4000, 8000))


def make_plan(quick: bool = False, full: bool = False, repeat: int | None = None,
              real: tuple[int, ...] | None = None,
              emulated: tuple[int, ...] | None = None) -> Plan:
    plan = Plan(**(QUICK if quick else FULL if full else {}))
    if repeat is not None:
        plan.repeat = repeat
    if real is not None:
        plan.real_sizes = real
    if emulated is not None:
        plan.emulated_sizes = emulated
    return plan


def _sizes(ctx, param, value):
    """A comma-separated list of device counts ("" for none)."""
    if value is None:
        return None
    try:
        sizes = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter("a comma-separated list of device counts, e.g. 1,100")
    if any(n < 1 for n in sizes):
        raise click.BadParameter("device counts are 1 or more")
    return sizes


# ---- the machine and the run's conditions -------------------------------------------------

def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return ((out.stdout or out.stderr).strip().splitlines() or [""])[0]


def machine() -> dict:
    """nproc, memory, CPU model, date and the versions that shape the numbers."""
    from hub.broker import find_mosquitto
    from simulator import build as fwbuild

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_mb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    memory_mb = int(line.split()[1]) // 1024
    except OSError:
        pass
    try:
        mosquitto = _first_line([find_mosquitto(), "-h"])
    except Exception:  # noqa: BLE001 - a missing broker shows up in the figures anyway
        mosquitto = ""
    try:
        micropython = _first_line([fwbuild.micropython_cmd(), "-c",
                                   "import sys; print(sys.implementation.version)"])
    except Exception:  # noqa: BLE001
        micropython = ""
    return {
        "nproc": os.cpu_count(),
        "memory_mb": memory_mb,
        "cpu": cpu or platform.processor(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "os": platform.platform(terse=True),
        "mosquitto": mosquitto,
        "micropython": micropython,
        "load_avg_at_start": round(os.getloadavg()[0], 2),
    }


# ---- the run --------------------------------------------------------------------------------

async def _figure(name: str, plan: Plan, workdir: str, say: Callable[[str], None],
                  results: dict) -> dict:
    from simulator import bench_device, bench_drain, bench_ingest, bench_latency

    folder = os.path.join(workdir, name)
    os.makedirs(folder, exist_ok=True)
    if name == "ingest":
        return await bench_ingest.measure(plan, folder, say)
    if name == "latency":
        return await bench_latency.measure(plan, folder, say)
    if name == "drain":
        return await bench_drain.measure(plan, folder, say)
    if name == "device":
        sizes = (results.get("latency") or {}).get("sizes") or {}
        heap = [s for k, s in sizes.items() if k.startswith("real_")]
        if not heap:
            # The latency figure did not run (--only): boot one real device for the heap.
            heap = [await bench_latency.real_devices(1, dataclasses.replace(
                plan, repeat=1, stretch_s=min(plan.stretch_s, 10.0)),
                os.path.join(folder, "real1"), say)]
        return await asyncio.get_running_loop().run_in_executor(
            None, bench_device.measure, plan, folder, say, heap)
    if name == "scale":
        known = (results.get("latency") or {}).get("sizes") or {}
        return await bench_latency.scale(plan, folder, say, known)
    raise ValueError(name)


async def _run(plan: Plan, figures: tuple[str, ...], workdir: str,
               say: Callable[[str], None]) -> dict:
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for name in FIGURES:
        if name not in figures:
            continue
        started = time.monotonic()
        say("== %s" % name)
        try:
            results[name] = await _figure(name, plan, workdir, say, results)
        except Exception as exc:  # noqa: BLE001 - one figure's failure must not lose the rest
            results[name] = {"error": "%s: %s" % (exc.__class__.__name__, exc)}
            say("%s failed: %s" % (name, results[name]["error"]))
        timings[name] = round(time.monotonic() - started, 1)
    return {"figures": results, "seconds": timings}


def run(plan: Plan, figures: tuple[str, ...] = FIGURES, say: Callable[[str], None] = print,
        workdir: str | None = None, keep: bool = False) -> dict:
    """Run the benchmarks; returns the report (see docs/benchmarks.md)."""
    own = workdir is None
    folder = workdir or tempfile.mkdtemp(prefix="pingjia-bench-")
    os.makedirs(folder, exist_ok=True)
    report: dict[str, Any] = {"bench": 1, "plan": dataclasses.asdict(plan),
                              "machine": machine()}
    started = time.monotonic()
    ok = False
    try:
        report.update(asyncio.run(_run(plan, figures, folder, say)))
        report["machine"]["load_avg_at_end"] = round(os.getloadavg()[0], 2)
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        report["summary"] = summary(report["figures"])
        ok = not any("error" in f for f in report["figures"].values())
        report["ok"] = ok
        report["workdir"] = folder if (keep or not own or not ok) else None
        return report
    finally:
        if own and ok and not keep:
            shutil.rmtree(folder, ignore_errors=True)


# ---- the summary table ------------------------------------------------------------------------

def _row(figure: str, what: str, value: Any, unit: str, baseline: Any, ratio: Any,
         target: str = "", met: Any = None) -> dict:
    return {"figure": figure, "what": what, "value": value, "unit": unit, "baseline": baseline,
            "ratio": ratio, "target": target, "met": met}


def summary(figures: dict) -> list[dict]:
    """One row per number: what, value, unit, baseline, ratio, target, met."""
    rows = []
    f = figures.get("ingest") or {}
    if "value" in f:
        rows.append(_row("ingest", "hub durable ingest (%d emulated devices)" % f["devices"],
                         f["value"], "votes/s", f["baseline"], f["ratio"], f["target"], f["met"]))
    f = figures.get("latency") or {}
    for name, size in (f.get("sizes") or {}).items():
        label = "%s devices, %s" % (size["devices"], "real" if name.startswith("real") else
                                    "emulated")
        if not size.get("valid", True):
            label += " (NOT VALID: %s)" % (
                "%d of %d visits failed" % (size["visit_errors"], size["visits"])
                if size.get("visit_errors") else "guarantees broken")
        base = size["baseline"]
        rows.append(_row("latency", "press-to-province p50, " + label, size["p50_ms"], "ms",
                         base["p50_ms"], size["ratio_p50"]))
        rows.append(_row("latency", "press-to-province p99, " + label, size["p99_ms"], "ms",
                         base["p99_ms"], size["ratio_p99"], size["target"], size["met"]))
    f = figures.get("drain") or {}
    if "value" in f:
        rows.append(_row("drain", "%d held votes: release to all accepted" % f["votes"],
                         f["value"], "s", None, None))
        rows.append(_row("drain", "drain rate vs the receiver's raw accept rate",
                         f["drain_votes_per_s"], "votes/s", f["baseline"], f["ratio"]))
    f = figures.get("device") or {}
    if "heap" in f:
        heap = f["heap"]
        rows.append(_row("device", "heap peak of the whole app", heap["peak_bytes"], "bytes",
                         heap["baseline"], heap["ratio"], heap["target"], heap["met"]))
        rows.append(_row("device", "heap peak / heap size", heap["share"], "",
                         None, None, heap["target"], heap["met"]))
        code = f["bytecode"]
        rows.append(_row("device", "firmware bytecode (.mpy)", code["mpy_bytes"], "bytes",
                         code["baseline"], code["ratio"]))
        rows.append(_row("device", "sign one vote", f["sign_vote_us"], "us", None, None))
        app = f["append_sync_us"]
        rows.append(_row("device", "append+sync one vote", app["value"], "us", app["baseline"],
                         app["ratio"]))
        rec = f["recover_full_journal_us"]
        rows.append(_row("device", "recover a full journal at boot (%s records)" % rec["records"],
                         rec["value"], "us", rec["baseline"], rec["ratio"]))
    f = figures.get("scale") or {}
    if "steps" in f:
        rows.append(_row("scale", "largest hall with every guarantee kept (searched up to %s)"
                         % f["searched_up_to"], f["value"], "devices", f["baseline"], f["ratio"]))
    for name, figure in figures.items():
        if "error" in figure:
            rows.append(_row(name, "failed: " + figure["error"], None, "", None, None))
    return rows


def format_table(report: dict) -> str:
    m = report["machine"]
    lines = ["pingjia bench (%s plan, repeat %d) on %s CPUs, %s MB, %s, %s" % (
        report["plan"]["name"], report["plan"]["repeat"], m["nproc"], m["memory_mb"], m["cpu"],
        m["date"]), ""]
    header = ("figure", "what", "value", "baseline", "ratio", "target")
    rows = [header]
    for row in report["summary"]:
        value = "" if row["value"] is None else "%s %s" % (_num(row["value"]), row["unit"])
        target = row["target"]
        if row["met"] is not None:
            target = "%s: %s" % (target, "met" if row["met"] else "MISSED")
        rows.append((row["figure"], row["what"], value.strip(), _num(row["baseline"]),
                     _num(row["ratio"]), target))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    lines.append("")
    lines.append("elapsed %.0f s, load average %s at start, %s at end" % (
        report["elapsed_s"], m["load_avg_at_start"], m.get("load_avg_at_end")))
    if report.get("workdir"):
        lines.append("work folder kept: %s" % report["workdir"])
    return "\n".join(lines)


def _num(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return ("%.3f" % value).rstrip("0").rstrip(".") if abs(value) < 10 else "%.0f" % value
    return str(value)


# ---- the command --------------------------------------------------------------------------------

@click.command("bench")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--repeat", type=click.IntRange(1, 50), default=None,
              help="Runs per figure, medians reported (default: 3; --quick 1, --full 5).")
@click.option("--quick", is_flag=True, help="Tiny sizes: a smoke run in well under a minute.")
@click.option("--full", is_flag=True,
              help="Longer runs, real MicroPython devices up to 250, the stepped scale search.")
@click.option("--only", "only", multiple=True, type=click.Choice(FIGURES),
              help="Run only this figure (repeatable).")
@click.option("--real", callback=_sizes, metavar="N,N",
              help="Latency with this many real MicroPython devices (default 1,100).")
@click.option("--emulated", callback=_sizes, metavar="N,N",
              help="Latency with this many emulated devices (default 500).")
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Keep every hall, log and database in this folder.")
@click.option("--keep", is_flag=True, help="Keep the temporary work folder after a good run.")
@click.pass_context
def bench(ctx, as_json, repeat, quick, full, only, real, emulated, workdir, keep):
    """Benchmarks: hub ingest, latency, backlog drain, device, scale (docs/benchmarks.md)."""
    if quick and full:
        raise click.UsageError("--quick and --full exclude each other")
    plan = make_plan(quick=quick, full=full, repeat=repeat, real=real, emulated=emulated)

    def say(line: str) -> None:
        click.echo(line, err=True)

    def stop(signum, frame):
        # A SIGTERM unwinds like Ctrl-C, so every hall, broker and worker is stopped.
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, stop)
    report = run(plan, tuple(only) or FIGURES, say=say, workdir=workdir, keep=keep)
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False, sort_keys=False))
    else:
        click.echo(format_table(report))
    ctx.exit(0 if report["ok"] else 1)


def main(argv: list[str] | None = None) -> None:  # `python -m simulator.bench`
    bench.main(argv, prog_name="pingjia bench")


if __name__ == "__main__":
    main(sys.argv[1:])
