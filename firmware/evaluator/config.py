# The device config (config.json on the device, written by provisioning): load, validate,
# and keep secrets out of logs. Portable core. The fields are documented in docs/rating.md,
# "Device config". Messages name the bad field but never echo a value: the value may be a
# key or a password.
import json

from . import codec

SECRETS = ("key", "mqtt_password", "wifi_password")


class ConfigError(ValueError):
    """The device config is missing, unreadable or has a bad field."""


def _text(raw, name, lo, hi, required=False):
    if raw is None:
        if required:
            raise ConfigError(name + ": missing")
        raw = ""
    if not isinstance(raw, str):
        raise ConfigError(name + ": not a string")
    if not lo <= len(raw.encode()) <= hi:
        raise ConfigError(name + ": length not %d..%d bytes" % (lo, hi))
    return raw


def _int(raw, name, default, lo, hi):
    if raw is None:
        return default
    if not isinstance(raw, int) or isinstance(raw, bool) or not lo <= raw <= hi:
        raise ConfigError(name + ": not an integer %d..%d" % (lo, hi))
    return raw


def _ident(raw, name, required):
    if raw is None and not required:
        return ""
    try:
        return codec.check_id(raw, name, not required)
    except codec.CodecError as exc:
        raise ConfigError(str(exc) if raw is not None else name + ": missing")


def _host(raw):
    host = _text(raw, "hub_host", 1, 253, True)
    for ch in host:
        o = ord(ch)
        if not (48 <= o <= 57 or 65 <= o <= 90 or 97 <= o <= 122 or ch in ".-:"):
            raise ConfigError("hub_host: not a host name or IP address")
    return host


class Config:
    """A validated device config. repr() and str() mask the secrets."""

    def __init__(self, fields):
        if not isinstance(fields, dict):
            raise ConfigError("config: not a JSON object")
        get = fields.get
        self.device_id = _ident(get("device_id"), "device_id", True)
        key = get("key")
        if key is None:
            raise ConfigError("key: missing")
        if not isinstance(key, str) or len(key) != 64:
            raise ConfigError("key: not 64 hex digits")
        try:
            self.key = codec.from_hex(key)  # 32 bytes, the per-device MAC key
        except codec.CodecError:
            raise ConfigError("key: not 64 hex digits")
        self.hub_host = _host(get("hub_host"))
        tls = get("tls", False)
        if not isinstance(tls, bool):
            raise ConfigError("tls: not true or false")
        self.tls = tls
        self.ca = _text(get("ca"), "ca", 0, 8192)  # PEM of the hall CA, for tls
        if tls and not self.ca:
            raise ConfigError("ca: required when tls is true")
        self.hub_port = _int(get("hub_port"), "hub_port", 8883 if tls else 1883, 1, 65535)
        self.mqtt_user = _text(get("mqtt_user"), "mqtt_user", 0, 64) or self.device_id
        self.mqtt_password = _text(get("mqtt_password"), "mqtt_password", 0, 128)
        wifi = get("wifi")  # the nested form {"ssid": ..., "password": ...} is accepted too
        if wifi is not None and not isinstance(wifi, dict):
            raise ConfigError("wifi: not an object")
        wifi = wifi or {}
        self.wifi_ssid = _text(get("wifi_ssid", wifi.get("ssid")), "wifi_ssid", 0, 32)
        password = _text(get("wifi_password", wifi.get("password")), "wifi_password", 0, 64)
        if password and len(password) < 8:
            raise ConfigError("wifi_password: WPA needs 8..64 characters")
        self.wifi_password = password
        self.window = _ident(get("window"), "window", False)
        self.seq_floor = _int(get("seq_floor"), "seq_floor", 0, 0, 0xFFFFFFFF)
        board = _text(get("board"), "board", 0, 64) or "board.json"
        if not board.endswith(".json"):
            raise ConfigError("board: not a .json file name")
        self.board = board
        # Fields this firmware does not know stay available, unvalidated, to the app.
        known = ("device_id", "key", "hub_host", "hub_port", "tls", "ca", "mqtt_user",
                 "mqtt_password", "wifi", "wifi_ssid", "wifi_password", "window", "seq_floor",
                 "board")
        self.extra = {}
        for name in fields:
            if name not in known:
                self.extra[name] = fields[name]

    def __repr__(self):
        return ("Config(device_id=%r, hub=%s:%d, tls=%r, mqtt_user=%r, window=%r, "
                "wifi_ssid=%r, seq_floor=%d, board=%r, key=***, mqtt_password=%s, "
                "wifi_password=%s)" % (
                    self.device_id, self.hub_host, self.hub_port, self.tls, self.mqtt_user,
                    self.window, self.wifi_ssid, self.seq_floor, self.board,
                    "***" if self.mqtt_password else "''",
                    "***" if self.wifi_password else "''"))

    __str__ = __repr__


def loads(text):
    """Parse and validate config JSON text (str or bytes)."""
    try:
        fields = json.loads(text)
    except (ValueError, UnicodeError):
        raise ConfigError("config: not valid JSON")
    return Config(fields)


def load(path):
    """Read and validate the config file at path."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        raise ConfigError("config: cannot read " + path)
    return loads(text)
