"""A small qemu guest that runs the Linux kernel's own NBD client against a host server.

`build_image()` makes (or finds in the cache) the guest; `GuestRunner.run()`
boots it with a shell script and hands back what the script reported.
"""

from portalbd.guest.build import GuestBuildError, GuestImage, build_image
from portalbd.guest.run import GuestError, GuestResult, GuestRunner

__all__ = [
    "GuestBuildError",
    "GuestError",
    "GuestImage",
    "GuestResult",
    "GuestRunner",
    "build_image",
]
