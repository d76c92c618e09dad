"""`pingjia sim demo` (and `make demo`): a hall to look at, running until Ctrl-C.

The hall of `sim run` (simulator/run.py) with the hub's HTTP API and dashboard on a fixed
port (8080), the provincial receiver on 9100 with its fault switch on, and citizens voting
at a gentle pace at every window, without end. Before the hub starts, the demo registers a
dashboard login for the hall manager and a business-system token for its own citizens (so
they keep working after someone registers their own system, which ends tokenless loopback
calls; docs/integration.md). It prints where to look, then shows the live view until
--duration passes or Ctrl-C / SIGTERM arrives, and stops everything it started.
"""
from __future__ import annotations

import asyncio
import os
import random
import secrets
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

from simulator.citizens import Citizens, Mix
from simulator.live import LiveView
from simulator.run import Forgeries, Hall, Options, Session, SimError, _victim

MANAGER = "demo"
SYSTEM = "demo-citizens"
# Between one citizen leaving a window and the next one's service ending: a calm hall.
PAUSE_S = (5.0, 15.0)
DRAIN_S = 15.0  # at a timed end, how long to let the last votes reach the province


@dataclass
class DemoOptions:
    devices: int = 20
    duration_s: float = 0.0  # 0: until Ctrl-C
    http_port: int = 8080
    province_port: int = 9100
    heap: str = "64wK"
    seed: int | None = None
    workdir: str | None = None
    keep: bool = False


class Demo:
    def __init__(self, opts: DemoOptions, out: Callable[[str], None], live: bool):
        self.opts = opts
        self.out = out
        self.live = LiveView(live)
        self.password = secrets.token_urlsafe(9)
        self.stop = asyncio.Event()
        self.stopped_by = "duration"

    def _options(self, workdir: str) -> Options:
        o = self.opts
        return Options(devices=o.devices, votes=0, heap=o.heap, seed=o.seed, workdir=workdir,
                       keep=True, province_faults=True, http_port=o.http_port,
                       province_port=o.province_port,
                       mix=Mix(think_s=(1.0, 4.0), walk_away_ttl_s=15))

    def _logins(self, hall: Hall) -> None:
        """The manager's dashboard login and the citizens' token, in the hub's store."""
        from hub import business
        from hub.dashboard import add_manager
        from hub.store import Store

        store = Store(hall.settings.db_path)
        try:
            add_manager(store, MANAGER, self.password, hall.settings.hub.id, "演示主任")
            self.token = business.add_system(store, SYSTEM)
        finally:
            store.close()

    def banner(self, session: Session) -> str:
        hall = session.hall
        hub = hall.http_url
        config = hall.settings.source
        lines = [
            "Pingjia demo: a hall of %d counter evaluators (real firmware under MicroPython), "
            "citizens voting" % len(session.fleet.devices),
            "  dashboard        %s/dashboard/   (log in as %s, password %s)" % (
                hub, MANAGER, self.password),
            "  hub API          %s/api/v1/status   %s/metrics" % (hub, hub),
            "  hub status       pingjia hub status --config %s" % config,
            "  province stats   %s/api/v1/stats   (pingjia province stats --url %s)" % (
                hall.province_url, hall.province_url),
            "  province outage  curl -X POST %s/_control/faults -d "
            "'{\"mode\": \"error\", \"for_s\": 60}'" % hall.province_url,
            "  work folder      %s" % session.workdir,
            "  logs             %s (hub), %s (province), devices/D001/device.log" % (
                "hub.log", "province.log"),
        ]
        if self.opts.duration_s > 0:
            lines.append("Running for %g s; Ctrl-C stops it sooner." % self.opts.duration_s)
        else:
            lines.append("Running until Ctrl-C.")
        return "\n".join(lines)

    async def main(self, workdir: str) -> dict:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        opts = self._options(workdir)
        rng = random.Random(opts.seed)
        session = Session(opts, workdir, lambda line: self.out(line))
        serving = None
        try:
            opened = asyncio.ensure_future(session.open(before_start=self._logins_hook(session)))
            stopper = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait([opened, stopper], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not opened.done():
                opened.cancel()
                await asyncio.gather(opened, return_exceptions=True)
                return self._result(session, None, Forgeries())
            opened.result()
            self.out(self.banner(session))
            citizens = Citizens(session.fleet, session.hub_api, rng, opts.mix)
            hall = session.hall
            serving = asyncio.gather(*(citizens.serve(d, hall.windows[d], None, PAUSE_S)
                                       for d in sorted(session.fleet.devices)))
            forgeries = Forgeries()
            end = time.monotonic() + self.opts.duration_s if self.opts.duration_s > 0 else None
            while not self.stop.is_set():
                if end is not None and time.monotonic() >= end:
                    break
                if serving.done():
                    serving.result()  # a citizen task failed: say why
                hall.check_services()
                if not forgeries.sent and len(_victim(session.fleet)[1]) >= 2:
                    # Once: shows the hub refusing forged and tampered votes (bad_mac).
                    forgeries = await session.forge(rng)
                await session.province.poll()
                self.live.show(session.progress(citizens, "demo", None))
                try:
                    await asyncio.wait_for(self.stop.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            if not self.stop.is_set():
                # A timed end: the last votes get a moment to reach the province.
                await session.drain(time.monotonic() + DRAIN_S,
                                    lambda phase: self.live.show(
                                        session.progress(citizens, phase, None)))
            self.live.end()
            session.write_visits(citizens.outcome.visits)
            return self._result(session, citizens, forgeries)
        finally:
            if serving is not None and not serving.done():
                serving.cancel()
            self.live.end()
            self.out("stopping the devices, the hub, its broker and the province")
            await session.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _logins_hook(self, session: Session):
        def hook(hall: Hall) -> None:
            self._logins(hall)
            session.token = self.token
        return hook

    def _on_signal(self, sig: int) -> None:
        if not self.stop.is_set():
            self.stopped_by = signal.Signals(sig).name
            self.stop.set()

    def _result(self, session: Session, citizens: Citizens | None,
                forgeries: Forgeries) -> dict:
        progress = session.progress(citizens, "done", None)
        return {"devices": len(session.fleet.devices), "visits": progress.visits_done,
                "votes_cast": progress.cast, "unrated": progress.unrated,
                "at_province": progress.at_province, "forged_sent": forgeries.sent,
                "stopped_by": self.stopped_by, "workdir": session.workdir}


def run(opts: DemoOptions, out: Callable[[str], None] = print, live: bool = False) -> dict:
    """Run the demo until its duration passes or it is stopped; returns a few counts."""
    if opts.devices < 1:
        raise SimError("the demo needs at least one device")
    own = opts.workdir is None
    workdir = opts.workdir or tempfile.mkdtemp(prefix="pingjia-demo-")
    os.makedirs(workdir, exist_ok=True)
    demo = Demo(opts, out, live)
    try:
        return asyncio.run(demo.main(workdir))
    finally:
        if own and not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif own:
            out("work folder kept: %s" % workdir)
