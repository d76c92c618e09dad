"""The serial bridge: a window PC relays an evaluator that has no network of its own.

The evaluator (an MCU with firmware/serial_link.py, or a Pi with a serial uplink) is wired
to the window PC by USB or UART and speaks the framed protocol in docs/agent.md ("Serial
protocol"). This bridge holds the MQTT session to the hall broker AS that device: client
id, user and password are the device's own, sent in its HELLO; the will is the device's
will. Votes go up byte for byte with the device's MAC -- the bridge has no key and never
signs -- and the hub verifies them exactly as if the device were on the LAN.

What a hall can rely on:
- A pulled cable, a vanished USB adapter or a killed bridge loses nothing: the device's
  journal keeps every unacked vote and sends it again in the next session (the hub's
  ack is the only thing that trims it).
- Downlinks are acked to the broker only once the device has taken them (its DACK), so a
  prompt that met a pulled cable is delivered again from the broker's persistent session.
- While the device is unreachable the hub sees it offline: the bridge publishes its will
  and leaves the session, exactly what the broker does for a device that lost Wi-Fi.

One thread (run) owns the serial port and all state; paho's network thread only queues
events for it.
"""
import collections
import json
import logging
import os
import struct
import threading
import time

from firmware import serial_link as S
from firmware.evaluator import codec

from . import AgentError
from .transport import tls_context, will_payload

log = logging.getLogger("pingjia.agent.bridge")

LINK_TIMEOUT_S = 5.0  # no frame from the device this long: it is gone
DACK_RETRY_S = 3.0  # a MSG without its DACK this long goes again (the frame or DACK was lost)
DACK_TRIES = 3  # ... this many times, then the session is restarted (see _retry_downlinks)
KEEPALIVE_S = 30
_RETAINED = ("ctx", "cat")  # replayed to a device that says HELLO again
_MAX_PENDING = 256


class BridgeError(AgentError):
    """A bridge config that is missing or wrong."""


class BridgeConfig:
    """Where the hub is, and optionally which device this bridge serves.

    Loaded from JSON: hub_host (required), hub_port, tls, ca (PEM text) or ca_file,
    device_id (serve only this device), mqtt_user / mqtt_password (used when the device's
    HELLO carries no password). A device provisioning file works as it is; its `key` is
    never read."""

    def __init__(self, fields, base_dir="."):
        if not isinstance(fields, dict):
            raise BridgeError("bridge config: not a JSON object")
        host = fields.get("hub_host")
        if not isinstance(host, str) or not host or len(host) > 253:
            raise BridgeError("hub_host: missing or not a host name")
        self.hub_host = host
        tls = fields.get("tls", False)
        if not isinstance(tls, bool):
            raise BridgeError("tls: not true or false")
        self.tls = tls
        port = fields.get("hub_port", 8883 if tls else 1883)
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise BridgeError("hub_port: not 1..65535")
        self.hub_port = port
        ca = fields.get("ca")
        if not ca and fields.get("ca_file"):
            path = os.path.join(base_dir, fields["ca_file"])
            try:
                with open(path) as f:
                    ca = f.read()
            except OSError as exc:
                raise BridgeError("ca_file: cannot read %s: %s" % (path, exc.strerror)) from None
        if tls and not ca:
            raise BridgeError("ca: the hall CA (PEM) is required when tls is true")
        self.ca = ca or None
        pin = fields.get("device_id")
        if pin is not None:
            try:
                codec.check_id(pin, "device_id")
            except codec.CodecError as exc:
                raise BridgeError(str(exc)) from None
        self.device_id = pin
        self.mqtt_user = fields.get("mqtt_user") or None
        self.mqtt_password = fields.get("mqtt_password") or None

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                fields = json.load(f)
        except FileNotFoundError:
            raise BridgeError("%s: no such bridge config" % path) from None
        except (OSError, ValueError) as exc:
            raise BridgeError("%s: cannot read: %s" % (path, exc)) from None
        return cls(fields, os.path.dirname(os.path.abspath(path)))

    def __repr__(self):
        return "BridgeConfig(hub=%s:%d, tls=%r, device_id=%r, password=%s)" % (
            self.hub_host, self.hub_port, self.tls, self.device_id,
            "***" if self.mqtt_password else "''")


class Identity:
    """Who the device says it is (HELLO). The password never reaches a log."""

    def __init__(self, device_id, user, password, max_body):
        self.device_id = device_id
        self.user = user
        self.password = password
        self.max_body = max_body

    def same(self, other):
        return other is not None and (self.device_id, self.user, self.password) == \
            (other.device_id, other.user, other.password)

    def __repr__(self):
        return "Identity(%s)" % self.device_id


def parse_hello(body, config):
    """Identity from a HELLO body; ValueError when it is not one."""
    hello = json.loads(bytes(body))
    if not isinstance(hello, dict) or hello.get("v") != S.PROTO:
        raise ValueError("hello: not protocol 1")
    device_id = codec.check_id(hello.get("d"), "d")
    user = hello.get("u") or config.mqtt_user or device_id
    password = hello.get("p") or config.mqtt_password or ""
    max_body = hello.get("mx", S.MAX_BODY)
    if not isinstance(user, str) or len(user) > 64 or not isinstance(password, str) \
            or len(password) > 128:
        raise ValueError("hello: user or password")
    if not isinstance(max_body, int) or isinstance(max_body, bool) or max_body < 256:
        raise ValueError("hello: mx")
    return Identity(device_id, user, password, max_body)


class Session:
    """The MQTT session held for one device; paho's callbacks become queued events."""

    def __init__(self, identity, config, events, factory=None, keepalive=KEEPALIVE_S):
        import paho.mqtt.client as mqtt

        self.identity = identity
        self.dn = "pj/%s/dn/" % identity.device_id
        self.up = "pj/%s/up/" % identity.device_id
        self._events = events
        make = factory or (lambda **kw: mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kw))
        # manual_ack: a downlink is acked to the broker only when the device has it.
        client = make(client_id=identity.device_id, clean_session=False, manual_ack=True)
        client.username_pw_set(identity.user, identity.password or None)
        client.will_set(self.up + "will", will_payload(identity.device_id), qos=1)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        if config.tls:
            client.tls_set_context(tls_context(config.ca))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self.client = client
        self.connected = False
        client.connect_async(config.hub_host, config.hub_port, keepalive=keepalive)
        client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._events.append(("refused", self, str(reason_code)))
            return
        # Every connect, session present or not: a SUBSCRIBE also brings the retained
        # ctx and cat again, which the device may have missed while away.
        client.subscribe(self.dn + "#", qos=1)
        self.connected = True
        self._events.append(("up", self))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected = False
        self._events.append(("down", self))

    def _on_message(self, client, userdata, message):
        self._events.append(("msg", self, message.topic, bytes(message.payload),
                             bool(message.retain), message.qos, message.mid,
                             bool(getattr(message, "dup", False))))

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self._events.append(("puback", self, mid))

    def close(self, publish_will):
        """Leave the session. publish_will: the device is gone, so say so as the broker
        would (a clean DISCONNECT makes the broker drop the registered will)."""
        client = self.client
        try:
            if publish_will and self.connected:
                info = client.publish(self.up + "will", will_payload(self.identity.device_id),
                                      qos=1)
                info.wait_for_publish(2.0)
        except (RuntimeError, ValueError) as exc:
            log.warning("will for %s not published: %s", self.identity.device_id, exc)
        finally:
            client.disconnect()
            client.loop_stop()
            self.connected = False


class Bridge:
    """Relays one serial port. run(stop) loops; step() is one pass (tests drive it)."""

    def __init__(self, port, config, link_timeout_s=LINK_TIMEOUT_S, clock=time.monotonic,
                 mqtt_factory=None, keepalive=KEEPALIVE_S, on_event=None):
        self.port = port  # agent.serialport.ReopeningPort with a read timeout
        self.config = config
        self.link_timeout_s = link_timeout_s
        self.clock = clock
        self._factory = mqtt_factory
        self._keepalive = keepalive
        self._notify = on_event
        self._framer = S.Framer(self._write)
        self._rx = S.Deframer()
        self._events = collections.deque()  # from paho's thread
        self.identity = None
        self.session = None
        self._last_rx = 0.0
        # A new bridge process must not reuse the previous one's generation, or a device
        # that missed the change would not see a new session.
        self._gen = struct.unpack("<H", os.urandom(2))[0]
        self._session_gen = None
        self._next_id = 0
        # MSG id -> [paho mid, qos, kind, payload, retained, sent at, tries]: downlinks
        # awaiting the device's DACK
        self._pending = {}
        self._mids = {}  # paho mid -> device mid: uplinks awaiting the broker's PUBACK
        self._retained = {}  # last ctx/cat payloads for this identity
        self.counters = collections.Counter()

    # -- the device side -------------------------------------------------------------------
    def _write(self, buf):
        self.port.write(buf)

    def _send(self, ftype, head=b"", topic=b"", payload=b""):
        try:
            self._framer.send(ftype, head, topic, payload)
            self.counters["frames_out"] += 1
            return True
        except OSError:
            self.counters["write_errors"] += 1
            return False

    def _status(self, state=None):
        if state is None:
            state = S.ST_UP if self.session is not None and self.session.connected else S.ST_DOWN
        gen = self._gen if state == S.ST_UP else 0
        self._send(S.STATUS, struct.pack("<BH", state, gen))

    def _on_frame(self, ftype, body):
        self._last_rx = self.clock()
        self.counters["frames_in"] += 1
        if ftype == S.HELLO:
            self._hello(body)
        elif ftype == S.PING:
            self._status(None if self.identity is not None else S.ST_WHO)
        elif ftype == S.PUB:
            self._pub(body)
        elif ftype == S.DACK and len(body) >= 2:
            self._dack(body[0] | body[1] << 8)
        else:
            self.counters["unknown_frames"] += 1

    def _hello(self, body):
        try:
            identity = parse_hello(body, self.config)
        except (ValueError, UnicodeError) as exc:
            self.counters["bad_hello"] += 1
            log.warning("HELLO refused: %s", exc)
            self._status(S.ST_WHO)
            return
        pin = self.config.device_id
        if pin is not None and identity.device_id != pin:
            self.counters["wrong_device"] += 1
            if self.counters["wrong_device"] % 60 == 1:  # it asks again every second
                    log.error("device %s on %s, but this bridge serves %s only",
                          identity.device_id, self.port.name, pin)
            self._status(S.ST_REFUSED)
            return
        if identity.same(self.identity):
            self._status()
            # The device may have restarted: its screen needs who is signed in and the
            # catalogue again, and the broker will not resend retained ones on its own.
            for kind in _RETAINED:
                payload = self._retained.get(kind)
                if payload is not None:
                    self._msg(kind, payload, True, 0)
            return
        self._detach("another identity", publish_will=self.identity is not None)
        self.identity = identity
        self._retained = {}
        log.info("device %s attached on %s: connecting to %s:%d", identity.device_id,
                 self.port.name, self.config.hub_host, self.config.hub_port)
        self.session = Session(identity, self.config, self._events, self._factory,
                               self._keepalive)
        self._event({"e": "attach", "d": identity.device_id})
        self._status()

    def _pub(self, body):
        session = self.session
        if session is None or not session.connected or len(body) < 4:
            # The device thinks it has a session it does not have: tell it. Its journal
            # still holds the record, so nothing is lost.
            self.counters["pub_without_session"] += 1
            self._status(None if self.identity is not None else S.ST_WHO)
            return
        mid, qos, tlen = struct.unpack("<HBB", bytes(body[:4]))
        try:
            if len(body) < 4 + tlen:
                raise ValueError("topic")
            # One identifier level (no "/", "+" or "#"): only under the device's own prefix.
            suffix = codec.check_id(str(bytes(body[4:4 + tlen]), "ascii"), "topic")
        except (ValueError, UnicodeError):
            self.counters["bad_topic"] += 1
            return
        payload = bytes(body[4 + tlen:])
        info = session.client.publish(session.up + suffix, payload, qos=1 if qos else 0)
        if info.rc != 0:
            self.counters["publish_failed"] += 1
            return
        self.counters["relayed_up"] += 1
        if suffix == "vote":
            self.counters["votes_up"] += 1
        if qos:
            if len(self._mids) >= _MAX_PENDING:
                self._mids.pop(next(iter(self._mids)))
                self.counters["puback_map_dropped"] += 1
            self._mids[info.mid] = mid

    def _dack(self, msg_id):
        pending = self._pending.pop(msg_id, None)
        if pending is None:
            self.counters["stale_dacks"] += 1
            return
        mid, qos = pending[0], pending[1]
        if self.session is not None:
            self.session.client.ack(mid, qos)
            log.debug("MSG %d taken by the device: acked to the broker", msg_id)

    def _msg(self, kind, payload, retained, msg_id):
        flags = 1 if retained else 0
        topic = kind.encode()
        head = struct.pack("<HBB", msg_id, flags, len(topic))
        return self._send(S.MSG, head, topic, payload)

    # -- the hub side ----------------------------------------------------------------------
    def _mqtt_event(self, event):
        kind, session = event[0], event[1]
        if session is not self.session:
            return  # from a session already closed
        if kind == "up":
            self._gen = (self._gen + 1) & 0xFFFF or 1
            self._pending.clear()
            self._mids.clear()
            self.counters["sessions"] += 1
            log.info("device %s: hub session up", session.identity.device_id)
            self._status(S.ST_UP)
        elif kind == "down":
            self._pending.clear()
            self._mids.clear()
            log.warning("device %s: hub session lost", session.identity.device_id)
            self._status(S.ST_DOWN)
        elif kind == "refused":
            self.counters["refused"] += 1
            log.error("broker refused device %s: %s", session.identity.device_id, event[2])
            self._status(S.ST_REFUSED)
        elif kind == "puback":
            device_mid = self._mids.pop(event[2], None)
            if device_mid is not None:
                self._send(S.PUBACK, struct.pack("<H", device_mid))
        elif kind == "msg":
            self._downlink(session, *event[2:])

    def _downlink(self, session, topic, payload, retained, qos, mid, dup=False):
        suffix = topic[len(session.dn):] if topic.startswith(session.dn) else None
        if not suffix or "/" in suffix:
            self.counters["foreign_msgs"] += 1
            if qos:
                session.client.ack(mid, qos)
            return
        if suffix in _RETAINED:
            self._retained[suffix] = payload
        if 4 + len(suffix) + len(payload) > session.identity.max_body:
            # The device could never take it; acked so the broker does not stall on it.
            self.counters["too_large_for_device"] += 1
            log.error("downlink %s of %d bytes is larger than device %s takes (%d): dropped",
                      suffix, len(payload), session.identity.device_id, session.identity.max_body)
            if qos:
                session.client.ack(mid, qos)
            return
        msg_id = 0
        if qos:
            self._next_id = self._next_id % 0xFFFF + 1
            msg_id = self._next_id
            if len(self._pending) >= _MAX_PENDING:
                self._pending.pop(next(iter(self._pending)))
                self.counters["dack_map_dropped"] += 1
            self._pending[msg_id] = [mid, qos, suffix, payload, retained, self.clock(), 1]
        if dup:
            self.counters["redelivered_down"] += 1  # the broker's second try: the last one
            # never reached the device (no DACK), or its DACK never reached us
        if self._msg(suffix, payload, retained, msg_id):
            self.counters["relayed_down"] += 1
            log.debug("downlink %s (%d bytes%s) to %s as MSG %d", suffix, len(payload),
                      ", a repeat" if dup else "",
                      session.identity.device_id, msg_id)

    def _retry_downlinks(self):
        """A MSG frame or its DACK lost on a live wire: send the MSG again (the device takes
        a repeat as MQTT's QoS 1 allows). After DACK_TRIES, restart the session instead of
        acking: the broker then delivers it again, and its window of unacked messages to
        this device cannot fill up and stall."""
        now = self.clock()
        for msg_id, entry in list(self._pending.items()):
            if now - entry[5] < DACK_RETRY_S:
                continue
            if entry[6] >= DACK_TRIES:
                self.counters["dack_give_up"] += 1
                log.warning("device %s did not confirm downlink %s after %d tries: "
                            "restarting its session", self.identity.device_id, entry[2],
                            entry[6])
                # No will: the device is alive and says HELLO again within a second.
                self._detach("downlink unconfirmed", publish_will=False)
                return
            entry[5] = now
            entry[6] += 1
            self.counters["msg_resent"] += 1
            self._msg(entry[2], entry[3], entry[4], msg_id)

    # -- lifecycle -------------------------------------------------------------------------
    def _detach(self, why, publish_will=True):
        session, self.session = self.session, None
        identity, self.identity = self.identity, None
        self._pending.clear()
        self._mids.clear()
        if session is not None:
            log.warning("device %s detached (%s)", identity.device_id, why)
            session.close(publish_will)
            self.counters["detached"] += 1
            self._event({"e": "detach", "d": identity.device_id, "why": why})

    def step(self):
        """Read what the device sent (waiting up to the port's timeout), handle it and the
        hub's events, and notice a device that went quiet or a port that went away."""
        data = self.port.read(4096)
        # Half a frame from before a reconnect needs no special care: every frame starts
        # with END, so the fragment fails its CRC (counted) and the next frame is whole.
        if not self.port.is_open and self.identity is not None:
            self._detach("serial port gone")
        if data:
            self._rx.feed(data, self._on_frame)
        while self._events:
            self._mqtt_event(self._events.popleft())
        if self._pending and self.identity is not None:
            self._retry_downlinks()
        if self.identity is not None and self.clock() - self._last_rx > self.link_timeout_s:
            self._detach("device silent for %.0f s" % self.link_timeout_s)

    def run(self, stop=None, watchdog=None):
        stop = stop or threading.Event()
        log.info("bridge on %s for %s", self.port.name, self.config)
        try:
            while not stop.is_set():
                self.step()
                if watchdog is not None:
                    watchdog()
        finally:
            self._detach("bridge stopping")
            self.port.close()

    def stats(self):
        rx = self._rx
        out = dict(self.counters)
        out.update(device=self.identity.device_id if self.identity else None,
                   hub_session=bool(self.session and self.session.connected),
                   port_open=self.port.is_open, bad_crc=rx.bad_crc, too_long=rx.too_long,
                   port_failures=getattr(self.port, "failures", 0))
        return out

    def _event(self, obj):
        if self._notify is not None:
            self._notify(obj)
