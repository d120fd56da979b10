#!/usr/bin/env bash
# Time one batch of CPU-heavy jobs (examples/transform.py) with -w 1, then with -w 4, on a private
# broker (--broker embedded). Usage: bash examples/speedup.sh [JOBS] (default 200, ~20 ms of CPU each).
# The speedup is bounded by the free cores: about 4x on 4 idle cores, about 2x on 2.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${1:-200}
dir=$(mktemp -d)
trap 'kill ${app:-} 2>/dev/null || true; rm -rf "$dir"' EXIT

for workers in 1 4; do
    python3 -m procmqtt run examples/transform.py:Transform -c examples/transform.toml \
        --broker embedded -w "$workers" 2> "$dir/log" &
    app=$!
    for _ in $(seq 150); do grep -q "subscribed to" "$dir/log" && break; sleep 0.1; done
    port=$(sed -n 's/.*embedded broker: mosquitto (pid [0-9]*) on 127\.0\.0\.1:\([0-9]*\);.*/\1/p' "$dir/log")
    mosquitto_sub -p "$port" -q 1 -t 'transformed/#' -C "$jobs" > /dev/null &
    sub=$!
    sleep 0.5  # let mosquitto_sub subscribe before the first result
    start=$(date +%s.%N)
    seq "$jobs" | sed 's/.*/{"text": "job &"}/' | mosquitto_pub -p "$port" -q 1 -t jobs/batch -l
    wait "$sub"
    end=$(date +%s.%N)
    kill -TERM "$app" && wait "$app"
    python3 -c "import sys; s = float(sys.argv[2]) - float(sys.argv[1]); print(f'-w {sys.argv[3]}: {sys.argv[4]} jobs in {s:.2f}s ({int(sys.argv[4]) / s:.0f} jobs/s)')" \
        "$start" "$end" "$workers" "$jobs" | tee -a "$dir/results"
done
python3 -c "import re, sys; r = [float(x) for x in re.findall(r'\((\d+) jobs/s\)', open(sys.argv[1]).read())]; print(f'speedup with 4 workers: {r[1] / r[0]:.1f}x')" "$dir/results"
