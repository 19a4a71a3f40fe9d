//! The guard against server-side request forgery for outgoing webhooks: which addresses a
//! receiver may not be reached at unless its configuration says `allow_private = true`.
//!
//! Whoever can write a receiver's URL (or control the DNS of its host) could otherwise make the
//! server send requests to itself, to the cloud's metadata service, or into the private
//! network it sits in. The check is made on IP addresses, never on host names: a name is
//! resolved, the refused addresses are dropped before any connection is made, and the address
//! a connection reached is checked again, so no spelling of a host and no DNS answer gets past.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address is refused, or `None` when a receiver may be reached there.
pub fn refused(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => refused_v6(v6),
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_unspecified() || a == 0 {
        Some("unspecified (0.0.0.0/8)")
    } else if ip.is_loopback() {
        Some("loopback (127.0.0.0/8)")
    } else if ip.is_private() {
        Some("private (RFC 1918)")
    } else if ip.is_link_local() {
        Some("link-local (169.254.0.0/16, where cloud metadata services answer)")
    } else if a == 100 && (64..128).contains(&b) {
        // Carrier-grade NAT space, which some clouds use for their own internal services.
        Some("shared address space (100.64.0.0/10)")
    } else if ip.is_broadcast() || ip.is_multicast() || a >= 240 {
        Some("not a unicast address")
    } else {
        None
    }
}

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let segments = ip.segments();
    if ip.is_unspecified() {
        return Some("unspecified (::)");
    }
    if ip.is_loopback() {
        return Some("loopback (::1)");
    }
    // An IPv4 address written as IPv6 reaches that IPv4 address: judge it as such. This covers
    // the mapped form (::ffff:a.b.c.d), the old compatible form (::a.b.c.d) and the NAT64
    // prefix (64:ff9b::a.b.c.d), which a NAT64 gateway turns into the IPv4 address.
    if let Some(v4) = ip.to_ipv4() {
        return refused_v4(v4);
    }
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [.., c, d] = segments;
        let v4 = Ipv4Addr::new((c >> 8) as u8, c as u8, (d >> 8) as u8, d as u8);
        return refused_v4(v4);
    }
    if segments[0] & 0xfe00 == 0xfc00 {
        Some("unique-local (fc00::/7)")
    } else if segments[0] & 0xffc0 == 0xfe80 {
        Some("link-local (fe80::/10)")
    } else if segments[0] & 0xffc0 == 0xfec0 {
        Some("site-local (fec0::/10)")
    } else if ip.is_multicast() {
        Some("not a unicast address")
    } else {
        None
    }
}

/// The address of a URL's host when it is written as an IP address (`http://10.0.0.1/`,
/// `http://[::1]:8080/`), which needs no resolving to be judged.
pub fn literal_ip(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judged(text: &str) -> Option<&'static str> {
        refused(text.parse().expect("an address"))
    }

    #[test]
    fn private_and_special_addresses_are_refused() {
        for text in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.0.9",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            // IPv4 forms of refused addresses, written as IPv6.
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:169.254.169.254",
            "::ffff:0.0.0.0",
            "::127.0.0.1",
            "::192.168.0.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(judged(text).is_some(), "{text} must be refused");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        for text in [
            "1.1.1.1",
            "8.8.8.8",
            "172.15.255.255",
            "172.32.0.1",
            "192.169.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "169.255.0.1",
            "2606:4700:4700::1111",
            "2001:db8::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert_eq!(judged(text), None, "{text} must be allowed");
        }
    }

    #[test]
    fn reasons_name_the_kind_of_address() {
        assert_eq!(judged("127.0.0.1"), Some("loopback (127.0.0.0/8)"));
        assert_eq!(judged("192.168.0.1"), Some("private (RFC 1918)"));
        assert_eq!(judged("fd00::1"), Some("unique-local (fc00::/7)"));
        // An IPv4 address written as IPv6 is judged, and named, as the IPv4 address.
        assert_eq!(judged("::ffff:127.0.0.1"), Some("loopback (127.0.0.0/8)"));
        assert!(judged("169.254.169.254").is_some_and(|r| r.starts_with("link-local")));
    }

    #[test]
    fn literal_hosts_are_read_with_or_without_brackets() {
        assert_eq!(literal_ip("10.0.0.1"), Some(IpAddr::from([10, 0, 0, 1])));
        assert_eq!(literal_ip("[::1]"), Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert_eq!(literal_ip("example.com"), None);
    }
}
