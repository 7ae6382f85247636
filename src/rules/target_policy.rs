//! Which network addresses the worker may call (the SSRF guard).
//!
//! Public addresses are always allowed. Addresses that reach inside the
//! operator's network (loopback, RFC 1918, link-local including the cloud
//! metadata address, CGNAT, unique-local, multicast, unspecified, …) are
//! refused unless they fall in one of the CIDRs of `postback.allowed_targets`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One CIDR block, e.g. `127.0.0.1/32` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.network, canonical(addr)) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                prefix_match(u32::from(net) as u128, u32::from(a) as u128, self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => prefix_match(u128::from(net), u128::from(a), self.prefix, 128),
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

fn prefix_match(net: u128, addr: u128, prefix: u8, bits: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    // checked: a prefix longer than the family never matches (and never panics)
    match bits.checked_sub(prefix) {
        Some(shift) if shift < 128 => (net >> shift) == (addr >> shift),
        _ => false,
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) is judged as the IPv4
/// address it carries, so the mapping cannot be used to slip past the rules.
/// The same holds for the IPv4-compatible (`::a.b.c.d`, deprecated) and the
/// IPv4-translated (`::ffff:0:a.b.c.d`, RFC 2765) forms; `::` and `::1` stay IPv6.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
            match s {
                [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0xffff, 0, _, _] => IpAddr::V4(embedded),
                [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 || lo > 1 => IpAddr::V4(embedded),
                _ => IpAddr::V6(v6),
            }
        }
        v4 => v4,
    }
}

/// Parses `a.b.c.d/n`, `x::y/n`, or a bare address (a /32 or /128).
pub fn parse_cidr(text: &str) -> Result<Cidr, String> {
    let text = text.trim();
    let (addr, prefix) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    let network: IpAddr = addr.parse().map_err(|_| format!("\"{text}\" is not an IP address or CIDR block"))?;
    let max = if network.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("\"{text}\" has an invalid prefix length (0 to {max})"))?,
    };
    let canon = canonical(network);
    let prefix = match (network, canon) {
        // `::ffff:10.1.2.3/120` is the IPv4 block 10.1.2.0/24: the mapped
        // prefix counts the 96 bits of the IPv6 wrapper
        (IpAddr::V6(_), IpAddr::V4(_)) => prefix.checked_sub(96).ok_or_else(|| {
            format!("\"{text}\" is an IPv4-mapped block; its prefix length must be 96 to 128 (that is, /0 to /32 of the IPv4 address)")
        })?,
        _ => prefix,
    };
    Ok(Cidr { network: canon, prefix })
}

/// Parses the comma-separated `postback.allowed_targets` value.
pub fn parse_allowlist(text: &str) -> Result<Vec<Cidr>, String> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(parse_cidr).collect()
}

/// Why an address is not public, or `None` for an ordinary public address.
pub fn non_public_reason(addr: IpAddr) -> Option<&'static str> {
    match canonical(addr) {
        IpAddr::V4(a) => v4_reason(a),
        IpAddr::V6(a) => v6_reason(a),
    }
}

fn v4_reason(a: Ipv4Addr) -> Option<&'static str> {
    let o = a.octets();
    if a.is_unspecified() || o[0] == 0 {
        Some("unspecified / this-network address")
    } else if a.is_loopback() {
        Some("loopback address")
    } else if a.is_private() {
        Some("private (RFC 1918) address")
    } else if a.is_link_local() {
        Some("link-local address (includes the cloud metadata service)")
    } else if o[0] == 100 && (o[1] & 0xC0) == 64 {
        Some("carrier-grade NAT (RFC 6598) address")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignment address")
    } else if o[0] == 198 && (o[1] & 0xFE) == 18 {
        Some("benchmarking (RFC 2544) address")
    } else if a.is_multicast() {
        Some("multicast address")
    } else if a.is_broadcast() || o[0] >= 240 {
        Some("reserved address")
    } else if a.is_documentation() {
        Some("documentation address")
    } else {
        None
    }
}

fn v6_reason(a: Ipv6Addr) -> Option<&'static str> {
    let seg = a.segments();
    if a.is_unspecified() {
        Some("unspecified address")
    } else if a.is_loopback() {
        Some("loopback address")
    } else if (seg[0] & 0xFE00) == 0xFC00 {
        Some("unique-local address")
    } else if (seg[0] & 0xFFC0) == 0xFE80 {
        Some("link-local address")
    } else if (seg[0] & 0xFFC0) == 0xFEC0 {
        Some("site-local address (deprecated, still routed inside some networks)")
    } else if seg[0] == 0x2001 && seg[1] == 0 {
        Some("Teredo address (carries an IPv4 address)")
    } else if seg[0] == 0x0100 && seg[1] == 0 && seg[2] == 0 && seg[3] == 0 {
        Some("discard-only address")
    } else if a.is_multicast() {
        Some("multicast address")
    } else if seg[0] == 0x2001 && seg[1] == 0x0db8 {
        Some("documentation address")
    } else if seg[0] == 0x0064 && seg[1] == 0xff9b {
        Some("NAT64 address")
    } else if seg[0] == 0x2002 {
        Some("6to4 address")
    } else {
        None
    }
}

/// The verdict for one resolved address: `Ok` to connect, `Err` with a
/// message suitable for `last_error`.
pub fn check_address(addr: IpAddr, allowlist: &[Cidr]) -> Result<(), String> {
    match non_public_reason(addr) {
        None => Ok(()),
        Some(_) if allowlist.iter().any(|c| c.contains(addr)) => Ok(()),
        Some(reason) => {
            Err(format!("refused to connect to {addr}: {reason}; add it to postback.allowed_targets to allow it"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn public_addresses_pass() {
        for a in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "100.128.0.1", "172.32.0.1"] {
            assert_eq!(check_address(ip(a), &[]), Ok(()), "{a}");
        }
    }

    #[test]
    fn internal_addresses_are_refused() {
        for a in [
            "127.0.0.1",
            "127.0.0.2",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "::10.0.0.1",
            "::ffff:0:127.0.0.1",
            "::ffff:0:169.254.169.254",
            "fec0::1",
            "feff::1",
            "2001:0::5efe:7f00:1",
            "100::1",
        ] {
            let err = check_address(ip(a), &[]).unwrap_err();
            assert!(err.contains("refused to connect"), "{a}: {err}");
        }
    }

    #[test]
    fn metadata_address_is_named_in_the_error() {
        let err = check_address(ip("169.254.169.254"), &[]).unwrap_err();
        assert!(err.contains("metadata"), "{err}");
    }

    #[test]
    fn allowlist_opens_exactly_its_block() {
        let allow = parse_allowlist("127.0.0.1/32, 10.0.0.0/8").unwrap();
        assert_eq!(check_address(ip("127.0.0.1"), &allow), Ok(()));
        assert!(check_address(ip("127.0.0.2"), &allow).is_err());
        assert_eq!(check_address(ip("10.200.1.1"), &allow), Ok(()));
        assert!(check_address(ip("192.168.0.1"), &allow).is_err());
        // a mapped, compatible or translated address is judged as its IPv4 self
        assert_eq!(check_address(ip("::ffff:127.0.0.1"), &allow), Ok(()));
        assert_eq!(check_address(ip("::127.0.0.1"), &allow), Ok(()));
        assert_eq!(check_address(ip("::ffff:0:127.0.0.1"), &allow), Ok(()));
        assert!(check_address(ip("::ffff:0:127.0.0.2"), &allow).is_err());
        // and a public IPv4 address inside them stays public
        assert_eq!(check_address(ip("::ffff:0:8.8.8.8"), &[]), Ok(()));
    }

    #[test]
    fn ipv6_allowlist() {
        let allow = parse_allowlist("::1").unwrap();
        assert_eq!(check_address(ip("::1"), &allow), Ok(()));
        assert!(check_address(ip("fd00::1"), &allow).is_err());
    }

    #[test]
    fn parse_errors_are_clear() {
        assert!(parse_allowlist("").unwrap().is_empty());
        assert!(parse_allowlist(" , ").unwrap().is_empty());
        let e = parse_allowlist("127.0.0.1/33").unwrap_err();
        assert!(e.contains("invalid prefix length"), "{e}");
        let e = parse_allowlist("localhost").unwrap_err();
        assert!(e.contains("not an IP address"), "{e}");
        assert_eq!(parse_cidr("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
    }

    #[test]
    fn an_ipv4_mapped_entry_opens_only_its_own_ipv4_block() {
        let allow = parse_allowlist("::ffff:127.0.0.2").unwrap();
        assert_eq!(allow[0].to_string(), "127.0.0.2/32");
        assert_eq!(check_address(ip("127.0.0.2"), &allow), Ok(()));
        assert!(check_address(ip("127.0.0.3"), &allow).is_err());
        assert!(check_address(ip("::ffff:127.0.0.3"), &allow).is_err());
        let block = parse_allowlist("::ffff:127.0.0.0/120").unwrap();
        assert_eq!(block[0].to_string(), "127.0.0.0/24");
        assert!(block[0].contains(ip("127.0.0.9")));
        assert!(!block[0].contains(ip("127.0.1.9")));
        let e = parse_allowlist("::ffff:127.0.0.2/64").unwrap_err();
        assert!(e.contains("96 to 128"), "{e}");
        // the arithmetic itself never underflows, whatever a Cidr holds
        let odd = Cidr { network: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), prefix: 128 };
        assert!(!odd.contains(ip("127.0.0.3")));
        assert!(!odd.contains(ip("127.0.0.2")));
    }

    #[test]
    fn zero_prefix_matches_everything_of_its_family() {
        let all4 = parse_cidr("0.0.0.0/0").unwrap();
        assert!(all4.contains(ip("10.0.0.1")));
        assert!(!all4.contains(ip("fd00::1")));
    }
}
