# The boot selector's last step, importing the app: a trial that fails before it confirmed
# itself is rolled back; a confirmed update that fails later is not undone (its failure is
# raised, for the watchdog), and a failure of the confirmed slot is raised too.
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "firmware"))
import bootsel  # noqa: E402

sys.path.pop(0)


def _state(path):
    return json.loads((path / "ota.json").read_text())


def _on_trial(path):
    (path / "ota.json").write_text(json.dumps({"a": 0, "t": 1, "n": 1, "tv": "0.2.0"}))
    return json.dumps(bootsel.back(_state(path)))


def test_trial_that_fails_before_confirming_rolls_back_and_resets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PJ_ENTRY", "no_such_app")  # the simulated device's reset: SystemExit
    fallback = _on_trial(tmp_path)
    with pytest.raises(SystemExit) as reset:
        bootsel.run("no_such_app_module", fallback)
    assert reset.value.code == 75
    assert _state(tmp_path) == {"a": 0, "t": None, "n": 0, "rb": "0.2.0"}


def test_confirmed_update_that_fails_later_is_not_rolled_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PJ_ENTRY", "no_such_app")
    fallback = _on_trial(tmp_path)
    # The trial confirmed itself while it ran (firmware/ota.py writes this) ...
    (tmp_path / "ota.json").write_text(json.dumps({"a": 1, "t": None, "n": 0}))
    # ... and later the app failed: raised, not a reset into the old slot.
    with pytest.raises(ImportError):
        bootsel.run("no_such_app_module", fallback)
    assert _state(tmp_path) == {"a": 1, "t": None, "n": 0}


def test_failure_of_the_confirmed_slot_is_raised(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImportError):
        bootsel.run("no_such_app_module", None)
    assert not (tmp_path / "ota.json").exists()
