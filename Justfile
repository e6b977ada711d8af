# ringlb's tasks. `just --list` shows them; README.md says where to start.
set shell := ["bash", "-euo", "pipefail", "-c"]

prefix := env_var_or_default("NETLAB_PREFIX", "rlab")
netlab := "target/release/netlab --prefix " + prefix

default:
    @just --list

# Build the ringlb and netlab binaries (release).
build:
    cargo build --release --bins

# Lints, unit and property tests, the end-to-end tests in network namespaces (root), the
# smoke bench, and the container image with its compose cluster (plain and BGP) under podman.
test: lint
    cargo test --release --workspace
    just test-fast-path
    just bench-smoke
    just container-test-bgp

# The end-to-end tests whose flows the kernel fast path would carry, again with it on every node
# (NETLAB_FAST_PATH): transfers over both carriers, keep-alive, drain, failures, health,
# bursts, restarts. (tests/fastpath.rs, in the workspace run, tests the fast path itself.)
test-fast-path:
    NETLAB_FAST_PATH=1 cargo test --release -p ringlb --test e2e --test survival --test restart -- \
        big_transfers keep_alive drained killed_node pinned_to_a_dead bursts health requests_through \
        rolling kill_9 entries_joining

# cargo fmt and clippy, warnings as errors; the fuzz targets still compile.
lint:
    cargo fmt --all --check
    cargo clippy --release --all-targets -- -D warnings
    # The fuzz targets are not run here (`just fuzz`), but they must keep compiling.
    RUSTFLAGS="--cfg fuzzing" cargo check -q --manifest-path fuzz/Cargo.toml --bins

# cargo-fuzz with libFuzzer and the address sanitizer; findings and logs go to
# fuzz/artifacts/TARGET, the growing corpus to fuzz/corpus/TARGET. Not part of `just test`.
# Fuzz every parser of untrusted bytes, RUNS executions per target, one after another.
fuzz runs="10000000":
    #!/usr/bin/env bash
    set -uo pipefail
    command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
    cd fuzz
    # cargo-fuzz needs nightly flags (-Zsanitizer); stable Rust allows them with this.
    export RUSTC_BOOTSTRAP=1
    cargo fuzz build || exit 1
    failed=()
    for target in $(cargo fuzz list); do
        mkdir -p "artifacts/$target"
        log="artifacts/$target/run.log"
        start=$(date +%s)
        nice -n 19 cargo fuzz run "$target" -- -runs={{runs}} -print_final_stats=1 >"$log" 2>&1
        status=$?
        secs=$(( $(date +%s) - start ))
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
        if [ "$status" -eq 0 ]; then
            echo "fuzz $target: ok, ${execs:-?} executions in ${secs} s"
        else
            failed+=("$target")
            echo "fuzz $target: FAILED after ${execs:-?} executions in ${secs} s (see fuzz/$log):"
            grep -m 3 -E "panicked|ERROR: AddressSanitizer|ERROR: libFuzzer|^(Failing input|Output of)" "$log" || tail -n 5 "$log"
            ls artifacts/"$target"/crash-* artifacts/"$target"/leak-* artifacts/"$target"/timeout-* artifacts/"$target"/oom-* 2>/dev/null
        fi
    done
    [ ${#failed[@]} -eq 0 ] || { echo "fuzz: findings in ${failed[*]}"; exit 1; }

# Bring up the lab: NODES nodes; ENTRY single (VIP via n1), ecmp (static multipath), bgp (BIRD on
# the router and every node, BFD) or l2 (client on the nodes' segment, ARP owner); CARRIER udp or ipip.
# SITES 2 splits the nodes over two sites (own router, client and entry each) joined by an emulated
# WAN, 40 ms ± 5 ms one way with 1 % loss (netlab-up-wan sets it).
netlab-up nodes="3" entry="single" carrier="udp" sites="1": build
    {{netlab}} up --nodes {{nodes}} --entry {{entry}} --carrier {{carrier}} --sites {{sites}}

# Bring up the lab with the kernel fast path (eBPF) on every node: flows after their first packet bypass the
# daemons (`just netlab-status` shows a `fast path:` line per node).
netlab-up-fast nodes="3" carrier="udp": build
    {{netlab}} up --nodes {{nodes}} --carrier {{carrier}} --fast-path

# Bring up two sites of NODES/2 nodes joined by an emulated WAN: one-way DELAY ± JITTER, LOSS (0 to
# 1), RATE (e.g. 10mbit, or none), SEED (the same seed, the same losses and delays). Entry single per
# site, carrier udp (sealed between the sites).
netlab-up-wan nodes="4" delay="40ms" jitter="5ms" loss="0.01" rate="none" seed="1": build
    {{netlab}} up --nodes {{nodes}} --sites 2 --wan-delay {{delay}} --wan-jitter {{jitter}} --wan-loss {{loss}} --wan-rate {{rate}} --wan-seed {{seed}}

# The WAN of a two-site lab: `stats`, `cut`, `heal`, or `set --wan-delay 80ms --wan-loss 0.05 ...`.
netlab-wan +args="stats":
    {{netlab}} wan {{args}}

# Two sites, each serving its own clients; a drained site's clients served by the other and back;
# a cut WAN leaving each site serving its own, and the cluster whole again after healing.
netlab-wan-demo: (netlab-up-wan)
    @echo; echo "== 8 new connections from site a's client (entry n1): served in site a =="
    {{netlab}} demo --requests 8
    @echo; echo "== 8 from site b's client (entry n3): served in site b =="
    {{netlab}} demo --requests 8 --site 2
    @echo; echo "== drain site a (n1 and n2): site a's clients are served in site b, over the sealed carrier =="
    {{netlab}} drain n1
    {{netlab}} drain n2
    sleep 1
    {{netlab}} demo --requests 8
    {{netlab}} status | grep -E "^node|^sites|^sealed"
    @echo; echo "== undrain site a: its clients come home =="
    {{netlab}} drain n1 --undo
    {{netlab}} drain n2 --undo
    sleep 1
    {{netlab}} demo --requests 8
    @echo; echo "== cut the WAN: each site serves its own clients =="
    {{netlab}} wan cut
    {{netlab}} demo --requests 4
    {{netlab}} demo --requests 4 --site 2
    sleep 8
    {{netlab}} status | grep -E "^node|^n[0-9] "
    @echo; echo "== heal the WAN: within seconds every node sees every other alive again =="
    {{netlab}} wan heal
    sleep 6
    {{netlab}} status | grep -E "^node|^n[0-9] "
    {{netlab}} wan stats
    @echo; echo "The lab is still up: just netlab-status ; just netlab-down"

# Stop every process of the lab and delete its namespaces.
netlab-down:
    if [ -x target/release/netlab ]; then {{netlab}} down; else cargo run -q --release --bin netlab -- --prefix {{prefix}} down; fi

# Run a command on a lab host: client, router, n1, n2, ... (two sites: also client2, router2, wan)
netlab-exec node +cmd:
    {{netlab}} exec {{node}} {{cmd}}

# Print every node's member table and counters.
netlab-status:
    {{netlab}} status

# Send requests to the VIP from the client and print who answered.
netlab-demo requests="12":
    {{netlab}} demo --requests {{requests}}

# Kill a node, cut a path between two nodes, heal; print what the cluster saw. In a bgp or l2 lab
# it first kills an entry's daemon and shows the network move its traffic.
netlab-chaos:
    {{netlab}} chaos

# Send COUNT TCP SYNs to the VIP from spoofed private sources, from the lab's client.
netlab-flood count="1000000":
    {{netlab}} flood --count {{count}}

# Kill ringlb on a node (kill -9), stop it (SIGTERM: it drains first, then exits), or start it again.
netlab-kill node:
    {{netlab}} kill {{node}}

netlab-stop node:
    {{netlab}} stop {{node}}

netlab-start node:
    {{netlab}} start {{node}}

# The README's demo: a lab that balances, survives its balancer being killed, and shows its state.
demo: (netlab-up)
    @echo; echo "== 12 new connections to the VIP, all entering through n1 =="
    {{netlab}} demo --requests 12
    @echo; echo "== member tables and counters =="
    {{netlab}} status
    @echo; echo "== kill -9 ringlb on n3: within a second the others stop sending it new flows =="
    {{netlab}} kill n3
    sleep 1
    {{netlab}} demo --requests 6
    {{netlab}} status
    @echo; echo "== start ringlb on n3 again: it rejoins and takes new flows =="
    {{netlab}} start n3
    sleep 1
    {{netlab}} demo --requests 6
    @echo; echo "== kill -9 ringlb on the entry n1: the node falls back to serving the VIP itself =="
    {{netlab}} kill n1
    {{netlab}} demo --requests 3
    {{netlab}} start n1
    @echo; echo "The lab is still up: just netlab-exec client curl -s http://10.200.0.10/ ; just netlab-down"

# Also ringlb across an emulated WAN between two sites, sealed and plain.
# Benchmarks (not tests): direct path, ringlb (plain and sealed carrier, with and without the kernel
# fast path), HAProxy, nftables NAT.
bench: build
    {{netlab}} bench --out docs/benchmarks.md

# Each ratio must hold in one of three tries.
# CI's speed check (under a minute): forwarded upload above 0.25x direct, sealed above 0.25x plain,
# forwarded 64-byte datagrams above 0.1x direct, and with the kernel fast path forwarded upload
# above 0.5x direct, most of it carried by the fast path.
bench-smoke: build
    {{netlab}} bench --smoke 0.25

# Two sites of two nodes, 150 ms ± 30 ms round trip, 3 % loss, light traffic from both sites'
# clients; writes the "WAN soak" section of docs/benchmarks.md.
# Membership across a slow, lossy WAN for MINUTES (not a test): nobody long suspected, nobody dead.
bench-wan-soak minutes="10": build
    {{netlab}} soak-wan --minutes {{minutes}} --out docs/benchmarks.md

# Aggregate requests/s with 1, 2, 4, 8 nodes behind one entry; plot in docs/scaling.png.
bench-scaling: build
    command -v gnuplot >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gnuplot-nox
    {{netlab}} bench --scaling docs/scaling.png

# Profile the forwarded path under one load (upload, download, close, keep-alive) with perf
# (apt-get install linux-perf); writes target/profile/LOAD.txt and LOAD.perf.data.
profile load="close": build
    command -v perf >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf
    {{netlab}} profile {{load}}

# The core's per-packet decision cost (criterion).
bench-core:
    cargo bench -p ringlb-core --bench decisions

# Resident memory of 1,000,000 tracked flows.
bench-memory:
    cargo bench -p ringlb-core --bench flow_memory

# The container image and a three-node compose cluster (podman, offline): builds the images,
# checks balancing, kill -9s daemons, removes everything it made. Root; well under 10 minutes.
container-test:
    deploy/container/test.sh

# container-test plus the BGP variant (BIRD beside each node, a BIRD router with ECMP and BFD).
container-test-bgp:
    RINGLB_CT_BGP=1 deploy/container/test.sh
