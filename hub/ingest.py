"""Ingest: uplinks from the broker into the store, then end-to-end acks back to the devices.

Two parts. `Ingestor` is the pure part: it takes a group of uplinks, checks each one
(topic, size, JSON, schema, device, MAC, identity) and writes the whole group in ONE SQLite
transaction; it returns the ack mark of every device the group touched. `IngestService`
is the MQTT part: a paho client whose network thread only queues messages, and an ingest
thread that groups them, calls the Ingestor, and only after the commit publishes the acks
and PUBACKs the messages to the broker.

PUBACK after commit (paho manual_ack) means a hub killed between receiving and committing
leaves the message unacknowledged at the broker, which redelivers it to the hub's
persistent session; the device's resend after 10 s without ack progress is the second net
(docs/hub.md, "Ack contract").
"""
import collections
import logging
import queue
import sqlite3
import threading
import time

from firmware.evaluator import codec

from . import updates
from .store import Store

log = logging.getLogger("pingjia.hub.ingest")

UPLINK_FILTER = "pj/+/up/#"
KINDS = ("vote", "birth", "hb", "evt", "will", "ota")
EVT_STATES = ("shown", "busy", "full", "bad")
QUEUE_MAX = 10000  # uplinks waiting for the ingest thread; a full queue holds paho back
# mosquitto sends a client at most this many unacknowledged QoS 1 messages (its
# max_inflight_messages, default 20). Since the hub PUBACKs only after its commit, a group
# holding that many will get no more until it commits: waiting longer would be idle time.
BROKER_INFLIGHT = 20

# Health fields a device reports in birth and hb (docs/protocol.md "Birth and heartbeat").
# A known field with the wrong type is a schema rejection; unknown fields are dropped.
_HEALTH_INTS = ("up", "heap", "jd", "old", "rc", "rssi", "disp", "mis", "clk", "lo", "next")
_HEALTH_TEXT = ("fw", "board", "rst")
_STUCK_MAX = 5

Uplink = collections.namedtuple("Uplink", "topic payload mid qos gen")


class Rejected(Exception):
    """One uplink turned away; `reason` is the counter it goes under."""

    def __init__(self, reason, device_id=None):
        Exception.__init__(self, reason)
        self.reason = reason
        self.device_id = device_id


class GroupResult:
    """What one committed group changed: the ack mark per device, and who was born."""

    def __init__(self):
        self.acks = {}
        self.births = []
        self.stored = 0
        self.rejected = 0
        self.duplicates = 0
        # Other downlinks to publish after the commit: (topic, payload, qos, retain).
        self.downlinks = []

    def merge(self, other):
        self.acks.update(other.acks)
        self.births.extend(other.births)
        self.downlinks.extend(other.downlinks)
        self.stored += other.stored
        self.rejected += other.rejected
        self.duplicates += other.duplicates


def parse_topic(topic):
    """(device_id, kind) of an uplink topic `pj/<d>/up/<kind>`, or None."""
    if not isinstance(topic, str):
        return None
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "pj" or parts[2] != "up" or parts[3] not in KINDS:
        return None
    try:
        codec.check_id(parts[1], "d")
    except codec.CodecError:
        return None
    return parts[1], parts[3]


def _decode(payload, what):
    if len(payload) > codec.MAX_UPLINK:
        raise Rejected("too_large")
    try:
        return codec.decode_json(payload, what)
    except (codec.CodecError, RecursionError):
        # RecursionError: "[[[[…" nested deeper than the parser's stack.
        raise Rejected("bad_json")


def _is_v1(obj):
    # Strictly the integer 1: JSON true and 1.0 compare equal to 1 in Python, and the vote
    # MAC does not cover "v", so the codec's `!=` test alone would let them through.
    value = obj.get("v")
    return type(value) is int and value == codec.PROTO


def _is_int(value, lo, hi):
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def health_fields(obj):
    """The device health fields of a birth/hb, type-checked (Rejected "schema" if not).
    Any of them may be null: a board that cannot tell (no RSSI while not associated)."""
    out = {}
    for key in _HEALTH_INTS:
        if key in obj:
            value = obj[key]
            if value is not None and not _is_int(value, -0x80000000, 0xFFFFFFFF):
                raise Rejected("schema")
            out[key] = value
    for key in _HEALTH_TEXT:
        if key in obj:
            value = obj[key]
            if value is not None and (not isinstance(value, str) or len(value) > 64):
                raise Rejected("schema")
            out[key] = value
    if "stuck" in obj:
        stuck = obj["stuck"]
        if stuck is not None and (not isinstance(stuck, list) or len(stuck) > _STUCK_MAX or
                                  not all(_is_int(x, 1, 5) for x in stuck)):
            raise Rejected("schema")
        out["stuck"] = stuck
    return out


class Ingestor:
    """Checks uplinks and stores them; one transaction per group. Never raises on input."""

    def __init__(self, store):
        self.store = store
        self.updates = updates.Reports(store)
        self.store_failures = 0   # uplinks whose transaction failed (device resends them)
        self.internal_errors = 0

    # -- groups -----------------------------------------------------------------------------
    def handle_group(self, uplinks):
        """Store a group of uplinks; the returned acks may be published once this returns."""
        result = GroupResult()
        try:
            with self.store.transaction():
                for up in uplinks:
                    self._handle(up, result)
                self._marks(result)
            return result
        except sqlite3.Error as exc:
            log.error("store: group of %d uplinks not committed: %s", len(uplinks), exc)
            if len(uplinks) == 1:
                self._failed(1)
                return GroupResult()
        # One bad apple (say a full disk for a moment, or a trigger) must not cost the
        # group: each uplink gets its own transaction, and only the failing ones are lost
        # here — their devices resend them, as nothing acked them.
        total = GroupResult()
        for up in uplinks:
            one = GroupResult()
            try:
                with self.store.transaction():
                    self._handle(up, one)
                    self._marks(one)
            except sqlite3.Error as exc:
                log.error("store: uplink on %s not committed: %s", _safe_topic(up.topic), exc)
                self._failed(1)
                continue
            total.merge(one)
        return total

    def _failed(self, n):
        self.store_failures += n
        try:
            with self.store.transaction():
                self.store.bump("store_failed", n)
        except sqlite3.Error:
            pass  # the store is down; the in-memory count is all we can keep

    def _marks(self, result):
        for device_id in result.acks:
            result.acks[device_id] = self.store.advance_contiguous(device_id)

    def _handle(self, up, result):
        parsed = parse_topic(up.topic)
        device_id = parsed[0] if parsed else None
        conn = self.store.conn
        # Each uplink in its own savepoint: one that fails half-way leaves no half.
        conn.execute("SAVEPOINT uplink")
        try:
            self._dispatch(up, parsed, device_id, result)
        except BaseException:
            conn.execute("ROLLBACK TO uplink")
            conn.execute("RELEASE uplink")
            raise
        conn.execute("RELEASE uplink")

    def _dispatch(self, up, parsed, device_id, result):
        try:
            if parsed is None:
                raise Rejected("unknown_topic")
            kind = parsed[1]
            if kind == "vote":
                self._vote(device_id, up.payload, result)
            elif kind == "birth":
                self._birth(device_id, up.payload, result)
            elif kind == "hb":
                self._hb(device_id, up.payload)
            elif kind == "evt":
                self._evt(device_id, up.payload)
            elif kind == "ota":
                self._ota(device_id, up.payload, result)
            else:
                self._will(device_id, up.payload)
        except Rejected as rej:
            self._reject(rej.reason, rej.device_id or device_id, up)
            result.rejected += 1
        except sqlite3.Error:
            raise
        except Exception:
            # A bug of ours must not stop the hub or lose count of the input.
            self.internal_errors += 1
            log.exception("ingest: internal error on %s", _safe_topic(up.topic))
            self.store.conn.execute("ROLLBACK TO uplink")
            self._reject("internal_error", device_id, up)
            result.rejected += 1

    def _reject(self, reason, device_id, up):
        size = len(up.payload) if up.payload is not None else 0
        self.store.count_rejection(reason, device_id, _safe_topic(up.topic), size)
        log.info("rejected %s: device %s, %d bytes", reason, device_id, size)

    def _known_device(self, device_id):
        device = self.store.device(device_id)
        if device is None:
            raise Rejected("unknown_device")
        if device["retired"]:
            raise Rejected("retired_device")
        return device

    def _same_device(self, obj, device_id, required=True):
        if "d" not in obj and not required:
            return
        if not isinstance(obj.get("d"), str):
            raise Rejected("schema")
        if obj["d"] != device_id:
            raise Rejected("topic_mismatch")

    # -- votes ------------------------------------------------------------------------------
    def _vote(self, device_id, payload, result):
        obj = _decode(payload, "vote")
        if not _is_v1(obj):
            raise Rejected("schema")
        try:
            vote = codec.validate_vote(obj)
        except codec.CodecError:
            raise Rejected("schema")
        if vote["d"] != device_id:
            raise Rejected("topic_mismatch")
        device = self._known_device(device_id)
        try:
            key = bytes.fromhex(device["key_hex"])
        except (TypeError, ValueError):
            raise Rejected("device_key")
        vote["mac"] = vote["mac"].lower()
        if not codec.verify_vote(key, vote):
            raise Rejected("bad_mac")
        stored_mac = self.store.vote_mac(device_id, vote["s"])
        if stored_mac is not None:
            # Acked again either way, so the device can trim its journal.
            result.acks[device_id] = 0
            if stored_mac == vote["mac"]:
                self.store.bump("duplicate")
                result.duplicates += 1
                return
            raise Rejected("conflict")
        self.store.insert_vote(vote)
        outcome = "voted" if vote["k"] == codec.KIND_VOTE else "unrated"
        self.store.set_prompt_outcome(vote["pid"], device_id, outcome, vote["s"])
        self.store.bump("stored")
        result.acks[device_id] = 0
        result.stored += 1

    # -- birth, heartbeat, events, will -----------------------------------------------------
    def _birth(self, device_id, payload, result):
        obj = _decode(payload, "birth")
        if not _is_v1(obj):
            raise Rejected("schema")
        self._same_device(obj, device_id)
        lo, nxt = obj.get("lo"), obj.get("next")
        if not _is_int(lo, 1, 0xFFFFFFFF) or not _is_int(nxt, 1, 0xFFFFFFFF) or lo > nxt:
            raise Rejected("schema")
        health = health_fields(obj)
        self._known_device(device_id)
        store = self.store
        store.note_health(device_id, online=True, birth=health)
        store.add_event(device_id, "birth", {k: health[k] for k in ("lo", "next", "rst", "fw")
                                             if k in health})
        mark = store.acked_seq(device_id)
        if mark < lo - 1:
            # The device no longer holds anything below lo (a wiped journal): whatever the
            # hub has not got from mark+1 to lo-1 is lost for good. Record it and move on,
            # or the ack would wait forever.
            held = store.conn.execute("SELECT count(*) FROM votes WHERE device_id = ? AND "
                                      "seq > ? AND seq < ?", (device_id, mark, lo)).fetchone()[0]
            missing = lo - 1 - mark - held
            store.add_event(device_id, "gap", {"from": mark + 1, "to": lo - 1,
                                               "missing": missing})
            store.bump("gap_seqs", missing)
            store.set_acked(device_id, lo - 1)
            log.warning("device %s: sequence gap %d..%d (%d votes never reached the hub)",
                        device_id, mark + 1, lo - 1, missing)
        elif nxt - 1 < mark:
            # The device will number new votes at or below what the hub holds: they will
            # show up as conflicts. Worth a flag on the dashboard.
            store.add_event(device_id, "seq_reset", {"next": nxt, "acked": mark})
        result.acks[device_id] = 0
        result.births.append(device_id)

    def _hb(self, device_id, payload):
        obj = _decode(payload, "hb")
        if not _is_v1(obj):
            raise Rejected("schema")
        self._same_device(obj, device_id)
        health = health_fields(obj)
        self._known_device(device_id)
        self.store.note_health(device_id, online=True, hb=health)

    def _evt(self, device_id, payload):
        obj = _decode(payload, "evt")
        self._same_device(obj, device_id, required=False)
        pid, state = obj.get("pid"), obj.get("st")
        if state not in EVT_STATES:
            raise Rejected("schema")
        try:
            codec.check_id(pid, "pid", allow_empty=(state == "bad"))
        except codec.CodecError:
            raise Rejected("schema")
        self._known_device(device_id)
        if not pid:
            # The device could not even read a pid from what we sent it: our fault, not
            # its; an event for the dashboard rather than a rejection of its report.
            self.store.add_event(device_id, "bad_prompt")
            return
        if not self.store.set_prompt_device_state(pid, device_id, state):
            raise Rejected("unknown_prompt")

    def _ota(self, device_id, payload, result):
        # Update progress and outcomes (hub/updates.py); a `get` is answered with a chunk.
        obj = _decode(payload, "ota")
        self._known_device(device_id)
        try:
            result.downlinks.extend(self.updates.handle(device_id, obj))
        except updates.Refused as exc:
            raise Rejected(exc.reason)

    def _will(self, device_id, payload):
        obj = _decode(payload, "will")
        if not _is_v1(obj) or obj.get("online") is not False:
            raise Rejected("schema")
        self._same_device(obj, device_id)
        self._known_device(device_id)
        self.store.note_health(device_id, online=False)
        self.store.add_event(device_id, "will")


def _safe_topic(topic):
    return topic[:128] if isinstance(topic, str) else None


class IngestService:
    """The hub's MQTT connection: uplinks in, acks (and any downlink) out.

    `on_group(result)` runs on the ingest thread after each committed group, after the acks
    went out: the app uses it to wake the forwarder and greet newborn devices.
    """

    def __init__(self, settings, db_path=None, client_id=None, on_group=None, clock=time.time):
        self.settings = settings
        self.db_path = db_path or settings.db_path
        self.client_id = client_id or "%s-%s" % (settings.broker.hub_user, settings.hub.id)
        self.on_group = on_group
        self.clock = clock
        self.queue = queue.Queue(QUEUE_MAX)
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._gen = 0
        self._thread = None
        self._client = None
        self.ingestor = None
        self.groups = 0
        self.acks_sent = 0

    # -- lifecycle --------------------------------------------------------------------------
    def start(self):
        import paho.mqtt.client as mqtt

        self._stop.clear()
        store = Store(self.db_path, clock=self.clock)
        self.ingestor = Ingestor(store)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             clean_session=False, manual_ack=True)
        broker = self.settings.broker
        client.username_pw_set(broker.hub_user, broker.hub_password or None)
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        client.connect_async(broker.host, broker.port, keepalive=30)
        client.loop_start()
        self._thread = threading.Thread(target=self._run, name="pingjia-ingest", daemon=True)
        self._thread.start()

    def stop(self, drain_s=2.0):
        """Finish what is queued (up to drain_s), then disconnect."""
        deadline = time.monotonic() + drain_s
        while not self.queue.empty() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        if self._client:
            self._client.disconnect()
            self._client.loop_stop()
        if self.ingestor:
            self.ingestor.store.close()

    def wait_connected(self, timeout=10.0):
        return self.connected.wait(timeout)

    def publish(self, topic, payload, qos=1, retain=False):
        """Any downlink; thread-safe (paho 2 serialises publishes)."""
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    # -- paho callbacks (network thread: keep them short) ----------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("broker refused the hub: %s", reason_code)
            return
        self._gen += 1
        client.subscribe(UPLINK_FILTER, qos=1)
        self.connected.set()
        log.info("connected to the broker (session present: %s)", flags.session_present)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("lost the broker: %s", reason_code)

    def _on_message(self, client, userdata, message):
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = None
        up = Uplink(topic, bytes(message.payload), message.mid, message.qos, self._gen)
        # Blocking here holds back paho (and so the broker) while the ingest thread catches
        # up: backpressure rather than an unbounded queue.
        while not self._stop.is_set():
            try:
                self.queue.put(up, timeout=0.5)
                return
            except queue.Full:
                continue

    # -- ingest thread ----------------------------------------------------------------------
    def _run(self):
        cfg = self.settings.ingest
        max_wait = cfg.max_wait_ms / 1000.0
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            group = [first]
            inflight = 1 if first.qos else 0
            deadline = time.monotonic() + max_wait
            while len(group) < cfg.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    if remaining > 0 and inflight < BROKER_INFLIGHT:
                        up = self.queue.get(timeout=remaining)
                    else:
                        up = self.queue.get_nowait()
                except queue.Empty:
                    break
                group.append(up)
                if up.qos:
                    inflight += 1
            try:
                self._commit_and_ack(group)
            except Exception:
                log.exception("ingest: group failed")
                time.sleep(0.5)

    def _commit_and_ack(self, group):
        result = self.ingestor.handle_group(group)
        self.groups += 1
        # Only now is every vote of the group on disk: the acks may go out.
        for device_id, seq in result.acks.items():
            self._client.publish("pj/%s/dn/ack" % device_id, codec.encode_ack(seq), qos=1)
            self.acks_sent += 1
        for topic, payload, qos, retain in result.downlinks:
            self._client.publish(topic, payload, qos=qos, retain=retain)
        gen = self._gen
        for up in group:
            # A message from an earlier connection is redelivered by the broker on this
            # one; acking its old mid here could ack some other message.
            if up.qos and up.gen == gen:
                self._client.ack(up.mid, up.qos)
        if self.on_group:
            try:
                self.on_group(result)
            except Exception:
                log.exception("ingest: on_group hook failed")
