//! The TCP connections this node's kernel serves on the VIP, read from `/proc/net/tcp` (of the
//! daemon's network namespace), as the flow keys of their clients' packets. A starting daemon
//! pins them to this node; see `ringlb_core::Node::adopt_local_flow`.

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use ringlb_wire::{FlowKey, IPPROTO_TCP};

/// Connections with `vip` as local address, as the client's flow key (client → VIP). IPv4
/// only, like the steering.
pub fn tcp_connections_on(vip: IpAddr) -> io::Result<Vec<FlowKey>> {
    match vip {
        IpAddr::V4(v4) => Ok(parse(&std::fs::read_to_string("/proc/net/tcp")?, v4)),
        IpAddr::V6(_) => Ok(Vec::new()),
    }
}

/// Parses `/proc/net/tcp`: `sl local_address rem_address st ...`, addresses as `%08X:%04X` of
/// the address in network byte order read as a native-endian word, and the port.
fn parse(text: &str, vip: Ipv4Addr) -> Vec<FlowKey> {
    const LISTEN: &str = "0A";
    const TIME_WAIT: &str = "06";
    const CLOSE: &str = "07";
    let endpoint = |s: &str| -> Option<(Ipv4Addr, u16)> {
        let (addr, port) = s.split_once(':')?;
        let word = u32::from_str_radix(addr, 16).ok()?;
        Some((Ipv4Addr::from(word.to_ne_bytes()), u16::from_str_radix(port, 16).ok()?))
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let (local, remote, state) = (fields.next()?, fields.next()?, fields.next()?);
            if matches!(state, LISTEN | TIME_WAIT | CLOSE) {
                return None;
            }
            let ((l_addr, l_port), (r_addr, r_port)) = (endpoint(local)?, endpoint(remote)?);
            (l_addr == vip).then(|| FlowKey::new(IpAddr::V4(r_addr), IpAddr::V4(vip), r_port, l_port, IPPROTO_TCP))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `/proc/net/tcp` line for `local` and `remote` in state `st`, as this host prints it.
    fn line(sl: usize, local: (Ipv4Addr, u16), remote: (Ipv4Addr, u16), st: &str) -> String {
        let hex = |(a, p): (Ipv4Addr, u16)| format!("{:08X}:{p:04X}", u32::from_ne_bytes(a.octets()));
        format!(
            "{sl:4}: {} {} {st} 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 20 4 30 10 -1",
            hex(local),
            hex(remote)
        )
    }

    #[test]
    fn connections_on_the_vip_are_read_as_client_flows() {
        let vip = Ipv4Addr::new(10, 200, 0, 10);
        let client = Ipv4Addr::new(10, 78, 0, 100);
        let any = Ipv4Addr::UNSPECIFIED;
        let text = [
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"
                .to_owned(),
            line(0, (any, 80), (any, 0), "0A"),
            line(1, (vip, 80), (client, 40000), "01"),
            line(2, (vip, 9000), (client, 40001), "03"),
            line(3, (vip, 80), (client, 40002), "06"),
            line(4, (Ipv4Addr::new(10, 77, 0, 1), 6636), (client, 40003), "01"),
            line(5, (vip, 80), (client, 40004), "08"),
        ]
        .join("\n");
        let key = |port, dport| FlowKey::new(IpAddr::V4(client), IpAddr::V4(vip), port, dport, IPPROTO_TCP);
        assert_eq!(parse(&text, vip), vec![key(40000, 80), key(40001, 9000), key(40004, 80)]);
    }

    #[test]
    fn this_hosts_own_table_parses() {
        // Whatever this namespace holds, reading it works and finds nothing on an unused address.
        assert_eq!(tcp_connections_on(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))).unwrap(), Vec::new());
    }
}
