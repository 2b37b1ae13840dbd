#!/usr/bin/env bash
# Measures that examples/latency_proxy.rs adds what it claims (not a test; CI does not run it):
# HEAD bucket through the proxy on one keep-alive connection, and a 10 MB GET under a rate cap,
# against s3s-fs on loopback. Prints, per one-way delay: the first request's time to first byte
# (new connection: handshake RTT + request RTT = 4 × delay expected), the second's on the same
# connection (1 RTT = 2 × delay expected), and the measured rate against the cap.
#
# usage: scripts/bench/latency_check.sh [delays in ms, default "0 5 15 40"]
set -euo pipefail
cd "$(dirname "$0")/../.."
delays=${*:-0 5 15 40}
. scripts/lib.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --locked -q --example latency_proxy
proxy_bin="$CARGO_TARGET_DIR/release/examples/latency_proxy"
work=$(mktemp -d /tmp/sso-latency.XXXXXX)
pids=()
trap 'kill "${pids[@]}" $s3pid 2>/dev/null; rm -rf "$work"' EXIT
start_s3s "$work/s3" lat bench benchsecret "$work/s3s.log"
sig=(--aws-sigv4 "aws:amz:us-east-1:s3" -u bench:benchsecret -H "x-amz-content-sha256: UNSIGNED-PAYLOAD")
head -c 10000000 /dev/urandom >"$work/blob"
curl "${sig[@]}" -sf -T "$work/blob" "http://127.0.0.1:$port/lat/blob" >/dev/null

start_proxy() { # extra args...; sets $paddr
  "$proxy_bin" --upstream "127.0.0.1:$port" "$@" >"$work/proxy.out" 2>"$work/proxy.err" &
  pids+=($!)
  for _ in $(seq 1 100); do
    paddr=$(sed -n 's/^listening //p' "$work/proxy.out")
    [[ -n "$paddr" ]] && return 0
    sleep 0.05
  done
  echo "proxy did not start" >&2; cat "$work/proxy.err" >&2; return 1
}
printf '%-9s %-16s %-16s %-16s %-16s\n' delay first_ttfb_ms expect_ms second_ttfb_ms expect_ms
for d in $delays; do
  start_proxy --delay "${d}ms"
  for _ in 1 2 3; do
    curl "${sig[@]}" -sf -o /dev/null -o /dev/null -I -w '%{time_starttransfer}\n' "http://$paddr/lat" "http://$paddr/lat"
  done >"$work/t"
  # Medians of three runs, first and second request.
  first=$(awk 'NR%2==1 {print $1*1000}' "$work/t" | sort -n | sed -n 2p)
  second=$(awk 'NR%2==0 {print $1*1000}' "$work/t" | sort -n | sed -n 2p)
  printf '%-9s %-16.1f %-16s %-16.1f %-16s\n' "${d}ms" "$first" "$((4 * d))" "$second" "$((2 * d))"
  kill "${pids[-1]}"
done
echo
printf '%-12s %-14s %-14s\n' cap_MB/s measured_MB/s ratio
for rate in 1MB 5MB 20MB; do
  start_proxy --rate "$rate"
  secs=$(curl "${sig[@]}" -sf -o /dev/null -w '%{time_total}\n' "http://$paddr/lat/blob")
  awk -v r="$rate" -v s="$secs" 'BEGIN {c = r + 0; m = 10 / s; printf "%-12s %-14.2f %-14.3f\n", c, m, m / c}'
  kill "${pids[-1]}"
done
