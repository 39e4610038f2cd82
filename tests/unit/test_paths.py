"""Where an S3 disk's local object cache lives by default (paths.object_cache_root)."""

from __future__ import annotations

from pathlib import Path

from portalbd.paths import object_cache_root


def test_systemd_cache_directory_wins() -> None:
    env = {"CACHE_DIRECTORY": "/var/cache/portalbd/disk0:/other", "XDG_CACHE_HOME": "/x"}
    assert object_cache_root("disk0", env, uid=0) == Path("/var/cache/portalbd/disk0")
    assert object_cache_root("disk0", env, uid=1000) == Path("/var/cache/portalbd/disk0")


def test_root_caches_under_var_cache_by_instance() -> None:
    assert object_cache_root("disk0", {}, uid=0) == Path("/var/cache/portalbd/disk0")


def test_a_user_caches_under_the_xdg_cache() -> None:
    xdg = {"XDG_CACHE_HOME": "/home/ann/.xdg", "HOME": "/home/ann"}
    assert object_cache_root("d", xdg, uid=1000) == Path("/home/ann/.xdg/portalbd/d")
    home = {"HOME": "/home/ann"}
    assert object_cache_root("d", home, uid=1000) == Path("/home/ann/.cache/portalbd/d")
