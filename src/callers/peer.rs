//! The client end of a connection, and who owns its socket.
//!
//! A pod's containers share one network namespace: the kernel's socket table
//! (`/proc/net/tcp`, `/proc/net/tcp6`) lists the client's own socket, with its owner's uid,
//! under the client's address and port. That tells containers apart with no change to the
//! client. Only sockets in tokenproxy's own network namespace are listed: a client elsewhere has
//! no uid here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;

/// One client connection: where it comes from, the address it connected to (the listener's,
/// or for a redirected connection the original destination), and the listener's name.
pub struct Peer {
    pub addr: SocketAddr,
    pub local: SocketAddr,
    pub listener: &'static str,
    /// Looked up once, on the first request that needs it: a socket's owner does not change.
    uid: OnceLock<Option<u32>>,
}

impl Peer {
    pub fn new(addr: SocketAddr, local: SocketAddr, listener: &'static str) -> Peer {
        Peer { addr, local, listener, uid: OnceLock::new() }
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
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(table).ok()?;
        text.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_ascii_whitespace().collect();
            let (local, remote, uid) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
            (parse_entry(local)? == client && parse_entry(remote)? == server).then(|| uid.parse().ok())?
        })
    })
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
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_accepted, peer) = listener.accept().unwrap();
        let me = unsafe_free_uid();
        assert_eq!(socket_owner(peer, listener.local_addr().unwrap()), Some(me));
        // Another remote end: not that socket.
        let elsewhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(socket_owner(peer, elsewhere), None);
        drop(client);
    }

    /// This process's uid, read from the kernel's own report.
    fn unsafe_free_uid() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        line.split_ascii_whitespace().nth(1).unwrap().parse().unwrap()
    }
}
