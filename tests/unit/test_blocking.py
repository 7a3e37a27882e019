"""`shared.blocking`: steps that may block refuse inside `refused()` (a submit's checks on the event loop), and
nowhere else; a model file's hash is such a step only when it is not cached yet."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shared import blocking
from shared.webui.hashes import HashCache


def test_a_step_that_may_block_raises_only_inside_refused() -> None:
    blocking.check("outside")  # nothing
    with pytest.raises(blocking.WouldBlock, match="hashing x"), blocking.refused():
        blocking.check("hashing x")
    blocking.check("after")  # reset when the block ends, also on an exception


def test_refused_is_per_context_so_a_thread_the_loop_hands_work_to_may_block() -> None:
    async def scenario() -> None:
        with blocking.refused():
            await asyncio.to_thread(blocking.check, "in the thread: a copy of the context, taken here")

    with pytest.raises(blocking.WouldBlock):
        asyncio.run(scenario())

    async def handed_after() -> None:
        with blocking.refused():
            pass
        await asyncio.to_thread(blocking.check, "after the block")

    asyncio.run(handed_after())


def test_hashing_a_file_not_cached_yet_would_block_and_a_cached_one_does_not(tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"\0" * 4096)
    cache = HashCache(tmp_path / ".hashes.json")
    with blocking.refused(), pytest.raises(blocking.WouldBlock):
        cache.sha256(model)
    digest = cache.sha256(model)  # in a thread, say
    with blocking.refused():
        assert cache.sha256(model) == digest
        assert HashCache.of_models_dir(tmp_path).sha256(model) == digest  # another process's copy, from the file
    model.write_bytes(b"\1" * 4096)  # a new version: hashed again
    with blocking.refused(), pytest.raises(blocking.WouldBlock):
        cache.sha256(model)
