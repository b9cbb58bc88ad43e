#!/usr/bin/env bash
# scripts/multihost.sh - fake a two-host cluster on one Linux machine.
#
# Builds two network namespaces ("hosts") joined by a private bridge, runs a
# private OpenSSH server inside each one, writes a DeepSpeed hostfile naming
# both hosts with slots=1, runs a command that can use the real multi-node
# launcher (`deepspeed --hostfile "$DS_HOSTFILE" --launcher pdsh ...`), and then
# removes every namespace, link, bridge, daemon and file it created.
#
# Usage:
#   scripts/multihost.sh run -- CMD ARGS...   set up, run CMD, tear down;
#                                            exits with CMD's exit status
#   scripts/multihost.sh up                   set up and leave it running;
#                                            prints a file to `source`
#   scripts/multihost.sh down [NAME...]       tear down NAME, or with no NAME
#                                            every instance whose owner is gone
#   scripts/multihost.sh stop-ssh NAME        stop both hosts' sshd (a cluster
#                                            where nodes cannot ssh to each other)
#   --slurm (after run/up)                    also a SLURM cluster: munged +
#                                            slurmctld here, one slurmd per host
#                                            (scripts/multihost-slurm.sh)
#
# Exit status:
#   CMD's status   for `run` once the hosts were up
#   77             the machine cannot host the harness (a tool missing: the
#                  script installs nothing, .ci/run does; not root; no netns /
#                  veth / bridge support).
#                  A line starting with "MULTIHOST_SKIP:" on stderr gives the
#                  reason; a test should skip only when it sees that line.
#   70             the harness itself failed (sshd did not come up, teardown
#                  left something behind, ...): a bug, not a reason to skip.
#
# See scripts/MULTIHOST.md for the design and how to use it with DeepSpeed.
set -euo pipefail

readonly EXIT_SKIP=77
readonly EXIT_HARNESS=70
# Every object we create is named "$NAME..." with NAME = dst<pid>, so two runs
# in parallel never collide and `down` can find exactly what one run made.
readonly NAME_PREFIX=dst
# Addresses come from 10.231.X.0/24; X is picked free at setup time (under a
# lock) so parallel instances get different subnets. Only the bridge we create
# in the root namespace and the two veth ends inside our namespaces ever carry
# these addresses, and the namespaces get no default route, so no traffic can
# leave towards anything we did not make.
readonly NET_BASE=10.231
# Interface name used for the veth end inside BOTH namespaces. Namespaces have
# separate interface tables, so the same name is fine and lets one value of
# GLOO_SOCKET_IFNAME work on every "host".
readonly NS_IFNAME=mh0
readonly STATE_ROOT=${TMPDIR:-/tmp}
readonly SSHD_PORT=22
SLURM=0
# shellcheck source=scripts/multihost-slurm.sh
source "$(dirname "${BASH_SOURCE[0]}")/multihost-slurm.sh"

log() { printf 'multihost: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit "$EXIT_HARNESS"; }
skip() {
    # Machine-readable reason for a pytest skip, then the distinct status.
    printf 'MULTIHOST_SKIP: %s\n' "$*" >&2
    exit "$EXIT_SKIP"
}

usage() {
    sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2
    exit 2
}

# ---------------------------------------------------------------- prerequisites

# Tools needed on this machine, mapped to the Debian package providing them.
# ssh-keygen/ssh come with openssh-server's dependency openssh-client.
declare -A TOOL_PKG=(
    [ip]=iproute2
    [sshd]=openssh-server
    [ssh]=openssh-client
    [ssh-keygen]=openssh-client
    [pdsh]=pdsh
    [unshare]=util-linux
    [flock]=util-linux
    [pgrep]=procps
)

find_tool() {
    # sshd lives in /usr/sbin, which is not always on a non-root PATH.
    PATH="$PATH:/usr/sbin:/sbin" command -v "$1" 2>/dev/null || true
}

check_tools() {
    # Installs nothing: CI installs these as root (.ci/run); elsewhere, install them or skip.
    local tool missing=() pkgs=()
    for tool in "${!TOOL_PKG[@]}"; do
        [[ -n "$(find_tool "$tool")" ]] || { missing+=("$tool"); pkgs+=("${TOOL_PKG[$tool]}"); }
    done
    ((${#missing[@]} == 0)) && return 0
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort)
    mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
    skip "missing tool(s): ${missing[*]} (Debian: apt-get install --no-install-recommends ${pkgs[*]}; .ci/run installs them)"
}

check_prereqs() {
    [[ $(uname -s) == Linux ]] || skip "needs Linux network namespaces (this is $(uname -s))"
    ((SLURM)) && slurm_add_tools
    check_tools
    [[ $EUID -eq 0 ]] || skip "needs root to create network namespaces (running as uid $EUID)"
    SSHD_BIN=$(find_tool sshd)
    SSH_BIN=$(find_tool ssh)
}

# ------------------------------------------------------------------ state files
#
# Everything an instance needs to be found and torn down later lives in
# $STATE_ROOT/$NAME.multihost/ (mode 0700): keys, configs, sshd logs, the
# hostfile, the ssh wrapper, and state.env which lists the objects created.

state_dir_of() { printf '%s/%s.multihost' "$STATE_ROOT" "$1"; }

# Append one "KEY=value" line; values here never contain spaces or quotes.
record() { printf '%s=%q\n' "$1" "$2" >>"$WORK/state.env"; }

# ------------------------------------------------------------------------ setup

pick_subnet() {
    # Called with the setup lock held. Start at a PID-derived slot to spread
    # parallel runs, skip any 10.231.X.0/24 already present on this machine.
    # Routes count too: a /24 of ours would shadow a real route to that range.
    local start=$(($$ % 250 + 1)) i x used
    used=$({ ip -o -4 addr show; ip -4 route show table all; } 2>/dev/null || true)
    for ((i = 0; i < 250; i++)); do
        x=$(((start + i - 1) % 250 + 1))
        if ! grep -Eq "(^| )${NET_BASE//./\\.}\.${x}\." <<<"$used"; then
            SUBNET_X=$x
            return 0
        fi
    done
    die "no free ${NET_BASE}.X.0/24 subnet"
}

# Run a setup step whose failure means "this machine cannot do it" (exit 77).
capability() {
    local what=$1 out
    shift
    out=$("$@" 2>&1) || skip "$what failed: $* -> ${out:-no output}"
}

make_network() {
    BRIDGE=${NAME}br
    BRIDGE_IP=${NET_BASE}.${SUBNET_X}.1
    HOST_IPS=("${NET_BASE}.${SUBNET_X}.2" "${NET_BASE}.${SUBNET_X}.3")
    NETNS=("${NAME}a" "${NAME}b")
    # Root-side veth ends; the peer is renamed to $NS_IFNAME inside its netns.
    VETHS=("${NAME}a" "${NAME}b")

    # Record each object before creating it, so teardown after a half-finished
    # setup still knows to look for it.
    record BRIDGE "$BRIDGE"
    record NETNS_0 "${NETNS[0]}"
    record NETNS_1 "${NETNS[1]}"
    record VETH_0 "${VETHS[0]}"
    record VETH_1 "${VETHS[1]}"

    capability "creating a bridge" ip link add "$BRIDGE" type bridge
    ip addr add "${BRIDGE_IP}/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up

    local i ns
    for i in 0 1; do
        ns=${NETNS[$i]}
        capability "creating a network namespace" ip netns add "$ns"
        capability "creating a veth pair" ip link add "${VETHS[$i]}" type veth peer name "${VETHS[$i]}p"
        ip link set "${VETHS[$i]}p" netns "$ns"
        ip link set "${VETHS[$i]}" master "$BRIDGE"
        ip link set "${VETHS[$i]}" up
        ip -n "$ns" link set lo up
        ip -n "$ns" link set "${VETHS[$i]}p" name "$NS_IFNAME"
        ip -n "$ns" addr add "${HOST_IPS[$i]}/24" dev "$NS_IFNAME"
        ip -n "$ns" link set "$NS_IFNAME" up
        # Deliberately no default route: the namespace can reach the bridge
        # subnet and nothing else.
    done
    write_netns_etc
}

# Per-host /etc/hosts and /etc/resolv.conf. `ip netns exec NS` bind-mounts
# every file in /etc/netns/NS/ over its namesake in /etc for what it starts
# (here: sshd, hence every session and rank). The hosts file lets each host
# resolve its own and its peer's hostname, as on a real cluster (libraries
# that look up gethostname() work, and c10d can name its peers). The
# resolv.conf has no nameserver, so the resolver only ever asks the
# namespace's own loopback: no DNS query can leave for the machine's server.
write_netns_etc() {
    local i dir
    for i in 0 1; do
        dir=/etc/netns/${NETNS[$i]}
        record "ETC_NETNS_$i" "$dir"
        mkdir -p "$dir"
        cat >"$dir/hosts" <<EOF
# multihost $NAME host $i (generated; removed on teardown)
127.0.0.1 localhost
::1 localhost ip6-localhost ip6-loopback
$BRIDGE_IP ${NAME}-gw
${HOST_IPS[0]} ${NAME}-host0
${HOST_IPS[1]} ${NAME}-host1
# c10d's TCPStore listens dual-stack and sees peers as v4-mapped addresses;
# without these its reverse lookups fail (a warning per connection).
::ffff:${HOST_IPS[0]} ${NAME}-host0
::ffff:${HOST_IPS[1]} ${NAME}-host1
EOF
        printf '# multihost %s: no nameserver on purpose (generated)\n' "$NAME" >"$dir/resolv.conf"
    done
}

make_ssh_material() {
    local i
    ssh-keygen -q -t ed25519 -N '' -C "$NAME-client" -f "$WORK/id_ed25519"
    ssh-keygen -q -t ed25519 -N '' -C "$NAME-host" -f "$WORK/ssh_host_ed25519_key"
    cp "$WORK/id_ed25519.pub" "$WORK/authorized_keys"
    # Pin the host key for both addresses: no trust-on-first-use prompts and
    # nothing is ever written to /root/.ssh.
    printf '%s,%s,%s,%s %s\n' "${HOST_IPS[0]}" "${HOST_IPS[1]}" "${NAME}-host0" "${NAME}-host1" \
        "$(cut -d' ' -f1,2 "$WORK/ssh_host_ed25519_key.pub")" >"$WORK/known_hosts"

    cat >"$WORK/ssh_config" <<EOF
# Private ssh client config for multihost instance $NAME (generated).
Host ${HOST_IPS[0]} ${HOST_IPS[1]} ${NAME}-host0 ${NAME}-host1
    User root
    Port $SSHD_PORT
    IdentityFile $WORK/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile $WORK/known_hosts
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 10
    LogLevel ERROR
EOF

    # DeepSpeed's runner calls plain `ssh` (reachability check, `hostname -I`)
    # and pdsh's ssh module execs `ssh` from PATH too. A wrapper first on PATH
    # makes both use the private config without touching ~/.ssh.
    mkdir -p "$WORK/bin"
    cat >"$WORK/bin/ssh" <<EOF
#!/bin/sh
# multihost $NAME: use the private config (keys, pinned host key).
exec $SSH_BIN -F $WORK/ssh_config "\$@"
EOF
    chmod 755 "$WORK/bin/ssh"

    for i in 0 1; do
        cat >"$WORK/sshd_$i.conf" <<EOF
# Private sshd for multihost host $i of $NAME (generated).
ListenAddress ${HOST_IPS[$i]}:$SSHD_PORT
HostKey $WORK/ssh_host_ed25519_key
PidFile $WORK/sshd_$i.pid
AuthorizedKeysFile $WORK/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
# The key files live under /tmp (world-writable), which StrictModes rejects.
StrictModes no
# PAM needs a login stack that containers often lack, and we need no session.
UsePAM no
X11Forwarding no
AllowTcpForwarding no
AllowAgentForwarding no
PrintMotd no
PrintLastLog no
# pdsh plus DeepSpeed's checks open several sessions at once.
MaxStartups 64
MaxSessions 64
LogLevel INFO
# Environment for every command run on this "host". GLOO_SOCKET_IFNAME pins
# gloo to this host's veth. Gloo would otherwise pick the address its hostname
# resolves to, which the per-host /etc/hosts makes right too; without either,
# it falls back to loopback and the other host cannot connect (seen: "Gloo
# connectFullMesh failed ... Connect timeout").
SetEnv GLOO_SOCKET_IFNAME=$NS_IFNAME MULTIHOST_NAME=$NAME MULTIHOST_HOST_INDEX=$i MULTIHOST_HOST_IP=${HOST_IPS[$i]}
EOF
    done
}

wait_for_port() {
    local ip=$1 port=$2 deadline=$((SECONDS + 15))
    while ((SECONDS < deadline)); do
        # bash's /dev/tcp: a bare TCP connect from the root namespace.
        if timeout 2 bash -c "exec 3<>/dev/tcp/$ip/$port" 2>/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    return 1
}

start_sshds() {
    local i
    # sshd refuses to start without its privilege-separation directory. It is
    # a standard empty directory a system sshd would also use, so it is left
    # in place rather than racing other instances to remove it.
    mkdir -p /run/sshd && chmod 755 /run/sshd
    "$SSHD_BIN" -t -f "$WORK/sshd_0.conf" || die "sshd rejected the generated config"
    for i in 0 1; do
        # Each host gets its own UTS and PID namespace besides the network one:
        # - its own hostname, as on a real cluster, so code that keys anything
        #   on the hostname sees two hosts;
        # - its own process table (with /proc remounted), because DeepSpeed's
        #   runner cleans up after a Ctrl-C by running `pkill -f <python> -u
        #   -m deepspeed.launcher.launch` on every host over ssh: with a shared
        #   PID namespace that would kill unrelated DeepSpeed jobs on this
        #   machine, including other harness instances.
        # sshd runs in the foreground (-D) as PID 1 of that namespace, so it
        # reaps orphaned session processes and, when it exits, the kernel
        # kills everything left in the namespace. `unshare --kill-child` ties
        # it to the unshare process whose pid we record ($!, since `ip netns
        # exec` execs): killing that one ends the whole host. Its stdio must
        # not hold the caller's pipes open, hence the redirections.
        # shellcheck disable=SC2016 # $1.. expand in the inner sh, on purpose
        ip netns exec "${NETNS[$i]}" \
            unshare --uts --pid --fork --kill-child --mount-proc sh -c \
            'hostname "$1" && exec "$2" -D -f "$3" -E "$4"' sh \
            "${NAME}-host$i" "$SSHD_BIN" "$WORK/sshd_$i.conf" "$WORK/sshd_$i.log" \
            </dev/null >"$WORK/sshd_$i.stdio" 2>&1 &
        record "HOST_PID_$i" "$!"
    done
    for i in 0 1; do
        wait_for_port "${HOST_IPS[$i]}" "$SSHD_PORT" ||
            die "sshd on ${HOST_IPS[$i]}:$SSHD_PORT not reachable: $(tail -n 5 "$WORK/sshd_$i.log" 2>/dev/null)"
    done
    # End-to-end check with the same wrapper the launcher will use.
    for i in 0 1; do
        "$WORK/bin/ssh" "${HOST_IPS[$i]}" true ||
            die "ssh to ${HOST_IPS[$i]} failed: $(tail -n 5 "$WORK/sshd_$i.log" 2>/dev/null)"
    done
}

write_outputs() {
    DS_HOSTFILE=$WORK/hostfile
    cat >"$DS_HOSTFILE" <<EOF
# DeepSpeed hostfile for multihost instance $NAME (generated)
${HOST_IPS[0]} slots=1
${HOST_IPS[1]} slots=1
EOF
    # Environment for the command (and for `source` after `up`).
    cat >"$WORK/env.sh" <<EOF
# source this to use multihost instance $NAME
export DS_HOSTFILE=$DS_HOSTFILE
export PATH=$WORK/bin:\$PATH
export PDSH_RCMD_TYPE=ssh
export MULTIHOST_NAME=$NAME
export MULTIHOST_WORKDIR=$WORK
export MULTIHOST_HOSTS="${HOST_IPS[*]}"
export MULTIHOST_MASTER_ADDR=${HOST_IPS[0]}
EOF
}

setup() {
    check_prereqs
    # dst<pid>; if an `up` instance left by an earlier process with the same
    # pid still exists, dst<pid>n1, n2, ... (names stay within the
    # 15-character interface-name limit with the br/a/b suffixes).
    local k=0
    NAME=${NAME_PREFIX}$$
    until mkdir -m 700 "$(state_dir_of "$NAME")" 2>/dev/null; do
        ((++k < 10)) || die "cannot create a state dir under $STATE_ROOT"
        NAME=${NAME_PREFIX}$$n$k
    done
    WORK=$(state_dir_of "$NAME")
    record NAME "$NAME"
    record OWNER_PID "$$"
    record MODE "$MODE"

    # Subnet choice and bridge address assignment must be atomic with respect
    # to other instances: lock this script file (no extra lock file to leave).
    exec 9<"$0"
    flock 9
    pick_subnet
    record SUBNET_X "$SUBNET_X"
    make_network
    flock -u 9
    exec 9<&-

    make_ssh_material
    start_sshds
    write_outputs
    ((SLURM)) && start_slurm
    SETUP_DONE=1
    log "up: $NAME on ${NET_BASE}.${SUBNET_X}.0/24, hosts ${HOST_IPS[*]}"
}

# --------------------------------------------------------------------- teardown

# Pids of live (non-zombie) processes in network namespace $1, leaving out
# pid $2 and its children. `ip netns pids` matches /proc/*/ns/net against the
# namespace; everything in it was started by us: the unshare holding the
# host, its sshd, sessions, launchers and ranks.
netns_pids_except() {
    local pid skip=" "
    [[ -n ${2:-} ]] && skip=" $2 $(pgrep -P "$2" 2>/dev/null | tr '\n' ' ')"
    for pid in $(ip netns pids "$1" 2>/dev/null); do
        [[ $skip == *" $pid "* ]] && continue
        [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]] && continue
        printf '%s\n' "$pid"
    done
}

# TERM, then after a grace period KILL, the given pid lister's results.
kill_until_gone() {
    local pids deadline=$((SECONDS + 5))
    pids=$("$@")
    [[ -n $pids ]] || return 0
    # shellcheck disable=SC2086 # word-splitting the pid list is intended
    kill -TERM $pids 2>/dev/null
    while ((SECONDS < deadline)); do
        pids=$("$@")
        [[ -n $pids ]] || return 0
        sleep 0.2
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null
    sleep 0.2
}

# Empty network namespace $1 whose host was started as pid $2 (the unshare
# process holding the host's PID namespace). Ranks, launchers and sessions get
# SIGTERM first so they can exit cleanly; then the host itself, which takes
# anything left with it. `run` reaps it with `wait` (it is our child there).
kill_netns_processes() {
    local ns=$1 listener=${2:-}
    [[ -e /run/netns/$ns ]] || return 0
    kill_until_gone netns_pids_except "$ns" "$listener"
    kill_until_gone netns_pids_except "$ns" ""
    [[ -n $listener ]] && wait "$listener" 2>/dev/null
    return 0
}

# Pids in process group $1 that carry MULTIHOST_NAME=$2 in their environment.
# The environment check guards against the group id having been reused.
cmd_group_pids() {
    local pid
    for pid in $(pgrep -g "$1" 2>/dev/null); do
        tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qx "MULTIHOST_NAME=$2" &&
            printf '%s\n' "$pid"
    done
}

# Tear down the instance whose state dir is $1. Never fails; returns 1 if
# something was left behind.
teardown_dir() {
    local dir=$1 NAME='' BRIDGE='' NETNS_0='' NETNS_1='' VETH_0='' VETH_1='' \
        HOST_PID_0='' HOST_PID_1='' CMD_PGID='' ETC_NETNS_0='' ETC_NETNS_1='' \
        SLURM_DIR='' MUNGED_PID='' SLURMCTLD_PID='' SLURMD_PID_0='' SLURMD_PID_1='' \
        ns link etc leftover=0
    [[ -f $dir/state.env ]] || { rm -rf "$dir"; return 0; }
    # shellcheck disable=SC1091
    source "$dir/state.env"
    # A command left running by a `run` that died without cleaning up (in a
    # live `run`, stop_child has already ended it and this finds nothing).
    [[ -n $CMD_PGID && -n $NAME ]] && kill_until_gone cmd_group_pids "$CMD_PGID" "$NAME"
    [[ -n $NETNS_0 ]] && kill_netns_processes "$NETNS_0" "$HOST_PID_0"
    [[ -n $NETNS_1 ]] && kill_netns_processes "$NETNS_1" "$HOST_PID_1"
    # The slurmds (and any job) were in the namespaces, gone now; then the controller, then munge.
    [[ -n $SLURM_DIR ]] && stop_slurm_daemons "$SLURM_DIR" "$SLURMCTLD_PID" "$MUNGED_PID"
    # Delete the root-side veth ends explicitly: deleting a namespace frees
    # its veth pairs only later (the kernel does netns cleanup in a
    # workqueue), while deleting one end removes the pair at once.
    for link in "$VETH_0" "$VETH_1"; do
        [[ -n $link ]] && ip link del "$link" 2>/dev/null
    done
    for ns in "$NETNS_0" "$NETNS_1"; do
        [[ -n $ns ]] && ip netns del "$ns" 2>/dev/null
    done
    [[ -n $BRIDGE ]] && ip link del "$BRIDGE" 2>/dev/null
    for etc in "$ETC_NETNS_0" "$ETC_NETNS_1"; do
        # Only ever a directory this instance created, named after it.
        [[ $etc == /etc/netns/"$NAME"[ab] ]] && rm -rf "$etc"
    done
    # Shared parent: remove only once empty (fails harmlessly otherwise).
    rmdir /etc/netns 2>/dev/null
    # Verify: nothing named after this instance may remain.
    if [[ -n $NAME ]]; then
        local links_re=": ${NAME}(br|a|b)[@:]"
        if ip netns list 2>/dev/null | grep -Eq "^${NAME}[ab]( |$)"; then
            log "WARNING: namespace of $NAME still present"; leftover=1
        fi
        if compgen -G "/etc/netns/${NAME}[ab]" >/dev/null; then
            log "WARNING: /etc/netns entries of $NAME still present"; leftover=1
        fi
        if ip -o link show 2>/dev/null | grep -Eq "$links_re"; then
            # Link deletion can be asynchronous; give it a moment.
            sleep 1
            if ip -o link show 2>/dev/null | grep -Eq "$links_re"; then
                log "WARNING: links of $NAME still present:" \
                    "$(ip -o link show | grep -E "$links_re" | cut -d: -f2 | tr '\n' ' ')"
                leftover=1
            fi
        fi
    fi
    if [[ ${MULTIHOST_KEEP_WORKDIR:-0} == 1 ]]; then
        log "keeping $dir (MULTIHOST_KEEP_WORKDIR=1)"
    else
        rm -rf "$dir"
    fi
    return "$leftover"
}

# --------------------------------------------------------------------- commands

CHILD_PID=''
TORN_DOWN=0
SETUP_DONE=0

stop_child() {
    # The command runs in its own process group (set -m), so one signal
    # reaches the deepspeed runner, pdsh and ssh clients together. The runner
    # reacts to SIGINT/SIGTERM by killing the remote launchers over pdsh.
    local sig=$1 deadline
    [[ -n $CHILD_PID ]] && kill -0 "$CHILD_PID" 2>/dev/null || return 0
    kill "-$sig" -- "-$CHILD_PID" 2>/dev/null || true
    deadline=$((SECONDS + 15))
    while ((SECONDS < deadline)) && kill -0 "$CHILD_PID" 2>/dev/null; do sleep 0.2; done
    kill -KILL -- "-$CHILD_PID" 2>/dev/null || true
}

on_exit() {
    local rc=$?
    set +e
    trap '' INT TERM HUP
    # A setup step that fails outside the capability checks is a harness bug;
    # report it as such rather than with whatever status the step returned.
    if ((!SETUP_DONE && rc != 0 && rc != EXIT_SKIP && rc < 128)); then
        rc=$EXIT_HARNESS
    fi
    if ((!TORN_DOWN)) && [[ -n ${WORK:-} && -d ${WORK:-} ]]; then
        TORN_DOWN=1
        stop_child TERM
        if ! teardown_dir "$WORK"; then
            log "ERROR: teardown of ${NAME:-?} left objects behind"
            ((rc == 0)) && rc=$EXIT_HARNESS
        else
            log "down: ${NAME:-?} removed"
        fi
    fi
    exit "$rc"
}

on_signal() {
    local sig=$1 num
    num=$(kill -l "$sig")
    log "caught SIG$sig, stopping the command and tearing down"
    stop_child "$sig"
    exit $((128 + num))
}

cmd_run() {
    [[ ${1:-} == --slurm ]] && { SLURM=1; shift; }
    [[ ${1:-} == -- ]] && shift
    (($# > 0)) || usage
    MODE=run
    trap on_exit EXIT
    trap 'on_signal INT' INT
    trap 'on_signal TERM' TERM
    trap 'on_signal HUP' HUP
    setup
    printf 'DS_HOSTFILE=%s\n' "$DS_HOSTFILE"

    local rc=0 start=$SECONDS
    # Job control puts the command in its own process group and, unlike a
    # plain `&`, does not make it ignore SIGINT. Running it in the background
    # and `wait`ing lets our traps fire at once instead of after it exits.
    set -m
    (
        # shellcheck disable=SC1091
        source "$WORK/env.sh"
        exec "$@"
    ) &
    CHILD_PID=$!
    set +m
    # Lets `down` stop the command if this script is SIGKILLed.
    record CMD_PGID "$CHILD_PID"
    wait "$CHILD_PID" || rc=$?
    CHILD_PID=''
    log "command exited with status $rc after $((SECONDS - start))s"
    exit "$rc"
}

cmd_up() {
    [[ ${1:-} == --slurm ]] && SLURM=1
    MODE=up
    # Tear down only if setup fails half-way; on success leave it running.
    trap on_exit EXIT
    setup
    trap - EXIT
    cat <<EOF
MULTIHOST_NAME=$NAME
DS_HOSTFILE=$DS_HOSTFILE
multihost instance $NAME is up. Use it with:
  source $WORK/env.sh
  ssh ${HOST_IPS[0]} hostname    # via the private wrapper on PATH
Tear it down with:
  $0 down $NAME
EOF
}

# Stop the sshd of both hosts of instance $1, leaving everything else (slurmds) up.
cmd_stop_ssh() {
    local dir i pid HOST_PID_0='' HOST_PID_1='' deadline
    dir=$(state_dir_of "${1:?stop-ssh needs an instance NAME}")
    [[ -f $dir/state.env ]] || { log "no instance $1 ($dir)"; return 1; }
    # shellcheck disable=SC1091
    source "$dir/state.env"
    for i in 0 1; do
        pid=HOST_PID_$i
        pid=${!pid}
        # The unshare holding the host (only while its command line names this instance's sshd config). It
        # ignores SIGTERM; its child sshd, PID 1 of the host, does not, and takes every ssh session with it.
        [[ -n $pid ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$dir/sshd_$i.conf" &&
            pkill -TERM -P "$pid"
        deadline=$((SECONDS + 10))
        while [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    done
    for i in 0 1; do
        pid=HOST_PID_$i
        ! kill -0 "${!pid}" 2>/dev/null || die "stop-ssh: sshd of host $i still running"
    done
    log "stop-ssh: sshd of $1 stopped"
}

cmd_down() {
    local dir name rc=0 owner
    if (($# > 0)); then
        for name in "$@"; do
            dir=$(state_dir_of "$name")
            [[ -d $dir ]] || { log "no instance $name ($dir)"; rc=1; continue; }
            teardown_dir "$dir" && log "down: $name removed" || rc=$EXIT_HARNESS
        done
        return "$rc"
    fi
    # No names: remove every instance whose owning process is gone (all `up`
    # instances, and `run`s that were SIGKILLed before they could clean up).
    shopt -s nullglob
    for dir in "$STATE_ROOT/${NAME_PREFIX}"*.multihost; do
        owner=$(sed -n 's/^OWNER_PID=//p' "$dir/state.env" 2>/dev/null)
        if [[ -n $owner ]] && kill -0 "$owner" 2>/dev/null &&
            grep -q '^MODE=run' "$dir/state.env"; then
            log "skipping $(basename "$dir" .multihost): its run (pid $owner) is still active"
            continue
        fi
        teardown_dir "$dir" && log "down: $(basename "$dir" .multihost) removed" || rc=$EXIT_HARNESS
    done
    return "$rc"
}

main() {
    local sub=${1:-}
    (($# > 0)) && shift
    case $sub in
        run) cmd_run "$@" ;;
        up) cmd_up "$@" ;;
        down) [[ $EUID -eq 0 ]] || skip "needs root"; cmd_down "$@" ;;
        stop-ssh) cmd_stop_ssh "$@" ;;
        -h | --help | help | '') usage ;;
        *) log "unknown subcommand '$sub'"; usage ;;
    esac
}

main "$@"
