//! The client end of a connection, and who owns its socket.
//!
//! A pod's containers share one network namespace: the kernel's socket table lists the client's
//! own socket, with its owner's uid, under the client's address and port. That tells containers
//! apart with no change to the client. The kernel is asked for that one socket by its exact
//! 4-tuple over netlink (`sock_diag`), which costs the same however many sockets the table
//! holds; `/proc/net/tcp{,6}`, a text dump of every socket, is read only where netlink is
//! refused. Only sockets in tokenproxy's own network namespace are found: a client elsewhere has
//! no uid here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};

use super::Caller;

/// One client connection: where it comes from, the address it connected to (the listener's,
/// or for a redirected connection the original destination), and the listener's name.
pub struct Peer {
    pub addr: SocketAddr,
    pub local: SocketAddr,
    pub listener: &'static str,
    /// Looked up once, on the first request that needs it: a socket's owner does not change.
    uid: OnceLock<Option<u32>>,
    /// The caller the connection's last proxy credentials proved with a secret.
    known: Mutex<Option<Known>>,
}

struct Known {
    generation: u64,
    credentials: Box<[u8]>,
    caller: Arc<Caller>,
}

impl Peer {
    pub fn new(addr: SocketAddr, local: SocketAddr, listener: &'static str) -> Peer {
        Peer { addr, local, listener, uid: OnceLock::new(), known: Mutex::new(None) }
    }

    /// The caller these exact credentials proved on this connection, with the table of
    /// `generation` in force.
    pub(super) fn remembered(&self, generation: u64, credentials: &[u8]) -> Option<Arc<Caller>> {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let known = known.as_ref().filter(|k| k.generation == generation)?;
        super::identity::equal_in_constant_time(&known.credentials, credentials).then(|| known.caller.clone())
    }

    pub(super) fn remember(&self, generation: u64, credentials: &[u8], caller: &Arc<Caller>) {
        *self.known.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Known { generation, credentials: credentials.into(), caller: caller.clone() });
    }

    /// The uid owning the client's socket, if it is in this network namespace.
    pub fn uid(&self) -> Option<u32> {
        *self.uid.get_or_init(|| {
            let uid = socket_owner(self.addr, self.local);
            tracing::debug!(peer = %self.addr, uid, "socket owner looked up");
            uid
        })
    }
}

/// The owner of the TCP socket whose local end is `client` and whose remote end is `server`
/// (the client's side of the connection: its address and the one it dialled, both exact, so no
/// other socket on the same port can stand in for it).
pub fn socket_owner(client: SocketAddr, server: SocketAddr) -> Option<u32> {
    let (client, server) = (unmapped(client), unmapped(server));
    match sock_diag::owner(client, server) {
        Ok(uid) => uid,
        Err(error) => {
            tracing::debug!(%error, "netlink sock_diag refused; reading /proc/net/tcp");
            proc_table_owner(client, server)
        }
    }
}

/// The same answer from the kernel's text tables: every socket, so its cost grows with them.
fn proc_table_owner(client: SocketAddr, server: SocketAddr) -> Option<u32> {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(table).ok()?;
        text.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_ascii_whitespace().collect();
            let (local, remote, uid) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
            (parse_entry(local)? == client && parse_entry(remote)? == server).then(|| uid.parse().ok())?
        })
    })
}

/// One `SOCK_DIAG_BY_FAMILY` request for one TCP socket (`inet_diag_req_v2` with its exact
/// `inet_diag_sockid`), answered with an `inet_diag_msg` or an error. Layouts:
/// `linux/inet_diag.h`, `linux/netlink.h`.
mod sock_diag {
    use std::io;
    use std::net::{IpAddr, SocketAddr};

    use rustix::fd::OwnedFd;
    use rustix::net::{AddressFamily, SocketFlags, SocketType, netlink, socket_with};

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const IPPROTO_TCP: u8 = 6;
    const TCP_LISTEN: u8 = 10;
    const HEADER: usize = 16;
    /// `inet_diag_sockid`: sport, dport, src[16], dst[16], if, cookie[2].
    const SOCKID: usize = 48;
    const REQUEST: usize = HEADER + 8 + SOCKID;
    /// Where `idiag_uid` sits in an `inet_diag_msg`: four bytes, the sockid, three counters.
    const UID_AT: usize = 4 + SOCKID + 12;

    /// `Ok(None)`: the kernel has no such socket here. `Err`: netlink itself is unavailable.
    /// Each thread keeps one netlink socket; the sequence number ties an answer to its request.
    pub fn owner(client: SocketAddr, server: SocketAddr) -> io::Result<Option<u32>> {
        thread_local! {
            static SOCKET: std::cell::RefCell<Option<(OwnedFd, u32)>> = const { std::cell::RefCell::new(None) };
        }
        SOCKET.with_borrow_mut(|slot| {
            if slot.is_none() {
                let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
                *slot = Some((
                    socket_with(AddressFamily::NETLINK, SocketType::DGRAM, flags, Some(netlink::SOCK_DIAG))?,
                    0,
                ));
            }
            let (socket, sequence) = slot.as_mut().expect("just made");
            *sequence = sequence.wrapping_add(1);
            let asked = ask(socket, client, server, *sequence);
            if asked.is_err() {
                *slot = None; // a socket in an unknown state is not used again
            }
            asked
        })
    }

    fn ask(
        socket: &OwnedFd,
        client: SocketAddr,
        server: SocketAddr,
        sequence: u32,
    ) -> io::Result<Option<u32>> {
        let (request, id) = request(client, server, sequence);
        rustix::io::write(socket, &request)?;
        // The kernel answers within the write: the answer is there to read, and an older one
        // left behind by a failure is skipped by its sequence number.
        let mut answer = [0u8; 512];
        loop {
            let n = rustix::io::read(socket, &mut answer)?;
            let seq = answer.get(8..12).map(|b| u32::from_ne_bytes(b.try_into().unwrap()));
            if seq == Some(sequence) {
                return Ok(parse(&answer[..n], &id));
            }
        }
    }

    fn sockid(client: SocketAddr, server: SocketAddr) -> [u8; SOCKID] {
        let mut id = [0u8; SOCKID];
        id[0..2].copy_from_slice(&client.port().to_be_bytes());
        id[2..4].copy_from_slice(&server.port().to_be_bytes());
        let put = |slot: &mut [u8], ip: IpAddr| match ip {
            IpAddr::V4(v4) => slot[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => slot.copy_from_slice(&v6.octets()),
        };
        put(&mut id[4..20], client.ip());
        put(&mut id[20..36], server.ip());
        // idiag_if 0 (any); the cookie INET_DIAG_NOCOOKIE: look the socket up by address.
        id[40..48].fill(0xff);
        id
    }

    fn request(client: SocketAddr, server: SocketAddr, sequence: u32) -> ([u8; REQUEST], [u8; SOCKID]) {
        let mut message = [0u8; REQUEST];
        message[0..4].copy_from_slice(&(REQUEST as u32).to_ne_bytes());
        message[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        message[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        message[8..12].copy_from_slice(&sequence.to_ne_bytes());
        message[HEADER] = match client.ip() {
            IpAddr::V4(_) => AddressFamily::INET.as_raw() as u8,
            IpAddr::V6(_) => AddressFamily::INET6.as_raw() as u8,
        };
        message[HEADER + 1] = IPPROTO_TCP;
        message[HEADER + 4..HEADER + 8].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
        let id = sockid(client, server);
        message[HEADER + 8..].copy_from_slice(&id);
        (message, id)
    }

    /// The uid, if the answer describes the socket asked for. The kernel's lookup falls back to a
    /// listening socket on the client's address and port: its remote end (zero) tells it apart.
    pub(super) fn parse(answer: &[u8], asked: &[u8; SOCKID]) -> Option<u32> {
        let kind = u16::from_ne_bytes(answer.get(4..6)?.try_into().ok()?);
        // NLMSG_ERROR carries ENOENT when no socket matches.
        if kind != SOCK_DIAG_BY_FAMILY {
            return None;
        }
        let message = answer.get(HEADER..)?;
        let same_socket = message.get(4..4 + 36)? == &asked[..36] && message.get(1)? != &TCP_LISTEN;
        let uid = u32::from_ne_bytes(message.get(UID_AT..UID_AT + 4)?.try_into().ok()?);
        same_socket.then_some(uid)
    }
}

/// An IPv4 client seen through an IPv6 listener (`::ffff:a.b.c.d`) is in the IPv4 table.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6), as the kernel prints them: each
/// 32-bit word of the address in the host's byte order.
fn parse_entry(entry: &str) -> Option<SocketAddr> {
    let (address, port) = entry.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| u32::from_str_radix(address.get(i * 8..i * 8 + 8)?, 16).ok().map(u32::to_ne_bytes);
    let ip = match address.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(unmapped(SocketAddr::new(ip, port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_entries_read_in_host_order() {
        let loopback = u32::from_ne_bytes([127, 0, 0, 1]);
        let entry = format!("{loopback:08X}:1F90");
        assert_eq!(parse_entry(&entry), Some("127.0.0.1:8080".parse().unwrap()));
        let mut six = String::new();
        for word in Ipv6Addr::LOCALHOST.octets().chunks(4) {
            six.push_str(&format!("{:08X}", u32::from_ne_bytes(word.try_into().unwrap())));
        }
        assert_eq!(parse_entry(&format!("{six}:0050")), Some("[::1]:80".parse().unwrap()));
        assert_eq!(parse_entry("zz:1"), None);
    }

    #[test]
    fn the_owner_of_a_loopback_client_socket_is_this_process_user() {
        let me = unsafe_free_uid();
        for address in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = std::net::TcpListener::bind(address) else {
                eprintln!("skipped {address}: no such loopback here");
                continue;
            };
            let server = listener.local_addr().unwrap();
            let client = std::net::TcpStream::connect(server).unwrap();
            let (_accepted, peer) = listener.accept().unwrap();
            assert_eq!(peer, client.local_addr().unwrap());
            // Netlink and the text table agree, and the public lookup gives the same.
            assert_eq!(sock_diag::owner(peer, server).unwrap(), Some(me), "{address}");
            assert_eq!(proc_table_owner(unmapped(peer), unmapped(server)), Some(me), "{address}");
            assert_eq!(socket_owner(peer, server), Some(me), "{address}");
            // Another remote end: not that socket.
            let elsewhere = SocketAddr::new(server.ip(), 1);
            assert_eq!(socket_owner(peer, elsewhere), None);
            assert_eq!(proc_table_owner(unmapped(peer), elsewhere), None);
        }
    }

    #[test]
    fn a_listening_socket_on_the_clients_port_does_not_stand_in_for_the_client() {
        // The kernel's exact lookup falls back to a listener bound to the asked local address:
        // a client we cannot see (another namespace) must not take a listener's owner.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let bound = listener.local_addr().unwrap();
        let dialled: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(sock_diag::owner(bound, dialled).unwrap(), None);
        assert_eq!(socket_owner(bound, dialled), None);
    }

    #[test]
    fn a_short_or_foreign_netlink_answer_is_no_owner() {
        let asked = [0u8; 48];
        assert_eq!(sock_diag::parse(&[], &asked), None);
        assert_eq!(sock_diag::parse(&[0u8; 20], &asked), None);
        let mut truncated = vec![0u8; 16 + 40];
        truncated[4..6].copy_from_slice(&20u16.to_ne_bytes());
        assert_eq!(sock_diag::parse(&truncated, &asked), None);
    }

    /// This process's uid, read from the kernel's own report.
    fn unsafe_free_uid() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        line.split_ascii_whitespace().nth(1).unwrap().parse().unwrap()
    }
}
