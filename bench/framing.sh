#!/usr/bin/env bash
# The differential tests of the hand-written relay against hyper, long (src/proxy/h1/differential/):
# answers (the relay's answer framing against hyper's client: accepted or not, and where each
# answer ends) and request heads (a head the relay takes, hyper's server takes and reads alike).
# CASES generated inputs of each kind per seed (default 1 000 000), for each of SEEDS (default
# "1 2 3"), in a release build. Prints one line per kind and seed with the verdict counts and the
# disagreements (0, or the run fails with the first ones). The engine is a seeded property-style
# generator with byte mutations, in tokio's virtual time; cargo test runs 3 000 of each.
set -euo pipefail
cd "$(dirname "$0")/.."
CASES="${CASES:-1000000}"
SEEDS="${SEEDS:-1 2 3}"
status=0
for seed in $SEEDS; do
    TOKENPROXY_FRAMING_CASES="$CASES" TOKENPROXY_FRAMING_SEED="$seed" \
        cargo test --release --locked --lib differential -- --nocapture --test-threads 2 2>&1 |
        grep -E '^(framing|requests( \(origin form\))?):|disagree|panicked' || status=1
done
exit $status
