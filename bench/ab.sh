#!/usr/bin/env bash
# A/B: CPU time per proxied plain-HTTP request for two or more tokenproxy binaries, in alternating
# rounds of one run, so that the machine's drift hits all of them alike:
#
#   git worktree add /tmp/base <commit> && (cd /tmp/base && CARGO_TARGET_DIR=/tmp/base-target \
#       cargo build --release --locked --bin tokenproxy)
#   cargo build --release --locked --bin tokenproxy
#   bash bench/ab.sh /tmp/base-target/release/tokenproxy target/release/tokenproxy
#
# Needs wrk and nginx (bench/run.sh installs them). Loopback only (ports 18900-18929); each proxy
# is pinned to CPU 0, wrk and the nginx upstream to CPU 1; about 15 s per binary; everything it
# starts is stopped at the end.
set -uo pipefail
[ $# -ge 2 ] || { echo "usage: bash bench/ab.sh BINARY BINARY [BINARY ...]" >&2; exit 2; }
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT; mkdir -p $W/logs
cat > $W/nginx.conf <<NG
worker_processes 1; daemon off; pid $W/nginx.pid; error_log $W/logs/error.log;
events { worker_connections 4096; }
http { access_log off;
  server { listen 127.0.0.1:18900;
    location / { if (\$http_authorization != "Bearer bench-token") { return 401; } return 200 "ok\n"; } } }
NG
taskset -c 1 nginx -c $W/nginx.conf -p $W & NGINX=$!
echo '{"access_token":"bench-token","expires_at":"2099-01-01T00:00:00Z"}' > $W/t.json
cat > $W/abs.lua <<L
wrk.path = "http://127.0.0.1:18900/"
wrk.headers["Host"] = "127.0.0.1:18900"
L
i=0; PIDS=()
for bin in "$@"; do
  i=$((i+1))
  printf '[proxy]\nlisten = "127.0.0.1:1891%s"\n[admin]\nlisten = "127.0.0.1:1892%s"\n[tls]\nca_dir = "ca%s"\n[providers.bench]\nhosts = ["127.0.0.1:18900"]\ntoken_file = "t.json"\nallow_plaintext = true\n' $i $i $i > $W/c$i.toml
  RUST_LOG=warn taskset -c 0 "$(realpath "$bin")" run --config $W/c$i.toml 2>$W/logs/p$i.log & PIDS+=($!)
done
sleep 1
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
tck=$(getconf CLK_TCK)
for round in 1 2 3; do
  i=0
  for bin in "$@"; do
    pid=${PIDS[$i]}; i=$((i+1))
    taskset -c 1 wrk -t1 -c50 -d1s -s $W/abs.lua http://127.0.0.1:1891$i/ >/dev/null 2>&1
    before=$(cpu $pid)
    out=$(taskset -c 1 wrk -t1 -c50 -d4s -s $W/abs.lua http://127.0.0.1:1891$i/ 2>&1)
    after=$(cpu $pid)
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $4}')
    awk -v r=$round -v b="$bin" -v d=$((after-before)) -v t=$tck -v n=$reqs -v x=${non2xx:-0} \
      'BEGIN { printf "round %d  %-40s %7d req  %.2f us CPU/request  non-2xx %s\n", r, b, n, d/t*1e6/n, x }'
  done
done
kill "${PIDS[@]}" $NGINX 2>/dev/null; wait 2>/dev/null
