#!/usr/bin/env bash
# A one-node SLURM cluster on the local machine, to run the workflow through profiles/slurm for real.
#
#   bash scripts/slurm-cluster.sh start    # install (Debian, as root) and start munged, slurmctld, slurmd
#   bash scripts/slurm-cluster.sh status   # sinfo, or "down"
#   bash scripts/slurm-cluster.sh stop     # stop the daemons this script started (by their pid files)
#
# Everything lives in a state folder, $PRIVTUNE_SLURM_DIR (default /tmp/privtune-slurm): the munge key
# and socket, slurm.conf and gres.conf, the daemons' pid files, logs, state and spool folders. The node
# is this host at 127.0.0.1 with the CPUs `slurmd -C` reports and 3/4 of its memory; partitions `cpu`
# (default) and `gpu` match profiles/slurm. It has two fake GPUs (character devices 195:N in the state
# folder, as NVIDIA's are), so jobs asking for --gpus are scheduled and get CUDA_VISIBLE_DEVICES set,
# though nothing in them can use a GPU. There is no slurmdbd: `sacct` does not work, so the profile
# queries job states with squeue (MinJobAge keeps finished jobs visible to it for 5 minutes).
#
# Client tools (sinfo, sbatch, squeue, scontrol) read /etc/slurm/slurm.conf; when that file does not
# exist, start links it to the state folder's (stop removes the link). Otherwise set
# SLURM_CONF=$PRIVTUNE_SLURM_DIR/slurm.conf in the shells that submit jobs.
set -euo pipefail

STATE="${PRIVTUNE_SLURM_DIR:-/tmp/privtune-slurm}"
CONF="$STATE/slurm.conf"
ETC_CONF=/etc/slurm/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client slurm-wlm-basic-plugins munge)
NODE="$(hostname -s)"

answers() {  # the cluster answers sinfo (with the configuration client tools find)
    command -v sinfo >/dev/null 2>&1 && timeout 5 sinfo -h >/dev/null 2>&1
}

alive() {  # the pid in pid file $1 is a running process
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
    local missing=()
    for cmd in munged slurmctld slurmd sinfo sbatch; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "slurm-cluster: ${missing[*]} not installed, and there is no apt-get;" \
             "install ${PACKAGES[*]} (or your distribution's SLURM and munge) first" >&2
        exit 1
    fi
    echo "slurm-cluster: installing ${PACKAGES[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${PACKAGES[@]}" >"$STATE/apt.log" 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$STATE/apt.log" 2>&1 || true
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${PACKAGES[@]}" >>"$STATE/apt.log" 2>&1; then
            echo "slurm-cluster: apt-get could not install ${PACKAGES[*]} (see $STATE/apt.log)" >&2
            exit 1
        fi
    fi
}

write_config() {
    mkdir -p "$STATE"/{munge,log,ctld,spool}
    chmod 700 "$STATE/munge"
    if [[ ! -s "$STATE/munge/munge.key" ]]; then
        dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 600 "$STATE/munge/munge.key"

    # the node as slurmd sees it (CPUs, sockets, cores, threads), its memory at 3/4 (the rest for the OS)
    local hw real mem
    hw="$(slurmd -C | head -1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')"
    real="$(slurmd -C | head -1 | tr ' ' '\n' | sed -n 's/^RealMemory=//p')"
    mem=$(( real * 3 / 4 ))

    # fake GPUs: gres/gpu accepts character devices only; 195 is NVIDIA's major number
    for i in 0 1; do
        if [[ ! -c "$STATE/nvidia$i" ]]; then
            rm -f "$STATE/nvidia$i"
            mknod "$STATE/nvidia$i" c 195 "$i"
        fi
    done
    cat >"$STATE/gres.conf" <<EOF
AutoDetect=off
Name=gpu File=$STATE/nvidia0
Name=gpu File=$STATE/nvidia1
EOF

    cat >"$CONF" <<EOF
# One-node cluster written by scripts/slurm-cluster.sh (privtune); state in $STATE
ClusterName=privtune
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket.2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: processes tracked through /proc, no CPU binding, no usage sampling
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no slurmdbd: sacct does not work; Snakemake's SLURM plugin asks squeue instead
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# a job that asks for no memory gets this per CPU (without it, one job takes the whole node's)
DefMemPerCPU=1000
MailProg=/bin/true
# finished jobs stay visible to squeue for 5 minutes; the SLURM plugin wants >= 3 x its first
# status-check delay (slurm-init-seconds-before-status-checks, 40 s by default) before trusting squeue
MinJobAge=300
ReturnToService=2
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 ${hw}RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
}

link_client_config() {
    if [[ ! -e "$ETC_CONF" && ! -L "$ETC_CONF" ]] || [[ "$(readlink "$ETC_CONF" 2>/dev/null)" == "$CONF" ]]; then
        if [[ -w "$(dirname "$ETC_CONF")" ]]; then
            ln -sfn "$CONF" "$ETC_CONF"
            return 0
        fi
    fi
    [[ "$(readlink "$ETC_CONF" 2>/dev/null)" == "$CONF" ]] && return 0
    echo "slurm-cluster: $ETC_CONF is not ours: set SLURM_CONF=$CONF for client tools"
    export SLURM_CONF="$CONF"
}

start() {
    if answers; then
        echo "slurm-cluster: a cluster already answers sinfo; nothing to do"
        sinfo
        return 0
    fi
    if [[ $EUID -ne 0 ]]; then
        echo "slurm-cluster: start needs root (the daemons run as root; the fake GPUs are device nodes)" >&2
        exit 1
    fi
    mkdir -p "$STATE"
    mkdir -p "$STATE"
    install_packages
    write_config
    link_client_config

    if ! alive "$STATE/munged.pid"; then
        munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket.2" \
               --pid-file="$STATE/munged.pid" --log-file="$STATE/log/munged.log" \
               --seed-file="$STATE/munge/munged.seed"
    fi
    if ! alive "$STATE/slurmctld.pid"; then
        slurmctld -f "$CONF"  # daemonizes, writes SlurmctldPidFile
    fi
    if ! alive "$STATE/slurmd.pid"; then
        slurmd -f "$CONF"     # daemonizes, writes SlurmdPidFile
    fi

    local state="" deadline=$((SECONDS + 20))
    while (( SECONDS < deadline )); do
        state="$(SLURM_CONF="$CONF" timeout 3 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1 || true)"
        [[ "$state" == idle* ]] && break
        sleep 0.5
    done
    if [[ "$state" != idle* ]]; then
        for daemon in munged slurmctld slurmd; do
            alive "$STATE/$daemon.pid" || echo "slurm-cluster: $daemon is not running" >&2
        done
        echo "slurm-cluster: node $NODE is '${state:-not answering}' after 20 s; logs in $STATE/log" >&2
        exit 1
    fi
    SLURM_CONF="$CONF" sinfo
    echo "slurm-cluster: up; configuration $CONF, logs in $STATE/log"
}

stop() {
    local any=0
    for daemon in slurmd slurmctld munged; do
        local pidfile="$STATE/$daemon.pid"
        if alive "$pidfile"; then
            local pid
            pid="$(cat "$pidfile")"
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
            echo "slurm-cluster: stopped $daemon ($pid)"
            any=1
        fi
        rm -f "$pidfile"
    done
    # with the link gone, client tools fail at once instead of waiting for a controller that is down
    if [[ "$(readlink "$ETC_CONF" 2>/dev/null)" == "$CONF" ]]; then
        rm -f "$ETC_CONF"
    fi
    [[ $any -eq 1 ]] || echo "slurm-cluster: nothing running from $STATE"
}

status() {
    if answers; then
        sinfo
    elif [[ -f "$CONF" ]] && SLURM_CONF="$CONF" timeout 5 sinfo -h >/dev/null 2>&1; then
        SLURM_CONF="$CONF" sinfo
        echo "(client tools need SLURM_CONF=$CONF)"
    else
        echo "slurm-cluster: down (no controller answers sinfo)"
        return 3
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
