# `pingjia hub devices [--json]`, `pingjia hub device ID [--json]` and `pingjia hub managers`:
# the state of each device read from the store alone (the hub need not run), one-line
# errors, and manager logins that the dashboard then accepts.
import json

import pytest
from click.testing import CliRunner

from hub.cli import cli
from hub.dashboard import check_password
from hub.ingest import Ingestor, Uplink
from hub.settings import write_default
from hub.store import Store


@pytest.fixture
def hub_toml(tmp_path):
    settings = write_default(str(tmp_path / "hub.toml"), hub={"id": "hall-9"},
                             dashboard={"halls": {"east": ["E*"]}})
    store = Store(settings.db_path)
    for device_id, window in (("D1", "E01"), ("D2", "W02"), ("D3", "W03")):
        store.conn.execute("INSERT INTO devices (device_id, key_hex, window, label, created_at)"
                           " VALUES (?,?,?,?,?)", (device_id, "00" * 32, window, "", ""))
    ingestor = Ingestor(store)
    hb = {"v": 1, "fw": "0.1.0", "board": "sim", "up": 3, "rst": "power", "heap": 30000,
          "jd": 0, "old": 0, "rc": 0, "rssi": -50, "stuck": [2], "disp": 0, "mis": 0,
          "clk": 0, "lo": 1, "next": 1}
    for device_id in ("D1", "D2"):
        ingestor.handle_group([Uplink("pj/%s/up/birth" % device_id, json.dumps(
            dict(hb, d=device_id, stuck=[2] if device_id == "D1" else [])).encode(), 0, 1, 0)])
    ingestor.handle_group([Uplink("pj/D2/up/will", json.dumps(
        {"v": 1, "d": "D2", "online": False}).encode(), 0, 1, 0)])
    store.close()
    return settings.source


def pingjia(*args, stdin=None):
    return CliRunner().invoke(cli, list(args), input=stdin, catch_exceptions=False)


def test_devices_lists_each_state_with_its_reason(hub_toml):
    result = pingjia("hub", "devices", "--config", hub_toml)
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.strip().splitlines())
    assert lines["D1"].endswith("degraded: stuck key 2")
    assert "offline since" in lines["D2"] and "(will)" in lines["D2"]
    assert lines["D3"].endswith("never")
    data = json.loads(pingjia("hub", "devices", "--config", hub_toml, "--json").output)
    assert data["counts"] == {"degraded": 1, "offline": 1, "never": 1, "online": 0}
    assert [(d["device_id"], d["state"], d["reasons"]) for d in data["devices"]] == \
        [("D1", "degraded", ["stuck_key"]), ("D2", "offline", []), ("D3", "never", [])]


def test_device_shows_what_it_reported_and_its_events(hub_toml):
    result = pingjia("hub", "device", "D2", "--config", hub_toml)
    assert result.exit_code == 0, result.output
    assert "state: offline since" in result.output
    assert "firmware 0.1.0 on sim" in result.output
    assert "will" in result.output and "birth" in result.output
    data = json.loads(pingjia("hub", "device", "D1", "--config", hub_toml, "--json").output)
    assert data["reason_labels"] == ["按键卡住(2星键)"]
    assert data["fields"]["heap"] == 30000


def test_unknown_device_and_missing_store_are_one_line_errors(hub_toml, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "from hub.cli import main; main()", "hub",
                           "device", "D9", "--config", hub_toml],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: device D9: not registered on this hub"
    fresh = write_default(str(tmp_path / "other" / "hub.toml"))
    proc = subprocess.run([sys.executable, "-c", "from hub.cli import main; main()", "hub",
                           "devices", "--config", fresh.source],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no hub store yet" in proc.stderr


def test_managers_add_list_remove(hub_toml):
    result = pingjia("hub", "managers", "add", "zhang", "--config", hub_toml,
                     "--display-name", "张主任", "--password-stdin", stdin="s3cret-pass\n")
    assert result.exit_code == 0, result.output
    assert "hall hall-9" in result.output
    result = pingjia("hub", "managers", "add", "li", "--hall", "east", "--config", hub_toml,
                     stdin="another-pass\nanother-pass\n")
    assert result.exit_code == 0, result.output
    rows = json.loads(pingjia("hub", "managers", "list", "--json", "--config", hub_toml).output)
    assert [(r["name"], r["hall"], r["disabled"]) for r in rows] == \
        [("li", "east", 0), ("zhang", "hall-9", 0)]
    from hub.settings import Settings
    store = Store(Settings.load(hub_toml).db_path)
    try:
        stored = store.conn.execute("SELECT pw_hash FROM managers WHERE name = 'li'").fetchone()
        assert "another-pass" not in stored[0] and check_password("another-pass", stored[0])
    finally:
        store.close()
    again = CliRunner().invoke(cli, ["hub", "managers", "add", "zhang", "--config", hub_toml,
                                     "--password-stdin"], input="s3cret-pass\n")
    assert "already exists" in str(again.exception)
    short = CliRunner().invoke(cli, ["hub", "managers", "add", "wang", "--config", hub_toml,
                                     "--password-stdin"], input="short\n")
    assert "at least 8 characters" in str(short.exception)
    wrong_hall = CliRunner().invoke(cli, ["hub", "managers", "add", "wang", "--hall", "west",
                                          "--config", hub_toml, "--password-stdin"],
                                    input="long-enough\n")
    assert "hall west: not this hub's" in str(wrong_hall.exception)
    assert pingjia("hub", "managers", "remove", "li", "--config", hub_toml).exit_code == 0
    assert "(disabled)" in pingjia("hub", "managers", "list", "--config", hub_toml).output
