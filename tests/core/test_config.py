# Device config: defaults, validation messages naming the field, secrets never shown.
# Runs under CPython (pytest) and MicroPython (tests/core/run.py).
import json
import os

from evaluator import config
from evaluator.config import ConfigError

KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"


def _fields(**kw):
    fields = {"device_id": "D0001", "key": KEY, "hub_host": "192.168.1.10",
              "mqtt_password": "s3cret-mqtt-pw", "window": "W03"}
    for name in kw:
        if kw[name] is None:
            fields.pop(name, None)
        else:
            fields[name] = kw[name]
    return fields


def _error(fields):
    try:
        config.Config(fields)
    except ConfigError as exc:
        return str(exc)
    raise AssertionError("accepted")


def test_a_minimal_config_gets_the_documented_defaults():
    cfg = config.Config(_fields())
    assert cfg.device_id == "D0001"
    assert cfg.key == bytes(range(0, 256, 17)) * 2
    assert cfg.hub_host == "192.168.1.10" and cfg.hub_port == 1883
    assert cfg.tls is False and cfg.ca == ""
    assert cfg.mqtt_user == "D0001" and cfg.mqtt_password == "s3cret-mqtt-pw"
    assert cfg.wifi_ssid == "" and cfg.wifi_password == ""
    assert cfg.window == "W03" and cfg.seq_floor == 0 and cfg.board == "board.json"
    assert cfg.extra == {}


def test_every_field_is_taken_and_unknown_ones_are_kept_aside():
    cfg = config.Config(_fields(hub_host="hub.hall-1.local", hub_port=1884, mqtt_user="u1",
                                wifi_ssid="政务大厅", wifi_password="12345678", seq_floor=41,
                                board="esp32s3-evaluator.json", qr={"w": 8}))
    assert cfg.hub_host == "hub.hall-1.local" and cfg.hub_port == 1884
    assert cfg.mqtt_user == "u1" and cfg.wifi_ssid == "政务大厅"
    assert cfg.seq_floor == 41 and cfg.board == "esp32s3-evaluator.json"
    assert cfg.extra == {"qr": {"w": 8}}


def test_tls_needs_the_hall_ca_and_defaults_to_port_8883():
    assert _error(_fields(tls=True)) == "ca: required when tls is true"
    cfg = config.Config(_fields(tls=True, ca="-----BEGIN CERTIFICATE-----\n..."))
    assert cfg.tls is True and cfg.hub_port == 8883
    assert "tls" in _error(_fields(tls="yes"))


def test_nested_wifi_form_is_accepted():
    cfg = config.Config(_fields(wifi={"ssid": "hall", "password": "password1"}))
    assert cfg.wifi_ssid == "hall" and cfg.wifi_password == "password1"
    assert _error(_fields(wifi="hall")) == "wifi: not an object"


def test_bad_fields_are_named_in_one_line():
    cases = [
        (_fields(device_id=None), "device_id: missing"),
        (_fields(device_id="D 1"), "device_id: bad character"),
        (_fields(key=None), "key: missing"),
        (_fields(key=KEY[:-2]), "key: not 64 hex digits"),
        (_fields(key=KEY[:-2] + "zz"), "key: not 64 hex digits"),
        (_fields(key=7), "key: not 64 hex digits"),
        (_fields(hub_host=None), "hub_host: missing"),
        (_fields(hub_host=""), "hub_host: length"),
        (_fields(hub_host="hub hall"), "hub_host: not a host name"),
        (_fields(hub_port=0), "hub_port: not an integer"),
        (_fields(hub_port=65536), "hub_port: not an integer"),
        (_fields(hub_port="1883"), "hub_port: not an integer"),
        (_fields(hub_port=True), "hub_port: not an integer"),
        (_fields(mqtt_password=5), "mqtt_password: not a string"),
        (_fields(wifi_ssid="x" * 33), "wifi_ssid: length"),
        (_fields(wifi_password="short"), "wifi_password: WPA"),
        (_fields(window="窗口3"), "window: bad character"),
        (_fields(seq_floor=-1), "seq_floor: not an integer"),
        (_fields(board="board.txt"), "board: not a .json"),
        ([1, 2], "config: not a JSON object"),
    ]
    for fields, message in cases:
        got = _error(fields)
        assert got.startswith(message), (message, got)
        assert "\n" not in got


def test_secrets_never_appear_in_repr_str_or_errors():
    cfg = config.Config(_fields(wifi_password="wifi-pass-123"))
    for text in (repr(cfg), str(cfg), "%s" % cfg):
        assert KEY not in text and "s3cret-mqtt-pw" not in text and "wifi-pass-123" not in text
        assert "D0001" in text and "key=***" in text
    bad = "g" + KEY[1:]
    assert bad not in _error(_fields(key=bad))
    assert "x" * 60 not in _error(_fields(mqtt_password="x" * 200))


def test_loads_and_load_read_json_text_and_files():
    text = json.dumps(_fields())
    assert config.loads(text).device_id == "D0001"
    assert config.loads(text.encode()).device_id == "D0001"
    try:
        config.loads("{not json")
    except ConfigError as exc:
        assert str(exc) == "config: not valid JSON"
    else:
        raise AssertionError("accepted")
    path = (os.getenv("TMPDIR") or "/tmp") + "/pj-config-test-%d.json" % id(text)
    with open(path, "w") as f:
        f.write(text)
    try:
        assert config.load(path).window == "W03"
    finally:
        os.remove(path)
    try:
        config.load(path)
    except ConfigError as exc:
        assert "cannot read" in str(exc)
    else:
        raise AssertionError("missing file accepted")
