//! Plain-HTTP/1.1 through the hand-written relay (`src/proxy/h1/`): what a client connection
//! borrows, keeps and gives back (SPEC §4 `max_idle_per_host`, `src/proxy/h1/pool.rs`),
//! every framing of an answer, header hygiene both ways, and the hand-over to hyper of what the
//! relay does not serve, against an upstream that numbers its connections and reports when each
//! one closes.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use support::*;

const TOKEN: &str = "tok-connections-7f3a";

/// What the upstream saw, in order.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    Accepted(usize),
    /// `head`: the request head as it arrived; `body`: the bytes its Content-Length announced.
    Request {
        conn: usize,
        path: String,
        authorization: Option<String>,
        head: String,
        body: String,
    },
    Closed(usize),
}

/// An HTTP/1.1 upstream written on raw sockets, so that a test controls exactly when it closes.
/// Every answer's body says `conn=<n> path=<path>`. Paths:
/// - `/close-after`: answers, then closes the connection 50 ms later without saying so first
///   (as a server whose keep-alive timeout fires does);
/// - `/close-header`: answers with `Connection: close` and closes;
/// - `/stream`: sends the head and half the body, then waits for the peer to go away;
/// - `/chunked`: a chunked body in three writes, with a trailer;
/// - `/late`: answers after 1.5 s;
/// - `/early`: `103 Early Hints`, then the answer;
/// - `/until-close`: a body with no length, ended by closing the connection;
/// - `/hop`: an answer with hop-by-hop headers, one of them named by `Connection`;
/// - anything else: answers (a `HEAD` without the body) and waits for the next request.
#[derive(Clone)]
struct Upstream {
    addr: std::net::SocketAddr,
    events: Arc<Mutex<Vec<Event>>>,
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = Upstream { addr: listener.local_addr().unwrap(), events: Arc::default() };
        let events = upstream.events.clone();
        tokio::spawn(async move {
            for conn in 1.. {
                let Ok((stream, _)) = listener.accept().await else { return };
                events.lock().unwrap().push(Event::Accepted(conn));
                tokio::spawn(serve(conn, stream, events.clone()));
            }
        });
        upstream
    }

    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    fn accepted(&self) -> usize {
        self.events().iter().filter(|e| matches!(e, Event::Accepted(_))).count()
    }

    fn closed(&self, conn: usize) -> bool {
        self.events().contains(&Event::Closed(conn))
    }

    /// The upstream connection each request arrived on, in order, with its Authorization.
    fn requests(&self) -> Vec<(usize, String, Option<String>)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Request { conn, path, authorization, .. } => Some((conn, path, authorization)),
                _ => None,
            })
            .collect()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The head and body of the request for `path`, as the upstream received them.
    fn request_to(&self, path: &str) -> (String, String) {
        self.events()
            .into_iter()
            .find_map(|e| match e {
                Event::Request { path: p, head, body, .. } if p == path => Some((head, body)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no request for {path}: {:?}", self.events()))
    }
}

async fn serve(conn: usize, stream: TcpStream, events: Arc<Mutex<Vec<Event>>>) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut line = String::new();
        if read.read_line(&mut line).await.unwrap_or(0) == 0 {
            break;
        }
        let method = line.split_whitespace().next().unwrap_or("?").to_string();
        let path = line.split_whitespace().nth(1).unwrap_or("?").to_string();
        let mut authorization = None;
        let mut head = line.clone();
        let mut length = 0;
        loop {
            let mut header = String::new();
            if read.read_line(&mut header).await.unwrap_or(0) == 0 {
                events.lock().unwrap().push(Event::Closed(conn));
                return;
            }
            head.push_str(&header);
            if header == "\r\n" {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("authorization") {
                    authorization = Some(value.trim().to_string());
                } else if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                }
            }
        }
        let mut request_body = vec![0u8; length];
        if read.read_exact(&mut request_body).await.is_err() {
            break;
        }
        let request_body = String::from_utf8(request_body).unwrap();
        events.lock().unwrap().push(Event::Request {
            conn,
            path: path.clone(),
            authorization,
            head,
            body: request_body,
        });
        let body = format!("conn={conn} path={path}");
        match path.as_str() {
            _ if method == "HEAD" => {
                let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                if write.write_all(answer.as_bytes()).await.is_err() {
                    break;
                }
            }
            "/chunked" => {
                let parts = [
                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n5\r\nfirst\r\n",
                    "7;ext=1\r\n second\r\n",
                    "6\r\n third\r\n0\r\nx-sum: 18\r\n\r\n",
                ];
                for part in parts {
                    let _ = write.write_all(part.as_bytes()).await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            "/late" => {
                // Answers after the proxy's upstream_timeout (1 s in the test that asks for it).
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                let _ = write.write_all(answer.as_bytes()).await;
            }
            "/early" => {
                let hints = "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n";
                let _ = write.write_all(hints.as_bytes()).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                let _ = write.write_all(answer.as_bytes()).await;
            }
            "/until-close" => {
                let _ = write.write_all(format!("HTTP/1.1 200 OK\r\n\r\n{body}").as_bytes()).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = write.write_all(b" and more").await;
                break;
            }
            "/hop" => {
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nConnection: x-private\r\nX-Private: hop\r\nKeep-Alive: timeout=5\r\n\
                     Proxy-Authenticate: Basic\r\nX-End: kept\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = write.write_all(answer.as_bytes()).await;
            }
            "/stream" => {
                let head = "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nfirst half";
                let _ = write.write_all(head.as_bytes()).await;
                let mut rest = [0u8; 1];
                let _ = read.read(&mut rest).await; // until the proxy goes away
                break;
            }
            "/close-header" => {
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = write.write_all(answer.as_bytes()).await;
                break;
            }
            _ => {
                let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                if write.write_all(answer.as_bytes()).await.is_err() {
                    break;
                }
                if path == "/close-after" {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    break;
                }
            }
        }
    }
    events.lock().unwrap().push(Event::Closed(conn));
}

/// A keep-alive client connection to the proxy, sending absolute-form requests by hand.
struct Client {
    stream: TcpStream,
}

impl Client {
    async fn connect(tp: &TokenProxy) -> Client {
        Client { stream: TcpStream::connect(tp.proxy).await.unwrap() }
    }

    fn request(upstream: &Upstream, path: &str) -> String {
        format!("GET {} HTTP/1.1\r\nHost: {}\r\n\r\n", upstream.url(path), upstream.addr)
    }

    async fn send(&mut self, upstream: &Upstream, path: &str) {
        self.stream.write_all(Self::request(upstream, path).as_bytes()).await.unwrap();
    }

    /// The next response's status line and body (by Content-Length).
    async fn response(&mut self) -> (String, String) {
        let head = read_head(&mut self.stream).await;
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
            })
            .expect("a Content-Length");
        let mut body = vec![0u8; length];
        tokio::time::timeout(Duration::from_secs(10), self.stream.read_exact(&mut body))
            .await
            .unwrap()
            .unwrap();
        (head.lines().next().unwrap().to_string(), String::from_utf8(body).unwrap())
    }

    /// An answer after which the connection closes: its head must say so, and its body is what
    /// comes until the close.
    async fn last_answer(&mut self) -> String {
        let head = read_head(&mut self.stream).await;
        assert_eq!(header(&head, "connection"), Some("close"), "{head}");
        let mut rest = String::new();
        tokio::time::timeout(Duration::from_secs(10), self.stream.read_to_string(&mut rest))
            .await
            .unwrap()
            .unwrap();
        rest
    }

    /// One request and its answer, which must be a 200 from the upstream.
    async fn get(&mut self, upstream: &Upstream, path: &str) -> String {
        self.send(upstream, path).await;
        let (status, body) = self.response().await;
        assert_eq!(status, "HTTP/1.1 200 OK", "{path}: {body}");
        body
    }
}

fn start_proxy(dir: &std::path::Path, upstream: &Upstream, max_idle_per_host: usize) -> TokenProxy {
    let token_file = dir.join("api.json");
    std::fs::write(&token_file, token_json(TOKEN)).unwrap();
    // One worker: upstream connections are pooled per worker thread, and these tests follow
    // one pool.
    let extra = format!("upstream_timeout = \"5s\"\nmax_idle_per_host = {max_idle_per_host}\nworkers = 1");
    TokenProxy::start(dir, &plain_config(&upstream.addr.to_string(), &token_file, &extra))
}

/// The upstream connection a response came over.
fn conn_of(body: &str) -> usize {
    body.strip_prefix("conn=").and_then(|rest| rest.split(' ').next()).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_keep_alive_client_connection_keeps_its_own_upstream_connection() {
    let upstream = Upstream::start().await;
    let dir = tempdir();
    let tp = start_proxy(dir.path(), &upstream, 64);
    let (mut x, mut y) = (Client::connect(&tp).await, Client::connect(&tp).await);

    // Taking turns, one request at a time: a pool shared per request would carry both clients'
    // requests on one upstream connection. From its second request on, each client connection
    // keeps one of its own.
    let mut x_conns = Vec::new();
    let mut y_conns = Vec::new();
    for i in 0..6 {
        x_conns.push(conn_of(&x.get(&upstream, &format!("/x{i}")).await));
        y_conns.push(conn_of(&y.get(&upstream, &format!("/y{i}")).await));
    }
    // The first requests borrowed (and gave back) the one connection there was.
    assert_eq!((x_conns[0], y_conns[0]), (1, 1), "x {x_conns:?} y {y_conns:?}");
    assert!(x_conns[1..].iter().all(|&c| c == x_conns[1]), "x moved between connections: {x_conns:?}");
    assert!(y_conns[1..].iter().all(|&c| c == y_conns[1]), "y moved between connections: {y_conns:?}");
    assert_ne!(x_conns[1], y_conns[1], "two client connections share an upstream connection");
    assert_eq!(upstream.accepted(), 2);
    // Every request carried the token.
    let requests = upstream.requests();
    assert_eq!(requests.len(), 12);
    assert!(
        requests.iter().all(|(_, _, auth)| auth.as_deref() == Some(&*format!("Bearer {TOKEN}"))),
        "{requests:?}"
    );

    // When a client connection closes, its upstream connection goes back to the pool, open,
    // and the next client connection's first request uses it: nothing new is dialled. (The
    // proxy closes its side as it lets go of the client connection, in the same step that gives
    // the upstream connection back: once x reads the end, that is done.)
    x.stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), x.stream.read_to_end(&mut rest)).await.unwrap().unwrap();
    let mut z = Client::connect(&tp).await;
    assert_eq!(conn_of(&z.get(&upstream, "/z").await), x_conns[1]);
    assert!(!upstream.closed(x_conns[1]));
    assert_eq!(upstream.accepted(), 2, "{:?}", upstream.events());
}

#[tokio::test]
async fn a_client_that_leaves_mid_response_closes_the_upstream_connection() {
    let upstream = Upstream::start().await;
    let dir = tempdir();
    let tp = start_proxy(dir.path(), &upstream, 64);
    let mut client = Client::connect(&tp).await;
    client.get(&upstream, "/first").await;
    client.send(&upstream, "/stream").await;
    let head = read_head(&mut client.stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let streaming = upstream.requests().last().unwrap().0;
    drop(client);
    // Half a response cannot be reused: the upstream connection is closed, not pooled.
    eventually(Duration::from_secs(5), "the upstream connection closed", || async {
        upstream.closed(streaming).then_some(())
    })
    .await;
    // And the proxy serves the next client on a new connection.
    let mut next = Client::connect(&tp).await;
    let conn = conn_of(&next.get(&upstream, "/after").await);
    assert_ne!(conn, streaming);
}

#[tokio::test]
async fn an_upstream_that_closes_between_requests_is_replaced_without_a_failed_request() {
    let upstream = Upstream::start().await;
    let dir = tempdir();
    let tp = start_proxy(dir.path(), &upstream, 64);
    let mut client = Client::connect(&tp).await;
    client.get(&upstream, "/one").await;

    // The kept connection says Connection: close; the proxy keeps the client connection and
    // dials again for the next request.
    let said_close = conn_of(&client.get(&upstream, "/close-header").await);
    let next = conn_of(&client.get(&upstream, "/two").await);
    assert_ne!(next, said_close);

    // The upstream closes the kept connection after answering, without a word (its keep-alive
    // timeout): the next request, once the close has arrived, goes over a new connection.
    let closing = conn_of(&client.get(&upstream, "/close-after").await);
    eventually(Duration::from_secs(5), "the upstream closed", || async {
        upstream.closed(closing).then_some(())
    })
    .await;
    let after = conn_of(&client.get(&upstream, "/three").await);
    assert_ne!(after, closing);
    // Nothing failed and every request carried the token.
    let requests = upstream.requests();
    assert_eq!(requests.len(), 5, "{requests:?}");
    assert!(requests.iter().all(|(_, _, auth)| auth.as_deref() == Some(&*format!("Bearer {TOKEN}"))));
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_each_with_the_token() {
    let upstream = Upstream::start().await;
    let dir = tempdir();
    let tp = start_proxy(dir.path(), &upstream, 64);
    let mut client = Client::connect(&tp).await;
    // Three requests in one write, before any answer.
    let burst: String = ["/p1", "/p2", "/p3"].iter().map(|p| Client::request(&upstream, p)).collect();
    client.stream.write_all(burst.as_bytes()).await.unwrap();
    for path in ["/p1", "/p2", "/p3"] {
        let (status, body) = client.response().await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(body.ends_with(&format!("path={path}")), "{path}: {body}");
    }
    let requests = upstream.requests();
    assert_eq!(requests.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(), ["/p1", "/p2", "/p3"]);
    assert!(requests.iter().all(|(_, _, auth)| auth.as_deref() == Some(&*format!("Bearer {TOKEN}"))));
}

#[tokio::test]
async fn beyond_max_idle_per_host_client_connections_borrow_and_idle_ones_are_capped() {
    let upstream = Upstream::start().await;
    let dir = tempdir();
    let tp = start_proxy(dir.path(), &upstream, 1);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Client::connect(&tp).await);
    }
    // Three clients in turns, four requests each: one of them may keep a connection, the other
    // two borrow one per request.
    for round in 0..4 {
        for (i, client) in clients.iter_mut().enumerate() {
            client.get(&upstream, &format!("/c{i}r{round}")).await;
        }
    }
    assert_eq!(upstream.requests().len(), 12);
    // At most one kept and one idle in the pool: never a connection per client.
    assert!(upstream.accepted() <= 2, "{:?}", upstream.events());
    // Once the clients leave, only one idle connection stays open.
    drop(clients);
    eventually(Duration::from_secs(5), "one upstream connection left open", || async {
        let events = upstream.events();
        let closed = events.iter().filter(|e| matches!(e, Event::Closed(_))).count();
        (upstream.accepted() - closed == 1).then_some(())
    })
    .await;
}

/// Reads a chunked body as it arrives on the wire, framing and trailer included.
async fn read_chunked(stream: &mut TcpStream) -> String {
    let mut raw = Vec::new();
    while !raw.ends_with(b"\r\n0\r\nx-sum: 18\r\n\r\n") {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte)).await {
            Ok(Ok(1)) => raw.push(byte[0]),
            _ => panic!("the chunked body ended early: {}", String::from_utf8_lossy(&raw)),
        }
    }
    String::from_utf8(raw).unwrap()
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test]
async fn answers_of_every_framing_are_relayed_whole_and_the_client_connection_goes_on() {
    let upstream = Upstream::start().await;
    let dir = tempdir();
    let tp = start_proxy(dir.path(), &upstream, 64);
    let mut client = Client::connect(&tp).await;

    // Chunked, in three writes with a trailer: relayed as it came, framing and all.
    client.send(&upstream, "/chunked").await;
    let head = read_head(&mut client.stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(header(&head, "transfer-encoding"), Some("chunked"), "{head}");
    assert_eq!(header(&head, "trailer"), None, "Trailer is hop-by-hop: {head}");
    let chunked = read_chunked(&mut client.stream).await;
    assert_eq!(chunked, "5\r\nfirst\r\n7;ext=1\r\n second\r\n6\r\n third\r\n0\r\nx-sum: 18\r\n\r\n");

    // HEAD: a length and no body; the next answer follows at once.
    let head_request = format!("HEAD {} HTTP/1.1\r\nHost: {}\r\n\r\n", upstream.url("/h"), upstream.addr);
    client.stream.write_all(head_request.as_bytes()).await.unwrap();
    let head = read_head(&mut client.stream).await;
    assert!(head.starts_with("HTTP/1.1 200") && header(&head, "content-length").is_some(), "{head}");
    let body = client.get(&upstream, "/after-head").await;
    assert!(body.ends_with("path=/after-head"), "{body}");

    // 103 Early Hints is passed on before the answer.
    client.send(&upstream, "/early").await;
    let hints = read_head(&mut client.stream).await;
    assert!(hints.starts_with("HTTP/1.1 103"), "{hints}");
    assert_eq!(header(&hints, "link"), Some("</style.css>; rel=preload"));
    let (status, body) = client.response().await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.ends_with("path=/early"), "{body}");

    // All of it over one upstream connection after the first borrow, each with the token.
    let requests = upstream.requests();
    assert_eq!(requests.len(), 4, "{requests:?}");
    assert!(requests.iter().all(|(_, _, auth)| auth.as_deref() == Some(&*format!("Bearer {TOKEN}"))));
    assert!(upstream.accepted() <= 2, "{:?}", upstream.events());

    // A body that ends when the upstream closes: the client gets all of it, told that the
    // connection closes, and then the close.
    client.send(&upstream, "/until-close").await;
    let rest = client.last_answer().await;
    assert!(rest.ends_with("path=/until-close and more"), "{rest}");
}

#[tokio::test]
async fn hop_by_hop_and_tokenproxys_own_headers_are_removed_both_ways() {
    let upstream = Upstream::start().await;
    let dir = tempdir();
    let tp = start_proxy(dir.path(), &upstream, 64);
    let mut client = Client::connect(&tp).await;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: wrong.example\r\nConnection: keep-alive, x-client-hop\r\nX-Client-Hop: 1\r\n\
         Keep-Alive: timeout=5\r\nProxy-Authorization: Basic dXNlcjpwYXNzd29yZA==\r\nTokenproxy-Account: someone\r\n\
         TE: gzip\r\nAuthorization: Bearer the-apps-own\r\nX-End: 1\r\n\r\n",
        upstream.url("/hop")
    );
    client.stream.write_all(request.as_bytes()).await.unwrap();
    let (status, _) = client.response().await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let (head, _) = upstream.request_to("/hop");
    let lower = head.to_ascii_lowercase();
    for gone in
        ["x-client-hop", "keep-alive", "proxy-authorization", "tokenproxy-account", "te:", "the-apps-own"]
    {
        assert!(!lower.contains(gone), "{gone} reached the upstream:\n{head}");
    }
    assert_eq!(header(&head, "host"), Some(&*upstream.addr.to_string()), "{head}");
    assert_eq!(header(&head, "x-end"), Some("1"), "{head}");
    assert_eq!(header(&head, "authorization"), Some(&*format!("Bearer {TOKEN}")), "{head}");

    // The answer's own hop-by-hop headers stay between the upstream and tokenproxy.
    client.send(&upstream, "/hop").await;
    let head = read_head(&mut client.stream).await;
    for gone in ["x-private", "keep-alive", "proxy-authenticate", "connection"] {
        assert_eq!(header(&head, gone), None, "{gone} reached the client:\n{head}");
    }
    assert_eq!(header(&head, "x-end"), Some("kept"), "{head}");
}

#[tokio::test]
async fn requests_the_relay_does_not_serve_go_to_hyper_in_order_on_the_same_connection() {
    let upstream = Upstream::start().await;
    let dir = tempdir();
    let tp = start_proxy(dir.path(), &upstream, 64);
    let mut client = Client::connect(&tp).await;
    // Pipelined in one write: a GET (relayed by hand), a POST with a body (handed over with the
    // bytes already read) and a GET after it (served by hyper from then on).
    let post = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Length: 11\r\n\r\nhello there",
        upstream.url("/p2"),
        upstream.addr
    );
    let burst = format!("{}{post}{}", Client::request(&upstream, "/p1"), Client::request(&upstream, "/p3"));
    client.stream.write_all(burst.as_bytes()).await.unwrap();
    for path in ["/p1", "/p2", "/p3"] {
        let (status, body) = client.response().await;
        assert_eq!(status, "HTTP/1.1 200 OK", "{path}");
        assert!(body.ends_with(&format!("path={path}")), "{path}: {body}");
    }
    assert_eq!(upstream.request_to("/p2").1, "hello there");
    let requests = upstream.requests();
    assert_eq!(requests.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(), ["/p1", "/p2", "/p3"]);
    assert!(requests.iter().all(|(_, _, auth)| auth.as_deref() == Some(&*format!("Bearer {TOKEN}"))));

    // A client that says close is answered, told so, and closed.
    let closing = format!("GET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", upstream.url("/last"));
    let mut fresh = Client::connect(&tp).await;
    fresh.stream.write_all(closing.as_bytes()).await.unwrap();
    let rest = fresh.last_answer().await;
    assert!(rest.ends_with("path=/last"), "{rest}");
}

#[tokio::test]
async fn an_accounts_first_request_is_relayed_after_its_read_and_the_connection_stays_on_the_relay() {
    // The relay copies a header line as the client wrote it; hyper's client writes names in
    // lower case. So the upstream tells which path served each request.
    let upstream = Upstream::start().await;
    let dir = tempdir();
    std::fs::create_dir(dir.path().join("users")).unwrap();
    std::fs::write(dir.path().join("users/alice.json"), token_json("tok-alice-5e1f")).unwrap();
    let template = dir.path().join("users/{account}.json");
    let tp = TokenProxy::start(dir.path(), &plain_config(&upstream.addr.to_string(), &template, ""));
    let mut client = Client::connect(&tp).await;
    for path in ["/first", "/second"] {
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nTokenproxy-Account: alice\r\nX-Mixed-Case: 1\r\n\r\n",
            upstream.url(path),
            upstream.addr
        );
        client.stream.write_all(request.as_bytes()).await.unwrap();
        let (status, body) = client.response().await;
        assert_eq!(status, "HTTP/1.1 200 OK", "{path}: {body}");
        let (head, _) = upstream.request_to(path);
        assert!(head.contains("X-Mixed-Case: 1"), "{path} did not go through the relay: {head}");
    }
    let requests = upstream.requests();
    assert!(
        requests.iter().all(|(_, _, auth)| auth.as_deref() == Some("Bearer tok-alice-5e1f")),
        "{requests:?}"
    );
}

#[tokio::test]
async fn an_answer_that_comes_too_late_is_never_taken_for_the_next_ones() {
    let upstream = Upstream::start().await;
    let dir = tempdir();
    let token_file = dir.path().join("api.json");
    std::fs::write(&token_file, token_json(TOKEN)).unwrap();
    let extra = "upstream_timeout = \"1s\"";
    let tp = TokenProxy::start(dir.path(), &plain_config(&upstream.addr.to_string(), &token_file, extra));
    let mut client = Client::connect(&tp).await;
    client.get(&upstream, "/first").await;
    client.get(&upstream, "/kept").await;
    client.send(&upstream, "/late").await;
    let (status, body) = client.response().await;
    assert_eq!(status, "HTTP/1.1 504 Gateway Timeout", "{body}");
    // The late answer will still arrive on that upstream connection: the next request must not
    // read it as its own.
    let body = client.get(&upstream, "/next").await;
    assert!(body.ends_with("path=/next"), "{body}");
}
