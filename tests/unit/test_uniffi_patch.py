"""The SlateDB binding patch: applied, fast path used, values intact."""

from __future__ import annotations

import asyncio
import os

import slatedb.uniffi as sdb

from portalbd.config import LsmConfig
from portalbd.store import uniffi_patch
from portalbd.store.slate import SlateHandle, resolve_object_store


def test_patch_is_applied_to_the_installed_binding() -> None:
    uniffi_patch.apply()
    assert uniffi_patch.is_applied(), "the byte-copy patch no longer applies to slatedb"
    converter = sdb._generated._UniffiFfiConverterBytes
    assert converter.lower.__name__ == "lower_bytes"


def test_values_round_trip_through_the_patched_path() -> None:
    async def body() -> None:
        handle = await SlateHandle.open(
            resolve_object_store("memory:///"), "patch", LsmConfig(block_cache_size_bytes=0)
        )
        values = {i.to_bytes(8, "big"): os.urandom(n) for i, n in enumerate((0, 1, 7, 4096, 65536))}
        await handle.write(list(values.items()))
        # The binding may hand the patch any bytes-like object.
        lowered = sdb._generated._UniffiFfiConverterBytes.lower(bytearray(b"from a bytearray"))
        lowered.free()
        await handle.write([(b"ba", b"from a bytearray")])
        for key, value in values.items():
            assert await handle.get(key) == value
        assert await handle.get(b"ba") == b"from a bytearray"
        await handle.close()

    asyncio.run(body())


def test_continuation_wakes_futures_from_the_loop_and_from_other_threads() -> None:
    """The patched callback: call_soon on the loop's own thread, threadsafe elsewhere."""
    import threading

    uniffi_patch.apply()
    module = sdb._generated
    callback = module._uniffi_continuation_callback
    assert isinstance(callback, module._UNIFFI_RUST_FUTURE_CONTINUATION_CALLBACK)
    handles = module._UniffiContinuationHandleMap

    async def body() -> None:
        loop = asyncio.get_running_loop()
        here = loop.create_future()
        callback(handles.insert((loop, here)), 0)  # as Rust does, inside a poll
        assert await asyncio.wait_for(here, 5) == 0
        there = loop.create_future()
        handle = handles.insert((loop, there))
        thread = threading.Thread(target=callback, args=(handle, 1))
        thread.start()
        assert await asyncio.wait_for(there, 5) == 1
        thread.join()

    asyncio.run(body())
