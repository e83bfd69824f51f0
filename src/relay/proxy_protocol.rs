//! The PROXY protocol (v1 text and v2 binary, as HAProxy specifies it:
//! <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>), read before TLS when the
//! relay sits behind an L4 load balancer, so that admission caps and logs see the client's
//! address instead of the balancer's.
//!
//! [`parse`] is pure and never reads past the header; [`read_header`] feeds it from a socket
//! asking for no more bytes than the header can still need, so whatever follows (the TLS
//! ClientHello) stays in the socket for the TLS acceptor and nothing has to be replayed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest v1 line, CRLF included (the specification's bound: a TCP6 line at its widest).
pub const MAX_V1: usize = 107;
/// The longest v2 header accepted, signature and TLVs included: what fits in the smallest
/// TCP segment every path carries (the specification's advice), ample for the addresses and
/// the few TLVs balancers add (AWS VPC endpoint ids, Azure Private Link ids).
pub const MAX_V2: usize = 536;
/// A v2 header's fixed part: signature, version and command, family, length.
const V2_FIXED: usize = 16;
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// The shortest v1 line ("PROXY UNKNOWN\r\n"): reading this much never reads past a header.
const V1_MIN: usize = 15;

/// What a PROXY header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// Relayed for a client: its address and the one it connected to.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The balancer speaking for itself (v2 LOCAL, v1 UNKNOWN, a v2 family other than TCP
    /// over IPv4 or IPv6, e.g. its health checks): the socket's own peer is the client.
    Local,
}

impl Header {
    /// The client's address: the declared source, or `peer` for a [`Header::Local`] one.
    pub fn client(&self, peer: SocketAddr) -> SocketAddr {
        match self {
            Header::Proxied { source, .. } => *source,
            Header::Local => peer,
        }
    }
}

/// Why bytes are not a PROXY header. Messages are bounded: they quote at most a v1 line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY protocol signature (neither 'PROXY ' nor the v2 signature)")]
    Signature,
    #[error("PROXY v1 line has no CRLF within {MAX_V1} bytes")]
    V1TooLong,
    #[error("PROXY v1 line is not ASCII text")]
    V1NotText,
    #[error("PROXY v1 line {0:?} is not 'PROXY TCP4|TCP6 SOURCE DESTINATION SPORT DPORT'")]
    V1Fields(String),
    #[error("PROXY v1 address {0:?} is not of the announced family")]
    V1Address(String),
    #[error("PROXY v1 port {0:?} is not a decimal number up to 65535")]
    V1Port(String),
    #[error("PROXY v2 version {0} is not 2")]
    V2Version(u8),
    #[error("PROXY v2 command {0:#x} is neither LOCAL nor PROXY")]
    V2Command(u8),
    #[error("PROXY v2 family and protocol byte {0:#04x} is not defined")]
    V2Family(u8),
    #[error("PROXY v2 header of {0} bytes is longer than the {MAX_V2} accepted")]
    V2TooLong(usize),
    #[error("PROXY v2 addresses need {need} bytes, the header carries {have}")]
    V2Short { need: usize, have: usize },
}

/// Reads one PROXY header from the start of `buf`: `Ok(None)` while `buf` is a valid but
/// incomplete beginning, `Ok(Some((header, consumed)))` once complete (bytes after
/// `consumed` are the connection's own), or why it can never be one. TLVs are skipped.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first == V2_SIGNATURE[0] {
        parse_v2(buf)
    } else if first == V1_PREFIX[0] {
        parse_v1(buf)
    } else {
        Err(ProxyError::Signature)
    }
}

/// How many more bytes `buf` (a beginning [`parse`] called incomplete) needs at least: a read
/// of this many never takes a byte past the header.
fn wanted(buf: &[u8]) -> usize {
    match buf.first() {
        None => 1,
        Some(&b) if b == V1_PREFIX[0] => V1_MIN.saturating_sub(buf.len()).max(1),
        Some(_) if buf.len() < V2_FIXED => V2_FIXED - buf.len(),
        Some(_) => (V2_FIXED + v2_len(buf)).saturating_sub(buf.len()).max(1),
    }
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    let head = &buf[..buf.len().min(V1_PREFIX.len())];
    if head != &V1_PREFIX[..head.len()] {
        return Err(ProxyError::Signature);
    }
    let window = &buf[..buf.len().min(MAX_V1)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if window.len() >= MAX_V1 {
            Err(ProxyError::V1TooLong)
        } else if window.iter().any(|b| !b.is_ascii() || *b == b'\n') {
            // Fail early on what cannot become a line, rather than at the deadline.
            Err(ProxyError::V1NotText)
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&window[..end])
        .ok()
        .filter(|l| l.is_ascii())
        .ok_or(ProxyError::V1NotText)?;
    let fields: Vec<&str> = line.split(' ').collect();
    let header = match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Header::Local,
        ["PROXY", family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let v4 = *family == "TCP4";
            Header::Proxied {
                source: SocketAddr::new(v1_address(src, v4)?, v1_port(sport)?),
                destination: SocketAddr::new(v1_address(dst, v4)?, v1_port(dport)?),
            }
        }
        _ => return Err(ProxyError::V1Fields(line.to_string())),
    };
    Ok(Some((header, end + 2)))
}

fn v1_address(text: &str, v4: bool) -> Result<IpAddr, ProxyError> {
    let ip = if v4 {
        Ipv4Addr::from_str(text).map(IpAddr::V4).ok()
    } else {
        Ipv6Addr::from_str(text).map(IpAddr::V6).ok()
    };
    ip.ok_or_else(|| ProxyError::V1Address(text.to_string()))
}

fn v1_port(text: &str) -> Result<u16, ProxyError> {
    // `u16::from_str` would take a leading '+'; the specification has digits only.
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ProxyError::V1Port(text.to_string()));
    }
    text.parse()
        .map_err(|_| ProxyError::V1Port(text.to_string()))
}

/// The v2 length field: address block and TLVs after the fixed 16 bytes.
fn v2_len(buf: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([buf[14], buf[15]]))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    let head = &buf[..buf.len().min(V2_SIGNATURE.len())];
    if head != &V2_SIGNATURE[..head.len()] {
        return Err(ProxyError::Signature);
    }
    if let Some(&version_command) = buf.get(12) {
        if version_command >> 4 != 2 {
            return Err(ProxyError::V2Version(version_command >> 4));
        }
        if version_command & 0x0f > 1 {
            return Err(ProxyError::V2Command(version_command & 0x0f));
        }
    }
    // LOCAL discards the address block, family included (the specification's words).
    let local = buf.get(12).is_some_and(|vc| vc & 0x0f == 0);
    if let Some(&family) = buf.get(13).filter(|_| !local) {
        if family >> 4 > 3 || family & 0x0f > 2 {
            return Err(ProxyError::V2Family(family));
        }
    }
    if buf.len() < V2_FIXED {
        return Ok(None);
    }
    let total = V2_FIXED + v2_len(buf);
    if total > MAX_V2 {
        return Err(ProxyError::V2TooLong(total));
    }
    if buf.len() < total {
        return Ok(None);
    }
    let block = &buf[V2_FIXED..total];
    // The address block's size by family; TLVs, if any, follow it and are not needed here.
    let need = match buf[13] >> 4 {
        _ if local => 0,
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    if block.len() < need {
        return Err(ProxyError::V2Short {
            need,
            have: block.len(),
        });
    }
    let header = match (local, buf[13]) {
        // TCP over IPv4.
        (false, 0x11) => Header::Proxied {
            source: SocketAddr::new(ipv4(&block[0..4]), port(&block[8..10])),
            destination: SocketAddr::new(ipv4(&block[4..8]), port(&block[10..12])),
        },
        // TCP over IPv6.
        (false, 0x21) => Header::Proxied {
            source: SocketAddr::new(ipv6(&block[0..16]), port(&block[32..34])),
            destination: SocketAddr::new(ipv6(&block[16..32]), port(&block[34..36])),
        },
        // LOCAL, UNSPEC, UDP or unix sockets: the connection's own endpoints stand.
        _ => Header::Local,
    };
    Ok(Some((header, total)))
}

fn ipv4(b: &[u8]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

fn ipv6(b: &[u8]) -> IpAddr {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(b);
    IpAddr::V6(Ipv6Addr::from(octets))
}

fn port(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// Why a connection's PROXY header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the connection closed before its PROXY header was complete")]
    Closed,
    #[error("reading the PROXY header")]
    Read(#[source] std::io::Error),
    #[error("invalid PROXY header")]
    Invalid(#[source] ProxyError),
}

/// Reads exactly one PROXY header from `io` and nothing after it. The caller bounds it with
/// a deadline; the buffer is bounded by [`MAX_V2`] (larger than [`MAX_V1`]).
pub async fn read_header<S: AsyncRead + Unpin>(io: &mut S) -> Result<Header, ReadError> {
    let mut buf = [0u8; MAX_V2];
    let mut len = 0;
    loop {
        match parse(&buf[..len]).map_err(ReadError::Invalid)? {
            Some((header, _)) => return Ok(header),
            None => {
                // `parse` has bounded the length, so this stays within `buf`.
                let end = (len + wanted(&buf[..len])).min(MAX_V2);
                match io.read(&mut buf[len..end]).await {
                    Ok(0) => return Err(ReadError::Closed),
                    Ok(n) => len += n,
                    Err(e) => return Err(ReadError::Read(e)),
                }
            }
        }
    }
}

/// A trusted source of PROXY headers: an address, or a network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an address or a CIDR network (e.g. 10.0.0.0/8, 2001:db8::/32)")]
pub struct CidrError(String);

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let err = || CidrError(s.chars().take(64).collect());
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let network: IpAddr = addr.parse().map_err(|_| err())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(err)?
            }
            Some(_) => return Err(err()),
        };
        Ok(Cidr { network, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is in this network; IPv4-mapped IPv6 addresses count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// The relay's PROXY protocol setting: on, and from whom headers are taken.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyProtocol {
    /// Peers allowed to send headers (the balancers); empty means any peer, which is safe
    /// only when the relay is reachable through the balancers alone.
    pub trusted: Vec<Cidr>,
}

impl ProxyProtocol {
    /// Whether a connection from `peer` may carry a PROXY header.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.trusted.is_empty() || self.trusted.iter().any(|c| c.contains(peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.push(0x20 | command);
        b.push(family);
        b.extend_from_slice(&(block.len() as u16).to_be_bytes());
        b.extend_from_slice(block);
        b
    }

    fn v4_block() -> Vec<u8> {
        let mut b = vec![203, 0, 113, 7, 10, 0, 0, 1];
        b.extend_from_slice(&51234u16.to_be_bytes());
        b.extend_from_slice(&443u16.to_be_bytes());
        b
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let line = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n\x16\x03\x01";
        let (h, n) = parse(line).unwrap().unwrap();
        assert_eq!(
            n,
            line.len() - 3,
            "the bytes after CRLF are not the header's"
        );
        assert_eq!(
            h,
            Header::Proxied {
                source: addr("203.0.113.7:51234"),
                destination: addr("10.0.0.1:443")
            }
        );
        let line = b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 0\r\n";
        let (h, n) = parse(line).unwrap().unwrap();
        assert_eq!(n, line.len());
        assert_eq!(h.client(addr("127.0.0.1:1")), addr("[2001:db8::7]:65535"));
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n").unwrap(),
            Some((Header::Local, 15))
        );
        let (h, _) = parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.client(addr("10.1.1.1:9")), addr("10.1.1.1:9"));
        // The specification's widest lines: TCP6 at 104 bytes, UNKNOWN with addresses at 107.
        let wide = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let tcp6 = format!("PROXY TCP6 {wide} {wide} 65535 65535\r\n");
        assert_eq!(tcp6.len(), 104);
        assert!(parse(tcp6.as_bytes()).unwrap().is_some());
        let unknown = format!("PROXY UNKNOWN {wide} {wide} 65535 65535\r\n");
        assert_eq!(unknown.len(), MAX_V1);
        assert_eq!(
            parse(unknown.as_bytes()).unwrap(),
            Some((Header::Local, MAX_V1))
        );
    }

    #[test]
    fn v1_refusals() {
        let bad = |b: &[u8]| parse(b).unwrap_err();
        assert!(matches!(
            bad(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234\r\n"),
            ProxyError::V1Fields(_)
        ));
        assert!(matches!(
            bad(b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n"),
            ProxyError::V1Address(_)
        ));
        assert!(matches!(
            bad(b"PROXY TCP6 10.0.0.2 10.0.0.1 1 2\r\n"),
            ProxyError::V1Address(_)
        ));
        assert!(matches!(
            bad(b"PROXY TCP4 10.0.0.2 10.0.0.1 65536 2\r\n"),
            ProxyError::V1Port(_)
        ));
        assert!(matches!(
            bad(b"PROXY TCP4 10.0.0.2 10.0.0.1 +1 2\r\n"),
            ProxyError::V1Port(_)
        ));
        assert!(matches!(
            bad(b"PROXY TCP4  10.0.0.2 10.0.0.1 1 2\r\n"),
            ProxyError::V1Fields(_)
        ));
        assert!(matches!(
            bad(b"PROXY UDP4 10.0.0.2 10.0.0.1 1 2\r\n"),
            ProxyError::V1Fields(_)
        ));
        assert_eq!(bad(&[b'P'; MAX_V1 + 10]), ProxyError::Signature);
        let long = format!("PROXY UNKNOWN {}", "x".repeat(200));
        assert_eq!(bad(long.as_bytes()), ProxyError::V1TooLong);
        assert_eq!(bad(b"PROXY TCP4\n"), ProxyError::V1NotText);
        assert_eq!(bad("PROXY TCP4 é".as_bytes()), ProxyError::V1NotText);
    }

    #[test]
    fn truncated_headers_are_incomplete_not_wrong() {
        let line = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n";
        let packet = v2(1, 0x11, &v4_block());
        for whole in [&line[..], &packet[..]] {
            for cut in 0..whole.len() {
                assert_eq!(parse(&whole[..cut]), Ok(None), "cut at {cut}");
                assert!(
                    wanted(&whole[..cut]) <= whole.len() - cut,
                    "overreads at {cut}"
                );
            }
            assert!(parse(whole).unwrap().is_some());
        }
    }

    #[test]
    fn v2_proxy_and_local_with_ipv4_ipv6_and_tlvs() {
        let (h, n) = parse(&v2(1, 0x11, &v4_block())).unwrap().unwrap();
        assert_eq!(n, 28);
        assert_eq!(h.client(addr("127.0.0.1:1")), addr("203.0.113.7:51234"));

        let mut block = Vec::new();
        block.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        block.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        block.extend_from_slice(&[0xc8, 0x22, 0x01, 0xbb]);
        // TLVs: PP2_TYPE_AUTHORITY and an Azure Private Link id, skipped.
        block.extend_from_slice(&[0x02, 0x00, 0x03, b'a', b'b', b'c']);
        block.extend_from_slice(&[0xee, 0x00, 0x05, 0x01, 1, 2, 3, 4]);
        let mut packet = v2(1, 0x21, &block);
        packet.extend_from_slice(b"\x16\x03\x01 TLS follows");
        let (h, n) = parse(&packet).unwrap().unwrap();
        assert_eq!(n, 16 + block.len());
        assert_eq!(
            h,
            Header::Proxied {
                source: addr("[2001:db8::7]:51234"),
                destination: addr("[2001:db8::1]:443")
            }
        );

        // LOCAL (a health check), with or without addresses: the socket's peer stands.
        assert_eq!(parse(&v2(0, 0x00, &[])).unwrap(), Some((Header::Local, 16)));
        assert_eq!(
            parse(&v2(0, 0x11, &v4_block())).unwrap(),
            Some((Header::Local, 28))
        );
        assert_eq!(parse(&v2(0, 0x21, &[])).unwrap(), Some((Header::Local, 16)));
        // PROXY over UNSPEC, UDP or a unix socket: nothing usable, the socket's peer stands.
        assert_eq!(parse(&v2(1, 0x00, &[])).unwrap(), Some((Header::Local, 16)));
        assert_eq!(
            parse(&v2(1, 0x12, &v4_block())).unwrap().unwrap().0,
            Header::Local
        );
        assert_eq!(
            parse(&v2(1, 0x31, &[0; 216])).unwrap().unwrap().0,
            Header::Local
        );
    }

    #[test]
    fn v2_refusals() {
        let bad = |b: &[u8]| parse(b).unwrap_err();
        let mut wrong_version = v2(1, 0x11, &v4_block());
        wrong_version[12] = 0x11;
        assert_eq!(bad(&wrong_version), ProxyError::V2Version(1));
        assert_eq!(bad(&v2(2, 0x11, &v4_block())), ProxyError::V2Command(2));
        assert_eq!(bad(&v2(1, 0x41, &v4_block())), ProxyError::V2Family(0x41));
        assert_eq!(bad(&v2(1, 0x13, &v4_block())), ProxyError::V2Family(0x13));
        assert_eq!(
            bad(&v2(1, 0x21, &v4_block())),
            ProxyError::V2Short { need: 36, have: 12 }
        );
        // Oversized: refused on the length field alone, before the bytes arrive.
        let mut huge = v2(1, 0x11, &v4_block());
        huge[14..16].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(bad(&huge[..16]), ProxyError::V2TooLong(1016));
        let mut sig = v2(1, 0x11, &v4_block());
        sig[8] = b'X';
        assert_eq!(bad(&sig), ProxyError::Signature);
        assert_eq!(bad(b"\r\n\r\nGET / HTTP/1.1"), ProxyError::Signature);
    }

    #[test]
    fn garbage_and_tls_are_refused_at_once() {
        assert_eq!(parse(b"\x16\x03\x01\x02\x00"), Err(ProxyError::Signature));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyError::Signature));
        assert_eq!(parse(b"PROXX"), Err(ProxyError::Signature));
        assert_eq!(parse(b""), Ok(None));
    }

    #[tokio::test]
    async fn read_header_leaves_what_follows_in_the_stream() {
        let mut packet = v2(1, 0x11, &v4_block());
        packet.extend_from_slice(b"ClientHello");
        let mut io: &[u8] = &packet;
        let h = read_header(&mut io).await.unwrap();
        assert_eq!(h.client(addr("127.0.0.1:1")), addr("203.0.113.7:51234"));
        assert_eq!(io, b"ClientHello");

        // One byte at a time, as a trickling peer sends it.
        let (mut client, mut server) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            client.write_all(b"PROXY UNKNOWN\r\nGET").await.unwrap();
            client
        });
        assert_eq!(read_header(&mut server).await.unwrap(), Header::Local);
        let mut rest = [0u8; 3];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"GET");
        drop(writer.await.unwrap());

        let mut short: &[u8] = b"PROXY TCP4 1.2";
        assert!(matches!(
            read_header(&mut short).await,
            Err(ReadError::Closed)
        ));
        let mut tls: &[u8] = b"\x16\x03\x01\x02\x00\x01";
        assert!(matches!(
            read_header(&mut tls).await,
            Err(ReadError::Invalid(ProxyError::Signature))
        ));
    }

    #[test]
    fn trusted_peers_by_address_or_network() {
        let p = |list: &[&str]| ProxyProtocol {
            trusted: list.iter().map(|c| c.parse().unwrap()).collect(),
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(p(&[]).trusts(ip("198.51.100.1")));
        let lb = p(&["10.0.0.0/8", "192.0.2.5", "2001:db8::/32"]);
        assert!(lb.trusts(ip("10.200.0.1")));
        assert!(lb.trusts(ip("::ffff:10.1.2.3")));
        assert!(lb.trusts(ip("192.0.2.5")));
        assert!(!lb.trusts(ip("192.0.2.6")));
        assert!(lb.trusts(ip("2001:db8:1::1")));
        assert!(!lb.trusts(ip("2001:db9::1")));
        assert!(!lb.trusts(ip("11.0.0.1")));
        assert!(p(&["0.0.0.0/0"]).trusts(ip("8.8.8.8")));
        assert!(!p(&["0.0.0.0/0"]).trusts(ip("2001:db8::1")));
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "lb.example",
            "::/129",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
