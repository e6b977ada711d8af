// SPDX-License-Identifier: Apache-2.0
//
// ringlb's kernel fast path: a tc program on the underlay interface's ingress.
//
// It acts only on packets of flows the daemon has put in `flows`, after the daemon placed
// them; everything else (SYN, unknown flows, fragments, IP options, ICMP, UDP GSO trains,
// packets that would not fit the MTU once encapsulated) passes unchanged and takes the TUN
// path, as without this program. For a flow in `flows` it does what the daemon would:
//
//   LOCAL       the entry serves the flow itself: mark the packet so that routing delivers it
//               locally instead of into the TUN;
//   ENCAP_UDP   the entry forwards the flow: push IPv4 + UDP (the user-space carrier's format:
//               outer source port from the flow hash, destination the carrier port) and
//               redirect it to the peer through the neighbour table;
//   ENCAP_IPIP  the same with RFC 2003 IP-in-IP (the kernel's own GSO segments super-packets);
//   DECAP_UDP   a peer serves the flow: a carrier packet from the entry the daemon recorded
//   DECAP_IPIP  for it, to this node: strip the outer headers and mark it for local delivery.
//
// Each entry counts packets and bytes, stamps the time of the last one and notes a FIN or RST
// it carried, which the daemon reads back into its flow table (a closed flow is withdrawn
// there). A SYN always goes to the daemon, which places connections. The program never
// creates entries.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define KIND_LOCAL 1
#define KIND_ENCAP_UDP 2
#define KIND_ENCAP_IPIP 3
#define KIND_DECAP_UDP 4
#define KIND_DECAP_IPIP 5

// Indices of `stats`: packets (a GSO super-packet counts as its segments) for the first three,
// and packets or super-packets for the rest.
#define STAT_LOCAL 0
#define STAT_ENCAP 1
#define STAT_DECAP 2
#define STAT_PASS_CONTROL 3 // a SYN of an offloaded flow
#define STAT_PASS_MTU 4     // would not fit the MTU once encapsulated
#define STAT_PASS_GSO 5     // a UDP GSO train, or a super-packet too long to encapsulate
#define STAT_ERROR 6        // a helper failed; the packet went on unchanged
#define STAT_PASS_SOURCE 7  // a carrier packet from another address than the flow's entry
#define STAT_COUNT 8

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04

#define UDP_OVERHEAD (sizeof(struct iphdr) + sizeof(struct udphdr))
#define IPIP_OVERHEAD (sizeof(struct iphdr))

// Kernel UAPI of 6.3+ that Debian 12's headers lack.
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#endif

struct flow_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct flow_entry {
	__u8 kind;
	// Set once the program carried a FIN or RST of the flow (the daemon withdraws it).
	__u8 closed;
	__u8 pad[2];
	// ENCAP: this node's underlay address. DECAP: unused.
	__u32 outer_saddr;
	// ENCAP: the peer's underlay address. DECAP: the entry that sends the flow.
	__u32 outer_daddr;
	__u16 outer_sport;
	__u16 outer_dport;
	__u64 packets;
	__u64 bytes;
	// bpf_ktime_get_ns() of the last packet (CLOCK_MONOTONIC).
	__u64 last_seen;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct flow_key);
	__type(value, struct flow_entry);
	__uint(max_entries, 65536);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, STAT_COUNT);
} stats SEC(".maps");

// Set by the loader before the program is loaded (network byte order where on the wire).
volatile const __u32 cfg_vip = 0;
volatile const __u16 cfg_carrier_port = 0;
volatile const __u32 cfg_mark = 0;
volatile const __u32 cfg_ifindex = 0;
// The underlay interface's MTU.
volatile const __u32 cfg_mtu = 0;
// This node's underlay address: carrier packets are decapsulated only when addressed to it.
volatile const __u32 cfg_local = 0;

static __always_inline void count_n(__u32 index, __u64 n)
{
	__u64 *value = bpf_map_lookup_elem(&stats, &index);
	if (value)
		*value += n;
}

static __always_inline void count(__u32 index)
{
	count_n(index, 1);
}

// `headers`: the bytes in front of the inner payload (Ethernet, outer and inner headers), so
// that a GSO super-packet counts as the segments it stands for. (skb->gso_segs is not kept
// up to date on forwarded super-packets.)
// `inner_at`: where the inner IP header starts; bytes count from there (what the client sent).
// `tcp_flags`: the packet's TCP flags (0 for UDP).
static __always_inline __u64 account(struct flow_entry *entry, struct __sk_buff *skb, __u32 headers, __u32 inner_at,
				     __u8 tcp_flags)
{
	__u64 segs = 1;
	if (skb->gso_size && skb->len > headers)
		segs = (skb->len - headers + skb->gso_size - 1) / skb->gso_size;
	__sync_fetch_and_add(&entry->packets, segs);
	if (skb->len > inner_at)
		__sync_fetch_and_add(&entry->bytes, skb->len - inner_at);
	entry->last_seen = bpf_ktime_get_ns();
	if ((tcp_flags & (TCP_FIN | TCP_RST)) && !entry->closed)
		entry->closed = 1;
	return segs;
}

static __always_inline __u16 ip_checksum(struct iphdr *ip)
{
	__u16 *words = (__u16 *)ip;
	__u32 sum = 0;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
		sum += words[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

// The flow key of the IPv4 packet at `ip`, if it is an unfragmented TCP or UDP packet without
// options for the VIP. `flags` receives the TCP flags byte (0 for UDP), `l4_header` the length
// of the TCP or UDP header.
static __always_inline int inner_key(void *ip_start, void *data_end, struct flow_key *key, __u8 *flags,
				     __u32 *l4_header)
{
	struct iphdr *ip = ip_start;
	if ((void *)(ip + 1) > data_end)
		return -1;
	if (ip->version != 4 || ip->ihl != 5 || ip->daddr != cfg_vip)
		return -1;
	if (ip->frag_off & bpf_htons(0x3fff)) // MF or an offset
		return -1;
	key->saddr = ip->saddr;
	key->daddr = ip->daddr;
	key->proto = ip->protocol;
	key->pad[0] = key->pad[1] = key->pad[2] = 0;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)(ip + 1);
		if ((void *)(tcp + 1) > data_end)
			return -1;
		key->sport = tcp->source;
		key->dport = tcp->dest;
		*flags = ((__u8 *)tcp)[13];
		*l4_header = tcp->doff * 4;
		return 0;
	}
	if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > data_end)
			return -1;
		key->sport = udp->source;
		key->dport = udp->dest;
		*flags = 0;
		*l4_header = sizeof(*udp);
		return 0;
	}
	return -1;
}

// Packets the daemon must see: a SYN opens a connection, which the daemon places (a client
// may reuse its port for a new connection to another node). FIN and RST are carried, and
// noted in the entry.
static __always_inline int needs_daemon(const struct flow_key *key, __u8 flags)
{
	return key->proto == IPPROTO_TCP && (flags & TCP_SYN);
}

// `l4_header`: the length of the inner TCP or UDP header.
static __always_inline int encap(struct __sk_buff *skb, struct flow_entry *entry, __u32 l4_header, __u8 tcp_flags)
{
	int udp = entry->kind == KIND_ENCAP_UDP;
	__u32 overhead = udp ? UDP_OVERHEAD : IPIP_OVERHEAD;

	// A GSO super-packet's segments, or the packet itself, must still fit once wrapped.
	// (bpf_check_mtu would do this, but it is for GPL programs only.)
	__u32 wire = skb->gso_size ? sizeof(struct iphdr) + l4_header + skb->gso_size : skb->len - ETH_HLEN;
	if (wire + overhead > cfg_mtu) {
		count(STAT_PASS_MTU);
		return TC_ACT_OK;
	}
	if (skb->len - ETH_HLEN + overhead > 0xffff) {
		count(STAT_PASS_GSO);
		return TC_ACT_OK;
	}
	// One packet (or one TCP super-packet) in the frame, as its IP header says.
	struct iphdr inner_ip;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &inner_ip, sizeof(inner_ip)) < 0 ||
	    bpf_ntohs(inner_ip.tot_len) != skb->len - ETH_HLEN) {
		count(STAT_PASS_GSO);
		return TC_ACT_OK;
	}
	// The inner packet's first byte holds its TOS for the outer header.
	__u8 tos = 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + 1, &tos, 1) < 0) {
		count(STAT_ERROR);
		return TC_ACT_OK;
	}
	// FIXED_GSO: a super-packet's segments keep their size (the check above made sure they
	// fit once wrapped), rather than being cut into more, smaller ones.
	__u64 flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_FIXED_GSO;
	if (udp)
		flags |= BPF_F_ADJ_ROOM_ENCAP_L4_UDP;
	if (bpf_skb_adjust_room(skb, (__s32)overhead, BPF_ADJ_ROOM_MAC, flags) < 0) {
		count(STAT_ERROR);
		return TC_ACT_OK;
	}

	struct {
		struct iphdr ip;
		struct udphdr udp;
	} outer = {};
	outer.ip.version = 4;
	outer.ip.ihl = 5;
	outer.ip.tos = tos;
	outer.ip.tot_len = bpf_htons((__u16)(skb->len - ETH_HLEN));
	outer.ip.frag_off = bpf_htons(0x4000); // DF, as the user-space carrier's sockets send
	outer.ip.ttl = 64;
	outer.ip.protocol = udp ? IPPROTO_UDP : IPPROTO_IPIP;
	outer.ip.saddr = entry->outer_saddr;
	outer.ip.daddr = entry->outer_daddr;
	outer.ip.check = ip_checksum(&outer.ip);
	outer.udp.source = entry->outer_sport;
	outer.udp.dest = entry->outer_dport;
	outer.udp.len = bpf_htons((__u16)(skb->len - ETH_HLEN - sizeof(struct iphdr)));
	outer.udp.check = 0; // allowed over IPv4, as the user-space carrier's GSO sends also do
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &outer, overhead, 0) < 0) {
		// The room is pushed: this packet can no longer go on as it was.
		count(STAT_ERROR);
		return TC_ACT_SHOT;
	}
	count_n(STAT_ENCAP, account(entry, skb, ETH_HLEN + overhead + sizeof(struct iphdr) + l4_header, ETH_HLEN + overhead,
				     tcp_flags));
	return bpf_redirect_neigh(cfg_ifindex, NULL, 0, 0);
}

static __always_inline int decap(struct __sk_buff *skb, void *inner, void *data_end, __u32 outer_src, int udp)
{
	__u32 overhead = udp ? UDP_OVERHEAD : IPIP_OVERHEAD;
	struct iphdr *inner_ip = inner;
	if ((void *)(inner_ip + 1) > data_end)
		return TC_ACT_OK;
	// One inner packet (or one TCP super-packet) filling the datagram: not a train of carrier
	// datagrams that receive offload (UDP GRO) merged, whose first header would not describe
	// the rest. Those go to the daemon, which reads them one by one.
	if (bpf_ntohs(inner_ip->tot_len) != skb->len - ETH_HLEN - overhead) {
		__u8 f = 0;
		__u32 l = 0;
		struct flow_key k;
		if (inner_key(inner, data_end, &k, &f, &l) == 0 && bpf_map_lookup_elem(&flows, &k))
			count(STAT_PASS_GSO);
		return TC_ACT_OK;
	}
	struct flow_key key;
	__u8 flags = 0;
	__u32 l4_header = 0;
	if (inner_key(inner, data_end, &key, &flags, &l4_header) < 0)
		return TC_ACT_OK;
	struct flow_entry *entry = bpf_map_lookup_elem(&flows, &key);
	if (!entry || entry->kind != (udp ? KIND_DECAP_UDP : KIND_DECAP_IPIP))
		return TC_ACT_OK;
	if (entry->outer_daddr != outer_src) {
		count(STAT_PASS_SOURCE);
		return TC_ACT_OK;
	}
	if (needs_daemon(&key, flags)) {
		count(STAT_PASS_CONTROL);
		return TC_ACT_OK;
	}
	if (bpf_skb_adjust_room(skb, -(__s32)overhead, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_DECAP_L3_IPV4 | BPF_F_ADJ_ROOM_FIXED_GSO) < 0) {
		count(STAT_ERROR);
		return TC_ACT_OK;
	}
	skb->mark |= cfg_mark;
	count_n(STAT_DECAP, account(entry, skb, ETH_HLEN + sizeof(struct iphdr) + l4_header, ETH_HLEN, flags));
	return TC_ACT_OK;
}

SEC("classifier")
int ringlb_ingress(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	// Ethernet, IPv4, UDP, inner IPv4 and the start of TCP must be in the linear part.
	__u32 want = ETH_HLEN + UDP_OVERHEAD + sizeof(struct iphdr) + sizeof(struct tcphdr);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	if (data + want > data_end && skb->len >= want) {
		bpf_skb_pull_data(skb, want);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl != 5)
		return TC_ACT_OK;
	if (ip->frag_off & bpf_htons(0x3fff))
		return TC_ACT_OK;

	// Carrier packets for this node (not ones it routes on to another).
	if (ip->protocol == IPPROTO_UDP && ip->daddr == cfg_local) {
		struct udphdr *udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > data_end || udp->dest != cfg_carrier_port)
			return TC_ACT_OK;
		return decap(skb, udp + 1, data_end, ip->saddr, 1);
	}
	if (ip->protocol == IPPROTO_IPIP && ip->daddr == cfg_local)
		return decap(skb, ip + 1, data_end, ip->saddr, 0);

	struct flow_key key;
	__u8 flags = 0;
	__u32 l4_header = 0;
	if (inner_key(ip, data_end, &key, &flags, &l4_header) < 0)
		return TC_ACT_OK;
	struct flow_entry *entry = bpf_map_lookup_elem(&flows, &key);
	if (!entry)
		return TC_ACT_OK;
	if (needs_daemon(&key, flags)) {
		count(STAT_PASS_CONTROL);
		return TC_ACT_OK;
	}
	if (key.proto == IPPROTO_UDP && skb->gso_size) {
		count(STAT_PASS_GSO);
		return TC_ACT_OK;
	}
	switch (entry->kind) {
	case KIND_LOCAL:
		skb->mark |= cfg_mark;
		count_n(STAT_LOCAL, account(entry, skb, ETH_HLEN + sizeof(struct iphdr) + l4_header, ETH_HLEN, flags));
		return TC_ACT_OK;
	case KIND_ENCAP_UDP:
	case KIND_ENCAP_IPIP:
		return encap(skb, entry, l4_header, flags);
	default:
		return TC_ACT_OK;
	}
}

char _license[] SEC("license") = "Apache-2.0";
