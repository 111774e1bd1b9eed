#!/usr/bin/env bash
# What a second runtime worker costs (issue "Performance", goal 1): tokenproxy's CPU per
# proxied plain-HTTP request with `[proxy] workers = 1` and `= 2`, and nginx as a reverse proxy
# with `worker_processes 1` and `2` beside it as the reference, under the same load in one run.
#
#   bash bench/scaling.sh                 # RUNS=3 rounds, DURATION=5 s per measurement
#   RUNS=5 DURATION=8 bash bench/scaling.sh
#
# Layout on a 2-core machine: the proxy may run on CPUs 0 and 1 (so a second worker has a core
# to go to), wrk (one thread, 50 keep-alive connections) and the nginx upstream on CPU 1. Each
# round measures the four configurations one after another, so that a noisy moment lands on
# one round, not on one configuration; the table gives each one's range over the rounds and the
# ratio of 2 workers to 1 per round. Loopback only (ports 18180-18184); about RUNS x 4 x
# (DURATION + 1) seconds. Needs wrk and nginx (bench/run.sh installs them).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
RUNS=${RUNS:-3}
DURATION=${DURATION:-5}
TOKEN="bench-token-$(date +%s)"
for tool in wrk nginx taskset; do
    command -v $tool >/dev/null || { echo "$tool is required (bash bench/run.sh installs it)" >&2; exit 1; }
done
cargo build --release --locked --bin tokenproxy >&2 || { echo "build failed" >&2; exit 1; }
TOKENPROXY=$PWD/target/release/tokenproxy
WORK=$(mktemp -d /tmp/tokenproxy-scaling.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
HZ=$(getconf CLK_TCK)

wait_port() {
    for _ in $(seq 1 100); do
        (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && { exec 3>&- 3<&-; return 0; }
        sleep 0.1
    done
    return 1
}
tree_ticks() { # pid: user+system clock ticks of the process and its children (nginx workers)
    local total=0 p
    for p in $1 $(pgrep -P "$1"); do
        local f=()
        read -r -a f < <(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null) || true
        [ ${#f[@]} -gt 12 ] && total=$((total + f[11] + f[12]))
    done
    echo "$total"
}
nginx_conf() { # dir workers: stdin inside `http { }`
    mkdir -p "$1"
    {
        printf 'worker_processes %s;\ndaemon off;\npid %s/nginx.pid;\nerror_log %s/error.log crit;\n' "$2" "$1" "$1"
        printf 'events { worker_connections 4096; }\nhttp {\naccess_log off;\nkeepalive_requests 1000000;\n'
        printf 'client_body_temp_path %s;\nproxy_temp_path %s;\n' "$1" "$1"
        cat
        echo "}"
    } > "$1/nginx.conf"
}

nginx_conf "$WORK/upstream" 1 <<EOF
server { listen 127.0.0.1:18180;
  location / { if (\$http_authorization != "Bearer $TOKEN") { return 401; } return 200 "ok\n"; } }
EOF
taskset -c 1 nginx -c "$WORK/upstream/nginx.conf" -p "$WORK/upstream" & PIDS+=($!)
wait_port 18180 || { echo "the upstream did not start" >&2; exit 1; }

printf '{"access_token": "%s", "expires_at": "2099-01-01T00:00:00Z"}\n' "$TOKEN" > "$WORK/token.json"
cat > "$WORK/absolute.lua" <<EOF
wrk.path = "http://127.0.0.1:18180/"
wrk.headers["Host"] = "127.0.0.1:18180"
EOF
cat > "$WORK/reverse.lua" <<EOF
wrk.headers["Host"] = "127.0.0.1:18180"
EOF

# One measurement: starts the configuration on CPUs 0-1, warms it, counts its CPU ticks over
# DURATION of wrk at 50 connections; prints "us_per_request req_per_s".
measure() { # kind(tp|nginx) workers
    local kind=$1 workers=$2 pid port lua
    if [ "$kind" = tp ]; then
        port=18181
        printf '[proxy]\nlisten = "127.0.0.1:%s"\nworkers = %s\n[admin]\nlisten = "127.0.0.1:18182"\n[providers.bench]\nhosts = ["127.0.0.1:18180"]\ntoken_file = "%s"\nallow_plaintext = true\n' \
            "$port" "$workers" "$WORK/token.json" > "$WORK/tp.toml"
        RUST_LOG=warn taskset -c 0,1 "$TOKENPROXY" run --config "$WORK/tp.toml" 2>>"$WORK/tp.log" &
        pid=$!
        lua=$WORK/absolute.lua
    else
        port=18183
        nginx_conf "$WORK/rp$workers" "$workers" <<EOF
upstream bench { server 127.0.0.1:18180; keepalive 64; keepalive_requests 1000000; }
server { listen 127.0.0.1:$port;
  location / { proxy_pass http://bench; proxy_http_version 1.1; proxy_set_header Connection "";
    proxy_set_header Authorization "Bearer $TOKEN"; } }
EOF
        taskset -c 0,1 nginx -c "$WORK/rp$workers/nginx.conf" -p "$WORK/rp$workers" &
        pid=$!
        lua=$WORK/reverse.lua
    fi
    wait_port $port || { echo "$kind did not start" >&2; kill $pid; return 1; }
    taskset -c 1 wrk -t1 -c50 -d1s -s "$lua" "http://127.0.0.1:$port/" >/dev/null 2>&1
    local t0 t1 out requests non2xx
    t0=$(tree_ticks $pid)
    out=$(taskset -c 1 wrk -t1 -c50 -d"${DURATION}s" -s "$lua" "http://127.0.0.1:$port/" 2>&1)
    t1=$(tree_ticks $pid)
    kill $pid 2>/dev/null
    wait $pid 2>/dev/null
    requests=$(echo "$out" | awk '/requests in/ {print $1}')
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $4}')
    [ -z "$non2xx" ] || { echo "$kind with $workers: $non2xx answers were not 200" >&2; return 1; }
    awk -v t=$((t1 - t0)) -v hz="$HZ" -v n="${requests:-0}" -v d="$DURATION" \
        'BEGIN {if (n > 0) printf "%.2f %d\n", t * 1e6 / hz / n, n / d; else print "- -"}'
}

declare -A CPU RPS
for run in $(seq 1 "$RUNS"); do
    for config in "tp 1" "tp 2" "nginx 1" "nginx 2"; do
        read -r cpu rps < <(measure $config)
        CPU["$config $run"]=$cpu
        RPS["$config $run"]=$rps
        echo "round $run: $config worker(s): $cpu us/request, $rps req/s" >&2
    done
done

range() { # values...: "min-max"
    printf '%s\n' "$@" | sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%s-%s", lo, hi}'
}
echo
echo "CPU per proxied request (user + system) with 1 and 2 workers: proxy on CPUs 0-1, wrk (50 connections)"
echo "and the upstream on CPU 1, ${DURATION}s per measurement, $RUNS rounds; ratio = 2 workers / 1 worker per round"
echo
printf '| %-22s | %16s | %16s | %14s | %14s | %18s |\n' peer "1 worker us/req" "2 workers us/req" "1 worker req/s" "2 workers req/s" "ratio 2/1 (rounds)"
printf '|%s|\n' "------------------------|------------------|------------------|----------------|-----------------|--------------------"
for kind in tp nginx; do
    c1=() c2=() r1=() r2=() ratios=()
    for run in $(seq 1 "$RUNS"); do
        c1+=("${CPU[$kind 1 $run]}") c2+=("${CPU[$kind 2 $run]}")
        r1+=("${RPS[$kind 1 $run]}") r2+=("${RPS[$kind 2 $run]}")
        ratios+=("$(awk -v a="${CPU[$kind 2 $run]}" -v b="${CPU[$kind 1 $run]}" 'BEGIN {printf "%.2f", a / b}')")
    done
    name=tokenproxy
    [ $kind = nginx ] && name="nginx (reverse proxy)"
    printf '| %-22s | %16s | %16s | %14s | %15s | %18s |\n' "$name" "$(range "${c1[@]}")" "$(range "${c2[@]}")" \
        "$(range "${r1[@]}")" "$(range "${r2[@]}")" "${ratios[*]}"
done
echo
echo "measured at $(git rev-parse --short HEAD)"
