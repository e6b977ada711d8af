#!/usr/bin/env python3
"""Sends malformed packets at a ringlb node, for the robustness tests.

  inject.py carrier-udp PEER PORT VIP   malformed inner packets inside IP-in-UDP to PEER:PORT
  inject.py carrier-ipip PEER VIP       the same inside IP-in-IP (raw socket, protocol 4)
  inject.py tun VIP                     packets the kernel forwards but ringlb must refuse,
                                        sent to the VIP with IP_HDRINCL
Prints one line per packet sent: its name.
"""
import socket
import struct
import sys


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(src, dst, proto, payload, ihl=5, total=None, frag=0x4000):
    total = 20 + len(payload) if total is None else total
    hdr = struct.pack("!BBHHHBBH4s4s", (4 << 4) | ihl, 0, total, 0x1234, frag, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + payload


def udp(src, dst, payload=b"hello"):
    u = struct.pack("!HHHH", 40000, 53, 8 + len(payload), 0) + payload
    return ipv4(src, dst, 17, u)


def malformed_inner(vip):
    client = "10.78.0.100"
    good = udp(client, vip)
    return [
        ("truncated", good[:10]),
        ("bad_ihl", bytes([0x43]) + good[1:]),
        ("bad_length", good[:2] + struct.pack("!H", 1400) + good[4:]),
        ("not_vip", udp(client, "10.200.0.99")),
    ]


def main():
    mode = sys.argv[1]
    if mode == "carrier-udp":
        peer, port, vip = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for name, pkt in malformed_inner(vip):
            s.sendto(pkt, (peer, port))
            print(name)
        s.sendto(udp("10.78.0.100", vip), (peer, port))
        print("valid")
    elif mode == "carrier-ipip":
        peer, vip = sys.argv[2], sys.argv[3]
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
        for name, pkt in malformed_inner(vip):
            s.sendto(pkt, (peer, 0))
            print(name)
        s.sendto(udp("10.78.0.100", vip), (peer, 0))
        print("valid")
    elif mode == "tun":
        vip = sys.argv[2]
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        src = "10.78.0.100"
        pkts = [
            ("truncated_tcp", ipv4(src, vip, 6, b"\x9c\x40\x00\x50\0\0\0\1")),
            ("truncated_udp", ipv4(src, vip, 17, b"\x9c\x40")),
            ("fragment", ipv4(src, vip, 17, b"\x9c\x40\x00\x35\x00\x10\0\0" + b"x" * 16, frag=0x2000)),
        ]
        for name, pkt in pkts:
            s.sendto(pkt, (vip, 0))
            print(name)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
