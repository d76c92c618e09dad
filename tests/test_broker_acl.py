# The supervised mosquitto with per-device identity: generated config, ACL enforcement by
# the real broker, password hashes it accepts, reload without dropping clients, TLS with the
# hall CA, restart after a crash, and taking over a broker left by a killed hub.
import os
import queue
import shutil
import signal
import ssl
import subprocess
import sys
import time

import paho.mqtt.client as mqtt
import pytest

from conftest import free_port
from hub.broker import (Broker, BrokerError, BrokerFiles, PasswordFile, acl_text, config_text,
                        hash_password, running_pid, verify_password, write_broker_files)
from hub.keys import HallTLS, issue_client_cert
from hub.settings import write_default


# A paho client that records what it sees: connect results, SUBACKs, messages and
# disconnects, each on a queue the test reads with a deadline. test_provision.py uses it too.

class Peer:
    def __init__(self, client_id, username=None, password=None, clean_session=False):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv311, clean_session=clean_session)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connects = queue.Queue()
        self.subacks = queue.Queue()
        self.messages = queue.Queue()
        self.disconnects = queue.Queue()
        self.client.on_connect = lambda c, u, flags, rc, props: self.connects.put(rc)
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put(rcs)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.disconnects.put(rc)
        self.started = False

    def tls(self, ca_file, certfile=None, keyfile=None):
        self.client.tls_set(ca_certs=ca_file, certfile=certfile, keyfile=keyfile,
                            cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        return self

    def connect(self, port, host="127.0.0.1", timeout=10):
        """Connect and return the CONNACK reason code (is_failure tells refusal)."""
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        self.started = True
        return self.connects.get(timeout=timeout)

    def subscribe(self, topic, qos=1, timeout=10):
        self.client.subscribe(topic, qos)
        return self.subacks.get(timeout=timeout)

    def publish(self, topic, payload, qos=1, retain=False, timeout=10):
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout)
        return info

    def until(self, topic, timeout=10):
        """Messages received up to and including the first one on `topic`."""
        seen = []
        while True:
            item = self.messages.get(timeout=timeout)
            seen.append(item)
            if item[0] == topic:
                return seen

    def close(self):
        if self.started:
            self.client.disconnect()
            self.client.loop_stop()
            self.started = False


def make_settings(tmp_path, **broker):
    broker.setdefault("port", free_port())
    return write_default(str(tmp_path / "hub.toml"), broker=broker)


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def peers():
    made = []

    def make(*args, **kwargs):
        peer = Peer(*args, **kwargs)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


@pytest.fixture
def hall(tmp_path):
    """A started broker with devices A and B provisioned directly in the password file."""
    settings = make_settings(tmp_path)
    broker = Broker(settings)
    broker.start()
    with PasswordFile(broker.files.passwd) as pw:
        pw.set("A", "pass-A")
        pw.set("B", "pass-B")
    assert broker.reload()
    yield settings, broker
    broker.stop()


def connect_ok(peer, port):
    rc = peer.connect(port)
    assert not rc.is_failure, str(rc)
    return peer


def hub_peer(peers, settings, client_id="hub"):
    peer = connect_ok(peers(client_id, settings.broker.hub_user, settings.broker.hub_password),
                      settings.broker.port)
    assert not peer.subscribe("pj/+/up/#")[0].is_failure
    return peer


# -- generated files ----------------------------------------------------------------------

def test_acl_gives_devices_their_own_subtree_and_the_hub_all_devices():
    text = acl_text("hub")
    rules = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert rules == ["pattern write pj/%u/up/#", "pattern read pj/%u/dn/#", "user hub",
                     "topic read pj/+/up/#", "topic write pj/+/dn/#"]


def test_config_is_closed_to_anonymous_and_has_tls_only_when_asked(tmp_path):
    plain = make_settings(tmp_path)
    files = BrokerFiles.for_settings(plain)
    text = config_text(plain, files, run_as_root=False)
    assert "allow_anonymous false" in text
    assert "password_file %s\n" % files.passwd in text and "acl_file %s\n" % files.acl in text
    assert "persistence true" in text and files.persistence in text
    assert "listener %d 127.0.0.1" % plain.broker.port in text
    assert "certfile" not in text and "user root" not in text
    assert "user root" in config_text(plain, files, run_as_root=True)
    tls = plain.replace(broker={"tls_port": 8883, "require_client_cert": True})
    text = config_text(tls, files, run_as_root=False)
    assert "listener 8883 127.0.0.1" in text and "require_certificate true" in text
    assert os.path.join(files.tls_dir, "server.key") in text


def test_hub_password_is_required_and_never_written_in_clear(tmp_path):
    settings = make_settings(tmp_path)
    with pytest.raises(BrokerError, match="^broker.hub_password is empty"):
        write_broker_files(settings.replace(broker={"hub_password": ""}))
    files = write_broker_files(settings)
    for path in (files.conf, files.acl, files.passwd):
        with open(path) as f:
            assert settings.broker.hub_password not in f.read()
    assert os.stat(files.passwd).st_mode & 0o077 == 0
    with PasswordFile(files.passwd) as pw:
        assert pw.users() == ["hub"]
        assert pw.check("hub", settings.broker.hub_password)
        assert not pw.check("hub", "wrong")


def test_password_hashes_match_mosquitto_passwd(tmp_path):
    assert verify_password("s3cret", hash_password("s3cret"))
    assert not verify_password("s3cret", hash_password("other"))
    assert not verify_password("s3cret", "$6$abc$def")
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed")
    path = str(tmp_path / "pw")
    subprocess.run([tool, "-b", "-c", path, "someone", "s3cret"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with PasswordFile(path) as pw:
        assert pw.check("someone", "s3cret") and not pw.check("someone", "s3cre")


def test_password_file_edits_are_kept_across_writers(tmp_path):
    path = str(tmp_path / "broker" / "passwd")
    with PasswordFile(path) as pw:
        pw.set("A", "a")
    with PasswordFile(path) as pw:
        assert pw.ensure("A", "a") is False
        pw.set("B", "b")
        assert pw.remove("A") and not pw.remove("nobody")
    with PasswordFile(path) as pw:
        assert pw.users() == ["B"] and pw.check("B", "b")
    with pytest.raises(BrokerError):
        with PasswordFile(path) as pw:
            pw.set("a:b", "x")


# -- the real broker enforces identity and ACL --------------------------------------------

def test_wrong_password_unknown_user_and_anonymous_are_refused(hall, peers):
    settings, broker = hall
    port = settings.broker.port
    assert peers("A", "A", "wrong").connect(port).is_failure
    assert peers("Z", "Z", "pass-A").connect(port).is_failure
    assert peers("anon").connect(port).is_failure
    assert peers("hub2", "hub", "pass-A").connect(port).is_failure
    assert not peers("A", "A", "pass-A").connect(port).is_failure


def test_device_cannot_publish_under_another_devices_topics(hall, peers):
    settings, broker = hall
    hub = hub_peer(peers, settings)
    a = connect_ok(peers("A", "A", "pass-A"), settings.broker.port)
    a.publish("pj/B/up/vote", b"forged by A")
    a.publish("pj/B/up/birth", b"forged by A")
    a.publish("pj/A/dn/ack", b"self-ack by A")
    a.publish("pj/A/up/vote", b"control")
    seen = hub.until("pj/A/up/vote")
    assert seen == [("pj/A/up/vote", b"control")]


def test_device_cannot_read_another_devices_downlink_or_uplinks(hall, peers):
    settings, broker = hall
    hub = hub_peer(peers, settings)
    a = connect_ok(peers("A", "A", "pass-A"), settings.broker.port)
    b = connect_ok(peers("B", "B", "pass-B"), settings.broker.port)
    # mosquitto 2.0 may grant the SUBACK; what matters is that nothing is delivered.
    for topic in ("pj/B/dn/#", "pj/+/up/#", "#", "pj/A/dn/#"):
        a.subscribe(topic)
    assert not b.subscribe("pj/B/dn/#")[0].is_failure
    hub.client.publish("pj/B/dn/ack", b'{"s":7}', qos=1)
    b.publish("pj/B/up/vote", b"B's vote")
    hub.client.publish("pj/A/dn/ack", b'{"s":1}', qos=1)
    seen = a.until("pj/A/dn/ack")
    assert [t for t, _ in seen] == ["pj/A/dn/ack"] * len(seen)
    assert ("pj/B/dn/ack", b'{"s":7}') in b.until("pj/B/dn/ack")
    assert ("pj/B/up/vote", b"B's vote") in hub.until("pj/B/up/vote")


def test_hub_reads_every_uplink_and_writes_every_downlink_but_forges_no_uplink(hall, peers):
    settings, broker = hall
    hub = hub_peer(peers, settings)
    a = connect_ok(peers("A", "A", "pass-A"), settings.broker.port)
    b = connect_ok(peers("B", "B", "pass-B"), settings.broker.port)
    a.subscribe("pj/A/dn/#")
    b.subscribe("pj/B/dn/#")
    a.publish("pj/A/up/vote", b"a1")
    b.publish("pj/B/up/hb", b"b1")
    got = hub.until("pj/A/up/vote")
    if ("pj/B/up/hb", b"b1") not in got:
        got += hub.until("pj/B/up/hb")
    assert ("pj/A/up/vote", b"a1") in got and ("pj/B/up/hb", b"b1") in got
    hub.publish("pj/A/dn/ack", b"ack-a")
    hub.publish("pj/B/dn/ctx", b"ctx-b", retain=True)
    assert a.until("pj/A/dn/ack")[-1] == ("pj/A/dn/ack", b"ack-a")
    assert b.until("pj/B/dn/ctx")[-1] == ("pj/B/dn/ctx", b"ctx-b")
    # The hub cannot pose as a device: its uplink write never reaches a reader.
    spy = hub_peer(peers, settings, client_id="hub-reader")
    hub.publish("pj/A/up/vote", b"hub-forged")
    a.publish("pj/A/up/evt", b"control")
    assert spy.until("pj/A/up/evt") == [("pj/A/up/evt", b"control")]


def test_reload_admits_a_new_device_and_keeps_connected_clients(hall, peers):
    settings, broker = hall
    hub = hub_peer(peers, settings)
    a = connect_ok(peers("A", "A", "pass-A"), settings.broker.port)
    assert peers("C", "C", "pass-C").connect(settings.broker.port).is_failure
    with PasswordFile(broker.files.passwd) as pw:
        pw.set("C", "pass-C")
    assert broker.reload()
    # SIGHUP is handled asynchronously: poll until the broker has re-read the file.
    assert wait_for(lambda: _connects(settings, "C", "pass-C"))
    connect_ok(peers("C", "C", "pass-C"), settings.broker.port)
    a.publish("pj/A/up/vote", b"after reload")
    assert hub.until("pj/A/up/vote")[-1] == ("pj/A/up/vote", b"after reload")
    assert a.disconnects.empty() and hub.disconnects.empty()
    assert a.client.is_connected()


def _connects(settings, user, password):
    probe = Peer(user + "-probe", user, password, clean_session=True)
    try:
        return not probe.connect(settings.broker.port).is_failure
    except OSError:  # nothing listening yet
        return False
    finally:
        probe.close()


# -- supervision ------------------------------------------------------------------------

def test_supervised_broker_is_restarted_after_being_killed(hall, peers):
    settings, broker = hall
    broker.supervise(interval=0.05)
    first = broker.pid
    os.kill(first, signal.SIGKILL)
    assert wait_for(lambda: broker.restarts >= 1 and broker.pid not in (None, first))
    assert broker.is_running() and running_pid(settings) == broker.pid
    a = peers("A", "A", "pass-A")
    assert wait_for(lambda: _connects(settings, "A", "pass-A"))
    connect_ok(a, settings.broker.port)
    broker.stop()
    assert not broker.is_running() and running_pid(settings) is None
    assert broker.restarts == 1


HUB_SCRIPT = """
import sys, time
from hub.settings import Settings
from hub.broker import Broker
broker = Broker(Settings.load(sys.argv[1]))
broker.start()
print(broker.pid, flush=True)
time.sleep(600)
"""


def test_a_new_hub_takes_over_a_broker_left_by_a_killed_one(tmp_path):
    settings = make_settings(tmp_path)
    from conftest import ROOT
    hub = subprocess.Popen([sys.executable, "-c", HUB_SCRIPT, settings.source], cwd=ROOT,
                           stdout=subprocess.PIPE, text=True)
    try:
        orphan_pid = int(hub.stdout.readline())
        hub.kill()  # SIGKILL: no clean-up runs, the broker (own session) keeps running
        hub.wait(10)
        assert running_pid(settings) == orphan_pid
        successor = Broker(settings)
        successor.start()
        try:
            assert successor.pid != orphan_pid
            assert wait_for(lambda: not _alive(orphan_pid))
            assert successor.is_running() and running_pid(settings) == successor.pid
            assert _connects(settings, "hub", settings.broker.hub_password)
        finally:
            successor.stop()
    finally:
        if hub.poll() is None:
            hub.kill()
            hub.wait(10)
        if _alive(orphan_pid):
            os.kill(orphan_pid, signal.SIGKILL)


def _alive(pid):
    from hub.broker import _gone
    return not _gone(pid)


def test_a_second_live_supervisor_is_refused_without_touching_the_first(hall):
    settings, broker = hall
    rival = Broker(settings)
    with pytest.raises(BrokerError, match="another hub process supervises"):
        rival.start()
    assert broker.is_running() and running_pid(settings) == broker.pid
    assert _connects(settings, "A", "pass-A")


def test_start_fails_clearly_when_the_port_is_taken(tmp_path, mosquitto):
    settings = make_settings(tmp_path, port=mosquitto.port)
    broker = Broker(settings)
    with pytest.raises(BrokerError, match="already in use"):
        broker.start()
    assert not broker.is_running()


def test_external_mode_starts_nothing_and_gives_connection_details(tmp_path, mosquitto):
    settings = make_settings(tmp_path, mode="external", port=mosquitto.port, host="0.0.0.0")
    broker = Broker(settings)
    broker.start()
    assert broker.proc is None and not broker.reload()
    ep = broker.endpoint
    assert (ep.host, ep.port, ep.username) == ("127.0.0.1", mosquitto.port, "hub")
    assert ep.password == settings.broker.hub_password and ep.password not in repr(ep)
    assert broker.is_running()
    mosquitto.stop()
    assert not broker.is_running()
    broker.stop()


# -- TLS with the hall CA -----------------------------------------------------------------

def test_tls_listener_works_with_the_hall_ca(tmp_path, peers):
    settings = make_settings(tmp_path, tls_port=free_port())
    broker = Broker(settings)
    broker.start()
    try:
        ca = broker.endpoint.ca_file
        assert ca == HallTLS.for_settings(settings).ca_cert
        for host in ("127.0.0.1", "localhost"):
            peer = peers("hub-" + host, "hub", settings.broker.hub_password).tls(ca)
            rc = peer.connect(settings.broker.tls_port, host=host)
            assert not rc.is_failure
        # The TLS listener enforces identity too.
        assert peers("x", "hub", "wrong").tls(ca).connect(settings.broker.tls_port).is_failure
        # A client trusting another hall's CA refuses this broker.
        other = make_settings(tmp_path / "other", tls_port=free_port())
        write_broker_files(other)
        with pytest.raises(ssl.SSLError):
            peers("y", "hub", settings.broker.hub_password).tls(
                HallTLS.for_settings(other).ca_cert).connect(settings.broker.tls_port)
    finally:
        broker.stop()


def _utf8(text):
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def tls_connack(port, ca_file, username, password, certfile=None, keyfile=None):
    """An MQTT 3.1.1 CONNECT over TLS by hand; the CONNACK return code, or "refused"
    when the broker ends the TLS session instead (as it does without a client cert:
    under TLS 1.3 that shows only after the handshake, so paho would just wait)."""
    import socket
    context = ssl.create_default_context(cafile=ca_file)
    if certfile:
        context.load_cert_chain(certfile, keyfile)
    body = (_utf8("MQTT") + bytes([4, 0xC2]) + (30).to_bytes(2, "big") +
            _utf8(username + "-raw") + _utf8(username) + _utf8(password))
    packet = bytes([0x10, len(body)]) + body
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(packet)
                reply = tls.recv(4)
    except (ssl.SSLError, ConnectionError):
        return "refused"
    if len(reply) < 4:
        return "refused"
    assert reply[0] == 0x20, reply
    return reply[3]


def test_client_certificate_required_when_configured(tmp_path, peers):
    settings = make_settings(tmp_path, tls_port=free_port(), require_client_cert=True)
    broker = Broker(settings)
    broker.start()
    try:
        with PasswordFile(broker.files.passwd) as pw:
            pw.set("D1", "pass-D1")
        broker.reload()
        ca = broker.endpoint.ca_file
        port = settings.broker.tls_port
        assert tls_connack(port, ca, "D1", "pass-D1") == "refused"
        cert_pem, key_pem = issue_client_cert(settings, "D1")
        assert "PRIVATE KEY" in key_pem and "CERTIFICATE" in cert_pem
        cert, key = tmp_path / "d1.crt", tmp_path / "d1.key"
        cert.write_text(cert_pem)
        key.write_text(key_pem)
        assert wait_for(lambda: tls_connack(port, ca, "D1", "pass-D1", str(cert), str(key)) == 0)
        # A certificate does not replace the password: both are checked.
        assert tls_connack(port, ca, "D1", "wrong", str(cert), str(key)) == 5
        # A certificate from another hall's CA is refused.
        other = make_settings(tmp_path / "other", tls_port=free_port())
        write_broker_files(other)
        foreign_cert, foreign_key = issue_client_cert(other, "D1")
        (tmp_path / "f.crt").write_text(foreign_cert)
        (tmp_path / "f.key").write_text(foreign_key)
        assert tls_connack(port, ca, "D1", "pass-D1", str(tmp_path / "f.crt"),
                           str(tmp_path / "f.key")) == "refused"
        peer = peers("D1", "D1", "pass-D1").tls(ca, str(cert), str(key))
        assert not peer.connect(port).is_failure
    finally:
        broker.stop()
