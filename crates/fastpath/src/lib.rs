//! ringlb's optional kernel fast path: the tc program in `bpf/fastpath.c` and its loader.
//!
//! The daemon decides; this crate only carries decisions into the kernel. The program sits on
//! the underlay interface's ingress and handles the packets of flows the daemon installed here
//! (see [`Action`]), so that established flows no longer cross the TUN and the carrier socket.
//! Everything else passes unchanged to the TUN path. The daemon reads back, per flow, the
//! packets, bytes and time of the last packet ([`FastPath::usage`]), so its flow table, timeouts
//! and load stay true.
//!
//! **Lifetime.** The program is attached through a TCX link (kernel 6.6 and later) owned by this
//! process: when the daemon exits or dies, the kernel detaches it and every packet takes the TUN
//! path again (or, with no daemon, local delivery). On older kernels the loader refuses rather
//! than leave a netlink filter behind a dead daemon.
//!
//! **Privilege.** Loading needs CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN. Any failure is a
//! [`LoadError`]; the daemon logs it and runs without the fast path.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::process::Command;

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader, Pod};

/// Where the rule sends marked packets; it is removed when the [`FastPath`] is dropped.
const RULE_TABLE: &str = "local";

/// Where to attach and what the program needs to know.
#[derive(Debug, Clone)]
pub struct FastPathConfig {
    /// The underlay interface: client packets and carrier packets arrive on it, and
    /// encapsulated packets leave by it.
    pub interface: String,
    pub vip: Ipv4Addr,
    /// This node's underlay address (carrier packets are decapsulated only when sent to it).
    pub local: Ipv4Addr,
    /// The UDP carrier's port (packets to it are decapsulated when their flow is installed).
    pub carrier_port: u16,
    /// The mark bit (or bits) set on packets for local delivery, and the preference of the
    /// policy rule that sends marked packets to the `local` table (before the steering rule
    /// that would send them into the TUN).
    pub mark: u32,
    pub rule_pref: u32,
    /// Most flows offloaded at once.
    pub max_flows: u32,
}

/// What the program does with a flow's packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The entry serves the flow itself: deliver locally, skipping the TUN.
    Local,
    /// The entry forwards the flow to `peer` in the carrier's format.
    Encap { carrier: Carrier, local: Ipv4Addr, peer: Ipv4Addr, source_port: u16, port: u16 },
    /// This node serves the flow for the entry `from`: decapsulate its carrier packets.
    Decap { carrier: Carrier, from: Ipv4Addr },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    Udp,
    Ipip,
}

/// The 5-tuple of a client's IPv4 packet to the VIP, as the program reads it (network order).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
    proto: u8,
    pad: [u8; 3],
}

impl FlowKey {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, src_port: u16, dst_port: u16, proto: u8) -> Self {
        FlowKey {
            saddr: src.octets(),
            daddr: dst.octets(),
            sport: src_port.to_be_bytes(),
            dport: dst_port.to_be_bytes(),
            proto,
            pad: [0; 3],
        }
    }

    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.saddr)
    }

    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.daddr)
    }

    pub fn src_port(&self) -> u16 {
        u16::from_be_bytes(self.sport)
    }

    pub fn dst_port(&self) -> u16 {
        u16::from_be_bytes(self.dport)
    }

    pub fn proto(&self) -> u8 {
        self.proto
    }
}

/// `struct flow_entry` in `bpf/fastpath.c`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    kind: u8,
    closed: u8,
    pad: [u8; 2],
    outer_saddr: [u8; 4],
    outer_daddr: [u8; 4],
    outer_sport: [u8; 2],
    outer_dport: [u8; 2],
    packets: u64,
    bytes: u64,
    last_seen: u64,
}

const KIND_LOCAL: u8 = 1;
const KIND_ENCAP_UDP: u8 = 2;
const KIND_ENCAP_IPIP: u8 = 3;
const KIND_DECAP_UDP: u8 = 4;
const KIND_DECAP_IPIP: u8 = 5;

impl Entry {
    fn new(action: Action) -> Self {
        let mut e = Entry::default();
        match action {
            Action::Local => e.kind = KIND_LOCAL,
            Action::Encap { carrier, local, peer, source_port, port } => {
                e.kind = match carrier {
                    Carrier::Udp => KIND_ENCAP_UDP,
                    Carrier::Ipip => KIND_ENCAP_IPIP,
                };
                e.outer_saddr = local.octets();
                e.outer_daddr = peer.octets();
                e.outer_sport = source_port.to_be_bytes();
                e.outer_dport = port.to_be_bytes();
            }
            Action::Decap { carrier, from } => {
                e.kind = match carrier {
                    Carrier::Udp => KIND_DECAP_UDP,
                    Carrier::Ipip => KIND_DECAP_IPIP,
                };
                e.outer_daddr = from.octets();
            }
        }
        e
    }
}

// SAFETY: both are `repr(C)` structs of integers and byte arrays with no padding (each field is
// aligned by the ones before it; sizes 16 and 40), so every bit pattern is a valid value, as
// aya's `Pod` requires for copying them to and from the kernel.
unsafe impl Pod for FlowKey {}
// SAFETY: as above.
unsafe impl Pod for Entry {}

/// What an offloaded flow did in the kernel since it was installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub packets: u64,
    pub bytes: u64,
    /// CLOCK_MONOTONIC nanoseconds of the last packet (0: none yet).
    pub last_seen_ns: u64,
    /// The program carried a FIN or RST of the flow.
    pub closed: bool,
}

impl Entry {
    fn usage(&self) -> Usage {
        Usage { packets: self.packets, bytes: self.bytes, last_seen_ns: self.last_seen, closed: self.closed != 0 }
    }
}

/// The program's own counters (`stats` in `bpf/fastpath.c`), summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FastPathStats {
    /// Packets of flows served by the entry, delivered without the TUN.
    pub local: u64,
    /// Packets encapsulated and sent to a peer.
    pub encapsulated: u64,
    /// Carrier packets decapsulated and delivered.
    pub decapsulated: u64,
    /// Packets of offloaded flows left to the daemon: a SYN.
    pub passed_control: u64,
    /// ... too big to encapsulate within the MTU.
    pub passed_mtu: u64,
    /// ... UDP GSO trains and over-long super-packets.
    pub passed_gso: u64,
    /// ... carrier packets from another address than the flow's entry.
    pub passed_source: u64,
    /// A helper failed.
    pub errors: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the eBPF program is not built in (clang was missing when ringlb was built)")]
    NotBuilt,
    #[error("only IPv4 VIPs are offloaded")]
    NotIpv4,
    #[error("the kernel lacks TCX (6.6 or later is needed, so that the program dies with the daemon)")]
    NoTcx,
    #[error("loading the eBPF object: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("the eBPF program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("the eBPF maps: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("interface {0}: {1}")]
    Interface(String, std::io::Error),
    #[error("policy rule for marked packets: {0}")]
    Rule(String),
}

/// The loaded and attached program. Dropping it detaches the program and removes its rule.
pub struct FastPath {
    flows: HashMap<MapData, FlowKey, Entry>,
    stats: PerCpuArray<MapData, u64>,
    // Kept for the link's lifetime: dropping the `Ebpf` detaches the program.
    _ebpf: Ebpf,
    _link: SchedClassifierLink,
    /// The rule for marked packets, as `ip rule add|del` takes it.
    rule: Option<Vec<String>>,
    /// Room for batched reads of `flows`, allocated on first use.
    batch: Option<Batch>,
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath").field("rule", &self.rule).finish_non_exhaustive()
    }
}

#[cfg(fastpath_built)]
fn object() -> Option<&'static [u8]> {
    Some(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fastpath.o")))
}

#[cfg(not(fastpath_built))]
fn object() -> Option<&'static [u8]> {
    None
}

/// Whether this build carries the program.
pub fn built_in() -> bool {
    object().is_some()
}

impl FastPath {
    /// Loads the program, attaches it to the interface's ingress and adds the policy rule for
    /// marked packets.
    pub fn load(config: &FastPathConfig) -> Result<FastPath, LoadError> {
        let object = object().ok_or(LoadError::NotBuilt)?;
        let tcx = aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        if !tcx {
            return Err(LoadError::NoTcx);
        }
        let ifindex = read_number(&config.interface, "ifindex")?;
        let mtu = read_number(&config.interface, "mtu")?;
        let vip = u32::from_ne_bytes(config.vip.octets());
        let local = u32::from_ne_bytes(config.local.octets());
        let port = u16::from_ne_bytes(config.carrier_port.to_be_bytes());
        let mut ebpf = EbpfLoader::new()
            .override_global("cfg_vip", &vip, true)
            .override_global("cfg_carrier_port", &port, true)
            .override_global("cfg_mark", &config.mark, true)
            .override_global("cfg_ifindex", &ifindex, true)
            .override_global("cfg_mtu", &mtu, true)
            .override_global("cfg_local", &local, true)
            .map_max_entries("flows", config.max_flows.max(1))
            .load(object)?;
        let program: &mut SchedClassifier = ebpf
            .program_mut("ringlb_ingress")
            .ok_or_else(|| LoadError::Rule("the object has no ringlb_ingress program".into()))?
            .try_into()?;
        program.load()?;
        let id = program.attach_with_options(
            &config.interface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )?;
        let link = program.take_link(id)?;
        let flows = HashMap::try_from(
            ebpf.take_map("flows").ok_or(aya::maps::MapError::InvalidName { name: "flows".into() })?,
        )?;
        let stats = PerCpuArray::try_from(
            ebpf.take_map("stats").ok_or(aya::maps::MapError::InvalidName { name: "stats".into() })?,
        )?;
        let mut fast = FastPath { flows, stats, _ebpf: ebpf, _link: link, rule: None, batch: None };
        fast.add_rule(config)?;
        Ok(fast)
    }

    /// `ip rule add pref P fwmark M/M lookup local`, unless that very rule is there already (a
    /// daemon that died left it: harmless without the program, which alone sets the mark).
    /// Another rule at that preference is refused rather than taken over or replaced.
    fn add_rule(&mut self, config: &FastPathConfig) -> Result<(), LoadError> {
        let spec = rule_spec(config);
        let pref = config.rule_pref.to_string();
        let shown = ip(&["-4", "rule", "show", "pref", &pref])?;
        let ours = format!("fwmark 0x{:x}/0x{:x} lookup {RULE_TABLE}", config.mark, config.mark);
        match shown.trim() {
            "" => {
                let mut args = vec!["-4", "rule", "add"];
                args.extend(spec.iter().map(String::as_str));
                ip(&args)?;
            }
            line if line.lines().count() == 1 && line.contains(&ours) => {}
            other => {
                return Err(LoadError::Rule(format!(
                    "preference {pref} already holds another rule ({other}); choose fast_path.rule_pref"
                )))
            }
        }
        self.rule = Some(spec);
        Ok(())
    }

    /// Offloads a flow (or changes what is done with it).
    pub fn install(&mut self, key: &FlowKey, action: Action) -> Result<(), aya::maps::MapError> {
        self.flows.insert(key, Entry::new(action), 0)
    }

    /// Stops offloading a flow; its packets take the TUN path again. Returns what the flow did
    /// until then (`None`: it was not offloaded).
    pub fn remove(&mut self, key: &FlowKey) -> Option<Usage> {
        use aya::maps::IterableMap;
        // One system call that reads and deletes: no packet counted in between is lost.
        match lookup_and_delete(self.flows.map().fd().as_fd(), key) {
            Ok(last) => last.map(|e| e.usage()),
            // A kernel without it for hash maps (before 5.14): read, then delete.
            Err(_) => {
                let last = self.flows.get(key, 0).ok();
                let _ = self.flows.remove(key);
                last.map(|e| e.usage())
            }
        }
    }

    /// Calls `f` with every offloaded flow and what it did. Reads the table in batches of
    /// [`BATCH`] (one system call each: about 0.1 µs a flow); on a kernel that refuses batched
    /// lookups, one flow at a time (two system calls: about 1.4 µs a flow).
    pub fn usage(&mut self, mut f: impl FnMut(&FlowKey, Usage)) {
        if self.batch.is_none() {
            self.batch = Some(Batch::new());
        }
        if let Some(batch) = &mut self.batch {
            use aya::maps::IterableMap;
            if batch.walk(self.flows.map().fd().as_fd(), |k, e| f(k, e.usage())).is_ok() {
                return;
            }
        }
        // Only the daemon adds or removes entries, so the walk sees each one once.
        for (key, e) in self.flows.iter().flatten() {
            f(&key, e.usage());
        }
    }

    /// How many flows are offloaded.
    pub fn len(&self) -> usize {
        self.flows.keys().filter(Result::is_ok).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn stats(&self) -> FastPathStats {
        let sum = |i: u32| self.stats.get(&i, 0).map(|v| v.iter().sum::<u64>()).unwrap_or(0);
        FastPathStats {
            local: sum(0),
            encapsulated: sum(1),
            decapsulated: sum(2),
            passed_control: sum(3),
            passed_mtu: sum(4),
            passed_gso: sum(5),
            errors: sum(6),
            passed_source: sum(7),
        }
    }
}

impl Drop for FastPath {
    fn drop(&mut self) {
        if let Some(spec) = self.rule.take() {
            let mut args = vec!["-4", "rule", "del"];
            args.extend(spec.iter().map(String::as_str));
            if let Err(e) = ip(&args) {
                tracing::warn!(error = %e, "fast path: could not remove the policy rule for marked packets");
            }
        }
    }
}

/// The CLOCK_MONOTONIC time now, in nanoseconds: the clock of [`Usage::last_seen_ns`].
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer to a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// `pref P fwmark M/M lookup local`: exactly this rule is added, and deleted.
fn rule_spec(config: &FastPathConfig) -> Vec<String> {
    let mark = format!("0x{:x}/0x{:x}", config.mark, config.mark);
    ["pref", &config.rule_pref.to_string(), "fwmark", &mark, "lookup", RULE_TABLE].map(str::to_owned).to_vec()
}

fn read_number(name: &str, what: &str) -> Result<u32, LoadError> {
    let path = format!("/sys/class/net/{name}/{what}");
    let text = std::fs::read_to_string(&path).map_err(|e| LoadError::Interface(name.to_owned(), e))?;
    text.trim()
        .parse()
        .map_err(|_| LoadError::Interface(name.to_owned(), std::io::Error::new(std::io::ErrorKind::InvalidData, path)))
}

fn ip(args: &[&str]) -> Result<String, LoadError> {
    let out = Command::new("ip").args(args).output().map_err(|e| LoadError::Rule(format!("ip: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(LoadError::Rule(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())))
    }
}

/// `union bpf_attr`'s member for the `BPF_MAP_*_ELEM` commands (linux/bpf.h).
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// Reads and deletes `key`'s entry of the hash map `fd` in one step (`None`: it held none).
fn lookup_and_delete(fd: BorrowedFd<'_>, key: &FlowKey) -> std::io::Result<Option<Entry>> {
    let mut value = Entry::default();
    let mut attr = ElemAttr {
        map_fd: u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX),
        key: key as *const FlowKey as u64,
        value: &mut value as *mut Entry as u64,
        flags: 0,
    };
    // SAFETY: `ElemAttr` is the member this command reads; it reads one key of the map's key
    // size from `key` (`FlowKey` mirrors it) and writes one value of the map's value size into
    // `value` (`Entry` mirrors it), a live local.
    match unsafe { bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) } {
        Ok(()) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The `bpf(2)` system call `cmd` with `attr`, the `union bpf_attr` member it reads (passed with
/// its own size, a prefix of the union, as the kernel allows).
///
/// # Safety
/// `attr` must be the member `cmd` reads, and each pointer in it must point at live memory of
/// the size the command reads or writes there (a key, a value, `count` of each, a token).
unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<()> {
    // SAFETY: the caller vouches for `attr` and the buffers it points at; the size passed is
    // `attr`'s own, so the kernel reads no further.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, std::mem::size_of::<A>()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Flows read per `BPF_MAP_LOOKUP_BATCH` call.
const BATCH: usize = 4096;
const BATCH_U32: u32 = 4096;

/// Buffers for batched reads of the flow table.
struct Batch {
    keys: Vec<FlowKey>,
    values: Vec<Entry>,
}

/// `union bpf_attr`'s `batch` member (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

impl Batch {
    fn new() -> Self {
        let zero = FlowKey::new(Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, 0, 0, 0);
        Batch { keys: vec![zero; BATCH], values: vec![Entry::default(); BATCH] }
    }

    /// Calls `f` with every entry of the hash map `fd`, a batch at a time. An error before the
    /// first entry means the kernel does not do batched lookups (the caller walks instead).
    fn walk(&mut self, fd: BorrowedFd<'_>, mut f: impl FnMut(&FlowKey, &Entry)) -> std::io::Result<()> {
        // A hash map's batch token is a bucket index (u32).
        let (mut token_in, mut token_out) = (0u32, 0u32);
        let mut first = true;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first { 0 } else { &token_in as *const u32 as u64 },
                out_batch: &mut token_out as *mut u32 as u64,
                keys: self.keys.as_mut_ptr() as u64,
                values: self.values.as_mut_ptr() as u64,
                count: BATCH_U32,
                map_fd: u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX),
                ..BatchAttr::default()
            };
            // SAFETY: `BatchAttr` is the member this command reads; it writes at most `count`
            // keys and values, of the map's key and value sizes (`FlowKey` and `Entry` mirror
            // them), into the two buffers, which hold `BATCH` each; the tokens are live locals of
            // the size a hash map's batch token has.
            let err = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
            let done = match &err {
                None => false,
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
                Some(e) => {
                    if first {
                        return Err(std::io::Error::new(e.kind(), e.to_string()));
                    }
                    // The table changed under a token; what was read stands (the next
                    // reconciliation reads again).
                    return Ok(());
                }
            };
            let n = (attr.count as usize).min(BATCH);
            for i in 0..n {
                f(&self.keys[i], &self.values[i]);
            }
            if done {
                return Ok(());
            }
            token_in = token_out;
            first = false;
        }
    }
}
