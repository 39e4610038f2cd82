"""`gen mkfs --client kernel`: the mkfs workload through the Linux kernel's NBD client.

The FUSE path records what nbdfuse makes of the page cache's writeback; this
one boots the portalbd/guest qemu guest (TCG, no KVM needed), whose kernel
attaches /dev/nbd0 to the recording daemon itself, so the trace holds the
request sizes, flags and concurrency a real kernel client sends.  Only mkfs
fits in the guest (it has e2fsprogs, xfsprogs and busybox, no PostgreSQL or
Node); the file tree unpacked is the guest's own /lib and /sbin.
"""

from __future__ import annotations

from urllib.parse import urlparse

from portalbd.trace.gen.common import GenError, log

SCRIPT = r"""
set -e
attach /dev/nbd0 -N portalbd
wait_size /dev/nbd0
mkdir -p /mnt/fs
for fs in ext4 xfs; do
    if [ $fs = ext4 ]; then /sbin/mke2fs -t ext4 -F -q /dev/nbd0
    else /sbin/mkfs.xfs -f -q /dev/nbd0; fi
    mount -t $fs /dev/nbd0 /mnt/fs
    for round in __ROUNDS__; do
        mkdir /mnt/fs/tree$round
        cp -a /lib /sbin /bin /mnt/fs/tree$round/
    done
    sync
    umount /mnt/fs
    echo "$fs done at $(now)"
done
/sbin/nbd-client -d /dev/nbd0
"""


def mkfs_in_guest(uri: str, quick: bool, timeout: float = 600.0) -> None:
    try:
        from portalbd.guest import GuestError, GuestRunner, build_image
    except ImportError as e:  # pragma: no cover - the guest package ships with portalbd
        raise GenError(f"the kernel client needs portalbd.guest: {e}") from None
    port = urlparse(uri).port
    if port is None:
        raise GenError(f"cannot tell the port of {uri}")
    rounds = "1" if quick else "1 2 3"
    try:
        log("booting the kernel-client guest (qemu, TCG)")
        result = GuestRunner(build_image()).run(
            SCRIPT.replace("__ROUNDS__", rounds), port, timeout=timeout
        )
        result.check()
    except GuestError as e:
        raise GenError(f"kernel-client guest failed: {e}") from None
    log(f"guest finished in {result.elapsed:.1f}s")
