#!/usr/bin/env bash
# tokenproxy against squid, tinyproxy, mitmproxy, nginx as a reverse proxy (the floor) and a
# direct call, in one run, on loopback.
#
#   bash bench/run.sh            # installs what it needs from Debian, builds tokenproxy (release)
#   DURATION=10 bash bench/run.sh
#   PEERS="tokenproxy mitmproxy" bash bench/run.sh   # a subset (direct is always measured)
#   PEERS="tokenproxy tokenproxy-callers nginx" bash bench/run.sh   # with the callers rows (SPEC §13)
#   NEIGHBOUR=1 bash bench/run.sh   # also p50/p99 at one connection with a CPU-bound process (a
#                                   # shell loop at normal priority) on the proxy's CPU, as a
#                                   # sidecar's application would be; the same for every peer
#
# Each proxy adds `Authorization: Bearer …` to a plain-HTTP absolute-form GET and forwards it to
# one nginx upstream. Then the proxies that intercept TLS (tokenproxy, mitmproxy) do the same for
# HTTPS: CONNECT, a TLS handshake with the proxy's leaf certificate, keep-alive GETs inside, and
# a verified TLS connection to an nginx HTTPS upstream. wrk cannot CONNECT, so that part is driven
# by examples/loadgen.rs. The proxy is pinned to CPU 0; wrk and nginx share CPU 1. Measured per peer:
# req/s with 50 keep-alive connections, p50/p99 latency with 1 connection, the proxy's own
# CPU time (user+system, all its processes) per request served, and its peak RSS.
# Everything it starts it stops by PID; it is safe to re-run. Only 127.0.0.1 is used.
# No `set -e`: processes come and go while they are measured (squid's helpers), and a vanished
# /proc entry must not end the run. Steps that must succeed are checked explicitly.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

DURATION=${DURATION:-5}
NEIGHBOUR=${NEIGHBOUR:-0}
WARMUP=${WARMUP:-1}
PEERS=${PEERS:-"tokenproxy nginx squid tinyproxy mitmproxy"}
UPSTREAM_PORT=18080
TLS_UPSTREAM_PORT=18443
TOKEN="bench-token-$(date +%s)"
WORK=$(mktemp -d /tmp/tokenproxy-bench.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 0.3
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    wait 2>/dev/null # reaps them quietly (no "Killed" notices)
    rm -rf "$WORK"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1; }
want() { [[ " $PEERS " == *" $1 "* ]]; }
install_missing() {
    local missing=()
    need wrk || missing+=(wrk)
    need nginx || missing+=(nginx-light)
    need squid || missing+=(squid)
    need tinyproxy || missing+=(tinyproxy)
    need mitmdump || missing+=(mitmproxy)
    need openssl || missing+=(openssl)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing: ${missing[*]}" >&2
        apt-get update -qq >/dev/null 2>&1 || true
        for pkg in "${missing[@]}"; do
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null 2>&1 \
                || echo "note: $pkg could not be installed; its row is skipped" >&2
        done
    fi
}
install_missing
need wrk || { echo "wrk is required" >&2; exit 1; }
need nginx || { echo "nginx is required" >&2; exit 1; }

cargo build --release --locked --bin tokenproxy --example loadgen >&2 || { echo "build failed" >&2; exit 1; }
TOKENPROXY=$PWD/target/release/tokenproxy
LOADGEN=$PWD/target/release/examples/loadgen

# --- helpers ----------------------------------------------------------------------------------
wait_port() { # port: waits up to 10 s for a listener
    for _ in $(seq 1 100); do
        (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && { exec 3>&- 3<&-; return 0; }
        sleep 0.1
    done
    return 1
}
tree_pids() { # pid: the pid and all its descendants
    local pid=$1
    echo "$pid"
    for child in $(pgrep -P "$pid" 2>/dev/null); do tree_pids "$child"; done
}
cpu_ticks() { # pid: "user system" clock ticks of the process tree
    local user=0 system=0
    for p in $(tree_pids "$1"); do
        local f=()
        read -r -a f < <(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null) || true
        [ ${#f[@]} -gt 12 ] && user=$((user + f[11])) && system=$((system + f[12]))
    done
    echo "$user $system"
}
cpu_per_request() { # "u0 s0" "u1 s1" requests: "total (user + system)" microseconds per request
    local u0 s0 u1 s1
    read -r u0 s0 <<<"$1"
    read -r u1 s1 <<<"$2"
    awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$HZ" -v n="$3" \
        'BEGIN {f = 1e6 / hz / n; printf "%.1f (%.1f + %.1f)", (u + s) * f, u * f, s * f}'
}
peak_rss_kib() { # pid: sum of VmHWM over the tree
    local total=0
    for p in $(tree_pids "$1"); do
        local v
        v=$(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}
HZ=$(getconf CLK_TCK)

# Both upstreams answer 401 unless the request carries the token: a proxy that does not inject
# shows up in the non-2xx column. The direct baseline sends the header itself.
cat > "$WORK/direct.lua" <<EOF
wrk.headers["Authorization"] = "Bearer $TOKEN"
EOF
cat > "$WORK/absolute.lua" <<EOF
-- Sends an absolute-form request line, as a client does to a forward proxy.
wrk.path = "http://127.0.0.1:$UPSTREAM_PORT/"
wrk.headers["Host"] = "127.0.0.1:$UPSTREAM_PORT"
EOF

# --- the upstreams ------------------------------------------------------------------------------
# The HTTPS upstream's certificate, from a CA of its own that the proxies are told to trust.
TLS_UPSTREAM=""
if need openssl; then
    up=$WORK/upstream
    mkdir -p "$up"
    # A DNS name too: nginx checks an upstream's certificate by name (proxy_ssl_name).
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n' > "$up/ext"
    if openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
            -subj "/CN=bench upstream CA" -keyout "$up/ca.key" -out "$up/ca.pem" 2>/dev/null \
        && openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
            -keyout "$up/server.key" -out "$up/server.csr" 2>/dev/null \
        && openssl x509 -req -in "$up/server.csr" -CA "$up/ca.pem" -CAkey "$up/ca.key" -CAcreateserial \
            -days 2 -extfile "$up/ext" -out "$up/server.pem" 2>/dev/null; then
        TLS_UPSTREAM="    server {
        listen 127.0.0.1:$TLS_UPSTREAM_PORT ssl;
        ssl_certificate $up/server.pem;
        ssl_certificate_key $up/server.key;
        location / {
            if (\$http_authorization != \"Bearer $TOKEN\") { return 401; }
            return 200 \"ok\\n\";
        }
    }"
    fi
fi
[ -n "$TLS_UPSTREAM" ] || echo "note: no openssl to make the HTTPS upstream's certificate; HTTPS is skipped" >&2

nginx_conf() { # dir: writes dir/nginx.conf (one worker, no logs) with stdin inside `http { }`
    mkdir -p "$1"
    {
        cat <<EOF
worker_processes 1;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log crit;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $1;
    proxy_temp_path $1;
    fastcgi_temp_path $1;
    uwsgi_temp_path $1;
    scgi_temp_path $1;
    keepalive_requests 1000000;
EOF
        cat
        echo "}"
    } > "$1/nginx.conf"
}

nginx_conf "$WORK/nginx" <<EOF
    server {
        listen 127.0.0.1:$UPSTREAM_PORT;
        location / {
            if (\$http_authorization != "Bearer $TOKEN") { return 401; }
            return 200 "ok\n";
        }
    }
$TLS_UPSTREAM
EOF
taskset -c 1 nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" &
PIDS+=($!)
wait_port $UPSTREAM_PORT || { echo "nginx did not start" >&2; exit 1; }
[ -z "$TLS_UPSTREAM" ] || wait_port $TLS_UPSTREAM_PORT || { echo "nginx did not start HTTPS" >&2; exit 1; }

# --- measuring one peer -----------------------------------------------------------------------
RESULTS=()
measure() { # name port pid(or empty for direct) [lua]
    local name=$1 port=$2 pid=$3 lua=${4:-$WORK/absolute.lua}
    local url="http://127.0.0.1:$port/"
    taskset -c 1 wrk -t1 -c50 -d"${WARMUP}s" -s "$lua" "$url" >/dev/null 2>&1 || true
    local t0="0 0" t1="0 0"
    [ -n "$pid" ] && t0=$(cpu_ticks "$pid")
    local out
    out=$(taskset -c 1 wrk -t1 -c50 -d"${DURATION}s" -s "$lua" "$url" 2>&1)
    [ -n "$pid" ] && t1=$(cpu_ticks "$pid")
    local requests rps
    requests=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {printf "%d", $2}')
    local non2xx
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $4}')
    local lat p50 p99 same50="-" same99="-"
    lat=$(taskset -c 1 wrk -t1 -c1 -d"${DURATION}s" --latency -s "$lua" "$url" 2>&1)
    p50=$(echo "$lat" | awk '$1=="50%" {print $2}')
    p99=$(echo "$lat" | awk '$1=="99%" {print $2}')
    if [ -n "$pid" ]; then
        # The same with the proxy moved onto the load core: on a VM, the four cross-CPU wakeups
        # per request of the pinned layout cost more than the proxy's own work.
        for p in $(tree_pids "$pid"); do taskset -a -p -c 1 "$p" >/dev/null 2>&1; done
        lat=$(taskset -c 1 wrk -t1 -c1 -d"${DURATION}s" --latency -s "$lua" "$url" 2>&1)
        same50=$(echo "$lat" | awk '$1=="50%" {print $2}')
        same99=$(echo "$lat" | awk '$1=="99%" {print $2}')
        for p in $(tree_pids "$pid"); do taskset -a -p -c 0 "$p" >/dev/null 2>&1; done
    fi
    local busy50="-" busy99="-"
    if [ -n "$pid" ] && [ "$NEIGHBOUR" = 1 ]; then
        taskset -c 0 sh -c 'while :; do :; done' &
        local neighbour=$!
        lat=$(taskset -c 1 wrk -t1 -c1 -d"${DURATION}s" --latency -s "$lua" "$url" 2>&1)
        kill "$neighbour" 2>/dev/null
        wait "$neighbour" 2>/dev/null
        busy50=$(echo "$lat" | awk '$1=="50%" {print $2}')
        busy99=$(echo "$lat" | awk '$1=="99%" {print $2}')
    fi
    local cpu_us="-" rss="-"
    if [ -n "$pid" ] && [ "${requests:-0}" -gt 0 ]; then
        cpu_us=$(cpu_per_request "$t0" "$t1" "$requests")
        rss=$(awk -v k="$(peak_rss_kib "$pid")" 'BEGIN {printf "%.1f", k / 1024}')
    fi
    RESULTS+=("$name|$rps|$p50|$p99|$cpu_us|$rss|${non2xx:-0}|$same50|$same99|$busy50|$busy99")
}

# The same for intercepted HTTPS, driven by loadgen; `ca` is the proxy's interception CA.
HTTPS_RESULTS=()
measure_https() { # name port pid ca [reverse]: "reverse" is a TLS reverse proxy, reached directly
    local name=$1 port=$2 pid=$3 ca=$4 mode=${5:-forward}
    [ -n "$TLS_UPSTREAM" ] || return 0
    local load=(taskset -c 1 "$LOADGEN" --proxy "127.0.0.1:$port" --target "127.0.0.1:$TLS_UPSTREAM_PORT" --ca "$ca")
    [ "$mode" = reverse ] && load=(taskset -c 1 "$LOADGEN" --target "127.0.0.1:$port" --ca "$ca")
    # The warm-up also makes the leaf certificate, so that the measurement finds it cached.
    "${load[@]}" --connections 50 --duration "$WARMUP" >/dev/null 2>>"$WORK/loadgen.log" || true
    local t0 t1 out lat
    t0=$(cpu_ticks "$pid")
    out=$("${load[@]}" --connections 50 --duration "$DURATION" 2>>"$WORK/loadgen.log")
    t1=$(cpu_ticks "$pid")
    lat=$("${load[@]}" --connections 1 --duration "$DURATION" 2>>"$WORK/loadgen.log")
    field() { tr ' ' '\n' <<<"$1" | awk -F= -v k="$2" '$1 == k {print $2}'; }
    local requests cpu_us="-"
    requests=$(field "$out" requests)
    if [ "${requests:-0}" -gt 0 ]; then
        cpu_us=$(cpu_per_request "$t0" "$t1" "$requests")
    else
        echo "note: no HTTPS request through $name succeeded: $(tail -n 1 "$WORK/loadgen.log")" >&2
    fi
    # New connections: CONNECT, a full TLS handshake (no resumption) and one request each, ten
    # at a time; the CPU is per connection.
    local c0 c1 fresh connections conn_cpu="-"
    c0=$(cpu_ticks "$pid")
    fresh=$("${load[@]}" --connections 10 --requests-per-connection 1 --duration "$DURATION" 2>>"$WORK/loadgen.log")
    c1=$(cpu_ticks "$pid")
    connections=$(field "$fresh" connections)
    if [ "${connections:-0}" -gt 0 ]; then
        conn_cpu=$(cpu_per_request "$c0" "$c1" "$connections")
    fi
    # HTTP/2: one connection, 50 streams at once, each sending requests one after another.
    local h0 h1 h2 h2_requests h2_cpu="-"
    "${load[@]}" --connections 1 --h2-streams 50 --duration "$WARMUP" >/dev/null 2>>"$WORK/loadgen.log" || true
    h0=$(cpu_ticks "$pid")
    h2=$("${load[@]}" --connections 1 --h2-streams 50 --duration "$DURATION" 2>>"$WORK/loadgen.log")
    h1=$(cpu_ticks "$pid")
    h2_requests=$(field "$h2" requests)
    if [ "${h2_requests:-0}" -gt 0 ]; then
        h2_cpu=$(cpu_per_request "$h0" "$h1" "$h2_requests")
    else
        echo "note: no HTTP/2 request through $name succeeded: $(tail -n 1 "$WORK/loadgen.log")" >&2
    fi
    HTTPS_RESULTS+=("$name|$(field "$out" rps)|$(field "$lat" p50_us)|$(field "$lat" p99_us)|$cpu_us|$(field "$out" non2xx)|$(field "$out" errors)|$(field "$fresh" cps)|$conn_cpu|$(field "$h2" rps)|$h2_cpu|$(field "$h2" non2xx)")
}

# --- the peers ----------------------------------------------------------------------------------
measure "direct" $UPSTREAM_PORT "" "$WORK/direct.lua"

# tokenproxy
rss_idle_after=""
tls_idle_after=""
if want tokenproxy; then
    mkdir -p "$WORK/tp"
    printf '{"access_token": "%s", "expires_at": "2099-01-01T00:00:00Z"}\n' "$TOKEN" > "$WORK/tp/token.json"
    cat > "$WORK/tp/tokenproxy.toml" <<EOF
[proxy]
listen = "127.0.0.1:18081"
[admin]
listen = "127.0.0.1:18091"
[tls]
ca_dir = "ca"
extra_roots = ["$WORK/upstream/ca.pem"]
[providers.bench]
hosts = ["127.0.0.1:$UPSTREAM_PORT"]
token_file = "token.json"
allow_plaintext = true
[providers.bench-tls]
hosts = ["127.0.0.1:$TLS_UPSTREAM_PORT"]
token_file = "token.json"
EOF
    [ -f "$WORK/upstream/ca.pem" ] || sed -i '/^extra_roots/d' "$WORK/tp/tokenproxy.toml"
    RUST_LOG=warn taskset -c 0 "$TOKENPROXY" run --config "$WORK/tp/tokenproxy.toml" 2>"$WORK/tp/log" &
    TP_PID=$!
    PIDS+=($TP_PID)
    wait_port 18081 && measure "tokenproxy" 18081 $TP_PID
    # Idle keep-alive connections: RSS with 1000 open connections against none. Each connection
    # makes one request and stays open; they are made one after another, so that what is left is
    # the cost of an idle connection, not of 1000 requests in flight at once.
    rss_idle_before=$(awk '/VmRSS/ {print $2}' "/proc/$TP_PID/status")
    python3 - "$TP_PID" <<'EOF' > "$WORK/tp/idle" 2>/dev/null || true
import socket, sys, time
conns = []
for _ in range(1000):
    s = socket.create_connection(("127.0.0.1", 18081))
    s.sendall(b"GET http://127.0.0.1:18080/ HTTP/1.1\r\nHost: 127.0.0.1:18080\r\n\r\n")
    s.recv(4096)
    conns.append(s)
time.sleep(0.5)
print(open(f"/proc/{sys.argv[1]}/status").read().split("VmRSS:")[1].split()[0])
EOF
    rss_idle_after=$(cat "$WORK/tp/idle" 2>/dev/null || echo "")
    measure_https "tokenproxy" 18081 $TP_PID "$WORK/tp/ca/ca.pem"
    # The same with 1000 idle intercepted connections: CONNECT, a TLS handshake with the leaf
    # certificate, one GET inside, then left open (the tunnel's TLS state and hyper's connection
    # are what an idle intercepted client costs).
    if [ -n "$TLS_UPSTREAM" ]; then
        tls_idle_before=$(awk '/VmRSS/ {print $2}' "/proc/$TP_PID/status")
        python3 - "$TP_PID" "$WORK/tp/ca/ca.pem" "$TLS_UPSTREAM_PORT" <<'EOF' > "$WORK/tp/tls-idle" 2>"$WORK/tp/tls-idle.err" || true
import socket, ssl, sys, time
pid, ca, port = sys.argv[1], sys.argv[2], sys.argv[3]
context = ssl.create_default_context(cafile=ca)
conns = []
for _ in range(1000):
    s = socket.create_connection(("127.0.0.1", 18081))
    s.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head
    t = context.wrap_socket(s, server_hostname="127.0.0.1")
    t.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    assert t.recv(4096).startswith(b"HTTP/1.1 200")
    conns.append(t)
time.sleep(0.5)
print(open(f"/proc/{pid}/status").read().split("VmRSS:")[1].split()[0])
EOF
        tls_idle_after=$(cat "$WORK/tp/tls-idle" 2>/dev/null || echo "")
        [ -n "$tls_idle_after" ] || echo "note: idle intercepted connections not measured: $(tail -n 1 "$WORK/tp/tls-idle.err")" >&2
    fi
fi

# tokenproxy with callers (SPEC §13), each against the plain tokenproxy above ("CPU vs
# tokenproxy"): one caller with three rules (the third allows), 1,000 callers with ten rules each
# (the client is the last caller, allowed by its tenth rule), the first with the audit log on; then
# new connections (Connection: close, one request each) with no callers, a secret and a uid
# (the socket table lookup). PEERS="tokenproxy tokenproxy-callers" runs just these.
if want tokenproxy-callers && want tokenproxy; then
    tp_callers() { # name callers rules identity(secret|uid) audit(on|off) lua
        local name=$1 dir="$WORK/tpc-$1"
        mkdir -p "$dir"
        cp "$WORK/tp/token.json" "$dir/"
        python3 - "$dir" "$2" "$3" "$4" "$5" "$UPSTREAM_PORT" "$(id -u)" <<'PY'
import os, sys
d, n, rules, identity, audit, port, uid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7]
out = [f'[proxy]\nlisten = "127.0.0.1:18086"\n[admin]\nlisten = "127.0.0.1:18096"\n',
       f'[providers.bench]\nhosts = ["127.0.0.1:{port}"]\ntoken_file = "token.json"\nallow_plaintext = true\n']
if audit == "on":
    out.append('[audit]\nfile = "audit.jsonl"\n')
for i in range(n):
    name = f"caller-{i:04d}"
    if identity == "uid":
        out.append(f'[callers.{name}]\nuids = [{int(uid) if i == n - 1 else 100000 + i}]\n')
    else:
        with open(f"{d}/{name}.secret", "w") as f:
            f.write(f"secret-{name}-0123456789\n")
        os.chmod(f"{d}/{name}.secret", 0o600)
        out.append(f'[callers.{name}]\nsecret_file = "{name}.secret"\n')
    for r in range(rules - 1):
        # Rules the request passes over: another path, or another method.
        out.append(f'[[callers.{name}.allow]]\nprovider = "bench"\n' + (f'paths = ["/v{r}/*"]\n' if r % 2 == 0 else 'methods = ["POST"]\n'))
    out.append(f'[[callers.{name}.allow]]\nprovider = "bench"\nmethods = ["GET"]\npaths = ["/*"]\n')
open(f"{d}/tokenproxy.toml", "w").write("".join(out))
PY
        RUST_LOG=warn taskset -c 0 "$TOKENPROXY" run --config "$dir/tokenproxy.toml" 2>"$dir/log" &
        local pid=$!
        PIDS+=($pid)
        wait_port 18086 && measure "$name" 18086 $pid "$6"
        kill "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    }
    caller_lua() { # caller connection-close(yes|no): absolute form with the caller's credentials
        local auth=""
        [ -n "$1" ] && auth="wrk.headers[\"Proxy-Authorization\"] = \"Basic $(printf '%s:secret-%s-0123456789' "$1" "$1" | base64 -w0)\""
        local close=""
        [ "$2" = yes ] && close='wrk.headers["Connection"] = "close"'
        printf 'wrk.path = "http://127.0.0.1:%s/"\nwrk.headers["Host"] = "127.0.0.1:%s"\n%s\n%s\n' \
            "$UPSTREAM_PORT" "$UPSTREAM_PORT" "$auth" "$close"
    }
    caller_lua caller-0000 no > "$WORK/c1.lua"
    caller_lua caller-0999 no > "$WORK/c1000.lua"
    caller_lua caller-0000 yes > "$WORK/c1-close.lua"
    caller_lua "" yes > "$WORK/open-close.lua"
    caller_lua "" no > "$WORK/uid.lua"
    tp_callers "tp 1 caller, 3 rules" 1 3 secret off "$WORK/c1.lua"
    tp_callers "tp 1000/10000 rules" 1000 10 secret off "$WORK/c1000.lua"
    tp_callers "tp 1 caller + audit" 1 3 secret on "$WORK/c1.lua"
    tp_callers "tp 1 caller by uid" 1 3 uid off "$WORK/uid.lua"
    tp_callers "tp new conn, open" 0 0 secret off "$WORK/open-close.lua"
    tp_callers "tp new conn, secret" 1 3 secret off "$WORK/c1-close.lua"
    tp_callers "tp new conn, uid" 1 3 uid off "$WORK/open-close.lua"
fi

# nginx as a reverse proxy: not a forward proxy (no CONNECT, no routing by the request's host),
# but the leanest HTTP relay there is, so its CPU per request is the floor on this machine for
# the reads, writes and wakeups that relaying a request takes.
if want nginx; then
    nginx_conf "$WORK/nginx-rp" <<EOF
    upstream bench { server 127.0.0.1:$UPSTREAM_PORT; keepalive 64; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:18085;
        location / {
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer $TOKEN";
        }
    }
EOF
    taskset -c 0 nginx -c "$WORK/nginx-rp/nginx.conf" -p "$WORK/nginx-rp" &
    PIDS+=($!)
    wait_port 18085 && measure "nginx (reverse proxy)" 18085 "${PIDS[-1]}"
fi

# nginx as a TLS-terminating reverse proxy: TLS from the client with the same kind of key as
# tokenproxy's leaf certificates (ECDSA P-256), verified TLS with keep-alive (and session reuse)
# to the same HTTPS upstream, the header added. The leanest TLS relay there is: the bar for
# interception, which does the same work after a CONNECT.
if want nginx && [ -n "$TLS_UPSTREAM" ]; then
    nginx_conf "$WORK/nginx-tls" <<EOF
    upstream bench_tls { server 127.0.0.1:$TLS_UPSTREAM_PORT; keepalive 64; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:18087 ssl http2;
        ssl_certificate $WORK/upstream/server.pem;
        ssl_certificate_key $WORK/upstream/server.key;
        ssl_session_cache off;
        ssl_session_tickets off;
        location / {
            proxy_pass https://bench_tls;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer $TOKEN";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate $WORK/upstream/ca.pem;
            proxy_ssl_name localhost;
            proxy_ssl_session_reuse on;
        }
    }
EOF
    taskset -c 0 nginx -c "$WORK/nginx-tls/nginx.conf" -p "$WORK/nginx-tls" &
    PIDS+=($!)
    wait_port 18087 && measure_https "nginx (TLS reverse proxy)" 18087 "${PIDS[-1]}" "$WORK/upstream/ca.pem" reverse
fi

# squid
if want squid && need squid; then
    mkdir -p "$WORK/squid"
    chmod 777 "$WORK/squid"
    cat > "$WORK/squid/squid.conf" <<EOF
http_port 127.0.0.1:18082
http_access allow all
cache deny all
access_log none
cache_log $WORK/squid/cache.log
pid_filename $WORK/squid/squid.pid
coredump_dir $WORK/squid
request_header_add Authorization "Bearer $TOKEN" all
workers 1
EOF
    taskset -c 0 squid -N -f "$WORK/squid/squid.conf" >/dev/null 2>&1 &
    PIDS+=($!)
    wait_port 18082 && measure "squid" 18082 "${PIDS[-1]}"
fi

# tinyproxy
if want tinyproxy && need tinyproxy; then
    mkdir -p "$WORK/tinyproxy"
    cat > "$WORK/tinyproxy/tinyproxy.conf" <<EOF
Port 18083
Listen 127.0.0.1
Timeout 600
MaxClients 200
LogLevel Critical
AddHeader "Authorization" "Bearer $TOKEN"
EOF
    taskset -c 0 tinyproxy -d -c "$WORK/tinyproxy/tinyproxy.conf" >/dev/null 2>&1 &
    PIDS+=($!)
    wait_port 18083 && measure "tinyproxy" 18083 "${PIDS[-1]}"
fi

# mitmproxy
if want mitmproxy && need mitmdump; then
    mkdir -p "$WORK/mitm"
    cat > "$WORK/mitm/addon.py" <<EOF
def request(flow):
    flow.request.headers["Authorization"] = "Bearer $TOKEN"
EOF
    # It verifies the HTTPS upstream against the same CA that tokenproxy is given.
    HOME=$WORK/mitm taskset -c 0 mitmdump -q --listen-host 127.0.0.1 -p 18084 -s "$WORK/mitm/addon.py" \
        --set ssl_verify_upstream_trusted_ca="$WORK/upstream/ca.pem" >/dev/null 2>&1 &
    PIDS+=($!)
    if wait_port 18084; then
        measure "mitmproxy" 18084 "${PIDS[-1]}"
        measure_https "mitmproxy" 18084 "${PIDS[-1]}" "$WORK/mitm/.mitmproxy/mitmproxy-ca-cert.pem"
    fi
fi

# --- the table ----------------------------------------------------------------------------------
to_us() { # wrk latency ("52.00us", "1.20ms") -> microseconds
    awk -v v="$1" 'BEGIN {
        n = v + 0; if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000; else if (v ~ /s$/) print n * 1e6; else print "-" }'
}
tp_rps=$(for r in "${RESULTS[@]}"; do IFS='|' read -r n rps _ <<<"$r"; [ "$n" = tokenproxy ] && echo "$rps"; done)
tp_cpu=$(for r in "${RESULTS[@]}"; do IFS='|' read -r n _ _ _ cpu _ <<<"$r"; [ "$n" = tokenproxy ] && echo "$cpu"; done)
direct_rps=$(for r in "${RESULTS[@]}"; do IFS='|' read -r n rps _ <<<"$r"; [ "$n" = direct ] && echo "$rps"; done)

echo
echo "plain HTTP GET with header injection, ${DURATION}s per measurement, proxy on CPU 0, wrk + nginx on CPU 1"
echo "(\"one core\": the 1-connection latency again with the proxy moved onto CPU 1 beside wrk and nginx;"
echo "\"busy neighbour\": with NEIGHBOUR=1, again with a CPU-bound process on the proxy's CPU 0)"
echo
printf '| %-21s | %9s | %8s | %15s | %19s | %20s | %24s | %13s | %10s | %8s |\n' \
    peer "req/s @50" "vs direct" "p50/p99 @1" "p50/p99 @1 one core" "p50/p99 @1 neighbour" "CPU/request (user + sys)" "CPU vs tokenproxy" "peak RSS" "non-2xx"
printf '|%s|\n' "-----------------------|-----------|----------|-----------------|---------------------|----------------------|--------------------------|-------------------|------------|----------"
for r in "${RESULTS[@]}"; do
    IFS='|' read -r name rps p50 p99 cpu rss non2xx same50 same99 busy50 busy99 <<<"$r"
    vs_direct=$(awk -v a="$rps" -v b="$direct_rps" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "-"}')
    vs_tp=$(awk -v a="${cpu%% *}" -v b="${tp_cpu%% *}" 'BEGIN {if (a != "-" && b > 0) printf "%.1fx", a / b; else print "-"}')
    same="-" busy="-"
    [ "$same50" != "-" ] && same="$(to_us "$same50")/$(to_us "$same99") us"
    [ "$busy50" != "-" ] && busy="$(to_us "$busy50")/$(to_us "$busy99") us"
    printf '| %-21s | %9s | %8s | %15s | %19s | %20s | %21s us | %17s | %7s MiB | %8s |\n' \
        "$name" "$rps" "$vs_direct" "$(to_us "$p50")/$(to_us "$p99") us" "$same" "$busy" "$cpu" "$vs_tp" "$rss" "$non2xx"
done
if [ -n "$rss_idle_after" ]; then
    echo
    awk -v a="$rss_idle_before" -v b="$rss_idle_after" \
        'BEGIN {printf "tokenproxy RSS: %.1f MiB idle, %.1f MiB with 1000 idle keep-alive connections (+%.1f MiB)\n", a/1024, b/1024, (b-a)/1024}'
fi
if [ -n "$tls_idle_after" ]; then
    awk -v a="$tls_idle_before" -v b="$tls_idle_after" \
        'BEGIN {printf "tokenproxy RSS: %.1f MiB, %.1f MiB with 1000 idle intercepted (CONNECT + TLS) connections (+%.1f MiB, %.1f KiB each)\n", a/1024, b/1024, (b-a)/1024, (b-a)/1000}'
fi
echo "tokenproxy served $tp_rps req/s at 50 connections."

if [ ${#HTTPS_RESULTS[@]} -gt 0 ]; then
    tp_https_rps=$(for r in "${HTTPS_RESULTS[@]}"; do IFS='|' read -r n rps _ <<<"$r"; [ "$n" = tokenproxy ] && echo "$rps"; done)
    echo
    echo "intercepted HTTPS GET with header injection (CONNECT, leaf certificate cached, keep-alive,"
    echo "verified TLS to an nginx HTTPS upstream), ${DURATION}s per measurement, proxy on CPU 0, loadgen + nginx on CPU 1;"
    echo "\"new connections\": CONNECT, a full TLS handshake and one request per connection, 10 at a time"
    echo
    printf '| %-21s | %9s | %19s | %15s | %24s | %8s | %6s | %17s | %27s | %14s | %20s |\n' \
        peer "req/s @50" "tokenproxy vs peer" "p50/p99 @1" "CPU/request (user + sys)" "non-2xx" "errors" "new connections/s" "CPU/new connection (u + s)" "h2 req/s @50" "h2 CPU/request"
    printf '|%s|\n' "-----------------------|-----------|---------------------|-----------------|--------------------------|----------|--------|-------------------|-----------------------------|----------------|----------------------"
    for r in "${HTTPS_RESULTS[@]}"; do
        IFS='|' read -r name rps p50 p99 cpu non2xx errors cps conn_cpu h2_rps h2_cpu h2_non2xx <<<"$r"
        vs=$(awk -v a="${tp_https_rps:-0}" -v b="${rps:-0}" 'BEGIN {if (b > 0 && a > 0) printf "%.1fx", a / b; else print "-"}')
        [ "${h2_non2xx:-0}" = 0 ] || h2_rps="${h2_rps} (${h2_non2xx} non-2xx)"
        printf '| %-21s | %9s | %19s | %15s | %21s us | %8s | %6s | %17s | %24s us | %14s | %17s us |\n' \
            "$name" "${rps:--}" "$vs" "${p50:--}/${p99:--} us" "$cpu" "${non2xx:--}" "${errors:--}" "${cps:--}" "$conn_cpu" "${h2_rps:--}" "${h2_cpu:--}"
    done
    echo "(h2: one connection, 50 concurrent streams, HTTP/2 from the client; tokenproxy and nginx both speak HTTP/1.1 to the upstream)"
fi
