#!/usr/bin/env bash
# See procmqtt work: a private Mosquitto on a free loopback port, the sensors example on 4 workers,
# a stream of readings, the alerts the workers publish, then a graceful stop.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null || ! command -v mosquitto_pub >/dev/null; then
    echo "installing mosquitto and mosquitto-clients (Debian packages)..."
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto mosquitto-clients
fi
python3 -c 'import procmqtt' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check -e .

dir=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$port" > "$dir/mosquitto.conf"
if [ "$(id -u)" = 0 ]; then echo "user root" >> "$dir/mosquitto.conf"; fi
mosquitto -c "$dir/mosquitto.conf" 2> "$dir/mosquitto.log" &
broker=$!
trap 'kill "$broker" ${sub:-} 2>/dev/null || true; rm -rf "$dir"' EXIT

python3 -m procmqtt run examples/sensors.py:Sensors -c examples/sensors.toml \
    --broker "mqtt://127.0.0.1:$port" -w 4 2> >(tee "$dir/procmqtt.log" >&2) &
app=$!
for _ in $(seq 100); do grep -q "subscribed to" "$dir/procmqtt.log" 2>/dev/null && break; sleep 0.1; done

mosquitto_sub -p "$port" -t 'alerts/#' -v > "$dir/alerts.txt" &
sub=$!
sleep 0.3
for i in $(seq 1 40); do
    mosquitto_pub -p "$port" -q 1 -t "sensors/d$((i % 5))/temperature" -m "{\"celsius\": $((18 + i % 15)).5}"
done
sleep 1
kill -TERM "$app"
wait "$app" && status=0 || status=$?
kill "$sub" 2>/dev/null || true
echo
echo "alerts the workers published (seen by mosquitto_sub):"
sed 's/^/  /' "$dir/alerts.txt"
echo "procmqtt exited with code $status; readings handled per worker:"
grep -o "worker [0-9]: d" "$dir/procmqtt.log" | sort | uniq -c | sed 's/: d$//'
exit "$status"
