"""Figure 4, the device: heap, bytecode size, vote append+sync, journal recovery at boot.

- Heap peak of the whole device app: the highest live heap (bytes in use right after a
  collection) any real simulated device reported during the latency runs (figure 2), in
  its `-X heapsize=64K` heap (the board's 64 KB taken literally; on this 64-bit host an
  object takes about twice its room on the 32-bit board; docs/simulator.md, "Memory"). Baseline: the live
  heap of a bare VM of the same size with asyncio imported, the floor any app starts from.
- Bytecode: the .mpy files mpy-cross makes of firmware/ (what a board holds), and the
  ROMFS image the simulator maps; baseline: the Python source of the same modules.
- Timings (simulator/bench_device_mp.py, under the MicroPython unix port with the
  device's heap, running the compiled firmware): sign one vote, append+sync one vote, open
  a full journal at boot; baselines a plain file append+flush and a plain read of the same
  journal files, in the same VM.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from typing import Any, Callable

from simulator import build as fwbuild
from simulator.bench_kit import BenchError, median, ratio
from simulator.fleet import BOARD_HEAP

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_device_mp.py")
SIM_BOARD_FLASH = (16, 4096)  # hardware/boards/sim.json and the ESP32-S3 board alike
ROOM_TARGET = 0.8  # "room to spare": at most 80 % of the heap live at the peak


def bytecode_sizes(build_dir: str | None = None) -> dict:
    result = fwbuild.build(build_dir or fwbuild.DEFAULT_OUT)
    sources = fwbuild.sources()
    mpy = src = 0
    for rel, path in sources.items():
        if os.path.basename(path) in fwbuild.SIM_MODULES:
            continue  # the simulated board is not firmware
        mpy += os.path.getsize(os.path.join(result.out_dir, rel))
        src += os.path.getsize(path)
    return {"mpy_bytes": mpy, "source_bytes": src, "ratio": ratio(mpy, src),
            "romfs_bytes": os.path.getsize(result.romfs),
            "modules": sum(1 for p in sources.values()
                           if os.path.basename(p) not in fwbuild.SIM_MODULES)}


def _micropython(args: list[str], build_dir: str, cwd: str, timeout: float = 300) -> str:
    env = dict(os.environ, MICROPYPATH=fwbuild.micropython_path(build_dir))
    proc = subprocess.run([fwbuild.micropython_cmd(), "-X", "heapsize=" + BOARD_HEAP, *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise BenchError("micropython: %s" % (tail[-1] if tail else "exit %d" % proc.returncode))
    return proc.stdout.strip().splitlines()[-1]


def bare_heap(build_dir: str) -> dict:
    """Live heap of a bare VM with asyncio imported, in the device's heap size."""
    line = _micropython(["-c", "import gc, asyncio\ngc.collect()\n"
                               "print(gc.mem_alloc(), gc.mem_alloc() + gc.mem_free())"],
                        build_dir, fwbuild.ROOT)
    live, size = (int(x) for x in line.split())
    return {"live_bytes": live, "heap_bytes": size}


def timings(appends: int, build_dir: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="pingjia-bench-device-") as tmp:
        line = _micropython([SCRIPT, tmp, str(appends), str(SIM_BOARD_FLASH[0]),
                             str(SIM_BOARD_FLASH[1])], build_dir, tmp)
    try:
        return json.loads(line)
    except ValueError:
        raise BenchError("device timings: unreadable output %r" % line[:200]) from None


def measure(plan: Any, workdir: str, say: Callable[[str], None],
            heap_runs: list[dict]) -> dict:
    """heap_runs: the real-device latency results (each with heap_peak_bytes, heap_bytes)."""
    build_dir = fwbuild.DEFAULT_OUT  # the simulator's own build (incremental, shared)
    say("device: compiling the firmware with mpy-cross")
    sizes = bytecode_sizes(build_dir)
    bare = bare_heap(build_dir)
    runs = []
    for r in range(plan.repeat):
        say("device: timings %d/%d under the MicroPython unix port" % (r + 1, plan.repeat))
        runs.append(timings(plan.device_appends, build_dir))

    def med(key: str, stat: str = "median_us") -> float | None:
        return median([run[key][stat] for run in runs])

    peak = max((h.get("heap_peak_bytes") or 0 for h in heap_runs), default=0) or None
    heap_size = max((h.get("heap_bytes") or 0 for h in heap_runs), default=0) or None
    share = ratio(peak, heap_size)
    append, plain = med("append"), med("plain_append")
    recover, plain_read = med("recover"), med("plain_read")

    def paired(key: str, base: str) -> float | None:
        # Each run timed the operation and its baseline alternately: the ratio within a run
        # shares that run's moment of a busy machine; the median of those is the figure.
        return median([ratio(run[key]["median_us"], run[base]["median_us"]) for run in runs])

    return {
        "what": "the device app's heap, bytecode size and journal timings (MicroPython unix "
                "port, -X heapsize=%s)" % BOARD_HEAP,
        "heap": {
            "peak_bytes": peak, "heap_bytes": heap_size, "share": share,
            "estimate_32bit_bytes": int(share * 65536) if share else None,
            "target": "share <= %.1f (fits 64 KB with room to spare)" % ROOM_TARGET,
            "met": share is not None and share <= ROOM_TARGET,
            "baseline": bare["live_bytes"],
            "baseline_what": "live heap of a bare VM with asyncio imported, same heap size",
            "ratio": ratio(peak, bare["live_bytes"]),
            "from": "real devices of the latency runs: %s" % ", ".join(
                str(h.get("devices")) for h in heap_runs) if heap_runs else "no real devices ran",
        },
        "bytecode": dict(sizes, baseline=sizes["source_bytes"],
                         baseline_what="Python source of the same modules"),
        "sign_vote_us": med("sign"),
        "append_sync_us": {"value": append, "p99": med("append", "p99_us"), "baseline": plain,
                           "baseline_what": "plain file open/append/flush/close, same bytes",
                           "ratio": paired("append", "plain_append")},
        "recover_full_journal_us": {
            "value": recover, "records": runs[0]["full_records"] if runs else None,
            "bytes": runs[0]["full_bytes"] if runs else None, "baseline": plain_read,
            "baseline_what": "reading the same files in 64-byte reads",
            "ratio": paired("recover", "plain_read")},
        "payload_bytes": runs[0]["payload_bytes"] if runs else None,
        "appends_per_run": plan.device_appends,
        "runs": runs,
    }
