"""`Once`: work done once per key for messages that come again, bounded, failures retried."""

from __future__ import annotations

import asyncio

import pytest

from services.core.once import Once


class Work:
    """Counts its calls; succeeds (or not) as told, when released."""

    def __init__(self, result: bool = True) -> None:
        self.calls = 0
        self.result = result
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self) -> bool:
        self.calls += 1
        await self.release.wait()
        return self.result


async def test_a_key_done_is_not_done_again() -> None:
    skips: list[int] = []
    once = Once(10, lambda: skips.append(1))
    work = Work()

    assert await once.run("a", work)
    assert await once.run("a", work)
    assert await once.run("b", work)

    assert work.calls == 2
    assert once.skipped == 1
    assert skips == [1]


async def test_a_key_that_comes_again_while_being_done_waits_for_that_work() -> None:
    once = Once(10)
    work = Work()
    work.release.clear()

    first = asyncio.create_task(once.run("a", work))
    await asyncio.sleep(0)
    second = asyncio.create_task(once.run("a", work))
    await asyncio.sleep(0.01)
    assert not first.done() and not second.done()
    work.release.set()

    assert await first and await second
    assert work.calls == 1
    assert once.skipped == 1


async def test_a_failure_is_not_remembered_and_whoever_waited_gets_it() -> None:
    once = Once(10)
    failing = Work(result=False)
    failing.release.clear()

    first = asyncio.create_task(once.run("a", failing))
    await asyncio.sleep(0)
    second = asyncio.create_task(once.run("a", failing))
    failing.release.set()
    assert (await first, await second) == (False, False)
    assert "a" not in once

    succeeding = Work()
    assert await once.run("a", succeeding)
    assert succeeding.calls == 1
    assert "a" in once


async def test_work_that_raises_leaves_the_key_to_be_tried_again() -> None:
    once = Once(10)
    release = asyncio.Event()

    async def broken() -> bool:
        await release.wait()
        raise RuntimeError("a bug")

    first = asyncio.create_task(once.run("a", broken))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(once.run("a", broken))
    release.set()
    with pytest.raises(RuntimeError):
        await first
    assert await waiting is False
    assert "a" not in once


async def test_the_oldest_keys_are_forgotten_beyond_the_capacity() -> None:
    once = Once(2)
    work = Work()
    for key in ("a", "b", "c"):
        await once.run(key, work)

    assert len(once) == 2
    assert "a" not in once and "b" in once and "c" in once
    await once.run("a", work)
    assert work.calls == 4


async def test_no_capacity_or_no_key_remembers_nothing() -> None:
    work = Work()
    off = Once(0)
    await off.run("a", work)
    await off.run("a", work)
    on = Once(10)
    await on.run("", work)
    await on.run("", work)

    assert work.calls == 4
    assert len(off) == 0 and len(on) == 0
