#!/usr/bin/env bash
# Runs the DaemonSet's pod template as a one-node cluster with `podman kube play` (podman 4.3:
# Pods, Deployments and PVCs, no DaemonSet), to check the parts a container engine can check:
# the privileged init container runs `ringlb setup`, the main container runs `ringlb node` as
# 65534 with no capability, its config comes from the ConfigMap, its certificate from a per-node
# directory, /dev/net/tun from a device node of its own, and its admin endpoint answers.
#
# What it changes from deploy/kubernetes/base (and so does not check): no hostNetwork (the pod
# gets its own network namespace on an internal podman network: running `ringlb setup` in the
# host's would change this host's routing); the Secret projection with subPathExpr becomes a
# hostPath directory of this node's files; the downward-API fields (spec.nodeName,
# status.hostIP) and $(VAR) references become literal values (podman 4.3 expands neither);
# restartPolicy OnFailure (see below); probes are not run by podman 4.3's kube play.
# Needs: root, podman (with the drop-in of deploy/container/test.sh), python3 with PyYAML,
# the image localhost/ringlb:$VERSION (deploy/container/test.sh builds one; RINGLB_IMAGE).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
image=${RINGLB_IMAGE:?set RINGLB_IMAGE to a ringlb image}
prefix=rlkp$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
dir=/run/ringlb-kp/$prefix
net=${prefix}_net
mkdir -p "$dir/pki/node1" "$dir/tun" "$dir/state"
cleanup() {
    set +e
    [ -f "$dir/pod.yaml" ] && podman kube play --down "$dir/pod.yaml" >/dev/null 2>&1
    podman pod rm -f "$prefix" >/dev/null 2>&1
    podman network rm -f "$net" >/dev/null 2>&1
    rm -rf "$dir"
}
trap cleanup EXIT

# A /24 that no route and no podman network uses (the lock is deploy/container/test.sh's).
mkdir -p /var/cache/ringlb-container
exec 9>/var/cache/ringlb-container/subnet.lock
flock 9
used=$( (ip -4 route; podman network ls -q | xargs -r podman network inspect -f '{{range .Subnets}}{{.Subnet}} {{end}}') 2>/dev/null)
sub=
for x in $(shuf -i 30-99); do grep -q "10\.89\.$x\." <<<"$used" || { sub=10.89.$x; break; }; done
[ -n "$sub" ] || { echo "no free 10.89.X.0/24"; exit 1; }
podman network create --internal --subnet "$sub.0/24" "$net" >/dev/null
flock -u 9
ip=$sub.11
podman run --rm --network none --user 0 -v "$dir/pki:/pki" --entrypoint /usr/local/bin/ringlb "$image" cert init --dir /pki >/dev/null
podman run --rm --network none --user 0 -v "$dir/pki:/pki" --entrypoint /usr/local/bin/ringlb "$image" cert issue --dir /pki --node node1 --ip "$ip" >/dev/null
cp "$dir/pki/ca.pem" "$dir/pki/node1/ca.crt"; mv "$dir/pki/node1.pem" "$dir/pki/node1/tls.crt"; mv "$dir/pki/node1.key" "$dir/pki/node1/tls.key"
chown -R 0:65534 "$dir/pki/node1"; chmod 0440 "$dir/pki/node1/"*; chmod 0750 "$dir/pki/node1"
mknod -m 0600 "$dir/tun/tun" c 10 200 && chown 65534:65534 "$dir/tun/tun"

# The base's resources as `kubectl kustomize` would list them (it only lists them).
for f in namespace configmap daemonset; do cat "$here/base/$f.yaml"; echo "---"; done >"$dir/all.yaml"
"${PYTHON:-python3}" - "$dir" "$image" "$ip" "$prefix" <<'PY'
import sys, copy, yaml
d, image, ip, name = sys.argv[1:]
docs = [x for x in yaml.safe_load_all(open(f"{d}/all.yaml")) if x]
ds = next(x for x in docs if x["kind"] == "DaemonSet")
cm = next(x for x in docs if x["kind"] == "ConfigMap")
spec = copy.deepcopy(ds["spec"]["template"]["spec"])
for k in ("hostNetwork", "dnsPolicy", "nodeSelector", "priorityClassName", "tolerations"):
    spec.pop(k, None)
def fix(c):
    c["image"] = image
    env = []
    for e in c.get("env", []):
        if e["name"] == "RINGLB_NODE__NAME": e = {"name": e["name"], "value": "node1"}
        elif e["name"] == "HOST_IP": e = {"name": e["name"], "value": ip}
        elif e["name"] == "RINGLB_CONTROL__SEEDS": e = {"name": e["name"], "value": f'["node1@{ip}:6636"]'}
        elif "$(HOST_IP)" in e.get("value", ""): e = {"name": e["name"], "value": e["value"].replace("$(HOST_IP)", ip)}
        env.append(e)
    c["env"] = env
    for m in c.get("volumeMounts", []):
        if m["name"] == "pki": m.pop("subPathExpr")
        if m["name"] == "config": m.pop("subPath"); m["mountPath"] = "/etc/ringlb/ringlb.toml"
    c.pop("readinessProbe", None); c.pop("livenessProbe", None)
# Podman runs an init container of type "always" as a member of the pod, restarted by the pod's
# policy: with Always it re-ran `ringlb setup` in a loop, which broke the running daemon's TUN
# (EBADFD). OnFailure here; a DaemonSet's pods are Always, and Kubernetes runs init containers
# once per pod start.
spec["restartPolicy"] = "OnFailure"
for c in spec["initContainers"] + spec["containers"]:
    fix(c)
vols = {v["name"]: v for v in spec["volumes"]}
vols["pki"] = {"name": "pki", "hostPath": {"path": f"{d}/pki/node1", "type": "Directory"}}
vols["tun"] = {"name": "tun", "hostPath": {"path": f"{d}/tun/tun", "type": "CharDevice"}}
vols["state"] = {"name": "state", "hostPath": {"path": f"{d}/state", "type": "Directory"}}
open(f"{d}/ringlb.toml", "w").write(cm["data"]["ringlb.toml"])
vols["config"] = {"name": "config", "hostPath": {"path": f"{d}/ringlb.toml", "type": "File"}}
spec["volumes"] = list(vols.values())
pod = {"apiVersion": "v1", "kind": "Pod",
       "metadata": {"name": name, "labels": ds["spec"]["template"]["metadata"]["labels"],
                    # podman 4.3 removes a "once" init container while it still runs and fails.
                    "annotations": {**ds["spec"]["template"]["metadata"]["annotations"],
                                    "io.podman.annotations.init.container.type": "always"}},
       "spec": spec}
yaml.safe_dump(pod, open(f"{d}/pod.yaml", "w"))
PY
podman kube play --network "$net" --ip "$ip" "$dir/pod.yaml" >"$dir/play.log" 2>&1 || { cat "$dir/play.log"; exit 1; }
main=${prefix}-ringlb
for _ in $(seq 1 40); do
    podman exec "$main" ringlb status >"$dir/status" 2>/dev/null && break
    sleep 0.5
done
echo "== podman kube play of the DaemonSet's pod template (one node, own network namespace)"
podman pod ps --filter name="$prefix" --format '{{.Name}} {{.Status}} {{.NumberOfContainers}} containers'
podman ps -a --filter pod="$prefix" --format '{{.Names}} {{.Status}}'
echo "== ringlb status in the main container"
cat "$dir/status"
pid=$(podman inspect -f '{{.State.Pid}}' "$main")
echo "== main container: $(awk '/^Uid/ {print "uid " $2} /^CapEff/ {print "CapEff " $2}' /proc/$pid/status | tr '\n' ' ')"
echo "== metrics (admin endpoint): $(podman exec "$main" ringlb metrics | grep -c '^ringlb_') ringlb_ samples"
sleep 5
restarts=$(podman inspect -f '{{.RestartCount}}' "$main")
echo "== 5 s later: main container $(podman inspect -f '{{.State.Status}}' "$main"), $restarts restarts; init container $(podman inspect -f '{{.State.Status}} (exit {{.State.ExitCode}}), {{.RestartCount}} restarts' "${prefix}-setup")"
[ "$(podman inspect -f '{{.State.Status}}' "$main")" = running ] && [ "$restarts" -le 1 ] &&
grep -q "node node1" "$dir/status" && awk '/^Uid/ {exit !($2 == 65534)}' /proc/$pid/status \
    && awk '/^CapEff/ {exit !($2 == "0000000000000000")}' /proc/$pid/status \
    && echo "kube play: passed" || { echo "kube play: FAILED"; podman logs "$main" 2>&1 | tail; exit 1; }
