#!/usr/bin/env python3
"""Attacks a node's carrier port from a host on the underlay that can spoof a member's address.

  carrier_spoof.py plain   SRC DST PORT VIP N   N plaintext IP-in-UDP TCP SYNs to VIP:80
  carrier_spoof.py garbage SRC DST PORT N       N sealed-looking packets under made-up key ids
  carrier_spoof.py tamper  PCAP SRC DST PORT    captured sealed packets, counter moved on and
                                                one ciphertext bit flipped
  carrier_spoof.py replay  PCAP SRC DST PORT    captured sealed packets, unchanged
  carrier_spoof.py ack     SRC DST PORT CLIENT:CPORT VIP:VPORT N
                                                N plaintext IP-in-UDP TCP ACKs of one connection

Every packet leaves with the outer source address SRC (IP_HDRINCL). PCAP is a tcpdump capture
(Ethernet) of carrier packets to DST:PORT. Prints the number of packets sent.
"""
import os
import socket
import struct
import sys

from inject import csum, ipv4  # the packet writers the robustness tests share


def carrier(src, dst, port, payload):
    """Outer IPv4 + UDP (checksum 0: allowed over IPv4) around `payload`."""
    udp = struct.pack("!HHHH", 40000 + len(payload) % 1000, port, 8 + len(payload), 0) + payload
    return ipv4(src, dst, 17, udp)


def syn(client, vip, sport, dport=80, flags=0x02, seq=None):
    seq = 1000 + sport if seq is None else seq
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 64240, 0, 0)
    pseudo = socket.inet_aton(client) + socket.inet_aton(vip) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    return ipv4(client, vip, 6, tcp)


def captured(path, dst, port):
    """UDP payloads to dst:port in a pcap of Ethernet frames (tcpdump -i eth0) or Linux cooked
    v2 ones (tcpdump -i any)."""
    data = open(path, "rb").read()
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    # (bytes before the IP header, where the EtherType sits)
    head, proto_at = {1: (14, 12), 276: (20, 0)}[linktype]
    at, out = 24, []
    while at + 16 <= len(data):
        _, _, incl, _ = struct.unpack(endian + "IIII", data[at:at + 16])
        frame = data[at + 16:at + 16 + incl]
        at += 16 + incl
        if len(frame) < head + 28 or frame[proto_at:proto_at + 2] != b"\x08\x00":
            continue
        ip = frame[head:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 17 or socket.inet_ntoa(ip[16:20]) != dst:
            continue
        total = struct.unpack("!H", ip[2:4])[0]
        udp = ip[ihl:total]
        if struct.unpack("!H", udp[2:4])[0] == port:
            out.append(udp[8:])
    return out


def main():
    mode = sys.argv[1]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    if mode == "ack":
        src, dst, port = sys.argv[2], sys.argv[3], int(sys.argv[4])
        (client, cport), (vip, vport) = (a.rsplit(":", 1) for a in sys.argv[5:7])
        n = int(sys.argv[7])
        # Sequence numbers far outside any window: the kernel ignores them if they get through.
        payloads = [syn(client, vip, int(cport), int(vport), 0x10, 7 + i) for i in range(n)]
    elif mode in ("plain", "garbage"):
        src, dst, port = sys.argv[2], sys.argv[3], int(sys.argv[4])
        if mode == "plain":
            vip, n = sys.argv[5], int(sys.argv[6])
            payloads = [syn(f"10.78.{1 + i // 250}.{1 + i % 250}", vip, 20000 + i) for i in range(n)]
        else:
            n = int(sys.argv[5])
            payloads = [b"\x01\0\0\0" + os.urandom(12) + os.urandom(60 + 16) for _ in range(n)]
    else:
        path, src, dst, port = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
        payloads = [p for p in captured(path, dst, port) if p and p[0] >> 4 == 0]
        if mode == "tamper":
            moved = []
            for i, p in enumerate(payloads):
                p = bytearray(p)
                p[8:16] = struct.pack("!Q", (1 << 62) + i)  # a counter never used
                p[20] ^= 0x01
                moved.append(bytes(p))
            payloads = moved
    for p in payloads:
        s.sendto(carrier(src, dst, port, p), (dst, 0))
    print(len(payloads))


if __name__ == "__main__":
    main()
