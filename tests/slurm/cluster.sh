#!/usr/bin/env bash
# A one-node Slurm on this machine for the tests: munged, slurmctld and slurmd on 127.0.0.1.
#
#   tests/slurm/cluster.sh start     write a slurm.conf, start the daemons, wait for the node; print
#                                    the `export SLURM_CONF=...` line the clients (sbatch, squeue) need
#   tests/slurm/cluster.sh stop      stop the daemons this script started (by their pid files)
#   tests/slurm/cluster.sh env       print the export line again
#
# Needs root (slurmd starts the jobs) and Debian's slurm-wlm and munge (.ci/run installs them).
# Everything lives in LONGNET_SLURM_DIR (default: $TMPDIR/longnet-slurm): its own munge key and
# socket, state, spool, logs; the machine's /etc/slurm and system munged are not touched. No cgroups
# (proctrack/linuxproc, task/none), so it runs in containers; credentials expire after 5 s instead
# of 120 s, which is how long a requeued job waits before it starts again, and the scheduler looks at
# pending jobs every second (not every 30-60 s).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"   # the daemons live there

dir="${LONGNET_SLURM_DIR:-${TMPDIR:-/tmp}/longnet-slurm}"
conf="$dir/slurm.conf"
node="$(hostname -s)"

fail() { echo "tests/slurm/cluster.sh: $*" >&2; exit 1; }

running() {  # running PIDFILE: the daemon named in PIDFILE is alive
    [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_conf() {
    local cpus mem_mb
    cpus="$(getconf _NPROCESSORS_ONLN)"
    (( cpus >= 2 )) || cpus=2   # the tests run 2 tasks (config_overrides: declared, not detected)
    mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"
    cat > "$conf" <<CONF
# Written by tests/slurm/cluster.sh: a one-node test cluster, no cgroups, no accounting.
ClusterName=longnet-test
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=${LONGNET_SLURMCTLD_PORT:-6817}
SlurmdPort=${LONGNET_SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=900
KillWait=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
    [[ $EUID -eq 0 ]] || fail "run as root (slurmd starts the jobs)"
    for cmd in munged mungekey slurmctld slurmd sbatch sinfo; do
        command -v "$cmd" >/dev/null || fail "$cmd not found: apt-get install -y slurm-wlm munge"
    done
    if running "$dir/slurmctld.pid" || running "$dir/slurmd.pid" || running "$dir/munge/munged.pid"; then
        fail "already running in $dir (tests/slurm/cluster.sh stop first)"
    fi
    mkdir -p "$dir"/{state,spool,log,munge}
    chmod 755 "$dir/munge"  # the key inside is 0600; clients need to reach the socket
    [[ -f "$dir/munge/munge.key" ]] || mungekey --create --keyfile="$dir/munge/munge.key"
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    write_conf
    export SLURM_CONF="$conf"
    slurmctld -f "$conf"
    slurmd -f "$conf" -N "$node"
    local state=""
    for _ in $(seq 120); do
        state="$(sinfo -h -n "$node" -o %T 2>/dev/null || true)"
        [[ "$state" == idle ]] && break
        sleep 0.5
    done
    [[ "$state" == idle ]] || fail "node $node is '${state:-unreachable}', not idle; logs in $dir/log"
    echo "export SLURM_CONF=$conf"
}

stop() {
    local pidfile pid
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        running "$pidfile" || continue
        pid="$(cat "$pidfile")"
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$conf" ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
