#!/usr/bin/env bash
# See procmqtt work in one command: installs what is missing (mosquitto through apt-get, procmqtt
# and its demo extra into .venv), then runs `procmqtt demo` (a private Mosquitto on a free
# loopback port, the demo app on 4 workers, a steady stream, a live view, a summary, a graceful
# stop). Extra arguments go to `procmqtt demo`, e.g. -w 2 --seconds 5.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bootstrap.sh

ensure_tools mosquitto:mosquitto
ensure_venv demo
exec "$VENV_PYTHON" -m procmqtt demo "$@"
