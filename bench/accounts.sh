#!/usr/bin/env bash
# Resident memory of a proxy with many loaded accounts (SPEC §8).
#
#     ACCOUNTS=10000 bash bench/accounts.sh
#
# Builds tokenproxy in release mode, writes ACCOUNTS token files for one multi-account provider,
# starts a Python upstream and the proxy on loopback, reads the proxy's RSS idle, then sends one
# request naming each account (which loads it) over one keep-alive connection, and reads the RSS
# again. Every request must come back 200 with its own account's token, and /tokens must list
# every account. Stops what it started by PID; loopback only; safe to re-run.
set -euo pipefail

ACCOUNTS="${ACCOUNTS:-10000}"
UPSTREAM_PORT="${UPSTREAM_PORT:-18091}"
cd "$(dirname "$0")/.."
cargo build --release --bin tokenproxy >/dev/null 2>&1 || cargo build --release --bin tokenproxy

work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

python3 - "$work" "$ACCOUNTS" <<'EOF'
import json, os, sys
work, n = sys.argv[1], int(sys.argv[2])
os.makedirs(f"{work}/tokens", exist_ok=True)
for i in range(n):
    with open(f"{work}/tokens/user{i:06d}.json", "w") as f:
        json.dump({"access_token": f"token-{i:06d}-abcdefghijklmnopqrstuvwxyz0123456789",
                   "refresh_token": f"refresh-{i:06d}-abcdefghijklmnopqrstuvwxyz",
                   "expires_at": "2099-01-01T00:00:00Z"}, f)
EOF

# An upstream that answers with the Authorization it got, so each response can be checked.
cat >"$work/upstream.py" <<'EOF'
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = (self.headers.get("Authorization") or "none").encode()
        # Head and body in one write: two small writes meet Nagle and a delayed ACK (40 ms each).
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        self.wfile.write(head + body)
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Echo).serve_forever()
EOF
python3 "$work/upstream.py" "$UPSTREAM_PORT" &
pids+=($!)

cat >"$work/tokenproxy.toml" <<EOF
[proxy]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[providers.many]
hosts = ["127.0.0.1:$UPSTREAM_PORT"]
token_file = "tokens/{account}.json"
allow_plaintext = true
EOF
RUST_LOG=warn,tokenproxy=info ./target/release/tokenproxy --log-format json run --config "$work/tokenproxy.toml" \
    2>"$work/log" &
tp=$!
pids+=($tp)
for _ in $(seq 100); do
    grep -q '"listener":"admin"' "$work/log" 2>/dev/null && grep -q '"listener":"proxy"' "$work/log" && break
    sleep 0.1
done
proxy="$(grep '"listener":"proxy"' "$work/log" | sed 's/.*"addr":"\([^"]*\)".*/\1/')"
admin="$(grep '"listener":"admin"' "$work/log" | sed 's/.*"addr":"\([^"]*\)".*/\1/')"
rss() { awk '/^VmRSS/ {print $2}' "/proc/$tp/status"; }
sleep 1
idle="$(rss)"

python3 - "$proxy" "$admin" "$UPSTREAM_PORT" "$ACCOUNTS" "$tp" "$work/loaded" <<'EOF'
import json, sys, time, urllib.request
import requests
proxy, admin, port, n, pid, loaded = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6]
s = requests.Session()
s.trust_env = False
s.proxies = {"http": f"http://{proxy}"}
started = time.monotonic()
for i in range(n):
    r = s.get(f"http://127.0.0.1:{port}/", headers={"Tokenproxy-Account": f"user{i:06d}"}, timeout=10)
    assert r.status_code == 200 and r.text == f"Bearer token-{i:06d}-abcdefghijklmnopqrstuvwxyz0123456789", (i, r.status_code, r.text)
elapsed = time.monotonic() - started
# The accounts' cost is read before /tokens builds its (large, transient) answer.
time.sleep(1)
with open(f"/proc/{pid}/status") as status, open(loaded, "w") as out:
    out.write(next(l.split()[1] for l in status if l.startswith("VmRSS")))
views = json.load(urllib.request.urlopen(f"http://{admin}/tokens?provider=many"))
assert len(views) == n, len(views)
print(f"{n} accounts loaded by {n} requests in {elapsed:.1f}s; /tokens lists {len(views)}")
EOF
loaded="$(cat "$work/loaded")"
after_tokens="$(rss)"
peak="$(awk '/^VmHWM/ {print $2}' "/proc/$tp/status")"
echo "RSS idle:            $((idle / 1024)) MiB ($idle KiB)"
echo "RSS with $ACCOUNTS accounts: $((loaded / 1024)) MiB ($loaded KiB), peak $((peak / 1024)) MiB"
echo "per account:         $(( (loaded - idle) * 1024 / ACCOUNTS )) bytes; +$(( (loaded - idle) / 1024 )) MiB over idle"
echo "after GET /tokens listing all of them: $((after_tokens / 1024)) MiB"
