//! Behind a reverse proxy: which peers may say who the client is (`--trusted-proxies`), and
//! the client's address, host and scheme they forward.
//!
//! A request from a trusted proxy carries the client in `Forwarded` (RFC 7239) or, without it,
//! in `X-Forwarded-For` / `X-Forwarded-Host` / `X-Forwarded-Proto`. Each proxy appends the
//! address it received the request from, so the chain reads client, proxy, proxy, ... and the
//! server's peer is the last hop. The leftmost entries are whatever the client sent, so they
//! prove nothing: the client is the rightmost address that is not a trusted proxy. A request
//! from any other peer is taken as it is: its forwarding headers are ignored, since anyone can
//! write them.
//!
//! This module reads headers and addresses only; the router decides what the client is used
//! for (the per-address session limit, the host and origin checks, the log of a new session).

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use hyper::header::{HeaderMap, HeaderName};

/// An address block: `10.0.0.0/8`, `::1/128`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// An IPv4 address seen through a dual-stack socket (`::ffff:a.b.c.d`) as the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = match raw.trim().split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (raw.trim(), None),
        };
        let network = canonical(
            address
                .parse::<IpAddr>()
                .map_err(|_| format!("{raw:?} is not an address or ADDRESS/PREFIX"))?,
        );
        let most = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => most,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= most)
                .ok_or_else(|| format!("{raw:?}: the prefix must be 0-{most}"))?,
        };
        Ok(Cidr { network, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is in this block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The client of a request, as far as the server can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The client's address: the peer's, or the one a trusted proxy forwarded.
    pub addr: IpAddr,
    /// The `Host` the client asked for, as a trusted proxy forwarded it.
    pub host: Option<String>,
    /// The scheme (`http` or `https`) the client used, as a trusted proxy forwarded it.
    pub proto: Option<String>,
}

/// The peers trusted to forward the client (`--trusted-proxies`); none by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(pub Vec<Cidr>);

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// One hop of a forwarding chain.
#[derive(Debug, Default)]
struct Hop {
    /// `None`: an obfuscated or `unknown` node.
    addr: Option<IpAddr>,
    host: Option<String>,
    proto: Option<String>,
}

/// Every value of a header, its comma-separated items in order, across repeated headers.
fn items<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

/// A node as `Forwarded` or `X-Forwarded-For` names it: `1.2.3.4`, `1.2.3.4:80`, `[::1]`,
/// `"[::1]:80"`, `::1`; `None` for `unknown` or an obfuscated name.
fn node(raw: &str) -> Option<IpAddr> {
    let raw = raw.trim().trim_matches('"');
    if let Ok(ip) = raw.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = raw.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    raw.strip_prefix('[')
        .and_then(|rest| rest.split(']').next())
        .and_then(|ip| ip.parse().ok())
}

/// The chain `Forwarded` describes, client first.
fn forwarded_chain(headers: &HeaderMap) -> Vec<Hop> {
    items(headers, &FORWARDED)
        .map(|element| {
            let mut hop = Hop::default();
            for pair in element.split(';') {
                let Some((key, value)) = pair.split_once('=') else {
                    continue;
                };
                let value = value.trim().trim_matches('"');
                match key.trim().to_ascii_lowercase().as_str() {
                    "for" => hop.addr = node(value),
                    "host" => hop.host = Some(value.to_owned()),
                    "proto" => hop.proto = Some(value.to_ascii_lowercase()),
                    _ => {}
                }
            }
            hop
        })
        .collect()
}

/// The chain the `X-Forwarded-*` headers describe, client first; the host and scheme go with
/// the last hop (the proxy nearest the server sets them).
fn x_forwarded_chain(headers: &HeaderMap) -> Vec<Hop> {
    let mut chain: Vec<Hop> = items(headers, &X_FORWARDED_FOR)
        .map(|item| Hop {
            addr: node(item),
            ..Hop::default()
        })
        .collect();
    let host = items(headers, &X_FORWARDED_HOST).last().map(str::to_owned);
    let proto = items(headers, &X_FORWARDED_PROTO)
        .last()
        .map(str::to_ascii_lowercase);
    if chain.is_empty() && (host.is_some() || proto.is_some()) {
        // A proxy that forwards the host or scheme but not the address: the peer is the
        // client as far as anyone can tell.
        chain.push(Hop::default());
    }
    if let Some(last) = chain.last_mut() {
        last.host = host;
        last.proto = proto;
    }
    chain
}

impl TrustedProxies {
    /// Whether a peer may forward the client.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|cidr| cidr.contains(ip))
    }

    /// The client of a request from `peer` with these headers.
    pub fn client(&self, peer: SocketAddr, headers: &HeaderMap) -> Client {
        let mut client = Client {
            addr: canonical(peer.ip()),
            host: None,
            proto: None,
        };
        if !self.trusts(client.addr) {
            return client;
        }
        let chain = if headers.contains_key(FORWARDED) {
            forwarded_chain(headers)
        } else {
            x_forwarded_chain(headers)
        };
        // The host and scheme the proxy nearest the server reports.
        if let Some(nearest) = chain.last() {
            client.host = nearest.host.clone();
            client.proto = nearest
                .proto
                .clone()
                .filter(|p| p == "http" || p == "https");
        }
        // From the server outwards: each trusted hop vouches for the one before it.
        for hop in chain.iter().rev() {
            match hop.addr {
                Some(addr) => {
                    client.addr = canonical(addr);
                    if !self.trusts(client.addr) {
                        break;
                    }
                }
                // An unknown node: the nearest known hop is all that can be said.
                None => break,
            }
        }
        client
    }
}

/// Parses `--trusted-proxies`: comma-separated blocks.
pub fn parse_trusted(raw: &str) -> Result<TrustedProxies, String> {
    raw.split(',')
        .filter(|item| !item.trim().is_empty())
        .map(Cidr::from_str)
        .collect::<Result<Vec<_>, _>>()
        .map(TrustedProxies)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 40000)
    }

    #[test]
    fn blocks_parse_and_match_v4_v6_and_mapped_addresses() {
        let private: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(private.contains("10.200.3.4".parse().unwrap()));
        assert!(private.contains("::ffff:10.1.1.1".parse().unwrap()));
        assert!(!private.contains("11.0.0.1".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        let everyone: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(everyone.contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nonsense", "10.0.0.0/x", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(parse_trusted("127.0.0.1, 10.0.0.0/8").unwrap().0.len(), 2);
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let trusted = parse_trusted("10.0.0.0/8").unwrap();
        let forged = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=5.6.7.8;host=evil.example"),
        ]);
        let client = trusted.client(peer("192.0.2.9"), &forged);
        assert_eq!(
            client,
            Client {
                addr: "192.0.2.9".parse().unwrap(),
                host: None,
                proto: None
            }
        );
    }

    #[test]
    fn the_client_is_the_rightmost_address_that_is_not_a_trusted_proxy() {
        let trusted = parse_trusted("10.0.0.0/8").unwrap();
        // The client sent a forged entry first; 10.0.0.7 is a second trusted proxy.
        let chain = headers(&[
            ("x-forwarded-for", "6.6.6.6, 203.0.113.5"),
            ("x-forwarded-for", "10.0.0.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "chat.example"),
        ]);
        let client = trusted.client(peer("10.0.0.2"), &chain);
        assert_eq!(client.addr, "203.0.113.5".parse::<IpAddr>().unwrap());
        assert_eq!(client.host.as_deref(), Some("chat.example"));
        assert_eq!(client.proto.as_deref(), Some("https"));
        // Every hop trusted: the leftmost is the client.
        let inside = headers(&[("x-forwarded-for", "10.1.1.1, 10.0.0.7")]);
        assert_eq!(
            trusted.client(peer("10.0.0.2"), &inside).addr,
            "10.1.1.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn forwarded_wins_over_x_forwarded_and_reads_ports_brackets_and_unknown() {
        let trusted = parse_trusted("127.0.0.1, ::1").unwrap();
        let both = headers(&[
            (
                "forwarded",
                "for=192.0.2.60;proto=http, for=\"[2001:db8::17]:4711\";host=chat.example;proto=HTTPS",
            ),
            ("x-forwarded-for", "9.9.9.9"),
        ]);
        let client = trusted.client(peer("::1"), &both);
        assert_eq!(client.addr, "2001:db8::17".parse::<IpAddr>().unwrap());
        assert_eq!(client.host.as_deref(), Some("chat.example"));
        assert_eq!(client.proto.as_deref(), Some("https"));
        let unknown = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(
            trusted.client(peer("127.0.0.1"), &unknown).addr,
            "127.0.0.1".parse::<IpAddr>().unwrap(),
            "an unknown node leaves the nearest known hop"
        );
        let odd_proto = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-proto", "gopher"),
        ]);
        assert_eq!(trusted.client(peer("127.0.0.1"), &odd_proto).proto, None);
        let host_only = headers(&[
            ("x-forwarded-host", "chat.example"),
            ("x-forwarded-proto", "https"),
        ]);
        let client = trusted.client(peer("127.0.0.1"), &host_only);
        assert_eq!(client.addr, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            (client.host.as_deref(), client.proto.as_deref()),
            (Some("chat.example"), Some("https"))
        );
    }
}
