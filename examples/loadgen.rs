//! A load generator for what wrk cannot do: HTTPS through a forward proxy. Each connection sends
//! `CONNECT`, makes a TLS handshake with whatever certificate the proxy shows, then sends
//! keep-alive `GET`s on the decrypted connection until the time is up. Used by `bench/run.sh`.
//!
//!   cargo run --release --example loadgen -- --proxy 127.0.0.1:8080 --target 127.0.0.1:8443 \
//!       --ca data/ca/ca.pem --connections 50 --duration 5
//!
//! With `--requests-per-connection N`, each connection closes after N requests and another takes
//! its place: `--requests-per-connection 1` measures what a new connection costs (CONNECT, a full
//! TLS handshake, one request). Session resumption is off, so every handshake is a full one.
//!
//! With `--h2-streams N`, each connection speaks HTTP/2 (ALPN `h2`) and carries N streams at once,
//! each sending requests one after another: `--connections 1 --h2-streams 50` is fifty concurrent
//! requests on one connection.
//!
//! Prints one line: `requests=… rps=… p50_us=… p99_us=… connections=… cps=… non2xx=… errors=…`.
//! It runs on one thread, so that pinning it with `taskset` pins all of it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Parser)]
struct Args {
    /// The forward proxy (loopback only). Without it, connections go straight to `--target`:
    /// for transparent mode, inside a network namespace whose iptables rules send them to the
    /// proxy (`bench/transparent.sh`).
    #[arg(long)]
    proxy: Option<SocketAddr>,
    /// The `host:port` to CONNECT to.
    #[arg(long)]
    target: String,
    #[arg(long, default_value = "/")]
    path: String,
    /// A PEM file of CA certificates to trust (the proxy's interception CA); repeatable.
    #[arg(long, required = true)]
    ca: Vec<PathBuf>,
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Requests per connection before it is closed and a new one made; 0 keeps each connection
    /// until the time is up.
    #[arg(long, default_value_t = 0)]
    requests_per_connection: u64,
    /// HTTP/2 with this many concurrent streams per connection (0: HTTP/1.1).
    #[arg(long, default_value_t = 0)]
    h2_streams: usize,
}

/// What one connection saw.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    /// Connections that completed their requests.
    connections: u64,
    non2xx: u64,
    errors: u64,
    first_error: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.proxy.is_none_or(|p| p.ip().is_loopback()), "the proxy must be on a loopback address");
    ensure!(args.duration > 0.0 && args.duration <= 600.0, "--duration must be in (0, 600] seconds");
    ensure!((1..=10_000).contains(&args.connections), "--connections must be 1..=10000");
    ensure!(args.h2_streams <= 1000, "--h2-streams must be 0..=1000");
    ensure!(
        args.h2_streams == 0 || args.requests_per_connection == 0,
        "--h2-streams keeps its connections: no --requests-per-connection"
    );
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    let mut roots = rustls::RootCertStore::empty();
    for path in &args.ca {
        for cert in
            CertificateDer::pem_file_iter(path).with_context(|| format!("reading {}", path.display()))?
        {
            roots.add(cert?)?;
        }
    }
    let mut tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    // HTTP/1.1 only and full handshakes only, so that every proxy is measured doing the same
    // thing (a proxy that sends session tickets would otherwise get cheaper resumed handshakes).
    tls.alpn_protocols = vec![if args.h2_streams > 0 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
    tls.resumption = rustls::client::Resumption::disabled();
    let tls = TlsConnector::from(Arc::new(tls));

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let args = Arc::new(args);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration);
    let tallies = runtime.block_on(async {
        let tasks: Vec<_> = (0..args.connections)
            .map(|_| tokio::spawn(connection(args.clone(), tls.clone(), deadline)))
            .collect();
        let mut tallies = Vec::new();
        for task in tasks {
            tallies.push(task.await.expect("a connection task panicked"));
        }
        tallies
    });
    let elapsed = started.elapsed().as_secs_f64();

    let mut latencies: Vec<u32> = tallies.iter().flat_map(|t| t.latencies_us.iter().copied()).collect();
    latencies.sort_unstable();
    let percentile = |p: f64| -> u32 {
        if latencies.is_empty() { 0 } else { latencies[((latencies.len() - 1) as f64 * p) as usize] }
    };
    let errors: u64 = tallies.iter().map(|t| t.errors).sum();
    if let Some(e) = tallies.iter().find_map(|t| t.first_error.as_ref()) {
        eprintln!("loadgen: {errors} connection(s) failed; the first: {e}");
    }
    let connections: u64 = tallies.iter().map(|t| t.connections).sum();
    println!(
        "requests={} rps={:.0} p50_us={} p99_us={} connections={} cps={:.0} non2xx={} errors={}",
        latencies.len(),
        latencies.len() as f64 / elapsed,
        percentile(0.50),
        percentile(0.99),
        connections,
        connections as f64 / elapsed,
        tallies.iter().map(|t| t.non2xx).sum::<u64>(),
        errors,
    );
    if latencies.is_empty() {
        bail!("no request succeeded");
    }
    Ok(())
}

/// One keep-alive connection through the proxy, sending requests one after another until
/// `deadline`; or, with `--requests-per-connection`, one connection after another.
async fn connection(args: Arc<Args>, tls: TlsConnector, deadline: Instant) -> Tally {
    let mut tally = Tally::default();
    while Instant::now() < deadline {
        if let Err(e) = requests(&args, &tls, deadline, &mut tally).await {
            tally.errors += 1;
            tally.first_error = Some(format!("{e:#}"));
            break;
        }
        tally.connections += 1;
        if args.requests_per_connection == 0 {
            break;
        }
    }
    tally
}

/// Makes a connection and sends its requests on it.
async fn requests(
    args: &Args,
    tls: &TlsConnector,
    deadline: Instant,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let tcp = match args.proxy {
        Some(proxy) => connect_tunnel(proxy, &args.target).await?,
        None => {
            let tcp = TcpStream::connect(args.target.as_str())
                .await
                .with_context(|| format!("connecting to {}", args.target))?;
            tcp.set_nodelay(true)?;
            tcp
        }
    };
    let host = args.target.rsplit_once(':').map_or(args.target.as_str(), |(host, _)| host);
    let server_name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())?;
    let stream = tls.connect(server_name, tcp).await.context("TLS handshake with the proxy")?;
    if args.h2_streams > 0 {
        ensure!(stream.get_ref().1.alpn_protocol() == Some(b"h2"), "the proxy did not agree to HTTP/2");
        return h2_streams(args, TokioIo::new(stream), deadline, tally).await;
    }
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let limit = match args.requests_per_connection {
        0 => u64::MAX,
        n => n,
    };
    let mut sent_here = 0;
    while sent_here < limit && Instant::now() < deadline {
        sent_here += 1;
        let req = http::Request::get(args.path.as_str())
            .header(http::header::HOST, args.target.as_str())
            .body(Empty::<Bytes>::new())?;
        let sent = Instant::now();
        let response = sender.send_request(req).await.context("request")?;
        let status = response.status();
        response.into_body().collect().await.context("response body")?;
        tally.latencies_us.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
        if !status.is_success() {
            tally.non2xx += 1;
        }
    }
    Ok(())
}

/// `--h2-streams` streams at once on one HTTP/2 connection, each sending requests one after
/// another until `deadline`.
async fn h2_streams<T>(args: &Args, io: T, deadline: Instant, tally: &mut Tally) -> anyhow::Result<()>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await?;
    tokio::spawn(conn);
    let uri = format!("https://{}{}", args.target, args.path);
    let streams = (0..args.h2_streams).map(|_| {
        let mut sender = sender.clone();
        let uri = uri.clone();
        async move {
            let mut latencies = Vec::new();
            let mut non2xx = 0;
            while Instant::now() < deadline {
                let req = http::Request::get(uri.as_str()).body(Empty::<Bytes>::new())?;
                let sent = Instant::now();
                sender.ready().await.context("HTTP/2 connection")?;
                let response = sender.send_request(req).await.context("request")?;
                let status = response.status();
                response.into_body().collect().await.context("response body")?;
                latencies.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                non2xx += u64::from(!status.is_success());
            }
            anyhow::Ok((latencies, non2xx))
        }
    });
    for stream in futures_util::future::join_all(streams).await {
        let (latencies, non2xx) = stream?;
        tally.latencies_us.extend(latencies);
        tally.non2xx += non2xx;
    }
    Ok(())
}

/// Opens a connection to the proxy and asks it for a tunnel to `target`.
async fn connect_tunnel(proxy: SocketAddr, target: &str) -> anyhow::Result<TcpStream> {
    let mut tcp = TcpStream::connect(proxy).await.with_context(|| format!("connecting to {proxy}"))?;
    tcp.set_nodelay(true)?;
    tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await?;
    // Read the answer's head one byte at a time: nothing after it may be consumed here, since the
    // TLS handshake reads the rest.
    let mut head = Vec::with_capacity(128);
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(head.len() < 8192, "the proxy's CONNECT answer has no end");
        let byte = tcp.read_u8().await.context("reading the CONNECT answer")?;
        head.push(byte);
    }
    let status_line = String::from_utf8_lossy(head.split(|&b| b == b'\r').next().unwrap_or_default());
    ensure!(status_line.split(' ').nth(1) == Some("200"), "CONNECT refused: {status_line}");
    Ok(tcp)
}
