# The chaos run and the demo: faults injected while citizens vote (device power cuts racing
# the journal write, network cuts and stalls through the proxy, broker and hub kills,
# province outages) must lose nothing, double nothing and let nothing forged through; the
# demo must stop cleanly and leave no process behind. Plus the parts on their own: the
# proxy, reading a dead device's flash, the seeded fault plan, the live view line.
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pingjia(*args):
    return [sys.executable, "-c", "from hub.cli import main; main()", *args]


def _processes_in(folder):
    """Live processes whose working directory or command line lies in `folder`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cwd = os.readlink("/proc/%s/cwd" % pid)
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open("/proc/%s/stat" % pid) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (cwd.startswith(folder) or folder in cmd):
            found.append("%s %s" % (pid, cmd[:120]))
    return found


# ---- the proxy ------------------------------------------------------------------------------

async def _echo_server():
    async def echo(reader, writer):
        try:
            while True:
                data = await reader.read(1024)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _is_cut(reader, writer=None):
    """True when the connection is gone: reset, or closed with nothing more to read."""
    try:
        if writer is not None:
            writer.write(b"x")
            await writer.drain()
        return await asyncio.wait_for(reader.read(1024), 10) == b""
    except ConnectionError:
        return True


async def _read_or_none(reader, wait_s):
    try:
        return await asyncio.wait_for(reader.read(1024), wait_s)
    except asyncio.TimeoutError:
        return None


def test_proxy_carries_bytes_stalls_them_and_drops_links():
    from simulator.proxy import NetworkProxy

    async def scenario():
        server, port = await _echo_server()
        proxy = NetworkProxy("127.0.0.1", port)
        a_port = await proxy.add("D001")
        b_port = await proxy.add("D002")
        assert a_port != b_port and await proxy.add("D001") == a_port
        try:
            ra, wa = await asyncio.open_connection("127.0.0.1", a_port)
            rb, wb = await asyncio.open_connection("127.0.0.1", b_port)
            wa.write(b"hello")
            assert await asyncio.wait_for(ra.readexactly(5), 10) == b"hello"

            # A stall holds the bytes (the connection stays open); healing delivers them.
            proxy.stall("D001")
            wa.write(b"held")
            assert await _read_or_none(ra, 0.5) is None
            wb.write(b"other")  # the other device's link is untouched
            assert await asyncio.wait_for(rb.readexactly(5), 10) == b"other"
            proxy.heal("D001")
            assert await asyncio.wait_for(ra.readexactly(4), 10) == b"held"

            # A drop resets the open connection and refuses new ones until healed.
            proxy.drop("D001")
            assert await _is_cut(ra, wa)
            rc, wc = await asyncio.open_connection("127.0.0.1", a_port)
            assert await _is_cut(rc)
            wc.close()
            proxy.heal("D001")
            rd, wd = await asyncio.open_connection("127.0.0.1", a_port)
            wd.write(b"back")
            assert await asyncio.wait_for(rd.readexactly(4), 10) == b"back"

            # Every link at once (the hall's switch): both devices lose their connections.
            proxy.drop(None)
            assert await _is_cut(rd) and await _is_cut(rb)
            assert proxy.link("D002").state == "down" and proxy.link("D001").state == "down"
            proxy.heal(None)
            counters = proxy.counters()
            assert counters["drops"] == 3 and counters["stalls"] == 1
            assert counters["refused"] >= 1 and counters["aborted"] >= 2
            assert counters["bytes_up"] >= len(b"hello" b"held" b"other" b"back")
            for w in (wa, wb, wd):
                w.close()
        finally:
            await proxy.close()
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())


# ---- a dead device's flash --------------------------------------------------------------------

def test_power_cut_reads_the_journal_and_finds_records_never_reported(tmp_path):
    from firmware.evaluator.journal import Journal
    from simulator.fleet import Fleet, Saved

    fleet = Fleet(str(tmp_path / "devices"))
    dev = fleet.add("D001", {"device_id": "D001"})
    with open(os.path.join(dev.workdir, "board.json")) as f:
        flash = json.load(f)["flash"]
    journal = Journal(os.path.join(dev.workdir, flash.get("journal_dir", "journal")),
                      flash["journal_segments"], flash["segment_bytes"])
    payloads = {seq: json.dumps({"d": "D001", "s": seq, "k": "v", "pid": "P%d" % seq,
                                 "stars": 5}).encode() for seq in (1, 2, 3)}
    for seq in (1, 2, 3):
        journal.append(seq, 1700000000 + seq, payloads[seq])
    # A torn append after the last good record (the power went mid-write) is not a record.
    with open(journal._path(1), "ab") as f:
        f.write(b"\xa5\x40\x00\x04")
    # Seq 1 was reported durable; seq 2's "saved" never arrived; seq 3 was reported with
    # another record than the flash holds (a reused sequence number).
    dev.saved[1] = Saved("D001", 1, "v", "P1", 5, 1, payloads[1].decode(), 0)
    dev.saved[3] = Saved("D001", 3, "v", "P9", 5, 3, '{"other": true}', 0)

    found = asyncio.run(fleet.power_cut("D001"))

    assert [(s.seq, s.pid, s.reported) for s in found] == [(2, "P2", False)]
    assert dev.saved[2].reported is False and dev.saved[1].reported is True
    assert dev.seq_conflicts == [3]
    assert dev.power_cuts == 1 and fleet.flash_errors == []
    # The device's own flash is left as the cut left it, for its next boot to recover.
    with open(journal._path(1), "rb") as f:
        assert f.read().endswith(b"\xa5\x40\x00\x04")


# ---- the seeded plan and the live line ------------------------------------------------------

def test_fault_plan_is_repeatable_and_starts_with_every_kind():
    from simulator.chaos import FAULT_KINDS, FaultPlan, parse_kinds

    devices = ["D%03d" % i for i in range(1, 21)]
    one = [vars(FaultPlan(42, FAULT_KINDS, devices, 3.0).next()) for _ in range(1)]
    plan_a, plan_b = FaultPlan(42, FAULT_KINDS, devices, 3.0), FaultPlan(42, FAULT_KINDS,
                                                                         devices, 3.0)
    a = [vars(plan_a.next()) for _ in range(40)]
    b = [vars(plan_b.next()) for _ in range(40)]
    assert a == b and a[0] == one[0]
    other = [vars(f) for f in (FaultPlan(43, FAULT_KINDS, devices, 3.0).next()
                               for _ in range(40))]
    assert other != a
    assert sorted(f["kind"] for f in a[:len(FAULT_KINDS)]) == sorted(FAULT_KINDS)
    assert all(f["target"] in devices for f in a if f["kind"] == "power")
    assert all(f["target"] is None for f in a if f["kind"] in ("broker", "hub", "province"))
    assert parse_kinds("power, hub,power") == ("power", "hub")
    assert parse_kinds("all") == FAULT_KINDS
    with pytest.raises(Exception, match="unknown fault kind"):
        parse_kinds("power,meteor")


def test_live_line_shows_progress_counters_and_faults():
    import io

    from simulator.live import LiveView, Progress

    stream = io.StringIO()
    view = LiveView(True, stream=stream, clock=lambda: 100.0)
    progress = Progress(phase="citizens", visits_done=50, visits_total=100, cast=45,
                        unrated=2, at_province=40, misuse=3,
                        faults={"power": 2, "network": 1, "hub": 1}, faults_active=1,
                        cut_presses=1, devices_down=1)
    line = view.line(progress)
    assert line.startswith("[############............] 50/100 visits")
    for part in ("votes 45", "unrated 2", "province 40", "misuse 3", "faults P2 N1 H1 (1 active)",
                 "cut presses 1", "down 1", "citizens"):
        assert part in line, (part, line)
    view.show(progress)
    view.end()
    assert stream.getvalue().startswith("\r[") and stream.getvalue().endswith("\n")
    quiet = io.StringIO()
    off = LiveView(False, stream=quiet)
    off.show(progress)
    off.end()
    assert quiet.getvalue() == ""


# ---- end to end ---------------------------------------------------------------------------------

CHAOS_DEVICES = 20
CHAOS_VISITS = 100


@pytest.mark.slow
def test_seeded_chaos_run_loses_nothing_and_doubles_nothing(tmp_path):
    workdir = tmp_path / "chaos"
    cmd = _pingjia("sim", "chaos", "--devices", str(CHAOS_DEVICES), "--votes", str(CHAOS_VISITS),
                   "--seed", "11", "--fault-every", "2.5", "--deadline", "240",
                   "--workdir", str(workdir), "--json")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=290)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    summary = json.loads(lines[-1])
    context = json.dumps(summary, indent=1, ensure_ascii=False) + proc.stderr[-2000:]

    # Every kind of fault fired while the citizens were voting.
    for kind in ("power", "network", "broker", "hub", "province"):
        assert summary["faults_while_voting"][kind] >= 1, context
    assert summary["faults_missing"] == [] and summary["fault_errors"] == [], context
    assert summary["power_cuts"] >= 1 and summary["hub_restarts"] >= 1, context
    assert summary["broker_restarts"] >= 1, context
    assert summary["network"]["drops"] + summary["network"]["stalls"] >= 1, context
    # The guarantees.
    assert summary["votes_cast"] > CHAOS_VISITS // 2, context
    assert summary["votes_at_province"] == summary["votes_cast"], context
    assert summary["unrated_at_province"] == summary["unrated"], context
    assert summary["duplicates_at_province"] == 0, context
    assert summary["lost"] == 0, context
    assert summary["altered_at_province"] == 0, context
    assert summary["forged_sent"] >= 5 and summary["forged_accepted"] == 0, context
    assert summary["seq_conflicts"] == 0 and summary["device_crashes"] == 0, context
    # A press cut off by a power cut is not cast; whatever became durable anyway arrived.
    assert summary["durable_unreported_at_province"] == summary["durable_unreported"], context
    assert summary["visits"] == CHAOS_VISITS and summary["visit_errors"] == 0, context
    # Patient citizens: hardly anyone leaves because every attempt met a fault.
    assert summary["visits_given_up"] <= CHAOS_VISITS // 50, context
    assert summary["ok"] is True and proc.returncode == 0, context
    # The fault log names what happened, for replaying a seed.
    events = [json.loads(line) for line in (workdir / "faults.jsonl").read_text().splitlines()]
    assert {e["kind"] for e in events if e["event"] not in ("skipped", "healed")} == {
        "power", "network", "broker", "hub", "province"}
    assert events[-1]["event"] == "healed"
    assert not _processes_in(str(workdir)), _processes_in(str(workdir))


def _demo_cmd(workdir, duration):
    return _pingjia("sim", "demo", "--devices", "3", "--duration", str(duration),
                    "--http-port", str(_free_port()), "--province-port", str(_free_port()),
                    "--workdir", str(workdir))


def test_demo_runs_for_its_duration_then_stops_everything(tmp_path):
    workdir = tmp_path / "demo"
    proc = subprocess.run(_demo_cmd(workdir, 12), cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    out = proc.stdout
    assert proc.returncode == 0, out[-2000:] + proc.stderr[-2000:]
    for where in ("/dashboard/", "/api/v1/stats", "pingjia hub status --config",
                  "/_control/faults", str(workdir)):
        assert where in out, (where, out)
    assert "demo stopped (duration)" in out, out
    assert (workdir / "hub" / "hub.toml").exists() and (workdir / "visits.jsonl").exists()
    assert not _processes_in(str(workdir)), _processes_in(str(workdir))


def test_demo_stops_cleanly_on_ctrl_c(tmp_path):
    workdir = tmp_path / "demo"
    proc = subprocess.Popen(_demo_cmd(workdir, 0), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("Running until Ctrl-C"):
                break
        assert seen and seen[-1].startswith("Running until Ctrl-C"), "".join(seen)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, "".join(seen) + rest
    assert "demo stopped (SIGINT)" in rest, rest
    assert not _processes_in(str(workdir)), _processes_in(str(workdir))
