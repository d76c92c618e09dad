# Hub settings: documented defaults, one-line validation errors naming the key, paths
# relative to the settings file, and a round trip through write_default (what `hub init` uses).
import os
import stat

import pytest

from hub import PingjiaError
from hub.settings import Settings, SettingsError, write_default


def write(tmp_path, text, name="hub.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_empty_file_gives_every_documented_default(tmp_path):
    s = Settings.load(write(tmp_path, ""))
    assert s.hub.id == "hall-1" and s.hub.data_dir == "var"
    assert (s.broker.mode, s.broker.host, s.broker.port, s.broker.tls_port) == \
        ("supervise", "127.0.0.1", 1883, 0)
    assert s.broker.hub_user == "hub" and s.broker.hub_password == ""
    assert s.broker.require_client_cert is False and s.broker.tls is False
    assert (s.http.host, s.http.port) == ("127.0.0.1", 8080)
    assert s.province.endpoint == "http://127.0.0.1:9100/api/v1"
    assert s.province.profile == "national"
    assert (s.province.batch_max, s.province.batch_interval_ms) == (200, 300)
    assert (s.province.timeout_s, s.province.retry_max_s) == (10.0, 60.0)
    assert s.keys.signing_key == "keys/hub-ed25519.pem"
    assert (s.ingest.max_batch, s.ingest.max_wait_ms) == (500, 20)


def test_paths_resolve_against_the_settings_folder_not_the_cwd(tmp_path, monkeypatch):
    hub_dir = tmp_path / "hall"
    hub_dir.mkdir()
    path = write(hub_dir, '[hub]\ndata_dir = "state"\n')
    monkeypatch.chdir(tmp_path)
    s = Settings.load(os.path.relpath(path))
    root = str(hub_dir)
    assert s.data_dir == os.path.join(root, "state")
    assert s.db_path == os.path.join(root, "state", "hub.db")
    assert s.broker_dir == os.path.join(root, "state", "broker")
    assert s.tls_dir == os.path.join(root, "state", "broker", "tls")
    assert s.signing_key_path == os.path.join(root, "state", "keys", "hub-ed25519.pem")
    assert s.keys_dir == os.path.join(root, "state", "keys")
    assert s.path("x/y.txt") == os.path.join(root, "x", "y.txt")
    monkeypatch.chdir(hub_dir / "..")
    assert s.db_path == os.path.join(root, "state", "hub.db")


def test_absolute_paths_are_kept(tmp_path):
    elsewhere = str(tmp_path / "elsewhere")
    s = Settings.load(write(tmp_path, '[hub]\ndata_dir = "%s"\n[keys]\nsigning_key = "%s/k.pem"\n'
                                      % (elsewhere, elsewhere)))
    assert s.db_path == os.path.join(elsewhere, "hub.db")
    assert s.signing_key_path == os.path.join(elsewhere, "k.pem")


@pytest.mark.parametrize("text, key", [
    ('[hub]\nid = "hall 1"\n', "hub.id"),
    ('[hub]\nid = ""\n', "hub.id"),
    ('[broker]\nmode = "embedded"\n', "broker.mode"),
    ('[broker]\nport = 0\n', "broker.port"),
    ('[broker]\nport = 70000\n', "broker.port"),
    ('[broker]\nport = "1883"\n', "broker.port"),
    ('[broker]\nport = true\n', "broker.port"),
    ('[broker]\ntls_port = 1883\n', "broker.tls_port"),
    ('[broker]\nrequire_client_cert = true\n', "broker.require_client_cert"),
    ('[broker]\nrequire_client_cert = "yes"\n', "broker.require_client_cert"),
    ('[broker]\nhub_user = "a:b"\n', "broker.hub_user"),
    ('[http]\nport = -1\n', "http.port"),
    ('[province]\nendpoint = "ftp://x"\n', "province.endpoint"),
    ('[province]\nbatch_max = 0\n', "province.batch_max"),
    ('[province]\ntimeout_s = 0\n', "province.timeout_s"),
    ('[province]\nretry_max_s = "long"\n', "province.retry_max_s"),
    ('[ingest]\nmax_wait_ms = -5\n', "ingest.max_wait_ms"),
    ('[keys]\nsigning_key = ""\n', "keys.signing_key"),
    ('[broker]\nprot = 1884\n', "broker.prot"),
    ('[brokr]\nport = 1884\n', "brokr"),
    ('broker = 3\n', "broker"),
])
def test_bad_values_are_one_line_errors_naming_the_key(tmp_path, text, key):
    with pytest.raises(SettingsError) as info:
        Settings.load(write(tmp_path, text))
    message = str(info.value)
    assert message.startswith(key + ":"), message
    assert "\n" not in message
    assert isinstance(info.value, PingjiaError)


def test_missing_and_malformed_files_are_settings_errors(tmp_path):
    with pytest.raises(SettingsError, match="no such settings file"):
        Settings.load(str(tmp_path / "absent.toml"))
    with pytest.raises(SettingsError, match="not valid TOML"):
        Settings.load(write(tmp_path, "[hub\n"))


def test_sections_are_frozen(tmp_path):
    s = Settings.load(write(tmp_path, ""))
    with pytest.raises(Exception):
        s.broker.port = 1
    with pytest.raises(Exception):
        s.hub = None


def test_hub_password_never_appears_in_repr(tmp_path):
    s = Settings.load(write(tmp_path, '[broker]\nhub_password = "s3cret-value"\n'))
    assert s.broker.hub_password == "s3cret-value"
    assert "s3cret-value" not in repr(s)
    assert "s3cret-value" not in repr(s.broker)


def test_write_default_round_trip_with_fresh_password_and_overrides(tmp_path):
    path = str(tmp_path / "hub.toml")
    s = write_default(path, hub={"id": "hall-7"}, broker={"port": 1999, "tls_port": 8883})
    assert s.source == path and s.base_dir == str(tmp_path)
    assert s.hub.id == "hall-7"
    assert (s.broker.port, s.broker.tls_port) == (1999, 8883)
    assert len(s.broker.hub_password) >= 24 and ":" not in s.broker.hub_password
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = Settings.load(path)
    assert again == s
    assert again.to_dict() == s.to_dict()
    other = write_default(str(tmp_path / "other" / "hub.toml"))
    assert other.broker.hub_password != s.broker.hub_password


def test_write_default_refuses_to_overwrite_unless_forced(tmp_path):
    path = str(tmp_path / "hub.toml")
    first = write_default(path)
    with pytest.raises(SettingsError, match="already exists"):
        write_default(path)
    assert Settings.load(path) == first
    second = write_default(path, force=True)
    assert second.broker.hub_password != first.broker.hub_password


def test_write_default_validates_overrides(tmp_path):
    path = str(tmp_path / "hub.toml")
    with pytest.raises(SettingsError, match="^broker.port:"):
        write_default(path, broker={"port": 0})
    with pytest.raises(SettingsError, match="^broker.nope:"):
        write_default(path, broker={"nope": 1})
    assert not os.path.exists(path)


def test_replace_keeps_other_keys(tmp_path):
    s = Settings.load(write(tmp_path, '[broker]\nport = 1900\nhub_password = "pw"\n'))
    t = s.replace(broker={"tls_port": 8883})
    assert (t.broker.port, t.broker.tls_port, t.broker.hub_password) == (1900, 8883, "pw")
    assert s.broker.tls_port == 0
