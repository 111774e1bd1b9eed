#!/usr/bin/env bash
# CPU per request of a transparently intercepted HTTPS request against the same request through
# CONNECT interception, in one run (SPEC §12, issue "transparent interception": goal within 10%).
#
# Runs in a network namespace of its own (root: unshare, iptables), so nothing leaves the
# machine: api.test is 10.77.0.1 on the namespace's loopback, served by nginx over TLS with a CA
# made for the run. tokenproxy runs as nobody on CPU 0 with the rules `tokenproxy iptables`
# prints; examples/loadgen.rs runs as another user on CPU 1, 50 keep-alive connections, HTTP/1.1:
#   connect:     loadgen --proxy 127.0.0.1:8080 (CONNECT, then TLS with tokenproxy's leaf)
#   transparent: loadgen straight to api.test:443 (redirected by iptables, same leaf)
# CPU/request is tokenproxy's user + system time over the requests it served.
#
#   sudo bash bench/transparent.sh            # DURATION=5 seconds per measurement
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}

if [ -z "${TOKENPROXY_BENCH_INSIDE:-}" ]; then
    [ "$(id -u)" = 0 ] || { echo "bench/transparent.sh needs root (a network namespace, iptables)" >&2; exit 1; }
    for tool in nginx openssl iptables unshare setpriv taskset curl; do
        command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install nginx openssl iptables util-linux curl)" >&2; exit 1; }
    done
    cargo build --release --locked --bin tokenproxy --example loadgen >&2
    exec env TOKENPROXY_BENCH_INSIDE=1 unshare --net --mount -- bash "$0"
fi

WORK=$(mktemp -d)
chmod 755 "$WORK"
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

ip link set lo up
ip addr add 10.77.0.1/32 dev lo
printf '127.0.0.1 localhost\n10.77.0.1 api.test\n' > "$WORK/hosts"
mount --bind "$WORK/hosts" /etc/hosts

# The upstream's certificate, from a CA made for this run.
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$WORK/ca-key.pem" -out "$WORK/ca.pem" -subj /CN=bench-ca -days 1 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout "$WORK/key.pem" -out "$WORK/csr.pem" -subj /CN=api.test 2>/dev/null
printf 'subjectAltName=DNS:api.test\n' > "$WORK/ext"
openssl x509 -req -in "$WORK/csr.pem" -CA "$WORK/ca.pem" -CAkey "$WORK/ca-key.pem" -CAcreateserial \
    -out "$WORK/cert.pem" -days 1 -extfile "$WORK/ext" 2>/dev/null
cat > "$WORK/nginx.conf" <<EOF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
daemon off;
events {}
http {
    access_log off;
    server {
        listen 10.77.0.1:443 ssl;
        ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem;
        keepalive_requests 1000000;
        location / {
            if (\$http_authorization = "Bearer bench-token") { return 200 "ok\n"; }
            return 401;
        }
    }
}
EOF
taskset -c 1 nginx -c "$WORK/nginx.conf" -p "$WORK" &
PIDS+=($!)

mkdir -p "$WORK/tp"
echo '{"access_token":"bench-token","expires_at":"2099-01-01T00:00:00Z"}' > "$WORK/tp/api.json"
cat > "$WORK/tp/tokenproxy.toml" <<EOF
[proxy]
listen = "127.0.0.1:8080"
[admin]
listen = "127.0.0.1:9090"
[tls]
ca_dir = "ca"
extra_roots = ["$WORK/ca.pem"]
[transparent]
listen = "127.0.0.1:15001"
[providers.api]
hosts = ["api.test"]
token_file = "api.json"
EOF
chown -R 65534:65534 "$WORK/tp"
taskset -c 0 setpriv --reuid=65534 --regid=65534 --clear-groups -- \
    target/release/tokenproxy run --config "$WORK/tp/tokenproxy.toml" 2>"$WORK/tokenproxy.log" &
TP=$!
PIDS+=($TP)
for _ in $(seq 100); do curl -sf http://127.0.0.1:9090/healthz >/dev/null 2>&1 && break; sleep 0.1; done
target/release/tokenproxy iptables --uid 65534 --config "$WORK/tp/tokenproxy.toml" | grep '^iptables ' | sh -e
cp "$WORK/tp/ca/ca.pem" "$WORK/tokenproxy-ca.pem"
chmod 644 "$WORK/tokenproxy-ca.pem"

TICK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$TP/stat"; }
load() {
    setpriv --reuid=1000 --regid=1000 --clear-groups -- taskset -c 1 target/release/examples/loadgen \
        --target api.test:443 --ca "$WORK/tokenproxy-ca.pem" --connections 50 "$@"
}
field() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }

declare -A CPU RPS
for mode in connect transparent; do
    args=()
    [ "$mode" = connect ] && args=(--proxy 127.0.0.1:8080)
    load "${args[@]}" --duration 1 >/dev/null
    t0=$(cpu_ticks)
    out=$(load "${args[@]}" --duration "$DURATION")
    t1=$(cpu_ticks)
    requests=$(field "$out" requests)
    [ "$(field "$out" non2xx)" = 0 ] || { echo "$mode: requests without the token: $out" >&2; exit 1; }
    CPU[$mode]=$(awk -v t="$((t1 - t0))" -v hz="$TICK" -v n="$requests" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
    RPS[$mode]=$(field "$out" rps)
done

echo "| interception | req/s @50 | tokenproxy CPU/request |"
echo "|---|---|---|"
echo "| CONNECT | ${RPS[connect]} | ${CPU[connect]} µs |"
echo "| transparent | ${RPS[transparent]} | ${CPU[transparent]} µs |"
awk -v a="${CPU[transparent]}" -v b="${CPU[connect]}" 'BEGIN { printf "transparent / CONNECT CPU per request: %.2f×\n", a / b }'
