#!/usr/bin/env bash
# `just container-test`: the container images and the compose cluster, end to end, offline.
#
#  1. installs what is missing: podman, runc, debootstrap, binutils (apt); podman-compose (pip,
#     in its own virtualenv under $RINGLB_CT_CACHE). If podman cannot run a container as it is
#     configured, a drop-in /etc/containers/containers.conf.d/50-ringlb-podman.conf sets the
#     runtime runc and ulimits within the host's hard limits (containers.conf is not touched).
#  2. builds ringlb (cargo, on the host), the Debian base image (debootstrap + podman import,
#     kept as a cache: localhost/ringlb-base:bookworm), the ringlb image and the lab image;
#  3. brings up deploy/container/compose.yaml under a project name of its own (every container,
#     network and volume starts with it) on a free 10.89.X.0/24;
#  4. checks that 100 requests from the client to the VIP are answered by all three nodes;
#  5. kill -9s n3's ringlb container (it stays down) and, 2 s later, sends 100 requests of which
#     none may fail; starts it again; then kill -9s the entry n1's daemon process (a crash:
#     fail-open, and podman's restart policy starts it again) and checks the same;
#  6. runs the Kubernetes DaemonSet's pod template with podman kube play
#     (deploy/kubernetes/kube-play-test.sh; RINGLB_CT_KUBE=0 skips it);
#  7. with RINGLB_CT_BGP=1, the BGP variant (compose.bgp.yaml): the router learns three next hops,
#     100 requests through it reach all three nodes, kill -9 of n2's daemon removes its next hop
#     and 2 s later no request fails;
#  8. removes every container, network, volume, image and directory it made, also on failure.
#
# Environment: RINGLB_CT_PREFIX (default rlct<random>), RINGLB_CT_CACHE (default
# /var/cache/ringlb-container), RINGLB_BIN (a prebuilt ringlb; default: cargo build --release),
# RINGLB_CT_KEEP=1 (leave the cluster up, print how to remove it).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
start=$(date +%s.%N)
elapsed() { awk -v s="$start" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }'; }
log() { printf '[container-test %6ss] %s\n' "$(elapsed)" "$*"; }
die() { log "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (podman, network namespaces)"
prefix=${RINGLB_CT_PREFIX:-rlct$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')}
[[ $prefix =~ ^[a-z0-9]+$ ]] || die "RINGLB_CT_PREFIX must be lower-case letters and digits"
cache=${RINGLB_CT_CACHE:-/var/cache/ringlb-container}
run=/run/ringlb-ct/$prefix
vip=10.200.0.10
base_image=localhost/ringlb-base:bookworm
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/crates/ringlb/Cargo.toml" | head -n 1)
image=localhost/$prefix-ringlb:${version:-0.1.0}
lab_image=localhost/$prefix-lab:bookworm
compose_file=$here/compose.yaml
mkdir -p "$cache" "$run/dev-net"

# ---- 1. what the test needs ------------------------------------------------------------------
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v objcopy >/dev/null || need+=(binutils)
if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
compose_version=1.6.0
pc=$cache/venv/bin/podman-compose
if ! [ -x "$pc" ] || ! "$pc" --version 2>/dev/null | grep -q "podman-compose version $compose_version"; then
    log "pip install podman-compose==$compose_version (virtualenv $cache/venv)"
    python3 -m venv "$cache/venv"
    "$cache/venv/bin/pip" install -q "podman-compose==$compose_version"
fi
# Everything this run made goes, whatever happens.
compose_files=(-f "$compose_file")
compose() { "$pc" -p "$prefix" "${compose_files[@]}" "$@"; }
leftovers() {
    podman ps -a --format '{{.Names}}' | grep "^${prefix}_" || true
    podman volume ls --format '{{.Name}}' | grep "^${prefix}_" || true
    podman network ls --format '{{.Name}}' | grep "^${prefix}_" || true
}
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ "$rc" != 0 ]; then
        log "logs of the failed run:"
        for c in $(podman ps -a --format '{{.Names}}' | grep "^${prefix}_"); do
            echo "--- $c ($(podman inspect -f '{{.State.Status}} exit={{.State.ExitCode}} restarts={{.RestartCount}}' "$c" 2>/dev/null))"
            podman logs "$c" 2>&1 | tail -n 15 | sed 's/\x1b\[[0-9;]*m//g'
        done
    fi
    if [ "${RINGLB_CT_KEEP:-0}" = 1 ] && [ "$rc" = 0 ]; then
        log "left up (RINGLB_CT_KEEP=1); remove it with:"
        echo "  RINGLB_NET=$net RINGLB_DEV_DIR=$run/dev-net RINGLB_IMAGE=$image RINGLB_LAB_IMAGE=$lab_image \\"
        echo "    $pc -p $prefix -f $compose_file down -t 2 -v; podman rmi $image $lab_image; rm -rf $run"
        exit 0
    fi
    compose down -t 2 -v >"$run/down.log" 2>&1
    # Belt and braces: anything still named after this run.
    podman ps -a --format '{{.Names}}' | grep "^${prefix}_" | xargs -r podman rm -f -t 0 >/dev/null 2>&1
    podman volume ls --format '{{.Name}}' | grep "^${prefix}_" | xargs -r podman volume rm -f >/dev/null 2>&1
    podman network ls --format '{{.Name}}' | grep "^${prefix}_" | xargs -r podman network rm -f >/dev/null 2>&1
    podman rmi -f "$image" "$lab_image" >/dev/null 2>&1
    left=$(leftovers)
    rm -rf "$run"
    if [ -n "$left" ]; then
        log "FAILED: left behind: $left"
        rc=1
    else
        log "removed every container, network and volume of $prefix, its images and $run"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- 2. images -----------------------------------------------------------------------------
ctx=$run/build
mkdir -p "$ctx"
if [ -n "${RINGLB_BIN:-}" ]; then
    bin=$RINGLB_BIN
else
    log "cargo build --release --bin ringlb"
    (cd "$repo" && nice cargo build -q --release --bin ringlb -j 2)
    bin=${CARGO_TARGET_DIR:-$repo/target}/release/ringlb
fi
# The image needs the program, not its debug information (66 MB -> 9 MB).
objcopy --strip-debug "$bin" "$ctx/ringlb"

if ! podman image exists "$base_image"; then
    t=$(date +%s.%N)
    log "making $base_image from Debian's packages (debootstrap --variant=minbase, podman import)"
    "$here/base-image.sh" "$base_image" iproute2 >/dev/null
    log "base image made in $(awk -v s="$t" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }') s"
fi

# Podman as Debian ships it may not run containers here: crun refuses hybrid cgroups, and its
# default ulimits exceed the host's hard ones. Then a drop-in (read after containers.conf,
# which stays as it is) sets what is missing. It stays: podman's restart policy runs
# `podman container cleanup` outside this script, which needs it too.
dropin=/etc/containers/containers.conf.d/50-ringlb-podman.conf
if ! podman run --rm --network none "$base_image" true >/dev/null 2>"$run/probe.log"; then
    nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
    [ "$nofile" = unlimited ] && nofile=1048576
    [ "$nproc" = unlimited ] && nproc=4096
    # Soft = hard: runc was refused a hard nproc above the soft one here, though below the
    # host's hard one, and `podman kube play` failed with a soft nofile below the hard one.
    nproc=$(( nproc < 1024 ? nproc : 1024 ))
    log "podman cannot run a container as configured ($(tail -n 1 "$run/probe.log" | cut -c1-120)); writing $dropin"
    mkdir -p "$(dirname "$dropin")"
    {
        echo "# Written by deploy/container/test.sh: what podman needs on this host (deploy/README.md)."
        echo "[containers]"
        echo "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]"
        if podman info --format '{{.Host.OCIRuntime.Name}}' 2>/dev/null | grep -qv runc && command -v runc >/dev/null; then
            printf '[engine]\nruntime = "runc"\n'
        fi
    } >"$dropin"
    podman run --rm --network none "$base_image" true >/dev/null 2>"$run/probe.log" \
        || { cat "$run/probe.log"; die "podman still cannot run a container (see $dropin)"; }
fi

t=$(date +%s.%N)
podman build -q --layers=false --format docker -f "$here/Dockerfile" \
    --build-arg BASE="$base_image" --build-arg VERSION="$version" \
    --build-arg REVISION="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    -t "$image" "$ctx" >"$run/build.log" 2>&1 || { cat "$run/build.log"; die "building the ringlb image"; }
build_secs=$(awk -v s="$t" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }')
size=$(podman image inspect -f '{{.Size}}' "$image")
log "ringlb image $image: $(awk -v b="$size" 'BEGIN { printf "%.1f MB", b / 1e6 }') ($size bytes), built in $build_secs s from $base_image"
podman run --rm --entrypoint /usr/local/bin/ringlb "$image" --version | grep -q "ringlb $version" || die "the image's ringlb --version"
[ "$(podman image inspect -f '{{.Config.User}}' "$image")" = "65534:65534" ] || die "the image does not run as 65534"

# The lab image: nginx, curl, BIRD from apt (about 5 s; removed with the run), and this run's ringlb.
podman build -q -f "$here/lab.Dockerfile" --build-arg BASE="$base_image" -t "$lab_image" "$ctx" \
    >"$run/build-lab.log" 2>&1 || { cat "$run/build-lab.log"; die "building the lab image"; }
log "lab image $lab_image built"

# ---- 3. the cluster --------------------------------------------------------------------------
# A /24 that no route and no podman network uses; the lock keeps parallel runs apart.
exec 9>"$cache/subnet.lock"
flock 9
used=$( (ip -4 route; podman network ls -q | xargs -r podman network inspect -f '{{range .Subnets}}{{.Subnet}} {{end}}') 2>/dev/null)
net=
for x in $(shuf -i 100-249); do
    grep -q "10\.89\.$x\." <<<"$used" || { net=10.89.$x; break; }
done
[ -n "$net" ] || die "no free 10.89.X.0/24"
export RINGLB_NET=$net RINGLB_DEV_DIR=$run/dev-net RINGLB_IMAGE=$image RINGLB_LAB_IMAGE=$lab_image
log "compose up: project $prefix on $net.0/24 (nodes .11 .12 .13, client .100)"
compose up -d >"$run/up.log" 2>&1 || { grep -v healthcheck "$run/up.log" | tail -n 20; die "compose up"; }
flock -u 9

ctr() { echo "${prefix}_$1_1"; }
metrics() { podman exec "$(ctr "n$1-ringlb")" ringlb metrics 2>/dev/null; }
# Converged: every node sees 3 members alive and a load vector younger than 1 s from both peers.
converged() {
    local i text alive fresh
    for i in 1 2 3; do
        text=$(metrics "$i") || return 1
        alive=$(awk '/^ringlb_members_alive\{/ { s += $NF } END { print s + 0 }' <<<"$text")
        fresh=$(grep '^ringlb_peer_load_age_seconds{' <<<"$text" | grep -v "peer=\"n$i\"" | awk '$NF < 1 { c++ } END { print c + 0 }')
        [ "$alive" = 3 ] && [ "$fresh" = 2 ] || return 1
    done
}
deadline=$(( $(date +%s) + 60 ))
until converged; do
    [ "$(date +%s)" -lt "$deadline" ] || die "the cluster did not converge within 60 s"
    sleep 0.5
done
for i in 1 2 3; do
    podman healthcheck run "$(ctr "n$i-ringlb")" >/dev/null || die "healthcheck of n$i-ringlb"
    pid=$(podman inspect -f '{{.State.Pid}}' "$(ctr "n$i-ringlb")")
    [ "$(awk '/^CapEff/ { print $2 }' "/proc/$pid/status")" = 0000000000000000 ] || die "n$i-ringlb has capabilities"
    [ "$(awk '/^Uid/ { print $2 }' "/proc/$pid/status")" = 65534 ] || die "n$i-ringlb does not run as 65534"
done
log "cluster up and converged; every daemon healthy, uid 65534, no capabilities"

# ---- 4. balancing ----------------------------------------------------------------------------
requests() {
    podman exec "$(ctr client)" sh -c \
        "for i in \$(seq 1 $1); do curl -s -m 3 --connect-timeout 2 http://$vip/ || echo FAILED; done"
}
check_requests() {
    local what=$1 want_nodes=$2 out failed answered
    out=$(requests 100)
    failed=$(grep -c FAILED <<<"$out" || true)
    answered=$(grep -c '^served by n' <<<"$out" || true)
    log "$what: $answered of 100 answered, $failed failed; $(grep '^served by' <<<"$out" | sort | uniq -c | awk '{ printf "%s %s, ", $4, $1 }' | sed 's/, $//')"
    [ "$failed" = 0 ] && [ "$answered" = 100 ] || die "$what: $failed requests failed"
    for n in $want_nodes; do
        grep -q "^served by $n\$" <<<"$out" || die "$what: $n answered none"
    done
}
check_requests "100 requests through the entry n1" "n1 n2 n3"

# ---- 5. a daemon dies -----------------------------------------------------------------------
wait_converged() {
    local deadline=$(( $(date +%s) + 30 ))
    until converged; do
        [ "$(date +%s)" -lt "$deadline" ] || die "$1 within 30 s"
        sleep 0.5
    done
}
# n3's daemon killed and kept dead (podman kill: no restart): the entry stops placing flows on it.
c=$(ctr n3-ringlb)
podman kill -s KILL "$c" >/dev/null
log "kill -9 of n3's ringlb container (stays down); waiting 2 s"
sleep 2
check_requests "100 requests 2 s after n3's daemon died" "n1 n2"
podman start "$c" >/dev/null
wait_converged "n3's daemon did not rejoin"
log "n3's daemon started again and rejoined"
# The entry's daemon crashes (kill -9 of the process): its node serves the VIP itself
# (fail-open) and podman's restart policy starts the daemon again.
c=$(ctr n1-ringlb)
pid=$(podman inspect -f '{{.State.Pid}}' "$c")
kill -9 "$pid"
log "kill -9 of the entry n1's ringlb process (pid $pid); waiting 2 s"
sleep 2
check_requests "100 requests 2 s after the entry's daemon died" ""
wait_converged "n1's daemon did not come back"
log "n1's daemon restarted by podman (restarts: $(podman inspect -f '{{.RestartCount}}' "$c")) and rejoined"
# Placement weighs the flows each node served lately (closing flows linger 10 s), so right
# after the restarts the split is uneven; what matters is that nothing fails.
check_requests "100 requests after both restarts" ""

# ---- 6. the Kubernetes pod template, with podman kube play ------------------------------------
if [ "${RINGLB_CT_KUBE:-1}" = 1 ]; then
    PYTHON=$cache/venv/bin/python RINGLB_IMAGE=$image "$repo/deploy/kubernetes/kube-play-test.sh" \
        >"$run/kube-play.log" 2>&1 || { grep -v healthcheck "$run/kube-play.log" | tail -n 25; die "kube play of the DaemonSet's pod template"; }
    log "the DaemonSet's pod template under podman kube play: $(grep -E '^== (main|5 s)' "$run/kube-play.log" | sed 's/^== //' | tr '\n' ';' | sed 's/;$//')"
fi

# ---- 7. optional: the BGP variant (RINGLB_CT_BGP=1) -----------------------------------------
if [ "${RINGLB_CT_BGP:-0}" = 1 ]; then
    compose down -t 2 -v >"$run/down-none.log" 2>&1
    compose_files=(-f "$compose_file" -f "$here/compose.bgp.yaml")
    log "compose up with compose.bgp.yaml: BIRD per node, a BIRD router with ECMP and BFD"
    compose up -d >"$run/up-bgp.log" 2>&1 || { grep -v healthcheck "$run/up-bgp.log" | tail -n 20; die "compose up (bgp)"; }
    wait_converged "the BGP cluster did not converge"
    router_pid() { podman inspect -f '{{.State.Pid}}' "$(ctr router)"; }
    hops() { nsenter -t "$(router_pid)" -n ip route show "$vip" | grep -c nexthop || true; }
    deadline=$(( $(date +%s) + 30 ))
    until [ "$(hops)" = 3 ]; do
        [ "$(date +%s)" -lt "$deadline" ] || die "the router did not learn 3 next hops for the VIP within 30 s"
        sleep 0.2
    done
    log "the router holds the VIP with 3 next hops (BGP, ECMP)"
    check_requests "100 requests through the router" "n1 n2 n3"
    podman kill -s KILL "$(ctr n2-ringlb)" >/dev/null
    t=$(date +%s%N)
    until ! nsenter -t "$(router_pid)" -n ip route show "$vip" | grep -q "$net\.12 "; do
        [ $(( ($(date +%s%N) - t) / 1000000 )) -lt 5000 ] || die "n2's next hop still at the router 5 s after its daemon died"
        sleep 0.005
    done
    log "kill -9 of n2's daemon: its next hop left the router $(( ($(date +%s%N) - t) / 1000000 )) ms later; waiting 2 s"
    sleep 2
    check_requests "100 requests through the router 2 s after n2's daemon died" "n1 n3"
fi

log "passed in $(elapsed) s: image $(awk -v b="$size" 'BEGIN { printf "%.1f MB", b / 1e6 }'), built in $build_secs s"
