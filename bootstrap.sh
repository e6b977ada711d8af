#!/usr/bin/env bash
# The two commands of the README, for a fresh Debian machine with Rust, run as root:
#
#   ./bootstrap.sh demo   install what is missing, build, bring up a 3-node lab in network
#                         namespaces, show it balance real HTTP traffic, survive its balancer
#                         being killed, and print its state (the lab stays up: just netlab-down)
#   ./bootstrap.sh test   install what is missing, then lints, unit, property and end-to-end tests
#
# It installs Debian packages (iproute2, nftables, nginx, iperf3, wrk, haproxy, curl, python3,
# bird2 and tcpdump for the BGP and layer-2 entry labs, clang and libbpf-dev for the kernel
# fast path's eBPF program)
# and `just` when they are missing, and nothing else.
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" != 0 ]; then
    echo "bootstrap.sh: run as root (network namespaces and TUN devices need it)" >&2
    exit 1
fi

if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || { echo "bootstrap.sh: install Rust first (https://rustup.rs)" >&2; exit 1; }

deps() {
    local missing=()
    local -A pkg=([ip]=iproute2 [nft]=nftables [nginx]=nginx-light [iperf3]=iperf3 [wrk]=wrk
                  [haproxy]=haproxy [curl]=curl [python3]=python3 [sysctl]=procps [ss]=iproute2
                  [bird]=bird2 [tcpdump]=tcpdump [clang]=clang)
    for cmd in "${!pkg[@]}"; do
        command -v "$cmd" >/dev/null || [ -x "/usr/sbin/$cmd" ] || missing+=("${pkg[$cmd]}")
    done
    # The eBPF program's headers (bpf_helpers.h); without them ringlb builds without its fast path.
    [ -f /usr/include/bpf/bpf_helpers.h ] || missing+=(libbpf-dev)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "bootstrap.sh: installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    # nginx's Debian package starts a system nginx on :80 of the host; the lab does not need it.
    systemctl disable --now nginx >/dev/null 2>&1 || true
    # Likewise bird2's system BIRD: the lab runs its own, one per namespace.
    systemctl disable --now bird >/dev/null 2>&1 || true
    if command -v rustup >/dev/null; then
        rustup component add clippy rustfmt >/dev/null 2>&1 || true
    fi
    if ! command -v just >/dev/null; then
        echo "bootstrap.sh: installing just"
        if command -v pip3 >/dev/null || command -v pip >/dev/null; then
            "$(command -v pip3 || command -v pip)" install -q rust-just 2>/dev/null || true
            hash -r
        fi
        command -v just >/dev/null || cargo install -q --locked just
    fi
}

# Runs the test suite and closes with one line that sums every cargo test binary's result.
run_tests() {
    local log status
    log=$(mktemp /tmp/ringlb-test.XXXXXX)
    set +e
    just test 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    set -e
    grep -aoE 'test result: [A-Za-z]+\. [0-9]+ passed; [0-9]+ failed' "$log" |
        awk '{p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}'
    rm -f "$log"
    return "$status"
}

case "${1:-}" in
    demo) deps; just demo ;;
    test) deps; run_tests ;;
    *) echo "usage: $0 demo|test" >&2; exit 2 ;;
esac
