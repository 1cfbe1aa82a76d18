#!/usr/bin/env bash
# A benchmark trial against a real Dkron server binary (never built or fetched here: DKRON_BIN
# names one you built). 3 servers, each in a network namespace of its own on a bridge inside
# another namespace (nothing of the host changes), peer names through per-namespace hosts files
# as a headless Service gives them. Measures a cold start, then a graceful restart of a follower
# with a new IP, with dkron-ha's wrap (WRAP=1) or as the community manifests start Dkron (0).
#
#   DKRON_BIN=/path/to/dkron bash tests/tools/dkron-trial.sh 1   # root; cargo build first
#
# tests/e2e_dkron.rs runs the scenarios in pods on the real nodes; this trial stays as the side-by-side
# comparison with plain Dkron (no dkron-ha), which the pod tests do not run.
set -u
WRAP=${1:?usage: dkron-trial.sh 0|1}
DKRON=${DKRON_BIN:?set DKRON_BIN to a Dkron server binary}
HA=${DKRON_HA_BIN:-$(cd "$(dirname "$0")/../.." && pwd)/target/debug/dkron-ha}
T=$(mktemp -d /tmp/dkron-trial-$WRAP-XXXXXX)
FQ=dkron.jobs.svc.cluster.local
declare -A IP=([0]=10.77.0.10 [1]=10.77.0.11 [2]=10.77.0.12)
cleanup() {
  for p in $(cat $T/pids 2>/dev/null); do kill -9 $p 2>/dev/null; done
  pkill -9 -f "$T/data" 2>/dev/null
  for n in hub dk0 dk1 dk2 dk0b dk1b dk2b; do ip netns del tr$WRAP-$n 2>/dev/null; rm -rf /etc/netns/tr$WRAP-$n; done
  rm -rf "$T"
}
trap cleanup EXIT
ip netns add tr$WRAP-hub; ip -n tr$WRAP-hub link add br0 type bridge; ip -n tr$WRAP-hub link set br0 up; ip -n tr$WRAP-hub link set lo up
hosts() { { echo "127.0.0.1 localhost"; for i in 0 1 2; do echo "${IP[$i]} dkron-$i.$FQ"; done; }; }
mkns() { # name ip
  local n=tr$WRAP-$1
  ip netns add $n; ip -n $n link set lo up
  ip link add v-$WRAP$1 type veth peer name e0 netns $n
  ip link set v-$WRAP$1 netns tr$WRAP-hub; ip -n tr$WRAP-hub link set v-$WRAP$1 master br0 up
  ip -n $n addr add $2/24 dev e0; ip -n $n link set e0 up
  mkdir -p /etc/netns/$n
}
writehosts() { for n in dk0 dk1 dk2 dk0b dk1b dk2b; do [ -d /etc/netns/tr$WRAP-$n ] && hosts > /etc/netns/tr$WRAP-$n/hosts; done; }
start() { # idx nsname
  local i=$1 n=tr$WRAP-$2
  local args=(agent --server --data-dir=$T/data-$i --node-name=dkron-$i --log-level=info)
  if [ $WRAP = 1 ]; then
    ip netns exec $n env -i PATH=/usr/bin:/bin DKRON_HA_STATEFULSET=dkron DKRON_HA_SERVICE=dkron DKRON_HA_INITIAL_CLUSTER_SIZE=3 \
      DKRON_HA_CLUSTER_DOMAIN=cluster.local POD_NAME=dkron-$i POD_NAMESPACE=jobs POD_IP=${IP[$i]} \
      $HA wrap -- $DKRON "${args[@]}" > $T/log-$i-$2 2>&1 &
  else
    local joins=(); for j in 0 1 2; do [ $j != $i ] && joins+=(--retry-join=dkron-$j.$FQ); done
    ip netns exec $n $DKRON "${args[@]}" --bootstrap-expect=3 "${joins[@]}" > $T/log-$i-$2 2>&1 &
  fi
  echo $! >> $T/pids; eval "PID$i=$!"
}
leader_of() { ip netns exec tr$WRAP-$1 curl -s -m 1 -o /dev/null -w "%{http_code}" http://127.0.0.1:8080/v1/isleader 2>/dev/null; }
knows_leader() { ip netns exec tr$WRAP-$1 curl -s -m 1 http://127.0.0.1:8080/v1/leader 2>/dev/null | grep -q rpc_addr; }
mkns dk0 ${IP[0]}; mkns dk1 ${IP[1]}; mkns dk2 ${IP[2]}; writehosts
t0=$(date +%s.%N)
start 0 dk0; start 1 dk1; start 2 dk2
for k in $(seq 1 1200); do
  if knows_leader dk0 && knows_leader dk1 && knows_leader dk2; then break; fi; sleep 0.1; done
t1=$(date +%s.%N); echo "cold start: all 3 know a leader after $(echo "$t1 - $t0" | bc) s"
[ "${COLD_ONLY:-0}" = 1 ] && exit 0; sleep 3
# graceful restart of a follower with a new IP (pod deleted: SIGTERM, then a new pod, netns, IP)
R=""; for i in 0 1 2; do [ "$(leader_of dk$i)" = 404 ] && { R=$i; break; }; done
L=""; for i in 0 1 2; do [ "$(leader_of dk$i)" = 200 ] && L=$i; done
echo "leader dkron-$L, restarting follower dkron-$R"
eval "P=\$PID$R"; kill -TERM $P; for k in $(seq 1 300); do kill -0 $P 2>/dev/null || break; sleep 0.1; done
IP[$R]=10.77.0.2$R; mkns dk${R}b ${IP[$R]}; writehosts
t0=$(date +%s.%N); start $R dk${R}b
for k in $(seq 1 1500); do knows_leader dk${R}b && break; sleep 0.1; done
t1=$(date +%s.%N); echo "restart with new IP: knows the leader after $(echo "$t1 - $t0" | bc) s"
for k in $(seq 1 1500); do
  ip netns exec tr$WRAP-dk$L $DKRON raft list-peers --rpc-addr=${IP[$L]}:6868 2>/dev/null | grep -q "10.77.0.2$R" && break
  sleep 0.2; done
t2=$(date +%s.%N); echo "restart with new IP: raft shows the new address after $(echo "$t2 - $t0" | bc) s"
ip netns exec tr$WRAP-dk$L $DKRON raft list-peers --rpc-addr=${IP[$L]}:6868 2>&1 | tail -4
ip netns exec tr$WRAP-dk$L curl -s http://127.0.0.1:8080/v1/members | python3 -c 'import json,sys; print([(m["Name"],m["Addr"],m["Status"]) for m in json.load(sys.stdin)])'
