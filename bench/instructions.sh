#!/usr/bin/env bash
# Instructions per proxied plain-HTTP request, counted by callgrind: exact and repeatable where
# CPU time on this VM is not, so each change to the data path is judged by this first.
#
#   bash bench/instructions.sh target/release/tokenproxy [OTHER_BINARY ...]
#
# For each binary: tokenproxy under callgrind on one CPU (one runtime worker, as in
# bench/run.sh), one keep-alive client connection (curl, absolute form, the proxy injecting the
# token into every request) to an nginx upstream, run twice: with SMALL and with LARGE requests.
# (instructions(LARGE) - instructions(SMALL)) / (LARGE - SMALL) takes start-up, shutdown and the
# first connection out. Every answer must be 200 (the upstream answers 401 without the token).
#   TASKS_ONLY=1  counts only what runs inside tokio tasks: the worker's idle loop (epoll,
#                 parking) depends on timing and moves the total by 10 %; this repeats to 0.1 %.
#   KEEP=DIR      keeps the callgrind files there, for callgrind_annotate.
#   ACCOUNT=NAME  makes the provider multi-account (token_file = "tokens/{account}.json") and
#                 names NAME in a Tokenproxy-Account header on every request (SPEC §8).
#   HTTPS=1       intercepted HTTPS instead: the upstream nginx speaks TLS (a certificate from a
#                 CA of the script's own, which tokenproxy is told to trust), and curl sends
#                 CONNECT and GETs inside one kept tunnel, trusting tokenproxy's CA. The count
#                 includes the TLS work on both sides, which is the same for every build.
#                 HTTP_VERSION=2 has curl speak HTTP/2 inside the tunnel (one request at a time).
# Loopback only (ports 18950-18952); under a minute per binary.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: bash bench/instructions.sh BINARY [BINARY ...]" >&2; exit 2; }
for tool in valgrind nginx curl ${HTTPS:+openssl}; do
    command -v $tool >/dev/null || { echo "$tool is required" >&2; exit 1; }
done
SMALL=${SMALL:-200}
LARGE=${LARGE:-2200}
W=$(mktemp -d); NGINX=
cleanup() { [ -n "$NGINX" ] && kill "$NGINX" 2>/dev/null; wait 2>/dev/null; [ -n "${KEEP:-}" ] && cp $W/callgrind.* "$KEEP"/ 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
mkdir -p $W/logs
SCHEME=http LISTEN="" PROVIDER_HOST=127.0.0.1:18950 TLS_KEYS="" EXTRA_ROOTS=""
if [ -n "${HTTPS:-}" ]; then
    printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n' > $W/ext
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=bench upstream CA" -keyout $W/up-ca.key -out $W/up-ca.pem 2>/dev/null &&
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
        -keyout $W/up.key -out $W/up.csr 2>/dev/null &&
    openssl x509 -req -in $W/up.csr -CA $W/up-ca.pem -CAkey $W/up-ca.key -CAcreateserial \
        -days 2 -extfile $W/ext -out $W/up.pem 2>/dev/null || { echo "openssl failed" >&2; exit 1; }
    SCHEME=https LISTEN=" ssl" PROVIDER_HOST=localhost:18950 EXTRA_ROOTS="\"$W/up-ca.pem\""
    TLS_KEYS="ssl_certificate $W/up.pem; ssl_certificate_key $W/up.key;"
fi
cat > $W/nginx.conf <<NG
worker_processes 1; daemon off; pid $W/nginx.pid; error_log $W/logs/error.log;
events { worker_connections 1024; }
http { access_log off;
  server { listen 127.0.0.1:18950$LISTEN; $TLS_KEYS
    location / { if (\$http_authorization != "Bearer bench-token") { return 401; } return 200 "ok\n"; } } }
NG
nginx -c $W/nginx.conf -p $W & NGINX=$!
TOKEN_JSON='{"access_token":"bench-token","expires_at":"2099-01-01T00:00:00Z"}'
TOKEN_FILE=$W/t.json
HEADER=()
if [ -n "${ACCOUNT:-}" ]; then
    mkdir -p $W/tokens
    echo "$TOKEN_JSON" > "$W/tokens/$ACCOUNT.json"
    TOKEN_FILE='tokens/{account}.json'
    HEADER=(-H "Tokenproxy-Account: $ACCOUNT")
else
    echo "$TOKEN_JSON" > $W/t.json
fi
printf '[proxy]\nlisten = "127.0.0.1:18951"\n[admin]\nlisten = "127.0.0.1:18952"\n[tls]\nca_dir = "%s/ca"\nextra_roots = [%s]\n[providers.bench]\nhosts = ["%s"]\ntoken_file = "%s"\nallow_plaintext = true\n' \
    $W "$EXTRA_ROOTS" $PROVIDER_HOST "$TOKEN_FILE" > $W/c.toml
CURL_TLS=()
[ -n "${HTTPS:-}" ] && CURL_TLS=(--cacert $W/ca/ca.pem "--http${HTTP_VERSION:-1.1}")

wait_port() {
    for _ in $(seq 1 300); do
        (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && { exec 3>&- 3<&-; return 0; }
        sleep 0.1
    done
    return 1
}

# instructions BINARY N: total instructions of one tokenproxy process that served N requests.
instructions() {
    local bin=$1 n=$2 out=$W/callgrind.$2
    RUST_LOG=warn taskset -c 0 valgrind --tool=callgrind --callgrind-out-file=$out \
        ${TASKS_ONLY:+--toggle-collect='tokio::runtime::task::raw::poll'} "$bin" run --config $W/c.toml \
        2>$W/logs/valgrind.$n & local pid=$!
    wait_port 18951 || { echo "tokenproxy did not start under valgrind" >&2; cat $W/logs/valgrind.$n >&2; exit 1; }
    for _ in $(seq 1 "$n"); do echo "url = \"$SCHEME://$PROVIDER_HOST/\""; echo 'output = "/dev/null"'; done > $W/urls
    local codes
    codes=$(curl -s "${HEADER[@]}" "${CURL_TLS[@]}" --proxy http://127.0.0.1:18951 -K $W/urls -w '%{http_code}\n' | sort | uniq -c)
    [ "$(echo "$codes" | awk '$2 == 200 {print $1}')" = "$n" ] || { echo "not every answer was 200: $codes" >&2; exit 1; }
    kill -TERM $pid; wait $pid
    awk '/^summary:/ {print $2}' $out
}

for bin in "$@"; do
    instructions "$(realpath "$bin")" 1 >/dev/null # makes the CA, which the runs then only load
    small=$(instructions "$(realpath "$bin")" $SMALL)
    large=$(instructions "$(realpath "$bin")" $LARGE)
    awk -v b="$bin" -v s=$small -v l=$large -v n=$((LARGE - SMALL)) \
        'BEGIN { printf "%-50s %8.0f instructions per request\n", b, (l - s) / n }'
done
