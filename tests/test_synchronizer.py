"""Sync points, required versions, and publication through files for a second process."""

import asyncio

import pytest

from trinity.synchronizer.synchronizer import Synchronizer, SyncTimeoutError


def schedule(sync: Synchronizer, steps: int) -> list[tuple[int, int]]:
    """(explore step about to run, oldest weights version it may use) at each sync point."""
    return [
        (done + 1, sync.required_version(done, 0))
        for done in range(steps)
        if sync.explorer_should_sync(done)
    ]


def test_fixed_style_offsets(tmp_path):
    on_policy = Synchronizer(tmp_path, sync_interval=1, sync_offset=0)
    assert schedule(on_policy, 4) == [(2, 1), (3, 2), (4, 3)]
    one_ahead = Synchronizer(tmp_path, sync_interval=1, sync_offset=1)
    # step k+1 uses the model trained on step k-1: the explorer runs one step ahead
    assert schedule(one_ahead, 4) == [(3, 1), (4, 2)]
    every_two = Synchronizer(tmp_path, sync_interval=2, sync_offset=0)
    assert schedule(every_two, 6) == [(3, 2), (5, 4)]


def test_publication_reaches_another_process_through_files(tmp_path):
    trainer_side = Synchronizer(tmp_path)
    explorer_side = Synchronizer(tmp_path, poll_seconds=0.01, sync_timeout=5)

    async def main():
        waiter = asyncio.create_task(explorer_side.wait_for(2))
        await trainer_side.publish(1, "/ckpt/1")
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await trainer_side.publish(2, "/ckpt/2")
        return await waiter

    latest = asyncio.run(main())
    assert (latest.version, latest.ref) == (2, "/ckpt/2")


def test_wait_times_out_with_a_clear_message(tmp_path):
    sync = Synchronizer(tmp_path, sync_timeout=0.05, poll_seconds=0.01)
    with pytest.raises(SyncTimeoutError, match="sync_timeout"):
        asyncio.run(sync.wait_for(1))


def test_finished_trainer_releases_the_explorer(tmp_path):
    sync = Synchronizer(tmp_path, sync_timeout=5, poll_seconds=0.01)

    async def main():
        waiter = asyncio.create_task(sync.wait_for(3))
        await sync.publish(1, "r1")
        await sync.trainer_finished()
        return await waiter

    assert asyncio.run(main()).version == 1
    sync.reset()
    assert not sync.is_trainer_finished()
