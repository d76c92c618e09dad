"""Hub settings: one TOML file per hub, every key with a documented default.

docs/hub-setup.md is the reference table. Relative paths in the file are resolved against
the file's own folder (`hub.data_dir`) or against the data folder (`keys.signing_key`), so a
hub folder can be moved or copied as a whole.
"""
from __future__ import annotations

import dataclasses
import os
import re
import secrets
import tomllib
from dataclasses import dataclass, field

import tomli_w

from hub import PingjiaError

ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
BROKER_MODES = ("supervise", "external")


class SettingsError(PingjiaError):
    """A hub settings file that is missing, unreadable or holds a bad value."""


def _bad(key, why):
    return SettingsError("%s: %s" % (key, why))


def _check_str(key, value, allow_empty=True):
    if not isinstance(value, str):
        raise _bad(key, "must be a string")
    if not allow_empty and not value:
        raise _bad(key, "must not be empty")


def _check_id(key, value):
    _check_str(key, value)
    if not ID_RE.match(value):
        raise _bad(key, "must be 1-64 characters of A-Z a-z 0-9 . _ : -")


def _check_int(key, value, lo, hi=None):
    # bool is an int subclass; `port = true` is a mistake, not port 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(key, "must be an integer")
    if value < lo or (hi is not None and value > hi):
        if hi is None:
            raise _bad(key, "must be >= %d" % lo)
        raise _bad(key, "must be between %d and %d" % (lo, hi))


def _check_float(key, value, positive=True):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _bad(key, "must be a number")
    if positive and not value > 0:
        raise _bad(key, "must be > 0")


def _check_bool(key, value):
    if not isinstance(value, bool):
        raise _bad(key, "must be true or false")


@dataclass(frozen=True)
class HubSection:
    """[hub]: who this hub is and where it keeps its state."""
    id: str = "hall-1"
    data_dir: str = "var"  # SQLite db, keys, broker files; relative to the settings file

    def __post_init__(self):
        _check_id("hub.id", self.id)
        _check_str("hub.data_dir", self.data_dir, allow_empty=False)


@dataclass(frozen=True)
class BrokerSection:
    """[broker]: the hall's mosquitto, supervised by the hub or run by someone else."""
    mode: str = "supervise"
    host: str = "127.0.0.1"
    port: int = 1883
    tls_port: int = 0  # 0 = no TLS listener
    hub_user: str = "hub"
    # Written by `pingjia hub init`; repr=False keeps it out of logs and tracebacks.
    hub_password: str = field(default="", repr=False)
    require_client_cert: bool = False

    def __post_init__(self):
        if self.mode not in BROKER_MODES:
            raise _bad("broker.mode", "must be one of %s" % ", ".join(BROKER_MODES))
        _check_str("broker.host", self.host, allow_empty=False)
        _check_int("broker.port", self.port, 1, 65535)
        _check_int("broker.tls_port", self.tls_port, 0, 65535)
        if self.tls_port == self.port:
            raise _bad("broker.tls_port", "must differ from broker.port")
        _check_id("broker.hub_user", self.hub_user)
        _check_str("broker.hub_password", self.hub_password)
        if ":" in self.hub_user:
            # mosquitto's password file is `user:hash`; a colon would split the name.
            raise _bad("broker.hub_user", "must not contain ':'")
        _check_bool("broker.require_client_cert", self.require_client_cert)
        if self.require_client_cert and not self.tls_port:
            raise _bad("broker.require_client_cert", "needs broker.tls_port > 0")

    @property
    def tls(self):
        return self.tls_port > 0


@dataclass(frozen=True)
class HttpSection:
    """[http]: the business-system API, dashboard and /metrics."""
    host: str = "127.0.0.1"
    port: int = 8080

    def __post_init__(self):
        _check_str("http.host", self.host, allow_empty=False)
        _check_int("http.port", self.port, 1, 65535)


@dataclass(frozen=True)
class ProvinceSection:
    """[province]: where signed batches go and how hard the hub tries."""
    endpoint: str = "http://127.0.0.1:9100/api/v1"
    profile: str = "national"
    batch_max: int = 200
    batch_interval_ms: int = 300
    timeout_s: float = 10.0
    retry_max_s: float = 60.0

    def __post_init__(self):
        _check_str("province.endpoint", self.endpoint)
        if not self.endpoint.startswith(("http://", "https://")):
            raise _bad("province.endpoint", "must start with http:// or https://")
        _check_id("province.profile", self.profile)
        _check_int("province.batch_max", self.batch_max, 1)
        _check_int("province.batch_interval_ms", self.batch_interval_ms, 0)
        _check_float("province.timeout_s", self.timeout_s)
        _check_float("province.retry_max_s", self.retry_max_s)


@dataclass(frozen=True)
class KeysSection:
    """[keys]: the hub's batch signing key; relative to hub.data_dir."""
    signing_key: str = "keys/hub-ed25519.pem"

    def __post_init__(self):
        _check_str("keys.signing_key", self.signing_key, allow_empty=False)


@dataclass(frozen=True)
class IngestSection:
    """[ingest]: how many uplinks one SQLite transaction may group, and for how long."""
    max_batch: int = 500
    max_wait_ms: int = 20

    def __post_init__(self):
        _check_int("ingest.max_batch", self.max_batch, 1)
        _check_int("ingest.max_wait_ms", self.max_wait_ms, 0)


WEBHOOK_FORMATS = ("json", "text")


@dataclass(frozen=True)
class DashboardSection:
    """[dashboard]: the hall manager's pages, alerts and when a silent device is offline."""
    utc_offset_hours: int = 8  # the hall's clock for "today" (China Standard Time)
    session_hours: int = 12  # a manager's login lasts this long
    offline_after_s: int = 90  # no word from a device for this long: offline, will or not
    webhook_url: str = ""  # "" = alerts only on the page
    webhook_format: str = "json"  # json | text (a group robot's {"msgtype":"text"} message)
    webhook_secret: str = field(default="", repr=False)  # HMAC-SHA256 header when set
    webhook_attempts: int = 8  # tries per alert before it is counted as failed
    # Several halls on one hub: hall id -> window patterns (fnmatch). Empty: one hall, hub.id.
    halls: dict = field(default_factory=dict)

    def __post_init__(self):
        _check_int("dashboard.utc_offset_hours", self.utc_offset_hours, -12, 14)
        _check_int("dashboard.session_hours", self.session_hours, 1, 24 * 30)
        _check_int("dashboard.offline_after_s", self.offline_after_s, 10)
        _check_str("dashboard.webhook_url", self.webhook_url)
        if self.webhook_url and not self.webhook_url.startswith(("http://", "https://")):
            raise _bad("dashboard.webhook_url", "must be empty or start with http:// or https://")
        if self.webhook_format not in WEBHOOK_FORMATS:
            raise _bad("dashboard.webhook_format", "must be one of %s" % ", ".join(WEBHOOK_FORMATS))
        _check_str("dashboard.webhook_secret", self.webhook_secret)
        _check_int("dashboard.webhook_attempts", self.webhook_attempts, 1, 100)
        if not isinstance(self.halls, dict):
            raise _bad("dashboard.halls", "must be a table of hall id = [window patterns]")
        for hall, patterns in self.halls.items():
            _check_id("dashboard.halls", hall)
            if not isinstance(patterns, list) or not patterns or \
                    not all(isinstance(p, str) and p for p in patterns):
                raise _bad("dashboard.halls.%s" % hall, "must be a non-empty list of patterns")


SECTIONS = {
    "hub": HubSection,
    "broker": BrokerSection,
    "http": HttpSection,
    "province": ProvinceSection,
    "keys": KeysSection,
    "ingest": IngestSection,
    "dashboard": DashboardSection,
}


def _section(name, values):
    cls = SECTIONS[name]
    if not isinstance(values, dict):
        raise _bad(name, "must be a table")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            # A typo must not silently fall back to the default.
            raise _bad("%s.%s" % (name, key), "unknown key")
    return cls(**values)


@dataclass(frozen=True)
class Settings:
    """All of one hub's settings; `base_dir` is the folder of the settings file."""
    hub: HubSection = field(default_factory=HubSection)
    broker: BrokerSection = field(default_factory=BrokerSection)
    http: HttpSection = field(default_factory=HttpSection)
    province: ProvinceSection = field(default_factory=ProvinceSection)
    keys: KeysSection = field(default_factory=KeysSection)
    ingest: IngestSection = field(default_factory=IngestSection)
    dashboard: DashboardSection = field(default_factory=DashboardSection)
    base_dir: str = "."
    source: str | None = None  # the file these came from, if any

    def __post_init__(self):
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise _bad(name, "must be a table")
        # Absolute once, so later chdir() calls cannot move the hub's state.
        object.__setattr__(self, "base_dir", os.path.abspath(self.base_dir))

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data, base_dir="."):
        """Settings from a parsed TOML document; unknown sections or keys are errors."""
        if not isinstance(data, dict):
            raise SettingsError("settings: must be a table")
        sections = {}
        for name, values in data.items():
            if name not in SECTIONS:
                raise _bad(name, "unknown section")
            sections[name] = _section(name, values)
        return cls(base_dir=base_dir, **sections)

    @classmethod
    def load(cls, path):
        """Read and validate one hub settings file."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise SettingsError("%s: no such settings file (run `pingjia hub init`)" % path)
        except OSError as exc:
            raise SettingsError("%s: cannot read: %s" % (path, exc.strerror))
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError("%s: not valid TOML: %s" % (path, exc))
        settings = cls.from_dict(data, base_dir=os.path.dirname(os.path.abspath(path)))
        object.__setattr__(settings, "source", os.path.abspath(path))
        return settings

    def to_dict(self):
        """The TOML document for these settings (secrets included: write it 0600)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def replace(self, **sections):
        """A copy with some keys changed: replace(broker={"port": 1884})."""
        changed = {}
        for name, values in sections.items():
            if name not in SECTIONS:
                raise _bad(name, "unknown section")
            merged = dataclasses.asdict(getattr(self, name))
            merged.update(values)
            changed[name] = _section(name, merged)
        return dataclasses.replace(self, **changed)

    # -- derived paths ------------------------------------------------------------------
    def path(self, rel):
        """A path from the settings file resolved against the file's folder."""
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(rel)))

    @property
    def data_dir(self):
        return self.path(self.hub.data_dir)

    @property
    def db_path(self):
        return os.path.join(self.data_dir, "hub.db")

    @property
    def broker_dir(self):
        return os.path.join(self.data_dir, "broker")

    @property
    def tls_dir(self):
        return os.path.join(self.broker_dir, "tls")

    @property
    def signing_key_path(self):
        return os.path.normpath(os.path.join(self.data_dir, os.path.expanduser(self.keys.signing_key)))

    @property
    def keys_dir(self):
        return os.path.dirname(self.signing_key_path)


def new_password():
    """A fresh broker password: 32 URL-safe characters, no ':' (mosquitto's separator)."""
    return secrets.token_urlsafe(24)


HEADER = (
    "# Pingjia hub settings. Every key is documented with its default in docs/hub-setup.md.\n"
    "# This file holds the broker password of the hub: keep it private (mode 0600).\n\n"
)


def write_settings(settings, path):
    """Write settings as TOML, readable by the owner only (it holds the hub's password)."""
    text = HEADER + tomli_w.dumps(settings.to_dict())
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_default(path, force=False, **overrides):
    """Write a fresh hub.toml: defaults, a new hub broker password, then `overrides`
    given per section (`broker={"port": 1884}`). Returns the loaded Settings."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not force:
        raise SettingsError("%s: already exists (use --force to overwrite)" % path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    settings = Settings(base_dir=folder).replace(broker={"hub_password": new_password()})
    if overrides:
        settings = settings.replace(**overrides)
    write_settings(settings, path)
    return Settings.load(path)
