#!/usr/bin/env bash
# A real three-node Slurm on this one machine, for the tests: munge, slurmctld and three slurmd
# (n1..n3, all 127.0.0.1), everything in DIR. Needs root and the packages slurmctld slurmd
# slurm-client munge (.ci/install-deps.sh --tests installs them).
#
#   local-slurm.sh start DIR   prints `export SLURM_CONF=...` once every node is idle
#   local-slurm.sh stop DIR    stops every daemon it started, by the PIDs in DIR
set -euo pipefail

cmd=${1:?usage: local-slurm.sh start|stop DIR}
dir=${2:?usage: local-slurm.sh start|stop DIR}
dir=$(realpath -m "$dir")
# Ports unlikely to be taken on a CI machine.
ctld_port=${HETSYNC_TEST_SLURMCTLD_PORT:-16817}
node_ports=${HETSYNC_TEST_SLURMD_PORTS:-16818-16820}

log() { echo "local-slurm: $*" >&2; }

stop_pidfile() {
  local f=$1 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$f"
}

case "$cmd" in
start)
  [ "$(id -u)" -eq 0 ] || { log "needs root (slurmd runs jobs as any user)"; exit 1; }
  for b in munged mungekey slurmctld slurmd sbatch sinfo; do
    command -v "$b" >/dev/null || { log "$b is missing: run .ci/install-deps.sh --tests"; exit 1; }
  done
  mkdir -p "$dir"/{munge,state,spool,log}
  chmod 711 "$dir/munge" # munged wants its socket directory searchable by all

  mungekey --create --keyfile="$dir/munge/munge.key" --force
  chmod 400 "$dir/munge/munge.key"
  munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
    --seed-file="$dir/munge/munged.seed"
  munge -n -S "$dir/munge/munge.socket" | unmunge -S "$dir/munge/munge.socket" >/dev/null
  log "munged is up"

  host=$(hostname -s)
  cat >"$dir/slurm.conf" <<EOF
ClusterName=hetsync-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=n[1-3] NodeHostname=$host NodeAddr=127.0.0.1 Port=$node_ports CPUs=4 State=UNKNOWN
PartitionName=test Nodes=n[1-3] Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -i
  for n in n1 n2 n3; do slurmd -N "$n"; done
  for _ in $(seq 1 300); do
    states=$(sinfo -h -N -o %T 2>/dev/null | sort -u | tr '\n' ' ')
    [ "$states" = "idle " ] && [ "$(sinfo -h -N -o %N | wc -l)" -eq 3 ] && break
    sleep 0.1
  done
  if [ "$states" != "idle " ]; then
    log "nodes did not become idle (states: ${states:-none}); logs in $dir/log"
    exit 1
  fi
  log "slurmctld and slurmd n1 n2 n3 are up: $(sinfo -h -N -o '%N=%T' | tr '\n' ' ')"
  echo "export SLURM_CONF=$dir/slurm.conf"
  ;;
stop)
  for n in n1 n2 n3; do stop_pidfile "$dir/slurmd-$n.pid"; done
  stop_pidfile "$dir/slurmctld.pid"
  stop_pidfile "$dir/munge/munged.pid"
  log "stopped"
  ;;
*)
  echo "usage: local-slurm.sh start|stop DIR" >&2
  exit 2
  ;;
esac
