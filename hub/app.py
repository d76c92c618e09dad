"""The running hub: supervised broker, ingest, forwarder, the update rollout engine and the
HTTP API, started and stopped in the right order.

Nothing here holds state that matters: every vote, ack mark, batch and prompt is in the
SQLite store, so the process may be killed at any moment (SIGKILL included) and the next
start carries on. A graceful stop only saves redelivery work: it stops taking HTTP
requests, lets the ingest queue drain, then stops the forwarder and the broker last.
"""
import asyncio
import logging
import signal
import threading
import time

from aiohttp import web

from . import keys
from .broker import Broker
from .forward import Forwarder
from .http_api import Downlink, open_api
from .ingest import IngestService
from .store import Store
from .updates import RolloutEngine

log = logging.getLogger("pingjia.hub")

TIME_EVERY_S = 60.0


class Hub:
    """One hall hub. start() returns once every part runs; stop() is idempotent."""

    def __init__(self, settings, clock=time.time):
        self.settings = settings
        self.clock = clock
        self.broker = None
        self.ingest = None
        self.forwarder = None
        self.downlink = None
        self.updates = None
        self._loop = None
        self._http_thread = None
        self._http_ready = threading.Event()
        self._http_error = None
        self._stopped = False

    # -- lifecycle --------------------------------------------------------------------------
    def start(self):
        settings = self.settings
        # Migrate once, before several threads open their own connections.
        Store(settings.db_path, clock=self.clock).close()
        signing_key = keys.load_signing_key(settings.signing_key_path)
        try:
            self.broker = Broker(settings)
            self.broker.start()
            self.broker.supervise()
            self.forwarder = Forwarder.from_settings(settings, signing_key, clock=self.clock)
            self.forwarder.start()
            self.ingest = IngestService(settings, on_group=self._on_group, clock=self.clock)
            self.downlink = Downlink(self.ingest.publish, clock=self.clock)
            self.ingest.start()
            self.updates = RolloutEngine(settings.db_path, self.ingest.publish,
                                         wait_connected=self.ingest.wait_connected,
                                         clock=self.clock,
                                         offline_after_s=settings.dashboard.offline_after_s)
            self.updates.start()
            self._start_http()
        except BaseException:
            self.stop()
            raise
        log.info("hub %s running: broker %s:%d, http %s:%d", settings.hub.id,
                 settings.broker.host, settings.broker.port, settings.http.host,
                 settings.http.port)

    def stop(self):
        if self._stopped:
            return
        self._stopped = True
        if self._loop is not None and self._http_thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._http_thread.join(10)
        if self.updates is not None:
            self.updates.stop()
        if self.ingest is not None:
            self.ingest.stop()
        if self.forwarder is not None:
            self.forwarder.stop()
        if self.broker is not None:
            self.broker.stop()
        log.info("hub %s stopped", self.settings.hub.id)

    def run_until_signal(self):
        """Run until SIGINT or SIGTERM, then stop gracefully."""
        stop = threading.Event()

        def on_signal(signum, frame):
            log.info("signal %d: stopping", signum)
            stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            while not stop.wait(1.0):
                pass
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # -- wiring -----------------------------------------------------------------------------
    def _on_group(self, result):
        # On the ingest thread, after the group's acks went out.
        if result.stored:
            self.forwarder.wake()
        for device_id in result.births:
            try:
                self.downlink.greet(self.ingest.ingestor.store, device_id)
            except Exception:
                log.exception("greeting device %s failed", device_id)

    def health(self):
        return {"mqtt": self.ingest.connected.is_set() if self.ingest else False,
                "broker": self.broker.is_running() if self.broker else False}

    def _start_http(self):
        self._http_thread = threading.Thread(target=self._http_main, name="pingjia-http",
                                             daemon=True)
        self._http_thread.start()
        self._http_ready.wait(30)
        if self._http_error is not None:
            raise self._http_error

    def _http_main(self):
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        settings = self.settings
        downlink = self.downlink
        app, store = open_api(settings, downlink, clock=self.clock, health=self.health)
        runner = web.AppRunner(app, access_log=None)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, settings.http.host, settings.http.port)
            loop.run_until_complete(site.start())
        except OSError as exc:
            from . import PingjiaError
            self._http_error = PingjiaError("http %s:%d: %s" % (settings.http.host,
                                                                settings.http.port, exc.strerror))
            self._http_ready.set()
            loop.run_until_complete(runner.cleanup())
            store.close()
            loop.close()
            return
        ticker = loop.create_task(self._tick(store, downlink))
        self._http_ready.set()
        try:
            loop.run_forever()
        finally:
            ticker.cancel()
            loop.run_until_complete(asyncio.gather(ticker, return_exceptions=True))
            loop.run_until_complete(runner.cleanup())
            store.close()
            loop.close()

    async def _tick(self, store, downlink):
        """Catalogue to every device once connected, then hub time every minute."""
        await asyncio.get_running_loop().run_in_executor(None, self.ingest.wait_connected, 30.0)
        first = True
        while True:
            try:
                for device in store.active_devices():
                    if first:
                        downlink.cat(device["device_id"])
                    downlink.time(device["device_id"])
                first = False
            except Exception:
                log.exception("periodic downlinks failed")
            await asyncio.sleep(TIME_EVERY_S)
