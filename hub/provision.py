"""Provisioning: give a counter evaluator its identity on this hub.

A device gets a 32-byte MAC key (kept in the hub's registry, table `devices`, so the hub can
verify its votes) and a broker password (kept only as a hash in the broker's password file).
Both reach the device once, in its config or in an exported provisioning file, and are
never logged. Retiring a device takes its broker login away and keeps its votes.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import secrets
import socket
from dataclasses import dataclass, field

from hub import PingjiaError
from hub.broker import BrokerFiles, PasswordFile, reload_running
from hub.keys import HallTLS, issue_client_cert, write_secret
from hub.settings import new_password
from hub.store import Store

ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
KEY_BYTES = 32
DEFAULT_BOARD = "board.json"
EXPORT_FORMAT = "pingjia-provisioning/1"

# Same columns as the store's migration; whichever runs first creates the table.
DEVICES_DDL = """CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    key_hex TEXT NOT NULL,
    window TEXT,
    label TEXT,
    created_at TEXT NOT NULL,
    retired INTEGER NOT NULL DEFAULT 0)"""


class ProvisionError(PingjiaError):
    """A device cannot be added, retired or exported as asked."""


@dataclass(frozen=True)
class Provisioned:
    """What one device needs to join this hub. Secrets stay out of repr()."""
    device_id: str
    key_hex: str = field(repr=False)
    mqtt_user: str
    mqtt_password: str = field(repr=False)
    hub_host: str
    hub_port: int
    tls: bool = False
    ca_pem: str | None = field(default=None, repr=False)
    client_cert_pem: str | None = field(default=None, repr=False)
    client_key_pem: str | None = field(default=None, repr=False)
    window: str | None = None
    label: str | None = None
    seq_floor: int = 0
    hub_id: str = ""


@dataclass(frozen=True)
class DeviceRecord:
    """One row of the registry, without the key."""
    device_id: str
    window: str | None
    label: str | None
    created_at: str
    retired: bool
    broker_login: bool  # the broker's password file holds this device

    def as_dict(self):
        return {"device_id": self.device_id, "window": self.window, "label": self.label,
                "created_at": self.created_at, "retired": self.retired,
                "broker_login": self.broker_login}


def _check_id(what, value):
    if not isinstance(value, str) or not ID_RE.match(value):
        raise ProvisionError("%s %r: must be 1-64 characters of A-Z a-z 0-9 . _ : -" % (what, value))


def _open(settings):
    store = Store(settings.db_path)
    store.conn.execute(DEVICES_DDL)
    return store


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _lan_address():
    # The address this machine would use to reach the network; a UDP connect sends nothing.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def device_hub_address(settings, hub_host=None):
    """(host, port, tls) a device should connect to."""
    b = settings.broker
    host = hub_host or b.host
    if host in ("0.0.0.0", "::", ""):
        host = _lan_address()
    if b.tls_port:
        return host, b.tls_port, True
    return host, b.port, False


def _highest_seq(store, device_id):
    # A device re-provisioned under the same id must not reuse sequence numbers the hub
    # already holds: (device id, seq) is the vote's identity end to end.
    row = store.conn.execute("SELECT max(seq) FROM votes WHERE device_id = ?", (device_id,)).fetchone()
    highest = row[0] or 0
    return max(highest, store.acked_seq(device_id))


def _grant_login(settings, device_id, password):
    with PasswordFile(BrokerFiles.for_settings(settings).passwd) as pw:
        pw.set(device_id, password)
    reload_running(settings)


def _tls_material(settings, device_id, client_cert):
    if not settings.broker.tls_port:
        if client_cert:
            raise ProvisionError("client certificates need TLS: set broker.tls_port")
        return None, None, None
    tls = HallTLS.for_settings(settings)
    if not os.path.exists(tls.ca_cert):
        raise ProvisionError("no hall CA yet: run `pingjia hub init` with TLS or start the hub once")
    ca_pem = tls.ca_pem()
    if client_cert or settings.broker.require_client_cert:
        cert_pem, key_pem = issue_client_cert(settings, device_id)
        return ca_pem, cert_pem, key_pem
    return ca_pem, None, None


def add_device(settings, device_id, window=None, label=None, client_cert=False, replace=False,
               hub_host=None):
    """Register a device and give it broker credentials.

    A running supervised broker is reloaded so the device can connect at once; clients
    already connected stay connected. `replace` issues a fresh identity for an id the hub
    already knows (a replaced or reflashed unit); its sequence numbers then continue above
    every one the hub holds for that id (`seq_floor`).
    """
    _check_id("device id", device_id)
    if window is not None:
        _check_id("window", window)
    if label is not None and (not isinstance(label, str) or len(label) > 200 or "\n" in label):
        raise ProvisionError("label: at most 200 characters on one line")
    if device_id == settings.broker.hub_user:
        raise ProvisionError("device id %r: is the hub's own broker user" % device_id)
    ca_pem, cert_pem, key_pem = _tls_material(settings, device_id, client_cert)
    key_hex = secrets.token_bytes(KEY_BYTES).hex()
    password = new_password()
    store = _open(settings)
    try:
        with store.transaction():
            row = store.conn.execute("SELECT retired FROM devices WHERE device_id = ?",
                                     (device_id,)).fetchone()
            seq_floor = 0
            if row is not None:
                if not replace:
                    state = "was retired" if row[0] else "is already provisioned"
                    raise ProvisionError("device %s %s (use --replace to issue a new identity)"
                                         % (device_id, state))
                seq_floor = _highest_seq(store, device_id)
                store.conn.execute(
                    "UPDATE devices SET key_hex = ?, window = ?, label = ?, created_at = ?,"
                    " retired = 0 WHERE device_id = ?",
                    (key_hex, window, label, _now(), device_id))
            else:
                store.conn.execute(
                    "INSERT INTO devices (device_id, key_hex, window, label, created_at, retired)"
                    " VALUES (?, ?, ?, ?, ?, 0)", (device_id, key_hex, window, label, _now()))
            # Inside the transaction: if the password file cannot be written, the device is
            # not registered either, so a retry starts clean.
            _grant_login(settings, device_id, password)
    finally:
        store.close()
    host, port, tls = device_hub_address(settings, hub_host)
    return Provisioned(device_id=device_id, key_hex=key_hex, mqtt_user=device_id,
                       mqtt_password=password, hub_host=host, hub_port=port, tls=tls,
                       ca_pem=ca_pem, client_cert_pem=cert_pem, client_key_pem=key_pem,
                       window=window, label=label, seq_floor=seq_floor, hub_id=settings.hub.id)


def remove_device(settings, device_id):
    """Retire a device: its broker login goes (a connected session is closed by the
    broker's reload), its votes and registry row stay. Returns True if it was active."""
    _check_id("device id", device_id)
    store = _open(settings)
    try:
        with store.transaction():
            row = store.conn.execute("SELECT retired FROM devices WHERE device_id = ?",
                                     (device_id,)).fetchone()
            if row is None:
                raise ProvisionError("device %s: not provisioned on this hub" % device_id)
            store.conn.execute("UPDATE devices SET retired = 1 WHERE device_id = ?", (device_id,))
    finally:
        store.close()
    with PasswordFile(BrokerFiles.for_settings(settings).passwd) as pw:
        removed = pw.remove(device_id)
    reload_running(settings)
    return not row[0] or removed


def list_devices(settings, include_retired=True):
    """Registry rows, ordered by device id."""
    store = _open(settings)
    try:
        rows = store.conn.execute(
            "SELECT device_id, window, label, created_at, retired FROM devices "
            "ORDER BY device_id").fetchall()
    finally:
        store.close()
    with PasswordFile(BrokerFiles.for_settings(settings).passwd) as pw:
        logins = set(pw.users())
    return [DeviceRecord(r[0], r[1], r[2], r[3], bool(r[4]), r[0] in logins)
            for r in rows if include_retired or not r[4]]


def _device_row(settings, device_id):
    store = _open(settings)
    try:
        row = store.conn.execute(
            "SELECT key_hex, window, label, retired FROM devices WHERE device_id = ?",
            (device_id,)).fetchone()
        if row is None:
            raise ProvisionError("device %s: not provisioned on this hub" % device_id)
        if row[3]:
            raise ProvisionError("device %s: is retired" % device_id)
        return tuple(row), _highest_seq(store, device_id)
    finally:
        store.close()


def _check_wifi(wifi):
    # The same limits the firmware's config loader applies (802.11 / WPA2).
    if wifi is None:
        return None
    ssid = wifi.get("ssid") if isinstance(wifi, dict) else None
    if not isinstance(ssid, str) or not 1 <= len(ssid.encode("utf-8")) <= 32:
        raise ProvisionError("wifi: ssid must be 1-32 bytes")
    password = wifi.get("password") or ""
    if not isinstance(password, str) or not (password == "" or 8 <= len(password) <= 64):
        raise ProvisionError("wifi: password must be empty (open network) or 8-64 characters")
    return {"ssid": ssid, "password": password}


def device_config(provisioned, wifi=None, board=DEFAULT_BOARD):
    """The device config JSON (as a dict) the firmware reads (firmware/evaluator/config.py).
    With TLS it carries the hall CA as `ca`; a client certificate, when issued, is not in
    it (export_provisioning carries that for flash.sh to store as files)."""
    config = {
        "device_id": provisioned.device_id,
        "key": provisioned.key_hex,
        "hub_host": provisioned.hub_host,
        "hub_port": provisioned.hub_port,
        "mqtt_user": provisioned.mqtt_user,
        "mqtt_password": provisioned.mqtt_password,
        "window": provisioned.window or "",
        "tls": provisioned.tls,
        "seq_floor": provisioned.seq_floor,
        "board": board,
    }
    if provisioned.tls:
        config["ca"] = provisioned.ca_pem
    wifi = _check_wifi(wifi)
    if wifi is not None:
        config["wifi"] = wifi
    return config


def export_provisioning(settings, device_id, path=None, provisioned=None, wifi=None,
                        board=DEFAULT_BOARD, hub_host=None):
    """A provisioning file for flash.sh, for when the technician's machine cannot reach
    the hub: every device_config() key at the top level, plus `format`, `hub_id`, `label`,
    and `ca`, `client_cert`, `client_key` (PEM text, or null without TLS).

    With `provisioned` (just returned by add_device) its credentials are used. Without it,
    the device's key is read from the registry and a NEW broker password is issued (the
    hub keeps only a hash of the old one), which ends any session on the old password.
    Written to `path` with mode 0600 when given; the dict is returned either way.
    """
    if provisioned is None:
        (key_hex, window, label, _), seq_floor = _device_row(settings, device_id)
        ca_pem, cert_pem, key_pem = _tls_material(settings, device_id, False)
        password = new_password()
        _grant_login(settings, device_id, password)
        host, port, tls = device_hub_address(settings, hub_host)
        provisioned = Provisioned(device_id=device_id, key_hex=key_hex, mqtt_user=device_id,
                                  mqtt_password=password, hub_host=host, hub_port=port, tls=tls,
                                  ca_pem=ca_pem, client_cert_pem=cert_pem, client_key_pem=key_pem,
                                  window=window, label=label, seq_floor=seq_floor,
                                  hub_id=settings.hub.id)
    elif provisioned.device_id != device_id:
        raise ProvisionError("device %s: provisioned record is for %s" % (device_id, provisioned.device_id))
    document = {"format": EXPORT_FORMAT, "hub_id": provisioned.hub_id}
    document.update(device_config(provisioned, wifi=wifi, board=board))
    document.update({
        "label": provisioned.label,
        "ca": provisioned.ca_pem,
        "client_cert": provisioned.client_cert_pem,
        "client_key": provisioned.client_key_pem,
    })
    if path is not None:
        write_secret(path, (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return document
