//! `classify` on arbitrary bytes: what it takes, the kernel would deliver (see
//! `ringlb_fuzz::expect`) and etherparse reads alike (addresses, protocol, ports, TCP flags);
//! what the kernel would deliver and ringlb balances, it takes; and its fast path, wherever it
//! answers, agrees with the full one.
#![no_main]

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use libfuzzer_sys::fuzz_target;
use ringlb_fuzz::{expect, fix_ip_length, fix_ipv4_header, quoted_flow, Expect, Flow};
use ringlb_wire::{classify, classify_paths, L4};

fuzz_target!(|data: &[u8]| {
    // The first byte says which lengths and sums to make right, so that most inputs get past
    // the first check; the rest is the packet.
    let Some((&shape, bytes)) = data.split_first() else { return };
    let mut pkt = bytes.to_vec();
    if shape & 1 != 0 {
        fix_ip_length(&mut pkt);
    }
    if shape & 2 != 0 {
        fix_ipv4_header(&mut pkt);
    }
    let pkt = &pkt[..];

    let got = classify(pkt);
    let (fast, full) = classify_paths(pkt);
    if let Some(fast) = fast {
        assert_eq!(Ok(fast), full, "fast path disagrees with the full one");
    }
    assert_eq!(got, fast.map_or(full, Ok));

    let meta = match (got, expect(pkt)) {
        (Ok(meta), Expect::Take(flow)) => {
            let key = meta.key;
            let got = Flow {
                src: key.src(),
                dst: key.dst(),
                proto: key.proto,
                src_port: key.src_port,
                dst_port: key.dst_port,
            };
            assert_eq!(got, flow, "flow key");
            meta
        }
        (Ok(meta), Expect::Refuse(why)) => panic!("took {meta:?}, which the kernel refuses: {why}"),
        (Err(e), Expect::Take(flow)) => panic!("refused ({e}) {flow:?}, which the kernel takes"),
        (Err(_), Expect::Refuse(_)) => return,
    };

    let sliced = SlicedPacket::from_ip(pkt).expect("taken but etherparse refuses it");
    let (src, dst) = match &sliced.net {
        Some(NetSlice::Ipv4(v4)) => (v4.header().source_addr().into(), v4.header().destination_addr().into()),
        Some(NetSlice::Ipv6(v6)) => (v6.header().source_addr().into(), v6.header().destination_addr().into()),
        other => panic!("taken, etherparse reads {other:?}"),
    };
    assert_eq!((meta.key.src(), meta.key.dst()), (src, dst), "addresses");
    let (k, l4) = (meta.key, meta.l4);
    match (&sliced.transport, l4) {
        (Some(TransportSlice::Tcp(t)), L4::Tcp(f)) => {
            assert_eq!((k.proto, k.src_port, k.dst_port), (6, t.source_port(), t.destination_port()));
            assert_eq!((f.syn, f.ack, f.fin, f.rst), (t.syn(), t.ack(), t.fin(), t.rst()), "tcp flags");
        }
        (Some(TransportSlice::Udp(u)), L4::Udp) => {
            assert_eq!((k.proto, k.src_port, k.dst_port), (17, u.source_port(), u.destination_port()));
        }
        (Some(TransportSlice::Icmpv4(icmp)), L4::Icmp { error_for }) => {
            assert_eq!((k.proto, k.src_port, k.dst_port), (1, 0, 0));
            let quoted = error_for.map(|q| Flow {
                src: q.src(),
                dst: q.dst(),
                proto: q.proto,
                src_port: q.src_port,
                dst_port: q.dst_port,
            });
            assert_eq!(quoted, quoted_flow(icmp.slice()), "quoted flow of an icmp error");
        }
        (t, l4) => panic!("classify says {l4:?}, etherparse {t:?}"),
    }
});
