# scripts/multihost-slurm.sh - the SLURM part of scripts/multihost.sh (`--slurm`), sourced by it.
#
# A private munged and slurmctld in the root network namespace (slurmctld in its own UTS namespace, hostname
# NAME-ctl, listening on the bridge address) and one slurmd per host, inside that host's network namespace with
# its own UTS/PID/mount namespace, node name NAME-host0/1, NodeAddr = the host's veth address. CPU-only partition
# `cpu`, no cgroups (proctrack/linuxproc, task/none), no accounting. Everything lives in $WORK/slurm and is
# stopped by the harness teardown; nothing machine-wide (/etc/slurm, /etc/munge, systemd units) is used.
# shellcheck shell=bash

# Tools for --slurm, mapped to their Debian packages (.ci/run installs them).
declare -A SLURM_TOOL_PKG=(
    [munged]=munge
    [slurmctld]=slurmctld
    [slurmd]=slurmd
    [sbatch]=slurm-client
    [scontrol]=slurm-client
    [sinfo]=slurm-client
    [srun]=slurm-client
    [nsenter]=util-linux
)

slurm_add_tools() {
    local t
    for t in "${!SLURM_TOOL_PKG[@]}"; do TOOL_PKG[$t]=${SLURM_TOOL_PKG[$t]}; done
}

write_slurm_conf() {
    # Ports derived from the subnet so parallel instances don't clash; slurmctld listens on every address of the
    # root namespace, the slurmds each in their own namespace.
    local port=$((20000 + 2 * SUBNET_X)) i
    {
        cat <<EOF
# SLURM config of multihost instance $NAME (generated; removed on teardown)
ClusterName=$NAME
SlurmctldHost=${NAME}-ctl($BRIDGE_IP)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
AuthInfo=socket=$SLURM_DIR/munge/socket,cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$SLURM_DIR/ctld
SlurmdSpoolDir=$SLURM_DIR/spool-%n
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd-%n.pid
SlurmctldLogFile=$SLURM_DIR/slurmctld.log
SlurmdLogFile=$SLURM_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: containers rarely delegate them, and a CPU test needs no confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/linear
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
# cred_expire (AuthInfo) is also how long a requeued job waits before it may start again: 10 s, not 120; and
# the scheduler looks for startable jobs every 2 s, not 60 (seen: a requeued job idle for 76 s).
SchedulerParameters=sched_interval=2
MinJobAge=600
PlugStackConfig=$SLURM_DIR/plugstack.conf
MailProg=/bin/true
EOF
        for i in 0 1; do
            printf 'NodeName=%s-host%s NodeAddr=%s NodeHostname=%s-host%s CPUs=%s State=UNKNOWN\n' \
                "$NAME" "$i" "${HOST_IPS[$i]}" "$NAME" "$i" "$(nproc)"
        done
        printf 'PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n'
    } >"$SLURM_DIR/slurm.conf"
    : >"$SLURM_DIR/plugstack.conf"
}

wait_for_nodes_idle() {
    local deadline=$((SECONDS + 30)) idle
    while ((SECONDS < deadline)); do
        idle=$(SLURM_CONF=$SLURM_DIR/slurm.conf sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
        ((idle == 2)) && return 0
        sleep 0.5
    done
    return 1
}

start_slurm() {
    SLURM_DIR=$WORK/slurm
    mkdir -p "$SLURM_DIR/ctld" "$SLURM_DIR/munge" "$SLURM_DIR/spool-${NAME}-host0" "$SLURM_DIR/spool-${NAME}-host1"
    chmod 700 "$SLURM_DIR/munge"
    record SLURM_DIR "$SLURM_DIR"
    # A fresh munge key per instance: only this instance's daemons and clients can authenticate.
    head -c 1024 /dev/urandom >"$SLURM_DIR/munge/munge.key"
    chmod 400 "$SLURM_DIR/munge/munge.key"
    # --force: munged refuses to run as root without it.
    munged -F --force --socket="$SLURM_DIR/munge/socket" --key-file="$SLURM_DIR/munge/munge.key" \
        --pid-file="$SLURM_DIR/munge/munged.pid" --log-file="$SLURM_DIR/munge/munged.log" \
        --seed-file="$SLURM_DIR/munge/seed" </dev/null >"$SLURM_DIR/munge/stdio" 2>&1 &
    record MUNGED_PID "$!"
    local deadline=$((SECONDS + 10))
    until [[ -S $SLURM_DIR/munge/socket ]]; do
        ((SECONDS < deadline)) || die "munged did not start: $(tail -n 5 "$SLURM_DIR/munge/munged.log" 2>/dev/null)"
        sleep 0.1
    done
    write_slurm_conf

    # slurmctld only runs where gethostname() is the SlurmctldHost name: its own UTS namespace.
    unshare --uts sh -c 'hostname "$1" && exec slurmctld -D -f "$2"' sh "${NAME}-ctl" "$SLURM_DIR/slurm.conf" \
        </dev/null >"$SLURM_DIR/slurmctld.stdio" 2>&1 &
    record SLURMCTLD_PID "$!"

    local i
    for i in 0 1; do
        # Not `ip netns exec`: it remounts /sys, hiding /sys/fs/cgroup, and slurmd 22.05 will not start without
        # it ("No filesystem mounted on /sys/fs/cgroup") even with no cgroup plugin. nsenter keeps the mounts;
        # the per-host /etc/hosts that `ip netns exec` would bind is bound here by hand, in a private mount
        # namespace. Own PID namespace as for sshd: a job's processes die with their host.
        # shellcheck disable=SC2016 # $1.. expand in the inner sh
        nsenter --net="/run/netns/${NETNS[$i]}" \
            unshare --uts --pid --mount --fork --kill-child --mount-proc sh -c \
            'hostname "$1" && mount --bind "$3" /etc/hosts && exec slurmd -D -N "$1" -f "$2"' sh \
            "${NAME}-host$i" "$SLURM_DIR/slurm.conf" "/etc/netns/${NETNS[$i]}/hosts" \
            </dev/null >"$SLURM_DIR/slurmd_$i.stdio" 2>&1 &
        record "SLURMD_PID_$i" "$!"
    done
    wait_for_nodes_idle || die "SLURM nodes not idle after 30 s: $(SLURM_CONF=$SLURM_DIR/slurm.conf sinfo 2>&1)
slurmctld: $(tail -n 5 "$SLURM_DIR/slurmctld.log" 2>/dev/null)
slurmd: $(tail -n 5 "$SLURM_DIR/slurmd_0.stdio" 2>/dev/null)"
    printf 'export SLURM_CONF=%s\nexport MULTIHOST_SLURM_NODES="%s"\n' \
        "$SLURM_DIR/slurm.conf" "${NAME}-host0 ${NAME}-host1" >>"$WORK/env.sh"
    log "slurm: controller ${NAME}-ctl on $BRIDGE_IP, nodes ${NAME}-host0 ${NAME}-host1 idle (partition cpu)"
}

# Stop slurmctld and munged of instance dir $1 (the slurmds die with their namespaces). Args: dir, then pids;
# a pid is signalled only while its command line still names the dir (pids are reused after a `down` much later).
stop_slurm_daemons() {
    local dir=$1 pid live=()
    shift
    for pid in "$@"; do
        [[ -n $pid ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$dir" && live+=("$pid")
    done
    set -- "${live[@]}"
    for pid in "$@"; do
        kill -TERM "$pid" 2>/dev/null
    done
    local deadline=$((SECONDS + 10))
    for pid in "$@"; do
        while ((SECONDS < deadline)) && kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    return 0
}
