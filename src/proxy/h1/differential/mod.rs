//! Differential tests of the relay against hyper, the oracle: the same bytes go to both, and
//! they must agree. [`answers`]: on whether an upstream's answer is accepted and where it ends
//! (what the relay copies to the client verbatim). [`requests`]: a request head the relay
//! takes, hyper's server takes too, reads the same, and ends at the same byte.
//!
//! The engine is a seeded generator with byte mutations; `cargo test` runs a short, fixed-seed
//! round of each; `bench/framing.sh` runs long ones (`TOKENPROXY_FRAMING_CASES`,
//! `TOKENPROXY_FRAMING_SEED`). Both run in tokio's virtual time: a wait for bytes that will not
//! come ends as soon as nothing else can run, so a run costs CPU, not waiting.

mod answers;
mod requests;

/// A small, seeded generator (xorshift): the same seed gives the same inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// One to three byte edits (replace, insert, remove) with bytes from `alphabet`.
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>, alphabet: &[u8]) {
    for _ in 0..1 + rng.below(3) {
        if bytes.is_empty() {
            return;
        }
        let at = rng.below(bytes.len());
        let byte = *rng.pick(alphabet);
        match rng.below(3) {
            0 => bytes[at] = byte,
            1 => bytes.insert(at, byte),
            _ => {
                bytes.remove(at);
            }
        }
    }
}

/// How many cases and which seed: the environment's (`bench/framing.sh`), else these.
#[cfg(test)]
fn cases_and_seed(cases: usize, seed: u64) -> (usize, u64) {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    (
        var("TOKENPROXY_FRAMING_CASES").unwrap_or(cases),
        var("TOKENPROXY_FRAMING_SEED").unwrap_or(seed as usize) as u64,
    )
}
