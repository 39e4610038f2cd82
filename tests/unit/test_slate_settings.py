"""What SlateDB is told to do with its memory (store/slate.py build_settings)."""

from __future__ import annotations

import json

from portalbd.config import LsmConfig
from portalbd.store.slate import build_settings

MIB = 1 << 20


def test_sst_builds_run_one_at_a_time_and_no_larger_than_l0() -> None:
    # Every L0 flush and every subcompaction holds an SST it is building:
    # one of each at a time is what "RSS near the budgets" rests on.
    settings = json.loads(build_settings(LsmConfig()).to_json_string())
    worker = settings["compactor_options"]["worker"]
    assert settings["l0_flush_parallelism"] == 1
    assert worker["max_subcompactions"] == 1
    assert worker["max_concurrent_compactions"] == 1
    assert worker["max_sst_size"] == settings["l0_sst_size_bytes"] == 64 * MIB
    assert settings["max_unflushed_bytes"] == 128 * MIB


def test_an_object_cache_keeps_what_the_daemon_uploads() -> None:
    # Reads go to what was just flushed or compacted: both are cached as
    # they are written, not fetched back from the bucket.
    lsm = LsmConfig(object_cache_dir="/var/cache/portalbd/x")
    cache = json.loads(build_settings(lsm).to_json_string())["object_store_cache_options"]
    assert cache["root_folder"] == "/var/cache/portalbd/x"
    assert cache["cache_on_flush"] is True
    assert cache["cache_on_compaction"] is True
