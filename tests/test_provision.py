# Provisioning: `pingjia hub init` round trip, device registry + broker login, the device
# config and provisioning file, retiring, and live provisioning against the real broker
# (a new device gets in after reload while a connected one never notices).
import json
import logging
import os
import stat
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import ROOT, free_port
from test_broker_acl import Peer, connect_ok, hub_peer, peers, tls_connack, wait_for  # noqa: F401
from hub.broker import Broker, BrokerFiles, PasswordFile, write_broker_files
from hub.cli import cli
from hub.keys import (HallTLS, KeysError, ensure_hall_tls, ensure_signing_key, generate_signing_key,
                      load_signing_key, public_key_hex, public_key_pem)
from hub.provision import (ProvisionError, Provisioned, add_device, device_config,
                           export_provisioning, list_devices, remove_device)
from hub.settings import Settings, write_default
from hub.store import Store

CONFIG_KEYS = {"device_id", "key", "hub_host", "hub_port", "mqtt_user", "mqtt_password",
               "window", "tls", "seq_floor", "board"}


@pytest.fixture
def settings(tmp_path):
    return write_default(str(tmp_path / "hub.toml"), broker={"port": free_port()})


@pytest.fixture
def running(settings):
    broker = Broker(settings)
    broker.start()
    yield settings, broker
    broker.stop()


def login_ok(settings, user, password):
    with PasswordFile(BrokerFiles.for_settings(settings).passwd) as pw:
        return pw.check(user, password)


def store_vote(settings, device_id, seq):
    store = Store(settings.db_path)
    try:
        with store.transaction():
            store.insert_vote({"d": device_id, "s": seq, "t": 1700000000 + seq, "k": "v",
                               "pid": "P%d" % seq, "case": "", "stars": 5, "rs": [], "cv": "",
                               "w": "W01", "sn": "", "mac": "%064x" % seq})
    finally:
        store.close()


# -- registry and credentials ---------------------------------------------------------------

def test_add_device_registers_key_and_broker_login_without_leaking_secrets(settings, caplog):
    caplog.set_level(logging.DEBUG)
    p = add_device(settings, "D0001", window="W01", label="窗口 1")
    assert isinstance(p, Provisioned)
    assert len(p.key_hex) == 64 and bytes.fromhex(p.key_hex)
    assert p.mqtt_user == "D0001" and len(p.mqtt_password) >= 24
    assert (p.hub_host, p.hub_port, p.tls, p.seq_floor) == ("127.0.0.1", settings.broker.port, False, 0)
    assert p.key_hex not in repr(p) and p.mqtt_password not in repr(p)
    store = Store(settings.db_path)
    try:
        row = store.device("D0001")
    finally:
        store.close()
    assert row["key_hex"] == p.key_hex and row["window"] == "W01" and not row["retired"]
    assert login_ok(settings, "D0001", p.mqtt_password)
    assert not login_ok(settings, "D0001", "guess")
    # The broker password lives only as a hash in the password file.
    with open(BrokerFiles.for_settings(settings).passwd) as f:
        assert p.mqtt_password not in f.read()
    assert p.key_hex not in caplog.text and p.mqtt_password not in caplog.text
    other = add_device(settings, "D0002")
    assert other.key_hex != p.key_hex and other.mqtt_password != p.mqtt_password


def test_bad_ids_and_duplicates_are_refused(settings):
    for bad in ("", "has space", "a/b", "x" * 65, "设备1"):
        with pytest.raises(ProvisionError, match="must be 1-64 characters"):
            add_device(settings, bad)
    with pytest.raises(ProvisionError, match="window"):
        add_device(settings, "D1", window="W 1")
    with pytest.raises(ProvisionError, match="hub's own broker user"):
        add_device(settings, settings.broker.hub_user)
    add_device(settings, "D1")
    with pytest.raises(ProvisionError, match="already provisioned"):
        add_device(settings, "D1")
    assert [d.device_id for d in list_devices(settings)] == ["D1"]


def test_retire_keeps_votes_and_replace_continues_above_known_sequences(settings):
    first = add_device(settings, "D1", window="W01")
    store_vote(settings, "D1", 1)
    store_vote(settings, "D1", 2)
    assert remove_device(settings, "D1") is True
    assert remove_device(settings, "D1") is False
    assert not login_ok(settings, "D1", first.mqtt_password)
    [record] = list_devices(settings)
    assert record.retired and not record.broker_login
    assert list_devices(settings, include_retired=False) == []
    store = Store(settings.db_path)
    try:
        assert store.vote("D1", 2) is not None
    finally:
        store.close()
    with pytest.raises(ProvisionError, match="was retired"):
        add_device(settings, "D1")
    again = add_device(settings, "D1", window="W02", replace=True)
    assert again.seq_floor == 2 and again.key_hex != first.key_hex
    assert login_ok(settings, "D1", again.mqtt_password)
    [record] = list_devices(settings)
    assert not record.retired and record.broker_login and record.window == "W02"
    with pytest.raises(ProvisionError, match="not provisioned"):
        remove_device(settings, "nobody")


def test_device_config_has_exactly_the_firmware_keys(settings):
    p = add_device(settings, "D7", window="W07")
    config = device_config(p)
    assert set(config) == CONFIG_KEYS
    assert config["key"] == p.key_hex and config["mqtt_password"] == p.mqtt_password
    assert (config["device_id"], config["mqtt_user"], config["window"]) == ("D7", "D7", "W07")
    assert (config["tls"], config["seq_floor"], config["board"]) == (False, 0, "board.json")
    json.dumps(config)
    with_wifi = device_config(p, wifi={"ssid": "hall-net", "password": "pw-12345"}, board="sim.json")
    assert with_wifi["wifi"] == {"ssid": "hall-net", "password": "pw-12345"}
    assert with_wifi["board"] == "sim.json"
    for bad in ({"ssid": ""}, {"ssid": "x" * 33}, {"ssid": "hall", "password": "short"}):
        with pytest.raises(ProvisionError, match="wifi"):
            device_config(p, wifi=bad)


def test_the_firmware_accepts_the_config_provisioning_writes(tmp_path):
    from firmware.evaluator import config as firmware_config
    plain = write_default(str(tmp_path / "plain" / "hub.toml"), broker={"port": free_port()})
    p = add_device(plain, "D8", window="W08")
    loaded = firmware_config.loads(json.dumps(device_config(p, wifi={"ssid": "hall-net",
                                                                      "password": "pw-12345"})))
    assert (loaded.device_id, loaded.key, loaded.hub_port, loaded.tls) == \
        ("D8", bytes.fromhex(p.key_hex), plain.broker.port, False)
    assert (loaded.mqtt_user, loaded.mqtt_password, loaded.window) == ("D8", p.mqtt_password, "W08")
    assert (loaded.wifi_ssid, loaded.wifi_password, loaded.seq_floor) == ("hall-net", "pw-12345", 0)
    assert p.mqtt_password not in repr(loaded)
    tls = write_default(str(tmp_path / "tls" / "hub.toml"),
                        broker={"port": free_port(), "tls_port": free_port()})
    write_broker_files(tls)  # creates the hall CA
    t = add_device(tls, "D8")
    doc = export_provisioning(tls, "D8", provisioned=t)
    loaded = firmware_config.loads(json.dumps(doc))  # the export loads as a config too
    assert loaded.tls and loaded.ca == t.ca_pem and loaded.hub_port == tls.broker.tls_port


def test_export_writes_a_private_file_and_reexport_rotates_the_broker_password(settings, tmp_path):
    p = add_device(settings, "D9", window="W09")
    path = str(tmp_path / "out" / "D9.json")
    doc = export_provisioning(settings, "D9", path=path, provisioned=p)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path) as f:
        assert json.load(f) == doc
    assert CONFIG_KEYS <= set(doc)
    assert (doc["key"], doc["mqtt_password"], doc["ca"]) == (p.key_hex, p.mqtt_password, None)
    later = export_provisioning(settings, "D9")
    assert later["key"] == p.key_hex and later["mqtt_password"] != p.mqtt_password
    assert login_ok(settings, "D9", later["mqtt_password"])
    assert not login_ok(settings, "D9", p.mqtt_password)
    remove_device(settings, "D9")
    with pytest.raises(ProvisionError, match="retired"):
        export_provisioning(settings, "D9")


# -- against the real broker ---------------------------------------------------------------

def test_new_device_connects_after_provisioning_while_connected_one_stays(running, peers):
    settings, broker = running
    hub = hub_peer(peers, settings)
    a = add_device(settings, "DA")
    device_a = peers("DA", a.mqtt_user, a.mqtt_password)
    assert wait_for(lambda: _can_connect(settings, a.mqtt_user, a.mqtt_password))
    connect_ok(device_a, settings.broker.port)
    assert device_a.subscribe("pj/DA/dn/#")[0].value < 128

    b = add_device(settings, "DB")  # reloads the running broker through its pid file
    assert wait_for(lambda: _can_connect(settings, b.mqtt_user, b.mqtt_password))
    device_b = connect_ok(peers("DB", b.mqtt_user, b.mqtt_password), settings.broker.port)
    device_b.publish("pj/DB/up/birth", b"{}")
    device_a.publish("pj/DA/up/vote", b"still here")
    seen = hub.until("pj/DA/up/vote")
    if ("pj/DB/up/birth", b"{}") not in seen:
        seen += hub.until("pj/DB/up/birth")
    assert ("pj/DA/up/vote", b"still here") in seen and ("pj/DB/up/birth", b"{}") in seen
    hub.publish("pj/DA/dn/ack", b'{"s":1}')
    assert device_a.until("pj/DA/dn/ack")[-1] == ("pj/DA/dn/ack", b'{"s":1}')
    assert device_a.disconnects.empty() and device_a.client.is_connected()
    assert broker.restarts == 0


def test_retired_device_is_disconnected_and_cannot_return(running, peers):
    settings, broker = running
    a = add_device(settings, "DR")
    assert wait_for(lambda: _can_connect(settings, "DR", a.mqtt_password))
    device = connect_ok(peers("DR", "DR", a.mqtt_password), settings.broker.port)
    remove_device(settings, "DR")
    device.disconnects.get(timeout=10)
    assert not _can_connect(settings, "DR", a.mqtt_password)


def test_tls_provisioning_gives_a_working_ca_and_client_certificate(tmp_path):
    settings = write_default(str(tmp_path / "hub.toml"),
                             broker={"port": free_port(), "tls_port": free_port(),
                                     "require_client_cert": True})
    broker = Broker(settings)
    broker.start()
    try:
        p = add_device(settings, "DT", client_cert=True)
        assert p.tls and p.hub_port == settings.broker.tls_port
        assert p.ca_pem == HallTLS.for_settings(settings).ca_pem()
        doc = export_provisioning(settings, "DT", path=str(tmp_path / "DT.json"), provisioned=p)
        assert doc["tls"] is True and doc["client_cert"] and doc["client_key"]
        for name in ("ca", "client_cert", "client_key"):
            (tmp_path / name).write_text(doc[name])
        connect = lambda: tls_connack(doc["hub_port"], str(tmp_path / "ca"), doc["mqtt_user"],  # noqa: E731
                                      doc["mqtt_password"], str(tmp_path / "client_cert"),
                                      str(tmp_path / "client_key"))
        assert wait_for(lambda: connect() == 0)
    finally:
        broker.stop()


def _can_connect(settings, user, password):
    probe = Peer(user + "-probe", user, password, clean_session=True)
    try:
        return not probe.connect(settings.broker.port).is_failure
    except OSError:
        return False
    finally:
        probe.close()


# -- the CLI ---------------------------------------------------------------------------------

def run_cli(*args, env=None):
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_hub_init_round_trip_and_force_keeps_keys(tmp_path):
    port, tls_port = free_port(), free_port()
    out = run_cli("hub", "init", "--dir", str(tmp_path), "--hub-id", "hall-9", "--port", str(port),
                  "--tls-port", str(tls_port), "--json")
    info = json.loads(out)
    path = str(tmp_path / "hub.toml")
    assert info["config"] == path
    s = Settings.load(path)
    assert (s.hub.id, s.broker.port, s.broker.tls_port) == ("hall-9", port, tls_port)
    assert s.broker.hub_password and s.broker.hub_password not in out
    assert stat.S_IMODE(os.stat(s.signing_key_path).st_mode) == 0o600
    key = load_signing_key(s.signing_key_path)
    assert info["public_key_pem"] == public_key_pem(key).decode()
    tls = HallTLS.for_settings(s)
    assert info["ca_cert"] == tls.ca_cert and tls.exists()
    assert stat.S_IMODE(os.stat(tls.ca_key).st_mode) == 0o600
    assert os.path.exists(BrokerFiles.for_settings(s).conf)
    ca_before = tls.ca_pem()

    run_cli("hub", "init", "--dir", str(tmp_path), "--force", "--port", str(port))
    again = Settings.load(path)
    assert again.broker.hub_password != s.broker.hub_password and again.broker.tls_port == 0
    assert public_key_pem(load_signing_key(again.signing_key_path)) == public_key_pem(key)
    assert tls.ca_pem() == ca_before


def test_cli_errors_are_one_line_messages(tmp_path):
    def pingjia(*args):
        return subprocess.run([sys.executable, "-c", "from hub.cli import main; main()", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PINGJIA_CONFIG=str(tmp_path / "hub.toml")))

    missing = pingjia("device", "list")
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "no such settings file" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert pingjia("hub", "init").returncode == 0
    again = pingjia("hub", "init")
    assert again.returncode == 1 and again.stderr.startswith("error: ") and "already exists" in again.stderr
    bad = pingjia("device", "add", "bad id")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1


def test_device_commands_through_the_cli(tmp_path):
    config = str(tmp_path / "hub.toml")
    env = {"PINGJIA_CONFIG": config}
    run_cli("hub", "init", "--port", str(free_port()), env=env)
    export = str(tmp_path / "D5.json")
    out = run_cli("device", "add", "D5", "--window", "W05", "--export", export, "--wifi-ssid",
                  "hall", "--wifi-password", "wifi-pass", "--json", env=env)
    summary = json.loads(out)
    assert summary["device_id"] == "D5" and summary["window"] == "W05"
    assert summary["export"] == export
    with open(export) as f:
        doc = json.load(f)
    assert doc["wifi"] == {"ssid": "hall", "password": "wifi-pass"}
    assert doc["key"] not in out and doc["mqtt_password"] not in out
    settings = Settings.load(config)
    assert login_ok(settings, "D5", doc["mqtt_password"])
    listed = json.loads(run_cli("device", "list", "--json", "--config", config))
    assert [(d["device_id"], d["window"], d["retired"]) for d in listed] == [("D5", "W05", False)]
    assert "retired D5" in run_cli("device", "remove", "D5", env=env)
    assert json.loads(run_cli("device", "list", "--json", env=env)) == []
    assert json.loads(run_cli("device", "list", "--json", "--all", env=env))[0]["retired"] is True
    paths = json.loads(run_cli("hub", "broker-config", "--json", env=env))
    assert paths["conf"] == BrokerFiles.for_settings(settings).conf and paths["tls_dir"] is None


def test_signing_key_is_private_kept_and_bad_key_files_are_one_line_errors(tmp_path):
    path = str(tmp_path / "keys" / "hub.pem")
    key = generate_signing_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert len(public_key_hex(key)) == 64
    with pytest.raises(KeysError, match="already exists"):
        generate_signing_key(path)
    assert public_key_pem(ensure_signing_key(path)) == public_key_pem(key)
    with pytest.raises(KeysError, match="no signing key"):
        load_signing_key(str(tmp_path / "absent.pem"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(KeysError, match="not an unencrypted PEM private key"):
        load_signing_key(str(garbage))
    settings = write_default(str(tmp_path / "hub.toml"), broker={"tls_port": 8883})
    tls = ensure_hall_tls(settings)
    with pytest.raises(KeysError, match="not an Ed25519 private key"):
        load_signing_key(tls.ca_key)
