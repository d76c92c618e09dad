"""How a Pi evaluator reaches the hub: its own MQTT session (paho), or a serial link to a
window PC's bridge (firmware/serial_link.py). Either way the runtime sees one interface:

    start(), stop(), poll(now_ms), events() -> [("session", up) | ("msg", suffix,
    payload, retained) | ("refused", why)], publish(suffix, payload, qos) -> bool,
    connected, inflight (QoS 1 publishes awaiting PUBACK), reconnects

`suffix` is the last topic level: the transport puts it under pj/<device>/up/ (uplinks)
and takes it from under pj/<device>/dn/ (downlinks), so the runtime cannot publish
anywhere else. Events are queued by whatever thread sees them (paho's network thread) and
drained by the runtime's one loop thread, which alone touches the rating and journal.
"""
import collections
import json
import logging
import os
import ssl
import threading

from firmware import serial_link

log = logging.getLogger("pingjia.agent.transport")


def will_payload(device_id):
    return json.dumps({"v": 1, "d": device_id, "online": False}, separators=(",", ":")).encode()


def tls_context(ca_pem, cert_file=None, key_file=None):
    """TLS to the hall broker, trusting only the hall CA (docs/hub-setup.md)."""
    context = ssl.create_default_context(cadata=ca_pem)
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context


class MqttTransport:
    """The device's own persistent MQTT session to the hall broker (docs/protocol.md,
    "Transport"): client id and user = device id, clean_session=0, keepalive 30 s, the
    device's last will; subscribed to its downlinks on every connect."""

    def __init__(self, config, keepalive=30, client_factory=None, tls=None, reconnect_max_s=30):
        self.device_id = config.device_id
        self._config = config
        self._keepalive = keepalive
        self._factory = client_factory
        self._tls = tls
        self._reconnect_max_s = reconnect_max_s
        self._up = "pj/%s/up/" % self.device_id
        self._dn = "pj/%s/dn/" % self.device_id
        self._events = collections.deque()
        # Re-entrant: paho may run on_publish in the publishing thread itself.
        self._lock = threading.RLock()
        self._inflight = set()
        self._client = None
        self._ever = False
        self.connected = False
        self.reconnects = 0
        self.refusals = 0
        self.foreign = 0  # messages on topics that are not this device's downlinks

    def start(self):
        import paho.mqtt.client as mqtt

        factory = self._factory or (
            lambda **kw: mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kw))
        client = factory(client_id=self.device_id, clean_session=False)
        config = self._config
        client.username_pw_set(config.mqtt_user or self.device_id, config.mqtt_password or None)
        client.will_set(self._up + "will", will_payload(self.device_id), qos=1)
        client.reconnect_delay_set(min_delay=1, max_delay=self._reconnect_max_s)
        if config.tls:
            client.tls_set_context(self._tls or tls_context(config.ca))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self._client = client
        client.connect_async(config.hub_host, config.hub_port, keepalive=self._keepalive)
        client.loop_start()

    def stop(self):
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()  # a clean goodbye: the broker drops the will
            client.loop_stop()
        self.connected = False

    # -- paho's thread ---------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.refusals += 1
            self._events.append(("refused", str(reason_code)))
            return
        client.subscribe(self._dn + "#", qos=1)
        with self._lock:
            self._inflight.clear()
        if self._ever:
            self.reconnects += 1
        self._ever = True
        self.connected = True
        self._events.append(("session", True))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        was = self.connected
        self.connected = False
        with self._lock:
            self._inflight.clear()
        if was:
            self._events.append(("session", False))

    def _on_message(self, client, userdata, message):
        topic = message.topic
        if not topic.startswith(self._dn) or "/" in topic[len(self._dn):]:
            self.foreign += 1
            return
        self._events.append(("msg", topic[len(self._dn):], bytes(message.payload),
                             bool(message.retain)))

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._lock:
            self._inflight.discard(mid)

    # -- the runtime's thread --------------------------------------------------------------
    def poll(self, now_ms):
        pass  # paho's own thread does the work

    def events(self):
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out

    @property
    def inflight(self):
        return len(self._inflight)

    def publish(self, suffix, payload, qos=1):
        client = self._client
        if client is None or not self.connected:
            return False
        with self._lock:
            info = client.publish(self._up + suffix, payload, qos=qos)
            if info.rc != 0:
                return False
            if qos:
                self._inflight.add(info.mid)
        return True


class SerialTransport:
    """The evaluator's end of a serial link to a bridge on the window PC: the same
    frames as an MCU's firmware/serial_link.py, over a port that may vanish and return."""

    def __init__(self, config, port, ping_ms=1000, timeout_ms=5000):
        self.device_id = config.device_id
        self.port = port  # agent.serialport.ReopeningPort (or anything with read/write)
        self._events = collections.deque()
        hello = serial_link.hello_body(config.device_id, config.mqtt_user or config.device_id,
                                       config.mqtt_password)
        self.link = serial_link.Link(port, hello, self._on_message, self._on_session,
                                     ping_ms=ping_ms, timeout_ms=timeout_ms)
        self._ever = False
        self.reconnects = 0
        self.refusals = 0
        self._refused = False

    def start(self):
        pass  # the port opens at the first poll, and again whenever it comes back

    def stop(self):
        close = getattr(self.port, "close", None)
        if close is not None:
            close()

    def _on_session(self, up):
        if up:
            if self._ever:
                self.reconnects += 1
            self._ever = True
        self._events.append(("session", up))

    def _on_message(self, suffix, payload, retained):
        self._events.append(("msg", suffix, payload, retained))

    def poll(self, now_ms):
        self.link.poll(now_ms)
        if self.link.refused and not self._refused:
            self.refusals += 1
            self._events.append(("refused", "the bridge or the broker refused this device"))
        self._refused = self.link.refused

    def events(self):
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out

    @property
    def connected(self):
        return self.link.connected

    @property
    def inflight(self):
        return self.link.inflight

    def publish(self, suffix, payload, qos=1):
        try:
            self.link.publish(suffix, payload, qos)
        except OSError:
            return False
        return True


def client_cert_files(config, state_dir):
    """Client certificate and key PEM from a provisioning file (`client_cert`,
    `client_key`), written beside the journal with mode 0600 for ssl to load; (None,
    None) when the config has none."""
    cert, key = config.extra.get("client_cert"), config.extra.get("client_key")
    if not cert or not key:
        return None, None
    paths = []
    for name, pem in (("client.crt", cert), ("client.key", key)):
        path = os.path.join(state_dir, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pem)
        paths.append(path)
    return paths[0], paths[1]
