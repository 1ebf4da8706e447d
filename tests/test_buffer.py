"""Experience buffer: in-process queue and the SQLite buffer shared by two OS processes."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import pickle
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from trinity.buffer.experience import (
    ExperienceBuffer,
    ExperienceQueue,
    SqliteExperienceBuffer,
    build_experience_buffer,
)
from trinity.workflows.types import Experience


def make_exp(i: int, version: int = 0) -> Experience:
    return Experience(
        tokens=[1, 2, 3, 4 + i],
        prompt_length=2,
        logprobs=[-0.5, -0.25],
        loss_mask=[1, 1],
        reward=float(i),
        reward_components={"accuracy": float(i % 2)},
        task_id=f"t{i}",
        group_id=f"g{i // 4}",
        model_version=version,
        advantages=[0.1 * i, 0.1 * i],
        info={"i": i},
    )


def ids(batch: list[Experience]) -> list[int]:
    return [exp.info["i"] for exp in batch]


def run(coro):
    return asyncio.run(coro)


# --- ExperienceQueue ------------------------------------------------------------------------------


def test_queue_blocks_until_n_then_returns_exactly_n_in_order():
    async def main():
        q = ExperienceQueue(capacity=100, max_read_timeout=5)
        reader = asyncio.create_task(q.get_batch(5))
        await q.put([make_exp(i) for i in range(3)])
        await asyncio.sleep(0.05)
        assert not reader.done()  # 3 < 5: still waiting
        await q.put([make_exp(i) for i in range(3, 7)])
        batch = await asyncio.wait_for(reader, 1)
        assert ids(batch) == [0, 1, 2, 3, 4]
        assert q.pending() == 2

    run(main())


def test_queue_timeout_is_clear_and_loses_nothing():
    async def main():
        q = ExperienceQueue(max_read_timeout=0.1)
        await q.put([make_exp(0), make_exp(1)])
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="max_read_timeout") as err:
            await q.get_batch(5)
        assert 0.08 < time.monotonic() - started < 2
        assert "only 2 arrived" in str(err.value)
        assert q.pending() == 2
        assert ids(await q.get_batch(2, timeout=0.1)) == [0, 1]

    run(main())


def test_queue_close_gives_remainder_then_empty_and_wakes_readers():
    async def main():
        q = ExperienceQueue(max_read_timeout=5)
        waiting = asyncio.create_task(q.get_batch(3))
        await asyncio.sleep(0.02)
        await q.close()
        assert await asyncio.wait_for(waiting, 1) == []  # woken by close, nothing to give

        q = ExperienceQueue(max_read_timeout=5)
        await q.put([make_exp(i) for i in range(5)])
        await q.close()
        assert ids(await q.get_batch(4)) == [0, 1, 2, 3]
        assert ids(await q.get_batch(4)) == [4]  # short last batch
        assert await q.get_batch(4) == []
        with pytest.raises(RuntimeError, match="closed"):
            await q.put([make_exp(9)])

    run(main())


def test_queue_capacity_backpressure():
    async def main():
        q = ExperienceQueue(capacity=4, max_read_timeout=5)
        await q.put([make_exp(i) for i in range(6)])  # room for one more: accepted, overshoots
        writer = asyncio.create_task(q.put([make_exp(6)]))
        await asyncio.sleep(0.05)
        assert not writer.done()  # 6 pending >= capacity 4
        await q.get_batch(3)  # 3 pending < 4: the writer proceeds
        await asyncio.wait_for(writer, 1)
        assert ids(await q.get_batch(4)) == [3, 4, 5, 6]

        full = ExperienceQueue(capacity=1, max_read_timeout=0.05)
        await full.put([make_exp(0)])
        with pytest.raises(TimeoutError, match="trainer running"):
            await full.put([make_exp(1)])

    run(main())


def test_queue_backup_keeps_all_explorer_output(tmp_path):
    async def main():
        q = build_experience_buffer("queue", tmp_path / "b.db", backup=True)
        await q.put([make_exp(i, version=2) for i in range(4)])
        await q.get_batch(4)
        await q.close()

    run(main())
    with sqlite3.connect(tmp_path / "b.db") as conn:
        rows = conn.execute("SELECT model_version, task_id, data FROM explorer_output").fetchall()
    assert len(rows) == 4 and rows[0][:2] == (2, "t0")
    assert Experience.from_dict(json.loads(rows[3][2])) == make_exp(3, version=2)


def test_get_batch_rejects_bad_n(tmp_path):
    for buf in (ExperienceQueue(), SqliteExperienceBuffer(tmp_path / "b.db")):
        assert isinstance(buf, ExperienceBuffer)
        with pytest.raises(ValueError):
            run(buf.get_batch(0))


def test_factory(tmp_path):
    assert isinstance(build_experience_buffer("queue"), ExperienceQueue)
    buf = build_experience_buffer("SQLite", f"sqlite:///{tmp_path}/x.db", 7, 3.0)
    assert isinstance(buf, SqliteExperienceBuffer)
    assert (buf.path, buf.capacity, buf.max_read_timeout) == (tmp_path / "x.db", 7, 3.0)
    with pytest.raises(ValueError, match="known: queue, sqlite"):
        build_experience_buffer("redis", tmp_path / "y.db")


def test_sqlite_buffer_pickles_after_use(tmp_path):
    """Ray actors and spawned processes receive the buffer pickled: no live connection inside."""
    buf = SqliteExperienceBuffer(tmp_path / "b.db", max_read_timeout=1)
    run(buf.put([make_exp(0)]))
    copy = pickle.loads(pickle.dumps(buf))
    assert ids(run(copy.get_batch(1))) == [0]
    assert buf.pending() == 0


# --- SqliteExperienceBuffer, one process ----------------------------------------------------------


def test_sqlite_roundtrip_order_and_model_version(tmp_path):
    path = tmp_path / "buffer" / "experience_buffer.db"

    async def main():
        buf = SqliteExperienceBuffer(path, max_read_timeout=2)
        await buf.put([make_exp(i, version=i // 3) for i in range(6)])
        with sqlite3.connect(path) as conn:
            versions = [r[0] for r in conn.execute("SELECT model_version FROM experience")]
        assert versions == [0, 0, 0, 1, 1, 1]
        batch = await buf.get_batch(4)
        assert batch == [make_exp(i, version=i // 3) for i in range(4)]  # full fidelity
        assert buf.pending() == 2

    run(main())


def test_sqlite_timeout_close_and_stale_marker(tmp_path):
    path = tmp_path / "b.db"

    async def main():
        buf = SqliteExperienceBuffer(path, max_read_timeout=0.2)
        await buf.put([make_exp(0)])
        with pytest.raises(TimeoutError, match="max_read_timeout"):
            await buf.get_batch(2)
        assert buf.pending() == 1  # a timed-out read takes nothing
        await buf.put([make_exp(1), make_exp(2)])
        await buf.close()
        reader = SqliteExperienceBuffer(path, max_read_timeout=0.2)
        assert reader.is_closed()
        assert ids(await reader.get_batch(2)) == [0, 1]
        assert ids(await reader.get_batch(2)) == [2]
        assert await reader.get_batch(2) == []
        with pytest.raises(RuntimeError, match="closed"):
            await buf.put([make_exp(3)])
        # a new producer (restarted explorer) clears the previous run's end marker
        producer = SqliteExperienceBuffer(path)
        await producer.put([make_exp(4)])
        assert not reader.is_closed()
        with pytest.raises(TimeoutError):
            await reader.get_batch(2)
        await producer.close()
        await producer.reopen()
        assert not reader.is_closed()

    run(main())


def test_sqlite_backup_and_capacity(tmp_path):
    path = tmp_path / "b.db"

    async def main():
        buf = SqliteExperienceBuffer(path, capacity=2, max_read_timeout=0.2, backup=True)
        await buf.put([make_exp(0), make_exp(1)])
        with pytest.raises(TimeoutError, match="capacity"):
            await buf.put([make_exp(2)])
        await buf.get_batch(2)
        await buf.put([make_exp(2)])

    run(main())
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM explorer_output").fetchone()[0] == 3
        assert conn.execute("SELECT COUNT(*) FROM experience").fetchone()[0] == 1
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# --- SqliteExperienceBuffer, several OS processes -------------------------------------------------

N_ITEMS = 203
PUT_SIZE = 7
BATCH = 8


def _producer(path: str) -> None:
    async def main():
        buf = SqliteExperienceBuffer(path, capacity=64, max_read_timeout=20)
        for start in range(0, N_ITEMS, PUT_SIZE):
            await buf.put([make_exp(i) for i in range(start, min(start + PUT_SIZE, N_ITEMS))])
            await asyncio.sleep(0.002)
        await buf.close()

    asyncio.run(main())


def _consumer(path: str, out: str) -> None:
    async def main():
        buf = SqliteExperienceBuffer(path, max_read_timeout=20)
        with open(out, "w") as f:
            while batch := await buf.get_batch(BATCH):
                f.write(json.dumps(ids(batch)) + "\n")
                f.flush()

    asyncio.run(main())


def _reap(procs) -> None:
    """Kill children still running, so a regression fails the test instead of hanging pytest."""
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)


def _batches(out: Path) -> list[list[int]]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_sqlite_across_processes_no_loss_no_duplicates(tmp_path):
    ctx = mp.get_context("spawn")
    path = str(tmp_path / "buffer" / "experience_buffer.db")
    SqliteExperienceBuffer(path)  # create the schema once
    outs = [tmp_path / "c0.jsonl", tmp_path / "c1.jsonl"]
    procs = [ctx.Process(target=_consumer, args=(path, str(o))) for o in outs]
    procs.append(ctx.Process(target=_producer, args=(path,)))
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        _reap(procs)
    batches = [b for o in outs for b in _batches(o)]
    got = [i for b in batches for i in b]
    assert sorted(got) == list(range(N_ITEMS))  # no loss, no duplicates
    assert all(len(b) == BATCH for b in batches if len(b) != N_ITEMS % BATCH)
    assert sum(len(b) != BATCH for b in batches) == 1  # exactly one short, final batch
    for out in outs:  # each reader sees increasing ids (oldest first)
        mine = [i for b in _batches(out) for i in b]
        assert mine == sorted(mine)


class _DiesBeforeCommit(SqliteExperienceBuffer):
    def _on_taken(self, conn, rows):
        os._exit(3)  # killed after deleting the batch but before the commit


def _dying_consumer(path: str) -> None:
    asyncio.run(_DiesBeforeCommit(path, max_read_timeout=5).get_batch(5))


def _consume_then_hang(path: str, out: str) -> None:
    async def main():
        buf = SqliteExperienceBuffer(path, max_read_timeout=60)
        batch = await buf.get_batch(5)
        Path(out).write_text(json.dumps(ids(batch)))
        await buf.get_batch(100)  # blocks (polling) until killed

    asyncio.run(main())


def test_killed_consumer_loses_nothing_it_did_not_take(tmp_path):
    ctx = mp.get_context("spawn")
    path = str(tmp_path / "b.db")
    run(SqliteExperienceBuffer(path).put([make_exp(i) for i in range(20)]))

    dying = ctx.Process(target=_dying_consumer, args=(path,))
    out = tmp_path / "taken.json"
    hanging = ctx.Process(target=_consume_then_hang, args=(path, str(out)))
    try:
        dying.start()
        dying.join(30)
        assert dying.exitcode == 3
        assert SqliteExperienceBuffer(path).pending() == 20  # the uncommitted take rolled back

        hanging.start()
        deadline = time.monotonic() + 30
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # now inside the polling wait
        os.kill(hanging.pid, signal.SIGKILL)
        hanging.join(10)
    finally:
        _reap([dying, hanging])
    assert hanging.exitcode == -signal.SIGKILL
    taken = json.loads(out.read_text())
    assert taken == [0, 1, 2, 3, 4]  # consumed: get_batch returned them

    async def rest():
        buf = SqliteExperienceBuffer(path, max_read_timeout=1)
        return ids(await buf.get_batch(15))

    assert run(rest()) == list(range(5, 20))


@pytest.mark.parametrize("kind", ["sqlite", "sql"])
def test_a_reader_told_so_waits_past_an_earlier_producers_end_marker(tmp_path, kind):
    """A resumed trainer process starts beside a new explorer that has not cleared the marker
    the previous explorer left: it waits for the new rows instead of ending at once."""
    path = f"sqlite:///{tmp_path / 'b.db'}" if kind == "sql" else tmp_path / "b.db"

    async def main():
        earlier = build_experience_buffer(kind, path)
        await earlier.put([make_exp(0)])
        await earlier.close()
        reader = build_experience_buffer(kind, path, max_read_timeout=5)
        reader.ignore_end_markers_before(time.time())
        assert not reader.is_closed()
        read = asyncio.ensure_future(reader.get_batch(2))
        await asyncio.sleep(0.3)
        assert not read.done()  # one row and a stale marker: not the end
        producer = build_experience_buffer(kind, path)
        await producer.reopen()
        await producer.put([make_exp(1)])
        assert ids(await read) == [0, 1]
        await producer.put([make_exp(2)])
        await producer.close()  # this producer's end counts
        assert ids(await reader.get_batch(2)) == [2]
        assert await reader.get_batch(2) == []

    run(main())
