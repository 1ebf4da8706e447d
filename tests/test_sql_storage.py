"""storage_type: sql through SQLAlchemy: tasksets read from a database table, and an experience
buffer in any database (tested on SQLite URLs: the same code serves PostgreSQL or MySQL)."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from test_buffer import ids, make_exp
from test_strategies import config_with

from trinity.buffer.experience import SqlExperienceBuffer, build_experience_buffer
from trinity.buffer.tasksets import TasksetError, TasksetReader
from trinity.config import ConfigError
from trinity.launcher.launcher import _experience_buffer


def tasks_db(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    engine = sa.create_engine(url)
    table = sa.Table(
        "arith",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("question", sa.Text),
        sa.Column("answer", sa.Text),
    )
    table.metadata.create_all(engine)
    with engine.begin() as conn:  # inserted out of order: read back by primary key
        conn.execute(table.insert(), [{"id": 3, "question": "2+2", "answer": "4"}])
        conn.execute(table.insert(), [{"id": 1, "question": "1+1", "answer": "2"}])
    engine.dispose()
    return url


def sql_taskset(url: str, name: str = "arith") -> dict:
    return {
        "name": name,
        "storage_type": "sql",
        "path": url,
        "format": {"prompt_key": "question", "response_key": "answer"},
    }


def test_a_sql_taskset_reads_its_table_in_primary_key_order(tmp_path):
    reader = TasksetReader(
        sql_taskset(tasks_db(tmp_path)),
        repeat_times=1,
        batch_size=2,
        default_workflow="math_workflow",
    )
    assert [(t.raw["question"], t.raw["answer"]) for t in reader.read_batch()] == [
        ("1+1", "2"),
        ("2+2", "4"),
    ]


def test_sql_taskset_errors_name_the_table_and_url(tmp_path):
    url = tasks_db(tmp_path)
    kwargs = {"repeat_times": 1, "batch_size": 1, "default_workflow": "math_workflow"}
    with pytest.raises(TasksetError, match="has no table 'nope'"):
        TasksetReader(sql_taskset(url, "nope"), **kwargs)
    with pytest.raises(TasksetError, match="not a usable SQLAlchemy URL"):
        TasksetReader(sql_taskset("nosuchdialect://x"), **kwargs)
    with pytest.raises(ConfigError, match="give a SQLAlchemy URL"):
        config_with(
            tmp_path,
            **{
                "buffer.explorer_input.taskset.storage_type": "sql",
                "buffer.explorer_input.taskset.path": str(tmp_path / "tasks.db"),
            },
        )


def test_sql_buffer_roundtrip_close_and_timeout(tmp_path):
    url = f"sqlite:///{tmp_path / 'exp.db'}"

    async def main():
        buffer = build_experience_buffer("sql", url, max_read_timeout=0.3, name="exps")
        assert isinstance(buffer, SqlExperienceBuffer)
        await buffer.put([make_exp(i, version=i) for i in range(5)])
        first = await buffer.get_batch(2)
        with pytest.raises(TimeoutError, match="only 3 arrived"):
            await buffer.get_batch(4)
        await buffer.close()
        reader = SqlExperienceBuffer(url, name="exps")  # another process would see the same
        return first, await reader.get_batch(4), await reader.get_batch(4)

    first, rest, end = asyncio.run(main())
    assert ids(first) == [0, 1] and [e.model_version for e in first] == [0, 1]
    assert ids(rest) == [2, 3, 4] and end == []


def test_sql_buffer_readers_never_share_an_experience(tmp_path):
    url = f"sqlite:///{tmp_path / 'exp.db'}"

    async def consume(out):
        buffer = SqlExperienceBuffer(url, max_read_timeout=20)
        while batch := await buffer.get_batch(4):
            out.extend(ids(batch))

    async def produce():
        buffer = SqlExperienceBuffer(url, capacity=16, max_read_timeout=20)
        for start in range(0, 60, 6):
            await buffer.put([make_exp(i) for i in range(start, start + 6)])
        await buffer.close()

    async def main():
        SqlExperienceBuffer(url)  # the tables, once
        a, b = [], []
        await asyncio.gather(consume(a), consume(b), produce())
        return a, b

    a, b = asyncio.run(main())
    assert sorted(a + b) == list(range(60)) and a == sorted(a) and b == sorted(b)


def test_the_launcher_builds_the_sql_buffer_from_the_config(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    config = config_with(
        tmp_path,
        **{
            "buffer.trainer_input.experience_buffer.storage_type": "sql",
            "buffer.trainer_input.experience_buffer.path": url,
        },
    )
    buffer = asyncio.run(_experience_buffer(config, shared=False, reopen=True))
    assert isinstance(buffer, SqlExperienceBuffer) and buffer.url == url
    assert sa.inspect(sa.create_engine(url)).has_table("experience_buffer")


def explorer_output(url: str) -> tuple[list[str], list[tuple]]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        result = conn.exec_driver_sql("SELECT * FROM explorer_output ORDER BY id")
        columns, rows = list(result.keys()), [tuple(r) for r in result]
    engine.dispose()
    return columns, rows


def test_explorer_output_is_archived_through_sqlalchemy_as_the_sqlite_buffer_does(tmp_path):
    """The SQLAlchemy path (any URL; here ``sqlite:///``) keeps the same ``explorer_output`` rows
    as the sqlite3 buffer: ``archive`` alone, and ``put`` with ``backup``."""
    sqlalchemy_url = f"sqlite:///{tmp_path / 'sa.db'}"
    archive = build_experience_buffer("sql", sqlalchemy_url, name="exps")
    assert isinstance(archive, SqlExperienceBuffer)
    archive.archive([make_exp(i, version=3) for i in range(3)])
    backed_up = build_experience_buffer("sql", sqlalchemy_url, name="exps", backup=True)

    async def put_and_take():
        await backed_up.put([make_exp(3, version=4)])
        return await backed_up.get_batch(1)

    assert ids(asyncio.run(put_and_take())) == [3]  # consumed, yet kept in explorer_output
    reference = build_experience_buffer("sqlite", tmp_path / "plain.db")
    reference.archive([make_exp(i, version=3) for i in range(3)] + [make_exp(3, version=4)])

    columns, rows = explorer_output(sqlalchemy_url)
    ref_columns, ref_rows = explorer_output(f"sqlite:///{tmp_path / 'plain.db'}")
    assert columns == ref_columns
    created = columns.index("created")
    assert [r[:created] for r in rows] == [r[:created] for r in ref_rows]
    assert [(r[1], r[2], r[4]) for r in rows] == [
        (3, "t0", 0.0),
        (3, "t1", 1.0),
        (3, "t2", 2.0),
        (4, "t3", 3.0),
    ]
    for archived in (archive, backed_up, reference):
        archived.close_connection()
