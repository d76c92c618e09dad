# The counter evaluator's application: keys -> rating -> journal -> MQTT -> hub, and the
# hub's downlinks (who is signed in, prompts, acks, catalogue, time) back to the screen.
#
# Everything hardware-shaped is passed in (board, clock, MQTT client factory) so the very
# same App runs on an ESP32-S3 (firmware/main.py) and under the MicroPython unix port with
# the simulated board (simulator/simdevice.py).
#
# THE RULE (DESIGN.md guarantee 1): a record from the rating state machine is signed,
# appended to the journal -- which returns only when the record is durable -- and only then
# does the screen say "thank you". A journal that is full or a flash write that fails shows
# the QR fallback instead; the citizen is never thanked for a vote that is not on flash.
#
# Guarantee 2: records leave the journal only on the hub's application ack (dn/ack), never
# on an MQTT PUBACK. The journal is the outgoing queue: the uplink task walks it in
# sequence order with QoS 1, and when acks stop advancing for resend_ms it starts again at
# the oldest unacked record (docs/protocol.md, "Ack").
#
# Memory (docs/firmware.md, "Memory"): the whole device runs in a 64 KB heap, so this file
# keeps few names and methods (each costs heap on the device), sleeps with sleep_ms (a float
# is a heap object) and allocates nothing in the 20 ms key scan.
import gc
import json
import time

import asyncio

from micropython import const  # MicroPython only: no fallback to load

from evaluator import VERSION, codec
from evaluator.journal import JournalError, JournalFull
from evaluator.keys import Keys

_UI_MS = const(20)  # key scan period; Keys debounces over several scans
_TICK_EVERY = const(5)  # rating timeouts checked every 5th scan (100 ms)
_DRAW_EVERY = const(3)  # screen compared every 3rd scan (60 ms)
_ROOM_EVERY = const(50)  # journal room re-checked about once a second
_VOTE_ROOM = const(512)  # journal bytes one vote record needs, with margin (payload ~330)
_EVT_SLOTS = const(4)  # prompt outcomes waiting to go up; overflow drops the oldest, counted
_UPLINK_IDLE_MS = const(200)
_CLOCK_SLACK_S = const(2)  # hub time within this of ours is not worth a correction
# The largest downlink packet (topic and payload) a device takes: the hub keeps its
# catalogue, the largest downlink, within it (docs/mqtt.md, "Sizes"). A client other than
# ours (the serial link) gets a receive buffer this big. Our MQTT client's buffer is
# _RX_BYTES: prompts and contexts fit, and a catalogue above it is spooled to flash
# (catalogue.py) as it arrives.
MAX_DOWNLINK = const(5120)
_RX_BYTES = const(2048)
_ITEM_BYTES = const(1027)  # 256 x 32 px of a prompt's item, and the bitmap's 3-byte tail
_ANIM_MS = const(250)


def _attr(config, name, default=None):
    # Config may be the evaluator.config object or a plain dict (the simulator, tests).
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


class App:
    """One counter evaluator. Construct, then `await app.run()` (runs forever).

    `clock` has ticks_ms(), ticks_diff(a, b) and time(); MicroPython's time module is the
    default."""

    def __init__(self, board, config, rating, journal, client_factory=None, clock=None,
                 draw=None, keys=None, ssl=None, hb_s=30, resend_ms=10000, keepalive=30,
                 max_packet=None):
        self.board = board
        self.rating = rating
        self.journal = journal
        self.clock = clock = clock or time
        self.device_id = device_id = codec.check_id(_attr(config, "device_id"), "device_id")
        key = _attr(config, "key")
        self._key = codec.from_hex(key) if isinstance(key, str) else bytes(key)
        self.hb_ms = int(hb_s * 1000)
        self.resend_ms = resend_ms
        self._dn = "pj/" + device_id + "/dn/"
        self._up = up = "pj/" + device_id + "/up/"
        self._notify = getattr(board, "event", None)
        self._feed = getattr(board, "feed", None)  # the watchdog, where the board has one
        self._store = None  # the catalogue on flash (a board with a screen and files)
        self._shown = []  # its reasons whose bitmaps are loaded: the ones on screen
        files = _attr(board, "files")
        if board.display is not None and files is not None:
            from catalogue import Catalogue
            self._store = Catalogue(files)
        # The client first: its receive buffer is the largest block the app allocates,
        # and asking for it before the screens and their bitmaps load avoids fragmentation.
        if client_factory is None:
            from mqtt import MQTTClient
            client_factory = MQTTClient
            max_packet = max_packet or _RX_BYTES
        self.client = client_factory(
            client_id=device_id, server=_attr(config, "hub_host"),
            port=_attr(config, "hub_port", 1883), user=_attr(config, "mqtt_user") or device_id,
            password=_attr(config, "mqtt_password"), keepalive=keepalive, clean_session=False,
            will=(up + "will", ('{"v":1,"d":"%s","online":false}' % device_id).encode(), 1,
                  False),
            ssl=ssl, max_packet=max_packet or MAX_DOWNLINK, on_message=self._on_message,
            on_connect=self._on_connect, spool=self._spool, borrow=True)
        self.keys = keys or Keys(board.keys_pins, active=_attr(board, "key_active", 0))
        self._bitmap = None
        self._item = None
        if board.display is not None:
            # Imported late: a board without a panel never loads them. Hub bitmaps are
            # decoded into the screens' form once, as their downlink arrives.
            from display import bitmap
            self._bitmap = bitmap
            # The prompt's item bitmap lives here (display.lift), allocated once at boot:
            # the hub renders an item at most 256 px wide on two 16-px lines.
            self._item = bytearray(_ITEM_BYTES)
            if draw is None:
                from screens import draw
        self._draw = draw
        # Counters: nothing is dropped silently (DESIGN.md guarantee 5).
        self.saved = 0
        self.refused_full = 0
        self.flash_errors = 0
        self.bad_records = 0
        self.bad_downlinks = 0
        self.evt_dropped = 0
        self.resends = 0
        self.published = 0
        self.uplink_errors = 0
        self.draw_errors = 0
        qr = (_attr(config, "extra") or {}).get("qr") or _attr(config, "qr")
        if qr is not None:
            # The QR fallback bitmap FULL shows, from provisioning (one that does not decode
            # leaves FULL with its text only, counted).
            rating.qr = self._decode(qr)
        self._boot_ms = now = clock.ticks_ms()
        self._clk_offset = 0  # hub time minus RTC time, seconds
        self.clk_correction = 0
        # Uplink state: highest seq published in this pass, and when acks last advanced.
        self._sent = 0
        self._progress_ms = now
        self._kicked = False  # set when there may be something new to send
        self._evts = []  # (pid, outcome) pairs; bounded by _EVT_SLOTS
        self._full = False
        self._drawn_changes = -1
        self._drawn_ms = now
        self._hb_at = now  # when the last heartbeat was due
        self._drawn_state = None
        # The updater (ota.py) is loaded when an offer arrives, or now when ota.json has a
        # trial to confirm or a rollback to report; a unit never updated never loads it.
        self.ota = None
        try:
            with open("ota.json") as f:
                st = json.load(f)
            if st.get("t") is not None or st.get("rb"):
                import ota as module

                self.ota = module.start(self)
        except (OSError, ValueError, AttributeError):
            pass

    def unix_time(self):
        return int(self.clock.time()) + self._clk_offset

    # ---- THE RULE ---------------------------------------------------------------------
    def save(self, record, now):
        """Sign record, make it durable, and only then let the rating say thanks.

        Returns the sequence number on success, or 0 when the record could not be stored
        (the rating then shows the QR fallback)."""
        journal = self.journal
        seq = journal.next_seq
        t = self.unix_time()
        why = None
        try:
            payload = codec.encode_vote(codec.make_vote(
                self._key, self.device_id, seq, t, record["k"], record["pid"], record["case"],
                record["stars"], record["rs"], record["cv"], record["w"], record["sn"]))
            journal.append(seq, t, payload)
        except JournalFull:
            self.refused_full += 1
            why = "full"
        except ValueError:  # CodecError: a record the protocol cannot carry (a bug, counted)
            self.bad_records += 1
            why = "bad"
        except OSError:  # flash write or sync failed: not durable, so no thanks
            self.flash_errors += 1
            why = "flash"
        except JournalError:  # a damaged journal refuses appends until it is reopened
            self.flash_errors += 1
            why = "journal"
        if why is not None:
            self.rating.saved(False, now)
            self._full = True
            self._event({"e": "refused", "why": why})
            return 0
        # Durable now (append returned); the thanks screen may follow.
        self.rating.saved(True, now)
        self.saved += 1
        if self._notify is not None:  # only the simulated board listens; skip the garbage
            self._notify({"e": "saved", "seq": seq, "k": record["k"], "pid": record["pid"],
                          "stars": record["stars"], "t": t, "p": payload.decode()})
        self._check_room()
        self._kicked = True
        return seq

    def _check_room(self):
        # The journal decides whether another vote fits; the rating refuses prompts (and
        # shows the QR code) while it does not, and takes them again once acks free room.
        room = bool(self.journal.can_append(_VOTE_ROOM))
        if room == self._full:
            self._full = not room
            self.rating.set_full(not room)

    # ---- downlink -----------------------------------------------------------------------
    def _on_message(self, topic, payload, retain):
        if not topic.startswith(self._dn):
            self.bad_downlinks += 1
            return
        kind = topic[len(self._dn):]
        rating = self.rating
        try:
            if kind == "ack":
                seq = codec.decode_ack(payload)
                if self.journal.ack(seq):
                    self._progress_ms = self.clock.ticks_ms()
                    self._check_room()
                if seq > self._sent:
                    # The hub already holds these (e.g. after our reboot): no need to send them.
                    self._sent = seq
                self._kicked = True
                return
            if kind == "ota" or kind == "fw":
                # An offer (JSON) or a chunk of the image (binary). With no updater loaded
                # (or unloaded for a vote, self.ota then the offer it was on: see step()),
                # a chunk is nothing to act on and a withdrawal only forgets the offer.
                ota = self.ota
                if ota is None or isinstance(ota, bytes):
                    if kind == "fw":
                        return
                    if not len(payload):
                        self.ota = None
                        return
                    import ota as module

                    self.ota = ota = module.start(self)
                ota.on(kind, payload)
                self._kicked = True
                return
            store = self._store
            if kind == "cat" and store is not None:
                # A spooled catalogue comes as its sink; one that fit the buffer is spooled
                # here. Only a catalogue other than the one in use is read again; once the
                # rating took it, the rating's catalogue is the store on flash.
                sink = payload
                if isinstance(payload, (bytes, bytearray, memoryview)):
                    sink = store.spool()
                    sink.write(payload)
                changed = sink.close()
                if changed or store.cv is None:
                    cat, fresh = store.index(changed)
                    ok = rating.set_catalogue(cat)
                    store.commit(ok, changed, fresh, cat)
                    if ok:
                        rating.cat = store
                return
            # The client's buffer bounds a downlink, so no size check here. With a screen,
            # the bitmaps' base64 is decoded out of the payload first (display.lift), so
            # json never builds that text; the bitmaps go to the rating in the screens'
            # form, and the rating checks the message either way.
            lifted = None
            # A prompt on screen keeps its item in the buffer for items; a prompt arriving
            # meanwhile is answered busy, so its item is not decoded at all.
            busy = kind == "prompt" and (rating.state == "PROMPT" or rating.state == "REASONS"
                                         or rating.state == "SAVING")
            if self._bitmap is not None and (kind == "ctx" or kind == "prompt"):
                from display import lift
                lifted = lift(payload, self._item if kind == "prompt" else None, busy)
            msg = json.loads(payload)
            if not isinstance(msg, dict):
                raise ValueError(kind)  # not an object
            decode = self._decode
            if kind == "ctx":
                msg["name"] = decode(msg.get("name"), lifted)
                msg["win"] = decode(msg.get("win"), lifted)
                rating.set_context(msg)
            elif kind == "prompt":
                msg["item"] = None if busy else decode(msg.get("item"), lifted)
                outcome = rating.offer(msg, self.clock.ticks_ms())
                pid = msg.get("pid")
                self._queue_evt(pid if isinstance(pid, str) else "", outcome)
            elif kind == "cat":
                if rating.set_catalogue(msg):
                    for entry in msg["rs"]:
                        entry["bm"] = decode(entry.get("bm"))
            elif kind == "time":
                t = msg.get("t")
                if not isinstance(t, int) or isinstance(t, bool):
                    raise ValueError(kind)  # t not an int
                diff = t - self.unix_time()
                if diff > _CLOCK_SLACK_S or diff < -_CLOCK_SLACK_S:
                    self._clk_offset += diff
                    self.clk_correction = diff
            else:
                raise ValueError(kind)  # not a downlink we know
        except (ValueError, KeyError, TypeError):
            self.bad_downlinks += 1
            if kind == "prompt":
                self._queue_evt("", "bad")

    def _spool(self, topic, length):
        # The MQTT client asks where a downlink too big for its buffer goes: a catalogue to
        # flash (up to MAX_DOWNLINK); anything else is dropped and counted by the client.
        if self._store is not None and topic == self._dn + "cat" and length <= MAX_DOWNLINK:
            return self._store.spool()
        return None

    def _decode(self, wire, lifted=None):
        # A wire bitmap in the form the screens draw (as is where there is no screen). One
        # that does not decode stays as it is, for the rating to refuse -- unless it has
        # the size and length the rating checks and only its base64 is bad: that one is
        # counted and dropped, and the screen shows what it shows for no bitmap (the
        # identifier, or 请您评价).
        if self._bitmap is None or not isinstance(wire, dict):
            return wire
        try:
            return self._bitmap(wire, lifted)
        except ValueError:
            w = wire.get("w")
            h = wire.get("h")
            b = wire.get("b")
            if (isinstance(w, int) and isinstance(h, int) and isinstance(b, str)
                    and b[:1] != "#" and 0 < w <= 1024 and 0 < h <= 64
                    and (w + 7) // 8 * h <= 2048 and len(b) == ((w + 7) // 8 * h + 2) // 3 * 4):
                self.bad_downlinks += 1
                return None
            return wire

    def _queue_evt(self, pid, st):
        # st: the prompt's outcome (shown, busy, full or bad)
        if len(self._evts) >= _EVT_SLOTS:
            self._evts.pop(0)
            self.evt_dropped += 1
        self._evts.append((pid, st))
        self._event({"e": "offer", "pid": pid, "st": st})
        self._kicked = True

    async def _on_connect(self, client):
        await client.subscribe(self._dn + "#", 1)
        # A new session: walk the journal from its oldest unacked record again once the
        # hub has had the chance to ack what it already holds.
        self._sent = 0
        self._progress_ms = self.clock.ticks_ms()
        await client.publish(self._up + "birth", self.heartbeat(True), 1)
        if self.ota is not None and not isinstance(self.ota, bytes):
            await self.ota.connected(client)  # a trial confirms; a rollback is reported
        self._event({"e": "conn", "up": True, "rc": client.reconnects})
        self._kicked = True

    # ---- uplink -------------------------------------------------------------------------
    def heartbeat(self, birth=False):
        j = self.journal
        board = self.board
        clock = self.clock
        oldest_t = j.oldest_t
        # "heap": free heap after a collection, so it is what the app could still use
        # (without one, garbage not yet collected would count as used).
        gc.collect()
        hb = {"v": codec.PROTO, "d": self.device_id, "fw": VERSION,
              "board": _attr(board, "name", ""),
              "up": clock.ticks_diff(clock.ticks_ms(), self._boot_ms) // 1000,
              "rst": board.reset_cause(), "heap": gc.mem_free(), "jd": j.depth,
              "old": (self.unix_time() - oldest_t) if oldest_t is not None else 0,
              "rc": self.client.reconnects, "rssi": board.rssi(), "stuck": self.keys.stuck,
              "disp": 0 if getattr(board.display, "ok", False) else 1,
              "mis": self.rating.misuse, "clk": self.clk_correction}
        if birth:
            nxt = j.next_seq
            lo = j.oldest_seq
            hb["lo"] = nxt if lo is None else lo
            hb["next"] = nxt
        return json.dumps(hb).encode()

    async def _uplink(self):
        client = self.client
        journal = self.journal
        clock = self.clock
        while True:
            if not client.isconnected():
                await client.connected()
            try:
                if self._evts:
                    pid, st = self._evts[0]
                    await client.publish(self._up + "evt",
                                         json.dumps({"pid": pid, "st": st}).encode(), 1)
                    if self._evts and self._evts[0][0] == pid:
                        self._evts.pop(0)
                    continue
                # One record at a time, the reader closed before any await: appends and
                # acks (which delete segments) happen between publishes, never under it.
                rec = None
                gen = journal.unacked(self._sent)
                for rec in gen:
                    break
                gen.close()
                gen = None
                if rec is not None:
                    seq = rec[0]
                    payload = rec[2]
                    rec = None
                    await client.publish(self._up + "vote", payload, 1)
                    payload = None
                    self.published += 1
                    if seq == journal.oldest_seq:
                        # The oldest unacked record just went (again): its ack is due from now.
                        self._progress_ms = clock.ticks_ms()
                    if seq > self._sent:
                        self._sent = seq
                    continue
                # Votes first: the updater's requests and reports only when none waits.
                ota = self.ota
                if ota is not None and not isinstance(ota, bytes):
                    msg = ota.read()
                    if msg is not None:
                        await client.publish(self._up + "ota", msg, 1)
                        ota.ack(msg)  # PUBACKed
                        continue
            except OSError:
                # The link dropped mid-publish; the client reconnects by itself and the
                # record stays in the journal, so nothing is lost, only delayed.
                await asyncio.sleep_ms(100)
                continue
            except Exception:  # noqa: BLE001 - this task must outlive any single fault
                # An unreadable journal record or a client bug: counted, retried after a
                # pause. Ending this task would silently stop every later vote.
                self.uplink_errors += 1
                await asyncio.sleep_ms(1000)
                continue
            now = clock.ticks_ms()
            if (journal.depth and self._sent >= (journal.oldest_seq or 0)
                    and clock.ticks_diff(now, self._progress_ms) >= self.resend_ms):
                # Sent but never acked (lost between broker and hub, or the hub crashed
                # before its commit): start again at the oldest unacked record.
                self._sent = 0
                self._progress_ms = now
                self.resends += 1
                continue
            # Idle: poll the kick flag rather than wait_for(), which would allocate a
            # cancelled task every idle period.
            self._kicked = False
            for _ in range(_UPLINK_IDLE_MS // 50):
                if self._kicked:
                    break
                await asyncio.sleep_ms(50)

    async def _beat(self):
        # One heartbeat, in a task of its own (step() starts one every hb_s): a stalled
        # uplink never holds it up, and no task waits between beats.
        if self.client.isconnected():
            try:
                await self.client.publish(self._up + "hb", self.heartbeat(), 0)
            except OSError:
                pass
        self._event({"e": "hb", "mis": self.rating.misuse, "jd": self.journal.depth})

    # ---- keys, rating timeouts, screen ----------------------------------------------------
    def _refresh(self, now):
        # rating.changes bumps whenever the view would differ; PROMPT and REASONS also
        # redraw a few times a second for the countdown and long names that scroll.
        rating = self.rating
        state = rating.state
        if rating.changes == self._drawn_changes and not (
                (state == "PROMPT" or state == "REASONS")
                and self.clock.ticks_diff(now, self._drawn_ms) >= _ANIM_MS):
            return
        self._drawn_changes = rating.changes
        self._drawn_ms = now
        display = self.board.display
        if display is not None and self._draw is not None:
            try:
                view = rating.view()
                if self._store is not None:
                    # A catalogue on flash: the bitmaps of the reasons on screen are in
                    # RAM, no others (loaded when their page shows, so each is one object
                    # for as long as it is seen, which keeps a scrolling label's start).
                    store = self._store
                    shown = self._shown
                    want = view["reasons"] if view["state"] == "REASONS" else ()
                    per = view["per_page"]
                    first = view["page"] * per
                    last = min(first + per, len(want))
                    i = 0
                    while i < len(shown):
                        entry = shown[i]
                        keep = False
                        for k in range(first, last):
                            if want[k] is entry:
                                keep = True
                        if keep:
                            i += 1
                        else:
                            entry["bm"] = None
                            shown.pop(i)
                    for k in range(first, last):
                        entry = want[k]
                        ref = entry.get("f")
                        if ref is not None and entry.get("bm") is None:
                            entry["bm"] = store.load(ref)
                            shown.append(entry)
                self._draw(display, view, now)
                view = None
            except Exception:  # noqa: BLE001 - a screen bug must not stop the votes
                self.draw_errors += 1
            display.show()  # a bus error is counted by the display (heartbeat "disp")
        if state != self._drawn_state:
            self._drawn_state = state
            prompt = rating.prompt
            self._event({"e": "state", "st": state,
                         "pid": prompt.get("pid") if isinstance(prompt, dict) else None})

    def step(self, n):
        """One scan of the user interface; n counts scans (for the slower duties)."""
        if self._feed is not None:
            self._feed()
        now = self.clock.ticks_ms()
        for stars in self.keys.poll(now):
            if self._notify is not None:
                self._notify({"e": "key", "stars": stars})
            record = self.rating.press(stars, now)
            if record is not None:
                self.save(record, now)
        if n % _TICK_EVERY == 0:
            record = self.rating.tick(now)
            if record is not None:
                self.save(record, now)
            if self.clock.ticks_diff(now, self._hb_at) >= self.hb_ms:
                self._hb_at = now
                asyncio.create_task(self._beat())
            ota = self.ota
            try:
                if isinstance(ota, bytes):
                    # The updater was unloaded while a citizen voted (its 2 KB of heap went
                    # to the vote): loaded again with the same offer once the rating is
                    # idle, it resumes the download where dl.json says.
                    state = self.rating.state
                    if state != "PROMPT" and state != "REASONS" and state != "SAVING":
                        self.ota = None
                        self._on_message(self._dn + "ota", ota, False)
                elif ota is not None:
                    ota = ota.tick(now)
                    if ota is not None:
                        import sys

                        self.ota = ota
                        sys.modules.pop("ota", None)
            except Exception:  # noqa: BLE001 - an updater fault must never stop the votes
                # (a MemoryError, say): counted with the uplink's; the offer comes again at
                # the next connect, and an unconfirmed trial still has the boot selector.
                self.uplink_errors += 1
                self.ota = None
        if n % _ROOM_EVERY == 0:
            self._check_room()
        if n % _DRAW_EVERY == 0:
            self._refresh(now)

    def _event(self, obj):
        # The simulated board reports these to the simulator; a real board has no listener.
        if self._notify is not None:
            self._notify(obj)

    async def run(self):
        self._check_room()
        self._refresh(self.clock.ticks_ms())
        tasks = (asyncio.create_task(self.client.run()), asyncio.create_task(self._uplink()))
        try:
            n = 0
            while True:
                self.step(n)
                n += 1
                await asyncio.sleep_ms(_UI_MS)
        finally:
            for task in tasks:
                task.cancel()
