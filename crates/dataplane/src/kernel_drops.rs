//! Packets the kernel dropped before the daemon read them: overload, told apart from loss.
//!
//! Two queues lie between the network and the packet loop, and the kernel drops at both when
//! the loop falls behind:
//! - **the TUN's queue** (`tun.rs` sets 10,000 packets): VIP packets the kernel hands to the
//!   TUN while it is full are dropped and counted in the device's `tx_dropped` (the TUN
//!   transmits towards its reader). Read from `/proc/net/dev`, which always shows the reading
//!   process's own network namespace (`/sys/class/net` shows the namespace sysfs was mounted
//!   in, which need not be ours).
//! - **the carrier socket's receive buffer**: carrier packets from peers that find it full. The
//!   socket's own drop counter (`sk_drops`, the `drops` column of `/proc/net/udp` and
//!   `/proc/net/raw`), read with `getsockopt(SO_MEMINFO)` on the socket itself: one system call,
//!   no search through a table of every socket on the host by port or inode.
//!
//! Both count what the kernel counts: one per buffer it dropped, so a GSO super-packet (TUN) or
//! a GRO batch (carrier) dropped whole counts once; the figures are a lower bound on packets.
//! No packet the daemon read is in them, so they never overlap `ringlb_dropped_packets_total`
//! (whose `tun_write_error` is the other direction: writes into the TUN). The packet loop
//! samples them once a second and for every snapshot, never per packet.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// What the kernel dropped before the daemon read it, since the daemon started. `None`: the
/// counter could not be read (the reason was logged once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelDrops {
    /// VIP packets the TUN's queue had no room for.
    pub tun_queue: Option<u64>,
    /// Carrier packets the carrier socket's receive buffer had no room for.
    pub carrier_socket: Option<u64>,
}

impl KernelDrops {
    /// Both, the unreadable ones as 0.
    pub fn total(&self) -> u64 {
        self.tun_queue.unwrap_or(0) + self.carrier_socket.unwrap_or(0)
    }
}

/// Follows the two counters from the daemon's start: the TUN's from its value then (a
/// persistent TUN keeps counting across daemons), the socket's across the 32-bit wrap of the
/// kernel's counter (sampled once a second, it cannot wrap unseen).
#[derive(Debug)]
pub(crate) struct KernelDropsReader {
    tun: String,
    tun_base: Option<u64>,
    /// The socket counter's last raw value, and the total since the start.
    socket_last: u32,
    socket_total: u64,
    socket_ok: bool,
    last: KernelDrops,
    warned: bool,
}

impl KernelDropsReader {
    /// Starts following the TUN `tun` and the carrier socket `socket` (a new socket: its
    /// counter starts at 0).
    pub(crate) fn new(tun: String, socket: BorrowedFd<'_>) -> Self {
        let tun_base = tun_tx_dropped(&tun).ok();
        let socket_last = socket_drops(socket).unwrap_or(0);
        KernelDropsReader {
            tun,
            tun_base,
            socket_last,
            socket_total: u64::from(socket_last),
            socket_ok: true,
            last: KernelDrops::default(),
            warned: false,
        }
    }

    /// Reads both counters now.
    pub(crate) fn sample(&mut self, socket: BorrowedFd<'_>) -> KernelDrops {
        let tun = tun_tx_dropped(&self.tun);
        let sock = socket_drops(socket);
        if let Ok(raw) = sock {
            self.socket_total += u64::from(raw.wrapping_sub(self.socket_last));
            self.socket_last = raw;
        }
        self.socket_ok = sock.is_ok();
        let tun_queue = match (&tun, self.tun_base) {
            (Ok(now), Some(base)) => Some(now.saturating_sub(base)),
            (Ok(now), None) => {
                self.tun_base = Some(*now);
                Some(0)
            }
            (Err(_), _) => None,
        };
        if let (Some(e), false) = (tun.as_ref().err().or(sock.as_ref().err()), self.warned) {
            tracing::warn!(tun = %self.tun, error = %e, "cannot read the kernel's drop counters; they stay unknown");
            self.warned = true;
        }
        self.last = KernelDrops { tun_queue, carrier_socket: self.socket_ok.then_some(self.socket_total) };
        self.last
    }
}

/// The `sk_drops` counter of `socket` (`getsockopt(SOL_SOCKET, SO_MEMINFO)`).
pub fn socket_drops(socket: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = [0u32; SK_MEMINFO_VARS];
    let mut len = libc::socklen_t::try_from(std::mem::size_of_val(&info)).unwrap_or(0);
    // SAFETY: the fd is borrowed, so it stays open for the call; `info` is a live, writable
    // array of `len` bytes, and the kernel writes at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_MEMINFO, info.as_mut_ptr().cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let drops = usize::try_from(libc::SK_MEMINFO_DROPS).unwrap_or(usize::MAX);
    // Kernels before 4.15 give fewer fields (no drop counter).
    if usize::try_from(len).unwrap_or(0) < (drops + 1) * 4 {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "SO_MEMINFO has no drop counter on this kernel"));
    }
    Ok(info[drops])
}

/// Fields of `SO_MEMINFO` (`SK_MEMINFO_VARS` in the kernel's `sock_diag.h`).
const SK_MEMINFO_VARS: usize = 9;

/// The TUN's (or any device's) `tx_dropped`, from this network namespace's `/proc/net/dev`.
pub fn tun_tx_dropped(device: &str) -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/net/dev")?;
    tx_dropped_in(&text, device)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no device {device:?} in /proc/net/dev")))
}

/// The transmit `drop` column of `device` in the text of `/proc/net/dev`: after `name:`, eight
/// receive fields (bytes packets errs drop fifo frame compressed multicast), then transmit
/// bytes, packets, errs, drop.
fn tx_dropped_in(text: &str, device: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, fields) = line.split_once(':')?;
        (name.trim() == device).then(|| fields.split_whitespace().nth(11)?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, UdpSocket};
    use std::os::fd::AsFd;

    #[test]
    fn the_tx_drop_column_of_the_named_device() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
             lo:    1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0\n  \
             eth0: 5000000   4000    0    3    0     0          0         0   700000    3000    0    0    0     0       0          0\n \
             ring0:  123456    789    0    0    0     0          0         0 99999999  500000    1 41234    0     0       0          0\n";
        let check = |device: &str, want: Option<u64>| assert_eq!(tx_dropped_in(text, device), want, "{device}");
        check("ring0", Some(41_234));
        check("eth0", Some(0));
        check("lo", Some(0));
        check("ring", None);
        check("ring0x", None);
        check("", None);
        assert_eq!(tx_dropped_in("ring0: 1 2 3\n", "ring0"), None, "a short line is not a zero");
    }

    /// A receive buffer too small for what is sent to it: every datagram the reader did not get
    /// is in the socket's drop counter, no more, no fewer (loopback loses nothing else).
    #[test]
    fn a_full_receive_buffer_counts_every_datagram_it_refused() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket2::SockRef::from(&rx).set_recv_buffer_size(4096).unwrap();
        rx.set_nonblocking(true).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to: SocketAddr = rx.local_addr().unwrap();
        assert_eq!(socket_drops(rx.as_fd()).unwrap(), 0);
        let sent = 1_000u32;
        for i in 0..sent {
            tx.send_to(&i.to_be_bytes().repeat(16), to).unwrap();
        }
        let mut received = 0u32;
        let mut buf = [0u8; 128];
        while rx.recv(&mut buf).is_ok() {
            received += 1;
        }
        let drops = socket_drops(rx.as_fd()).unwrap();
        assert!(received > 0 && drops > 0, "received {received}, dropped {drops}: the buffer did not overflow");
        assert_eq!(received + drops, sent, "received {received} + dropped {drops} != sent {sent}");
    }

    #[test]
    fn the_reader_counts_from_its_start_across_the_wrap() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut r = KernelDropsReader::new("lo".into(), rx.as_fd());
        // As if the kernel's 32-bit counter had wrapped since the last sample.
        r.socket_last = u32::MAX - 4;
        r.socket_total = 10;
        let s = r.sample(rx.as_fd());
        assert_eq!(s.carrier_socket, Some(10 + 5));
        assert!(s.tun_queue.is_some(), "lo is in /proc/net/dev");
        let mut gone = KernelDropsReader::new("no-such-dev".into(), rx.as_fd());
        assert_eq!(gone.sample(rx.as_fd()).tun_queue, None);
    }
}
