"""The Raspberry Pi evaluator: keys -> rating -> durable journal -> hub, and the hub's
downlinks (who is signed in, prompts, acks, catalogue, time) back to the screen.

It is firmware/app.py's behaviour under CPython, built from the same portable core
(firmware/evaluator: Rating, Keys, Journal, codec) so a Pi and an MCU evaluator cannot
disagree about what a vote is. What differs is only the hardware around it: keys come from
GPIO (agent/board.py), the screen is drawn with Pillow for luma.oled (agent/screens.py),
and the hub is reached through a transport (agent/transport.py): the device's own MQTT
session, or a serial link to a window PC's bridge.

THE RULE (DESIGN.md guarantee 1): a record from the rating state machine is signed,
appended to the journal -- which returns only once it is fsynced -- and only then does the
screen say "thank you". A full journal or a failed write shows the QR fallback instead.

Guarantee 2: records leave the journal only on the hub's application ack (dn/ack), never
on an MQTT PUBACK. The journal is the outgoing queue: the uplink walks it in sequence
order with QoS 1, a few records in flight at a time, and when acks stop advancing for
resend_ms (10 s) it starts again at the oldest unacked record (docs/protocol.md, "Ack").

One thread runs everything here (run() or step()); the transport's own threads only queue
events for it, so the rating and the journal never see two callers at once.
"""
import json
import logging
import threading
import time

from firmware.evaluator import VERSION, codec
from firmware.evaluator.journal import JournalFull
from firmware.evaluator.keys import Keys
from firmware.evaluator.rating import Rating

log = logging.getLogger("pingjia.agent")

UI_MS = 20  # key scan period; Keys debounces over several scans
_TICK_EVERY = 5  # rating timeouts checked every 5th scan (100 ms)
_DRAW_EVERY = 3  # screen compared every 3rd scan (60 ms)
_ROOM_EVERY = 50  # journal room re-checked about once a second
VOTE_ROOM = 512  # journal bytes one vote record needs, with margin (payload ~330)
EVT_SLOTS = 4  # prompt outcomes waiting to go up; overflow drops the oldest, counted
WINDOW = 8  # QoS 1 publishes in flight at once
CLOCK_SLACK_S = 2  # hub time within this of ours is not worth a correction
MAX_DOWNLINK = 32768  # a Pi has room for a ctx with a staff photo
ANIM_MS = 250
_ANIMATED = ("PROMPT", "REASONS")


class Clock:
    """Monotonic milliseconds for intervals, wall-clock seconds for vote times."""

    def ticks_ms(self):
        return int(time.monotonic() * 1000)

    def time(self):
        return time.time()


def qr_fallback(config):
    """The QR bitmap FULL shows: `qr` (a wire bitmap from provisioning) or `qr_url`
    (rendered here: the Pi has segno), else None."""
    extra = getattr(config, "extra", {}) or {}
    if isinstance(extra.get("qr"), dict):
        return extra["qr"]
    url = extra.get("qr_url")
    if isinstance(url, str) and url:
        from hub import bitmaps
        try:
            return bitmaps.qr_bitmap(url)
        except Exception as exc:  # noqa: BLE001 - a bad URL must not stop the evaluator
            log.warning("qr_url cannot become a QR code: %s", exc)
    return None


class Evaluator:
    """One counter evaluator on a Linux board. run(stop) loops; step() is one scan."""

    def __init__(self, config, board, journal, transport, rating=None, keys=None, screens=None,
                 clock=None, hb_s=30, resend_ms=10000, window=WINDOW, on_event=None):
        self.config = config
        self.board = board
        self.journal = journal
        self.transport = transport
        self.rating = rating or Rating()
        self.keys = keys or Keys(board.keys_pins, active=board.key_active)
        self.clock = clock or Clock()
        self.device_id = codec.check_id(config.device_id, "device_id")
        self._key = bytes(config.key)
        self.hb_ms = int(hb_s * 1000)
        self.resend_ms = resend_ms
        self.window = window
        self._notify = on_event
        self.display = board.display
        if screens is None and self.display is not None:
            from .screens import Screens
            screens = Screens(self.display.width, self.display.height, self.display.mode,
                              photo=getattr(board, "photo", None))
        self.screens = screens
        qr = qr_fallback(config)
        if qr is not None:
            self.rating.qr = qr
        self._boot_ms = self.clock.ticks_ms()
        self._clk_offset = 0  # hub time minus our wall clock, seconds
        self.clk_correction = 0
        self._sent = 0  # highest seq published in this pass
        self._progress_ms = self._boot_ms  # when acks last advanced (or the oldest went out)
        self._birth_due = False
        self._hb_ms = self._boot_ms
        self._evts = []  # (pid, outcome) pairs; bounded by EVT_SLOTS
        self._full = False
        self._drawn_changes = -1
        self._drawn_ms = self._boot_ms
        self._drawn_state = None
        self.disp_ok = self.display is not None
        self._n = 0
        # Counters: nothing is dropped silently (DESIGN.md guarantee 5).
        self.saved_records = 0
        self.refused_full = 0
        self.flash_errors = 0
        self.bad_records = 0
        self.bad_downlinks = 0
        self.evt_dropped = 0
        self.resends = 0
        self.published = 0
        self.disp_failed = 0
        self.sessions = 0

    # ---- time -------------------------------------------------------------------------
    def unix_time(self):
        return int(self.clock.time()) + self._clk_offset

    def _set_hub_time(self, hub_t):
        diff = hub_t - self.unix_time()
        if diff > CLOCK_SLACK_S or diff < -CLOCK_SLACK_S:
            self._clk_offset += diff
            self.clk_correction = diff
            log.info("clock corrected by %d s from hub time", diff)

    def uptime_s(self):
        return (self.clock.ticks_ms() - self._boot_ms) // 1000

    # ---- THE RULE ---------------------------------------------------------------------
    def save(self, record, now):
        """Sign record, make it durable, and only then let the rating say thanks.
        Returns the sequence number, or 0 when it could not be stored (QR fallback)."""
        journal = self.journal
        seq = journal.next_seq
        t = self.unix_time()
        try:
            vote = codec.make_vote(self._key, self.device_id, seq, t, record["k"], record["pid"],
                                   record["case"], record["stars"], record["rs"], record["cv"],
                                   record["w"], record["sn"])
            payload = codec.encode_vote(vote)
            journal.append(seq, t, payload)
        except JournalFull:
            self.refused_full += 1
            return self._not_saved(now, "full")
        except ValueError:  # CodecError: a record the protocol cannot carry (a bug, counted)
            self.bad_records += 1
            return self._not_saved(now, "bad")
        except OSError as exc:  # the write or fsync failed: not durable, so no thanks
            self.flash_errors += 1
            log.error("journal write failed: %s", exc)
            return self._not_saved(now, "flash")
        # Durable now (append returned after fsync); the thanks screen may follow.
        self.rating.saved(True, now)
        self.saved_records += 1
        log.info("record %d saved (%s, prompt %s)", seq, record["k"], record["pid"])
        self._event({"e": "saved", "seq": seq, "k": record["k"], "pid": record["pid"],
                     "stars": record["stars"], "t": t, "p": payload.decode()})
        self._check_room()
        return seq

    def _not_saved(self, now, why):
        self.rating.saved(False, now)
        self._full = True
        log.warning("record refused: %s", why)
        self._event({"e": "refused", "why": why})
        return 0

    def _check_room(self):
        room = self.journal.can_append(VOTE_ROOM)
        if room and self._full:
            self._full = False
            self.rating.set_full(False)
        elif not room and not self._full:
            self._full = True
            self.rating.set_full(True)

    # ---- downlink -----------------------------------------------------------------------
    def on_message(self, kind, payload, retained=False):
        """One downlink from pj/<d>/dn/<kind>; malformed ones are counted, never fatal."""
        try:
            if kind == "ack":
                self._on_ack(codec.decode_ack(payload))
                return
            if len(payload) > MAX_DOWNLINK:
                raise ValueError("too large")
            msg = json.loads(payload)
            if not isinstance(msg, dict):
                raise ValueError("not an object")
            if kind == "ctx":
                if not self.rating.set_context(msg):
                    raise ValueError(self.rating.why)
            elif kind == "prompt":
                outcome = self.rating.offer(msg, self.clock.ticks_ms())
                if outcome == "bad":  # malformed, or answered already (a hub error)
                    self.bad_downlinks += 1
                    log.warning("prompt refused: %s", self.rating.why)
                pid = msg.get("pid")
                self._queue_evt(pid if isinstance(pid, str) else "", outcome)
            elif kind == "cat":
                if not self.rating.set_catalogue(msg):
                    raise ValueError(self.rating.why)
            elif kind == "time":
                t = msg.get("t")
                if not isinstance(t, int) or isinstance(t, bool):
                    raise ValueError("time: t")
                self._set_hub_time(t)
            else:
                raise ValueError("unknown downlink")
        except (ValueError, KeyError, TypeError) as exc:
            self.bad_downlinks += 1
            log.warning("downlink %s refused: %s", kind, exc)
            if kind == "prompt":
                self._queue_evt("", "bad")

    def _on_ack(self, seq):
        if self.journal.ack(seq):
            self._progress_ms = self.clock.ticks_ms()
            self._check_room()
        if seq > self._sent:
            # The hub already holds these (after our restart, say): no need to send them.
            self._sent = seq

    def _queue_evt(self, pid, outcome):
        if len(self._evts) >= EVT_SLOTS:
            self._evts.pop(0)
            self.evt_dropped += 1
        self._evts.append((pid, outcome))
        self._event({"e": "offer", "pid": pid, "st": outcome})

    def _on_session(self, up):
        now = self.clock.ticks_ms()
        if up:
            # A new session: birth first, then the journal from its oldest unacked record
            # once the hub has had the chance to ack what it already holds.
            self.sessions += 1
            self._sent = 0
            self._progress_ms = now
            self._birth_due = True
            log.info("hub session up (%d)", self.sessions)
        else:
            log.info("hub session down")
        self._event({"e": "conn", "up": up, "rc": self.transport.reconnects})

    # ---- uplink -------------------------------------------------------------------------
    def heartbeat(self, birth=False):
        j = self.journal
        oldest_t = j.oldest_t
        hb = {"v": codec.PROTO, "d": self.device_id, "fw": VERSION, "board": self.board.name,
              "up": self.uptime_s(), "rst": self.board.reset_cause(),
              "heap": self.board.free_memory(), "jd": j.depth,
              "old": max(0, self.unix_time() - oldest_t) if oldest_t is not None else 0,
              "rc": self.transport.reconnects, "stuck": list(self.keys.stuck),
              "disp": 0 if self.disp_ok else 1, "mis": self.rating.misuse,
              "clk": self.clk_correction}
        rssi = self.board.rssi()
        if rssi is not None:  # the hub refuses a null; on Ethernet the field is left out
            hb["rssi"] = rssi
        if birth:
            nxt = j.next_seq
            lo = j.oldest_seq
            hb["lo"] = nxt if lo is None else lo
            hb["next"] = nxt
        return json.dumps(hb).encode()

    def _next_unsent(self):
        gen = self.journal.unacked(self._sent)
        try:
            for rec in gen:
                return rec
            return None
        finally:
            gen.close()

    def _uplink(self, now):
        t = self.transport
        if not t.connected:
            return
        if self._birth_due:
            if not t.publish("birth", self.heartbeat(True), 1):
                return
            self._birth_due = False
        while self._evts and t.inflight < self.window:
            pid, outcome = self._evts[0]
            if not t.publish("evt", json.dumps({"pid": pid, "st": outcome}).encode(), 1):
                return
            self._evts.pop(0)
        journal = self.journal
        while t.inflight < self.window:
            rec = self._next_unsent()
            if rec is None:
                break
            seq, _t, payload = rec
            if not t.publish("vote", payload, 1):
                return  # the session dropped; the next one walks the journal again
            self.published += 1
            if seq == journal.oldest_seq:
                # The oldest unacked record just went (again): its ack is due from now.
                self._progress_ms = now
            if seq > self._sent:
                self._sent = seq
        if (journal.depth and self._sent >= (journal.oldest_seq or 0)
                and now - self._progress_ms >= self.resend_ms):
            # Sent but never acked (lost between broker and hub, or the hub crashed
            # before its commit): start again at the oldest unacked record.
            self._sent = 0
            self._progress_ms = now
            self.resends += 1
            log.info("no ack progress for %d ms: resending from seq %s", self.resend_ms,
                     journal.oldest_seq)

    def _heartbeat(self, now):
        if now - self._hb_ms < self.hb_ms:
            return
        self._hb_ms = now
        if self.transport.connected:
            self.transport.publish("hb", self.heartbeat(), 0)
        self._event({"e": "hb", "mis": self.rating.misuse, "jd": self.journal.depth})

    # ---- keys, rating timeouts, screen ----------------------------------------------------
    def _refresh(self, now):
        rating = self.rating
        state = rating.state
        if rating.changes == self._drawn_changes and not (
                state in _ANIMATED and now - self._drawn_ms >= ANIM_MS):
            return
        self._drawn_changes = rating.changes
        self._drawn_ms = now
        if state != self._drawn_state:
            self._drawn_state = state
            prompt = rating.prompt
            self._event({"e": "state", "st": state,
                         "pid": prompt.get("pid") if isinstance(prompt, dict) else None})
        if self.display is None or self.screens is None:
            return
        try:
            image = self.screens.render(rating.view(), now)
            self.display.display(image)
            self.disp_ok = True
        except Exception as exc:  # noqa: BLE001 - a dead panel or bus must not stop votes
            self.disp_failed += 1
            if self.disp_ok:
                log.error("display failed: %s", exc)
            self.disp_ok = False

    def step(self, n=None):
        """One scan: transport events, keys, timeouts, uplink, heartbeat, screen."""
        if n is None:
            n = self._n
        self._n = n + 1
        now = self.clock.ticks_ms()
        self.transport.poll(now)
        for event in self.transport.events():
            if event[0] == "msg":
                self.on_message(event[1], event[2], event[3])
            elif event[0] == "session":
                self._on_session(event[1])
            elif event[0] == "refused":
                log.error("hub refused the device's identity: %s", event[1])
        for stars in self.keys.poll(now):
            self._event({"e": "key", "stars": stars})
            record = self.rating.press(stars, now)
            if record is not None:
                self.save(record, now)
        if n % _TICK_EVERY == 0:
            record = self.rating.tick(now)
            if record is not None:
                self.save(record, now)
        if n % _ROOM_EVERY == 0:
            self._check_room()
        self._uplink(now)
        self._heartbeat(now)
        if n % _DRAW_EVERY == 0:
            self._refresh(now)

    def run(self, stop=None, watchdog=None):
        """Scan every UI_MS until `stop` (a threading.Event) is set."""
        stop = stop or threading.Event()
        self.transport.start()
        try:
            self._check_room()
            self._refresh(self.clock.ticks_ms())
            while not stop.is_set():
                started = time.monotonic()
                self.step()
                if watchdog is not None:
                    watchdog()
                stop.wait(max(0.0, UI_MS / 1000 - (time.monotonic() - started)))
        finally:
            self.transport.stop()

    def stats(self):
        """Counters for logs and `--json` output (no personal data)."""
        j = self.journal
        return {"device": self.device_id, "state": self.rating.state,
                "connected": bool(self.transport.connected), "journal_depth": j.depth,
                "next_seq": j.next_seq, "acked": j.acked, "saved": self.saved_records,
                "refused_full": self.refused_full, "flash_errors": self.flash_errors,
                "bad_records": self.bad_records, "bad_downlinks": self.bad_downlinks,
                "evt_dropped": self.evt_dropped, "resends": self.resends,
                "published": self.published, "disp_failed": self.disp_failed,
                "sessions": self.sessions, "misuse": self.rating.misuse,
                "chords": self.keys.chords, "stuck": list(self.keys.stuck)}

    def _event(self, obj):
        if self._notify is not None:
            self._notify(obj)
