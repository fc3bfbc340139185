#!/usr/bin/env bash
# A real two-node Ray cluster on one Linux machine, for tests and for watching a multi-node
# run: two network namespaces joined by a veth pair on a private subnet, a Ray head in one and
# a Ray worker node in the other, each bound to its own namespace address.
#
#   cluster/local-two-node.sh up        # start (root; iproute2, gcc)
#   cluster/local-two-node.sh status    # nodes, addresses, endpoints
#   cluster/local-two-node.sh exec head -- llmtrain submit configs/tiny-pretrain.yaml \
#         --address http://10.231.7.1:8265 --follow
#   cluster/local-two-node.sh down      # stop everything `up` started (safe to repeat)
#
# Node failures, for fault-injection tests (only the worker node: the head holds the GCS):
#   cluster/local-two-node.sh kill worker [--partition]   # SIGKILL every process of that node
#   cluster/local-two-node.sh start worker                # start Ray there again, wait until it joins
# `kill` is a crash: the kernel closes the node's connections, so peers see resets at once.
# With --partition the node's link goes down first, so peers see silence instead (a power cut
# or a network partition) and must notice through timeouts; `start` brings the link back.
#
# Layout (defaults; override with the environment variables below):
#   namespace llmt-head    10.231.7.1/24  Ray head: GCS :6379, dashboard + Jobs API :8265,
#                                          Ray Client :10001
#   namespace llmt-worker  10.231.7.2/24  Ray worker node
#   both ends of the veth pair are named llmt-link (GLOO_SOCKET_IFNAME=llmt-link works on both)
#
# Binding: Ray's own flags bind the dashboard (--dashboard-host) and the Ray Client server to
# the node address, but the C++ gRPC servers (GCS, raylet, core workers, dashboard agent) and
# the Prometheus endpoints listen on the wildcard address unless the node IP is 127.0.0.1.
# Every process started here therefore runs with LD_PRELOAD=bindshim.so (cluster/bindshim.c),
# which rewrites a wildcard bind() to the namespace's own address. `ss -ltnp` inside either
# namespace shows no 0.0.0.0 / * listener (tests/test_cluster_local.py checks it).
#
# Auth: token mode (RAY_AUTH_MODE=token) with a fresh random token written by `up` to
# $LLMTRAIN_CLUSTER_STATE/auth_token (mode 600). `exec` gives a command the same environment,
# so the Jobs API, State API and drivers authenticate; a client elsewhere needs
# RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH pointing to that file.
#
# Environment:
#   LLMTRAIN_CLUSTER_NAME    prefix of namespaces and link (default llmt; <= 10 characters)
#   LLMTRAIN_CLUSTER_SUBNET  first three octets of the /24 (default 10.231.7)
#   LLMTRAIN_CLUSTER_CPUS    CPUs each node advertises (default 1)
#   LLMTRAIN_CLUSTER_STATE   state directory (default /tmp/llmtrain-cluster-$NAME)
#   LLMTRAIN_RAY             the `ray` executable (default: the repo's .venv/bin/ray)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="${LLMTRAIN_CLUSTER_NAME:-llmt}"
SUBNET="${LLMTRAIN_CLUSTER_SUBNET:-10.231.7}"
CPUS="${LLMTRAIN_CLUSTER_CPUS:-1}"
STATE="${LLMTRAIN_CLUSTER_STATE:-/tmp/llmtrain-cluster-$NAME}"
RAY="${LLMTRAIN_RAY:-$REPO/.venv/bin/ray}"
PYTHON="$(dirname "$RAY")/python"

NS_HEAD="$NAME-head"
NS_WORKER="$NAME-worker"
LINK="$NAME-link"
HEAD_IP="$SUBNET.1"
WORKER_IP="$SUBNET.2"
GCS_PORT=6379
DASHBOARD_PORT=8265
CLIENT_PORT=10001
OBJECT_STORE_BYTES=$((256 * 1024 * 1024))
JOIN_TIMEOUT_S=90
STOP_GRACE_S=3  # raylet and gcs_server often ignore SIGTERM for longer; nothing here needs a graceful stop

die() { echo "local-two-node: error: $*" >&2; exit 2; }
say() { echo "local-two-node: $*" >&2; }

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

check_prereqs() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (network namespaces): sudo $0 ..."
    command -v ip >/dev/null || die "iproute2 ('ip') not found; install iproute2"
    ip netns list >/dev/null 2>&1 || die "'ip netns' is not usable here (kernel or container without netns support)"
    [[ ${#NAME} -le 10 && "$NAME" =~ ^[a-z][a-z0-9]*$ ]] || die "LLMTRAIN_CLUSTER_NAME='$NAME': use 1-10 lowercase letters/digits"
    [[ "$SUBNET" =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "LLMTRAIN_CLUSTER_SUBNET='$SUBNET': give three octets, e.g. 10.231.7"
}

ns_exists() { ip netns list | awk '{print $1}' | grep -qx "$1"; }

ip_of() { [[ "$1" == head ]] && echo "$HEAD_IP" || echo "$WORKER_IP"; }
ns_of() {
    case "$1" in
        head) echo "$NS_HEAD" ;;
        worker) echo "$NS_WORKER" ;;
        *) die "unknown node '$1'; use head or worker" ;;
    esac
}

# The environment of every process in a namespace: Ray services, workers, drivers, clients.
node_env() {
    local node="$1"
    # The venv's bin first: job entrypoints (`python -m llmtrain.cli`), `llmtrain` and `ray`
    # are the project's.
    echo "PATH=$(dirname "$RAY"):$PATH"
    echo "LD_PRELOAD=$STATE/bindshim.so"
    echo "LLMTRAIN_BIND_IP=$(ip_of "$node")"
    echo "RAY_AUTH_MODE=token"
    echo "RAY_AUTH_TOKEN_PATH=$STATE/auth_token"
    echo "RAY_USAGE_STATS_ENABLED=0"
    # Core workers export Ray's own metrics to the agent at 127.0.0.1, which bindshim moves to
    # the node address; llmtrain keeps its own metrics (metrics.jsonl, TensorBoard).
    echo "RAY_enable_metrics_collection=0"
    echo "GLOO_SOCKET_IFNAME=$LINK"
    echo "RAY_API_SERVER_ADDRESS=http://$HEAD_IP:$DASHBOARD_PORT"
    echo "DS_ACCELERATOR=cpu"
}

in_ns() {  # in_ns NODE CMD... : run CMD in NODE's namespace with the node environment
    local node="$1"; shift
    local envs=()
    mapfile -t envs < <(node_env "$node")
    ip netns exec "$(ns_of "$node")" env "${envs[@]}" "$@"
}

build_shim() {
    local src="$REPO/cluster/bindshim.c" out="$STATE/bindshim.so"
    command -v gcc >/dev/null || die "gcc not found (needed once to build cluster/bindshim.c); install gcc"
    gcc -shared -fPIC -O2 -Wall -Werror -o "$out.tmp" "$src" -ldl || die "could not build $src"
    mv "$out.tmp" "$out"
}

write_token() {
    (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$STATE/auth_token")
}

make_network() {
    ip netns add "$NS_HEAD"
    ip netns add "$NS_WORKER"
    # Both ends are created directly inside the namespaces: nothing is ever left in the root
    # namespace, and deleting a namespace deletes the pair.
    ip link add name "$LINK" netns "$NS_HEAD" type veth peer name "$LINK" netns "$NS_WORKER"
    local node ns
    for node in head worker; do
        ns="$(ns_of "$node")"
        # `ip netns exec` bind-mounts /etc/netns/NS/hosts over /etc/hosts: the two nodes'
        # addresses resolve from that file (c10d looks up its peers' names).
        mkdir -p "/etc/netns/$ns"
        { cat /etc/hosts; printf '%s %s\n%s %s\n' "$HEAD_IP" "$NS_HEAD" "$WORKER_IP" "$NS_WORKER"; } > "/etc/netns/$ns/hosts"
        ip -n "$ns" link set lo up
        # No IPv6 link-local address on the link: the namespace's only addresses are
        # 127.0.0.1, ::1 and the node address.
        ip netns exec "$ns" sysctl -q -w "net.ipv6.conf.$LINK.disable_ipv6=1"
        ip -n "$ns" addr add "$(ip_of "$node")/24" dev "$LINK"
        ip -n "$ns" link set "$LINK" up
    done
}

start_node() {
    local node="$1" ip log
    ip="$(ip_of "$node")"
    log="$STATE/$node.start.log"
    mkdir -p "$STATE/$node"
    local common=(--node-ip-address "$ip" --num-cpus "$CPUS" --num-gpus 0
                  --object-store-memory "$OBJECT_STORE_BYTES" --temp-dir "$STATE/$node" --disable-usage-stats)
    if [[ "$node" == head ]]; then
        in_ns head "$RAY" start --head --port "$GCS_PORT" --dashboard-host "$HEAD_IP" --dashboard-port "$DASHBOARD_PORT" \
            --ray-client-server-port "$CLIENT_PORT" "${common[@]}" >"$log" 2>&1 \
            || { tail -n 30 "$log" >&2; die "ray start --head failed (log: $log)"; }
    else
        in_ns worker "$RAY" start --address "$HEAD_IP:$GCS_PORT" "${common[@]}" >"$log" 2>&1 \
            || { tail -n 30 "$log" >&2; die "ray start on the worker node failed (log: $log)"; }
    fi
}

# Python run in the head namespace against the State API; prints one line per node.
list_nodes_py='
import sys
from ray.util.state import list_nodes
nodes = list_nodes(address=sys.argv[1], timeout=10, raise_on_missing_output=False)
for n in sorted(nodes, key=lambda n: n.node_ip):
    cpu = n.resources_total.get("CPU", 0)
    gpu = n.resources_total.get("GPU", 0)
    role = "head" if n.is_head_node else "worker"
    print(f"{role:6s} {n.node_ip:15s} {n.state:5s} CPU={cpu:g} GPU={gpu:g} node_id={n.node_id}")
'

alive_count() {
    in_ns head "$PYTHON" -c "$list_nodes_py" "http://$HEAD_IP:$DASHBOARD_PORT" 2>/dev/null | grep -c " ALIVE " || true
}

wait_for_nodes() {
    local deadline=$((SECONDS + JOIN_TIMEOUT_S)) n=0
    while ((SECONDS < deadline)); do
        n="$(alive_count)"
        [[ "$n" == 2 ]] && return 0
        sleep 1
    done
    die "only $n of 2 nodes alive after ${JOIN_TIMEOUT_S} s (logs: $STATE/*/session_latest/logs)"
}

kill_namespace_processes() {  # SIGTERM everything in the namespace, SIGKILL what remains
    local ns="$1" pids deadline
    ns_exists "$ns" || return 0
    pids="$(ip netns pids "$ns" || true)"
    [[ -z "$pids" ]] && return 0
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    deadline=$((SECONDS + STOP_GRACE_S))
    while ((SECONDS < deadline)); do
        [[ -z "$(ip netns pids "$ns" || true)" ]] && return 0
        sleep 0.5
    done
    pids="$(ip netns pids "$ns" || true)"
    # shellcheck disable=SC2086
    [[ -n "$pids" ]] && kill -KILL $pids 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        [[ -z "$(ip netns pids "$ns" || true)" ]] && return 0
        sleep 0.2
    done
    say "processes still in $ns after SIGKILL: $(ip netns pids "$ns" | tr '\n' ' ')"
    return 1
}

cmd_down() {
    check_prereqs
    local ok=0
    # Worker node first, so the head does not spend the shutdown marking it dead.
    kill_namespace_processes "$NS_WORKER" || ok=1
    kill_namespace_processes "$NS_HEAD" || ok=1
    local ns
    for ns in "$NS_WORKER" "$NS_HEAD"; do
        if ns_exists "$ns"; then
            ip netns del "$ns" || ok=1
        fi
        rm -rf "/etc/netns/${ns:?}"
    done
    rmdir /etc/netns 2>/dev/null || true  # only if no other namespace keeps files there
    rm -rf "$STATE"
    ((ok == 0)) || die "could not stop everything (see above)"
    say "down"
}

cmd_up() {
    check_prereqs
    [[ -x "$RAY" ]] || die "ray not found at $RAY; run setup.sh or set LLMTRAIN_RAY"
    [[ -x "$PYTHON" ]] || die "no python beside $RAY (expected $PYTHON)"
    if ns_exists "$NS_HEAD" || ns_exists "$NS_WORKER"; then
        if [[ -f "$STATE/auth_token" && "$(alive_count)" == 2 ]]; then
            say "already up"
            cmd_status
            return 0
        fi
        die "namespaces $NS_HEAD/$NS_WORKER exist but the cluster is not healthy; run '$0 down' first"
    fi
    if ip -br addr | grep -qF " $SUBNET."; then
        die "subnet $SUBNET.0/24 is already used by an interface of this machine; pick another with LLMTRAIN_CLUSTER_SUBNET"
    fi
    trap 'rc=$?; if ((rc != 0)); then say "up failed; cleaning up"; cmd_down || true; fi' EXIT
    rm -rf "$STATE"
    mkdir -p "$STATE"
    build_shim
    write_token
    make_network
    start_node head
    start_node worker
    wait_for_nodes
    trap - EXIT
    cmd_status
}

node_arg() {  # the node named by kill/start: only the worker node can fail and come back
    local cmd="$1" node="${2:-}"
    [[ "$node" == worker ]] && return 0
    [[ "$node" == head ]] && die "$cmd head: only the worker node can be killed and restarted (the head holds the GCS); use down/up"
    die "usage: $0 $cmd worker"
}

cmd_kill() {
    check_prereqs
    node_arg kill "${1:-}"
    local partition=0
    [[ "${2:-}" == "--partition" ]] && partition=1
    [[ -n "${2:-}" && "$partition" == 0 ]] && die "kill worker: unknown option '${2}'; use --partition or nothing"
    ns_exists "$NS_WORKER" || die "the cluster is down; run '$0 up' first"
    if ((partition)); then
        ip -n "$NS_WORKER" link set "$LINK" down
    fi
    local pids
    pids="$(ip netns pids "$NS_WORKER" || true)"
    # shellcheck disable=SC2086
    [[ -n "$pids" ]] && kill -KILL $pids 2>/dev/null || true
    for _ in $(seq 1 50); do
        [[ -z "$(ip netns pids "$NS_WORKER" || true)" ]] && break
        sleep 0.1
    done
    [[ -z "$(ip netns pids "$NS_WORKER" || true)" ]] || die "processes still in $NS_WORKER after SIGKILL"
    say "killed the worker node ($WORKER_IP)$( ((partition)) && echo ', link down')"
}

cmd_start() {
    check_prereqs
    node_arg start "${1:-}"
    ns_exists "$NS_WORKER" && [[ -f "$STATE/auth_token" ]] || die "the cluster is down; run '$0 up' first"
    [[ -z "$(ip netns pids "$NS_WORKER" || true)" ]] || die "the worker node is running; kill it first ('$0 kill worker')"
    ip -n "$NS_WORKER" link set "$LINK" up
    # The head may not have noticed the old node's death yet: wait for a node id not seen before.
    local before deadline=$((SECONDS + JOIN_TIMEOUT_S))
    before="$(worker_node_ids)"
    start_node worker
    while ((SECONDS < deadline)); do
        if worker_node_ids | grep -qvxF -e "${before:-none}"; then
            say "worker node ($WORKER_IP) joined again"
            return 0
        fi
        sleep 1
    done
    die "the worker node did not join within ${JOIN_TIMEOUT_S} s (log: $STATE/worker.start.log)"
}

worker_node_ids() {  # node ids of ALIVE nodes at the worker address
    in_ns head "$PYTHON" -c "$list_nodes_py" "http://$HEAD_IP:$DASHBOARD_PORT" 2>/dev/null \
        | awk -v ip="$WORKER_IP" '$2 == ip && $3 == "ALIVE" {sub("node_id=", "", $6); print $6}' || true
}

cmd_status() {
    check_prereqs
    if ! ns_exists "$NS_HEAD"; then
        echo "down (no namespace $NS_HEAD)"
        return 1
    fi
    echo "namespaces: $NS_HEAD ($HEAD_IP)  $NS_WORKER ($WORKER_IP)  link $LINK  subnet $SUBNET.0/24"
    echo "gcs:        $HEAD_IP:$GCS_PORT"
    echo "jobs api:   http://$HEAD_IP:$DASHBOARD_PORT  (token: $STATE/auth_token)"
    echo "ray client: ray://$HEAD_IP:$CLIENT_PORT"
    echo "nodes:"
    in_ns head "$PYTHON" -c "$list_nodes_py" "http://$HEAD_IP:$DASHBOARD_PORT" | sed 's/^/  /' \
        || { echo "  (the head does not answer)"; return 1; }
}

cmd_exec() {
    check_prereqs
    local node="${1:-}"
    [[ -n "$node" ]] || die "usage: $0 exec head|worker -- COMMAND [ARGS...]"
    shift
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -gt 0 ]] || die "usage: $0 exec head|worker -- COMMAND [ARGS...]"
    ns_exists "$(ns_of "$node")" || die "the cluster is down; run '$0 up' first"
    # RAY_ADDRESS: a driver started here (ray.init(), cluster.address=auto) joins this cluster,
    # not whichever Ray /tmp/ray/ray_current_cluster or a process scan finds first.
    in_ns "$node" env RAY_ADDRESS="$HEAD_IP:$GCS_PORT" "$@"
}

main() {
    local cmd="${1:-}"
    [[ $# -gt 0 ]] && shift
    case "$cmd" in
        up) cmd_up ;;
        down) cmd_down ;;
        status) cmd_status ;;
        exec) cmd_exec "$@" ;;
        kill) cmd_kill "$@" ;;
        start) cmd_start "$@" ;;
        -h|--help|help) usage 0 ;;
        *) usage 2 ;;
    esac
}

main "$@"
