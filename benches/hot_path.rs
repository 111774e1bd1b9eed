//! The per-request hot path, piece by piece: picking the provider for a host, building the
//! header from the cached token (also while another thread keeps swapping the token), picking
//! an account among 10, 10 000 and 100 000 loaded ones, and looking up an intercepted host's
//! leaf certificate.
//!
//!     cargo bench --bench hot_path

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::HeaderMap;
use tokenproxy::config::Config;
use tokenproxy::config::FileFormat;
use tokenproxy::tls::ca::CertificateAuthority;
use tokenproxy::tls::leaf::LeafCache;
use tokenproxy::tokens::file::parse;
use tokenproxy::tokens::store::FileStore;
use tokenproxy::tokens::{Provider, Providers};

/// Twenty providers, as a busy sidecar might have: exact hosts, ports and wildcards.
fn providers(dir: &std::path::Path) -> Providers {
    let mut toml = String::from("[proxy]\nlisten = \"127.0.0.1:0\"\n");
    for i in 0..20 {
        let hosts = match i % 3 {
            0 => format!("\"api{i}.example.com\", \"upload{i}.example.com\""),
            1 => format!("\"*.svc{i}.example.net\""),
            _ => format!("\"10.0.0.{i}:8443\", \"host{i}.internal:8443\""),
        };
        std::fs::write(
            dir.join(format!("p{i}.json")),
            format!(r#"{{"access_token":"token-{i}-abcdefghijklmnopqrstuvwxyz","expires_at":"2099-01-01T00:00:00Z"}}"#),
        )
        .unwrap();
        toml += &format!("[providers.p{i}]\nhosts = [{hosts}]\ntoken_file = \"p{i}.json\"\n");
    }
    std::fs::write(dir.join("tp.toml"), toml).unwrap();
    let config = Config::load(&dir.join("tp.toml")).unwrap();
    let store = Arc::new(FileStore::new(&config.providers));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(Providers::load(&config.providers, None, Duration::from_secs(30), store))
}

fn hot_path(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let providers = providers(dir.path());

    let mut group = c.benchmark_group("host_matching");
    group.bench_function("exact hit (last provider)", |b| {
        b.iter(|| providers.for_host(black_box("api18.example.com"), 443).is_some())
    });
    group.bench_function("wildcard hit", |b| {
        b.iter(|| providers.for_host(black_box("a.b.svc19.example.net"), 443).is_some())
    });
    group.bench_function("miss", |b| {
        b.iter(|| providers.for_host(black_box("www.unrelated.org"), 443).is_some())
    });
    group.finish();

    let provider = providers.for_host("api18.example.com", 443).unwrap().clone();
    let mut headers = HeaderMap::new();
    c.bench_function("pick provider + build header", |b| {
        b.iter(|| {
            let p = providers.for_host(black_box("api18.example.com"), 443).unwrap();
            let token = p.single().unwrap().current().unwrap();
            headers.insert(p.config.header.clone(), token.header_value().clone());
        })
    });

    // The same while another thread refreshes the token: once a millisecond (a few million times
    // more often than a real token changes), then as fast as it can (the worst case: the reader
    // pays for the cache line that the writer keeps taking).
    for (label, pause) in [
        ("pick provider + build header, token swapped every 1 ms", Some(Duration::from_millis(1))),
        ("pick provider + build header, token swapped in a tight loop", None),
    ] {
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = spawn_swapper(provider.clone(), stop.clone(), pause);
        c.bench_function(label, |b| {
            b.iter(|| {
                let p = providers.for_host(black_box("api18.example.com"), 443).unwrap();
                let token = p.single().unwrap().current().unwrap();
                headers.insert(p.config.header.clone(), token.header_value().clone());
            })
        });
        stop.store(true, Ordering::Relaxed);
        let swaps = swapper.join().unwrap();
        println!("(the swapper made {swaps} token swaps meanwhile)");
    }

    accounts(c);

    tokenproxy::tls::install_crypto_provider();
    let leaves = LeafCache::new(CertificateAuthority::load_or_create(&dir.path().join("ca")).unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(leaves.server_config("api.example.com")).unwrap();
    c.bench_function("leaf certificate lookup (cached)", |b| {
        b.iter(|| runtime.block_on(leaves.server_config(black_box("api.example.com"))).unwrap())
    });
}

/// Account lookup + header build for a multi-account provider with `n` loaded accounts: what a
/// request that names its account costs (SPEC §8), against the single-account figure above.
fn accounts(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let mut group = c.benchmark_group("account lookup + build header");
    for n in [10usize, 10_000, 100_000] {
        let dir = tempfile::tempdir().unwrap();
        let provider = runtime.block_on(load_accounts(dir.path(), n));
        let mut headers = HeaderMap::new();
        let mut lookup = |name: &str| {
            let credential = provider
                .credential_for(Some(black_box(name)))
                .now_or_never()
                .expect("a loaded account is found without waiting")
                .unwrap();
            let token = credential.current().unwrap();
            headers.insert(provider.config.header.clone(), token.header_value().clone());
        };
        // Every request for another account, in an order no prefetcher follows: the memory-bound
        // worst case. The names lie side by side in one buffer (fixed width), as close as a bench
        // gets to a request's header bytes, which are fresh in cache.
        let width = account_name(0).len();
        let packed: String = (0..n).map(account_name).collect();
        let mut i = 0usize;
        group.bench_function(format!("{n} accounts, each request another account"), |b| {
            b.iter(|| {
                i = (i + 7919) % n;
                lookup(&packed[i * width..(i + 1) * width])
            })
        });
        // One account again and again among `n` loaded: the lookup itself.
        let hot = account_name(n / 2);
        group.bench_function(format!("{n} accounts, the same account"), |b| b.iter(|| lookup(&hot)));
    }
    group.finish();
}

fn account_name(i: usize) -> String {
    format!("user{i:06}@example.com")
}

/// A multi-account provider with `n` accounts, each with its token file, all loaded.
async fn load_accounts(dir: &std::path::Path, n: usize) -> Arc<Provider> {
    std::fs::create_dir_all(dir.join("tokens")).unwrap();
    for i in 0..n {
        std::fs::write(
            dir.join(format!("tokens/{}.json", account_name(i))),
            format!(r#"{{"access_token":"token-{i}-abcdefghijklmnopqrstuvwxyz","expires_at":"2099-01-01T00:00:00Z"}}"#),
        )
        .unwrap();
    }
    let toml = "[providers.many]\nhosts = [\"api.example.com\"]\ntoken_file = \"tokens/{account}.json\"\n";
    std::fs::write(dir.join("tp.toml"), toml).unwrap();
    let config = Config::load(&dir.join("tp.toml")).unwrap();
    let store = Arc::new(FileStore::new(&config.providers));
    let providers = Providers::load(&config.providers, None, Duration::from_secs(30), store).await;
    let provider = providers.get("many").unwrap().clone();
    for i in 0..n {
        provider.credential_for(Some(&account_name(i))).await.unwrap();
    }
    assert_eq!(provider.credentials().len(), n);
    provider
}

/// A thread that adopts a new token every `pause` (or back to back) until `stop`; returns how
/// many swaps it made.
fn spawn_swapper(
    provider: Arc<Provider>,
    stop: Arc<AtomicBool>,
    pause: Option<Duration>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let docs: Vec<_> = (0..2)
            .map(|i| {
                let json = format!(r#"{{"access_token":"swapped-{i}","expires_at":"2099-01-01T00:00:00Z"}}"#);
                parse(FileFormat::Json, json.as_bytes()).unwrap()
            })
            .collect();
        let mut swaps = 0u64;
        while !stop.load(Ordering::Relaxed) {
            provider.adopt(provider.single().unwrap(), &docs[(swaps % 2) as usize]).unwrap();
            swaps += 1;
            if let Some(pause) = pause {
                std::thread::sleep(pause);
            }
        }
        swaps
    })
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
