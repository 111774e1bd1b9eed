#!/usr/bin/env bash
# The differential test of the relay's answer framing against hyper's client, long: CASES
# generated answers per seed (default 1 000 000), for each of SEEDS (default "1 2 3"), in a
# release build. Prints one line per seed with the verdict counts and the disagreements (0, or
# the run fails with the first ones). The engine is a seeded property-style generator with
# mutations (src/proxy/framing_differential.rs); cargo test runs 3 000 of them.
set -euo pipefail
cd "$(dirname "$0")/.."
CASES="${CASES:-1000000}"
SEEDS="${SEEDS:-1 2 3}"
for seed in $SEEDS; do
    TOKENPROXY_FRAMING_CASES="$CASES" TOKENPROXY_FRAMING_SEED="$seed" \
        cargo test --release --locked --lib the_relay_and_hyper_agree_on_where_every_answer_ends -- --nocapture 2>&1 |
        grep -E '^framing|disagree|panicked'
done
