"""The shell that runs inside the guest: its /init and the helpers given to every script.

Kept as Python strings (not package data files) so an installed portalbd needs
nothing beyond its modules. Both texts are part of the image cache key.

Serial ports: ttyS0 is the kernel console, ttyS1 the control channel to the
host (result sections, host calls, the exit status), ttyS2 the script's own
stdout and stderr.
"""

from __future__ import annotations

# The address and port the guest dials; run.py forwards them to the host server.
GUEST_NBD_HOST = "10.0.2.100"
GUEST_NBD_PORT = 10809
SCRIPT_FW_CFG = "opt/portalbd/script"

INIT = r"""#!/bin/busybox sh
# portalbd test guest: bring up the minimum, run the host's script, power off.
/bin/busybox --install -s
export PATH=/sbin:/usr/sbin:/bin:/usr/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo /sbin/modprobe > /proc/sys/kernel/modprobe
release=$(uname -r)
for m in $(cat /etc/guest-modules); do
    insmod /lib/modules/$release/$m.ko || echo "init: insmod $m failed"
done

exec 3<>/dev/ttyS1
stty raw -echo <&3
stty raw -echo </dev/ttyS2

ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2

script=/sys/firmware/qemu_fw_cfg/by_name/opt/portalbd/script/raw
i=0
while [ ! -e $script ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
cat $script > /run/script.sh
echo "@@READY $(cut -d' ' -f1 /proc/uptime)" >&3
export NBD_HOST=10.0.2.100 NBD_PORT=10809 HOME=/tmp
cd /tmp
/bin/sh -c '. /etc/guest-lib.sh; . /run/script.sh' >/dev/ttyS2 2>&1 3>&3
rc=$?
echo "@@EXIT $rc $(cut -d' ' -f1 /proc/uptime)" >&3
sync
reboot -f
"""

GUEST_LIB = r"""# Helpers every guest script can use (sourced before it).

# section NAME: send stdin to the host as the result section NAME.
section() {
    { echo "@@BEGIN $1"; base64; echo "@@END $1"; } >&3
}

# emit NAME WORDS...: send WORDS as the result section NAME.
emit() {
    _name=$1; shift
    printf '%s\n' "$*" | section "$_name"
}

# hostcall NAME [ARGS...]: run the host's handler for NAME, print its reply.
# Fails (status 1, reply on stderr) when the host handler failed.
hostcall() {
    echo "@@CALL $*" >&3
    IFS= read -r _reply <&3 || return 1
    case "$_reply" in
        "@@OK "*) printf '%s\n' "${_reply#@@OK }" ;;
        *) printf 'hostcall %s: %s\n' "$1" "${_reply#@@ERR }" >&2; return 1 ;;
    esac
}

# step NAME CMD...: run CMD in a subshell with `set -e`, report its exit status
# as section "status:NAME", and go on either way (one failing check must not
# hide the others' results).
step() {
    _step=$1; shift
    echo "== step $_step at $(now)"
    ( set -e; "$@" )
    emit "status:$_step" "$?"
    return 0
}

# attach DEV [nbd-client options...]: attach DEV to the host's server.
attach() {
    _dev=$1; shift
    /sbin/nbd-client "$NBD_HOST" "$NBD_PORT" "$_dev" "$@"
}

# wait_size DEV: wait until the kernel knows DEV's size (attach is asynchronous).
wait_size() {
    _i=0
    while [ "$(cat /sys/block/${1#/dev/}/size 2>/dev/null || echo 0)" = 0 ]; do
        _i=$((_i+1)); [ $_i -gt 200 ] && return 1
        sleep 0.05
    done
}

# now: seconds since boot, for timings measured inside the guest.
now() {
    cut -d' ' -f1 /proc/uptime
}
"""
