#!/usr/bin/env bash
# See procmqtt work in one command: installs what is missing, then runs `procmqtt demo`
# (a private Mosquitto on a free loopback port, the demo app on 4 workers, a steady stream, a live
# view, a summary, a graceful stop). Extra arguments go to `procmqtt demo`, e.g. -w 2 --seconds 5.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null; then
    if ! command -v apt-get >/dev/null; then
        echo "procmqtt demo needs the mosquitto binary: install the 'mosquitto' package (e.g. brew install mosquitto)" >&2
        exit 2
    fi
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "installing mosquitto (Debian package)..."
    $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q mosquitto
fi
if ! python3 -c 'import procmqtt.demo, prometheus_client' 2>/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check -e '.[demo]'
fi
exec python3 -m procmqtt demo "$@"
