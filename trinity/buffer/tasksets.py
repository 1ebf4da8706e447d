"""Tasksets: rows from a file, a directory, the Hugging Face Hub or a built-in generator -> Tasks.

The reader sees the taskset as one stream of epochs, each epoch a permutation of the rows
(identity unless shuffling is on; then seeded by ``(seed, epoch)``). Batch ``k`` is stream items
``[k*batch_size, (k+1)*batch_size)``, so batches run across epoch boundaries without a short
batch, ``skip_batches`` (resume) is arithmetic, and a resumed run reads exactly the batches the
interrupted one would have. Only the very last batch may be short.

Which row each stream item is comes from the original's ``data_selector`` (``sequential`` by
default, ``shuffle``, ``random``, ``offline_easy2hard``, ``difficulty_based``: see
trinity/buffer/selectors.py); our ``shuffle: true / false`` is short for ``shuffle`` /
``sequential``. ``feedback`` hands the selector the pass rates the explorer measured.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import dataclasses
import math
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from trinity.buffer.procedural import BUILTIN_TASKSETS, build_builtin
from trinity.buffer.selectors import build_selector
from trinity.buffer.task_pipeline import run_task_pipeline
from trinity.config import ConfigError, load_section
from trinity.config.schema import TasksetConfig
from trinity.workflows import REWARD_FUNCTIONS, WORKFLOWS
from trinity.workflows.types import Task

BUILTIN_PREFIX = "builtin:"
FILE_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
TEXT_BUILDERS = ("json", "csv")
HUB_PROBE_TIMEOUT_S = 3.0


class TasksetError(ConfigError):
    """A taskset that cannot be loaded or used; the message names the taskset and its path.

    A ``ConfigError``: the CLI reports it in one line with exit status 2, like any bad config.
    """


class TasksetReader:
    """Batches of ``Task`` for the explorer (``read_batch``) or all tasks at once (``all_tasks``)."""

    def __init__(
        self,
        taskset_cfg: TasksetConfig | Any,
        *,
        repeat_times: int,
        batch_size: int,
        total_epochs: int = 1,
        total_steps: int | None = None,
        default_workflow: str | None = None,
        default_reward_fn: str | None = None,
        is_eval: bool = False,
        seed: int | None = None,
        task_pipeline: dict[str, Any] | None = None,
    ):
        """``task_pipeline``: the original's ``data_processor.task_pipeline``, run once over the
        rows when they are loaded (``trinity.buffer.task_pipeline``)."""
        cfg = load_section(TasksetConfig, taskset_cfg)
        self.name = cfg.name or "taskset"
        self.path = cfg.path or ""
        if batch_size < 1:
            raise TasksetError(f"taskset '{self.name}': batch_size must be >= 1, got {batch_size}")
        self.repeat_times = int(repeat_times)
        self.batch_size = int(batch_size)
        self.total_epochs = max(1, int(total_epochs or 1))
        self.max_steps = total_steps or None
        self.is_eval = is_eval
        selector = cfg.data_selector
        if seed is None:  # ours (seed) over the original's (data_selector.seed)
            seed = selector.seed if cfg.seed is None else cfg.seed
        self.seed = int(seed)
        self.selector_type = selector.selector_type.lower()
        if cfg.shuffle is not None:
            if self.selector_type not in ("sequential", "shuffle"):
                raise TasksetError(
                    f"taskset '{self.name}': shuffle is short for selector_type shuffle / "
                    f"sequential; it cannot be combined with '{self.selector_type}'"
                )
            self.selector_type = "shuffle" if cfg.shuffle else "sequential"
        if is_eval:
            self.selector_type = "sequential"
        self.format = dataclasses.asdict(cfg.format)
        self.rollout_args = {
            key: value
            for key, value in dataclasses.asdict(cfg.rollout_args).items()
            if value is not None
        }
        self.workflow_args = dict(cfg.workflow_args)
        self.reward_fn_args = dict(cfg.reward_fn_args)
        self.workflow = cfg.default_workflow_type or default_workflow
        self.reward_fn = cfg.default_reward_fn_type or default_reward_fn
        self._check_names()

        self.rows = load_rows(cfg)
        if task_pipeline:
            self.rows = run_task_pipeline(self.rows, task_pipeline, cfg.format.prompt_key)
        if len(self.rows) == 0:
            raise TasksetError(
                f"taskset '{self.name}' ({self.path}) has no rows"
                + (" left after data_processor.task_pipeline" if task_pipeline else "")
            )
        if not self.format.get("workflow_key"):  # rows that pick their own workflow are not
            self._check_rows()
        self._next_batch = 0
        self._cursor = 0  # stream position when read by a TasksetScheduler
        try:
            self.selector = build_selector(
                self.selector_type,
                size=len(self.rows),
                seed=self.seed,
                feature_keys=list(selector.feature_keys),
                kwargs=dict(selector.kwargs),
                column=lambda key: _column(self.rows, key),
                where=f"taskset '{self.name}': data_selector",
            )
        except ConfigError as exc:
            raise TasksetError(str(exc)) from None

    def _check_names(self) -> None:
        if not self.workflow:
            raise TasksetError(
                f"taskset '{self.name}': no workflow; set default_workflow_type "
                f"(e.g. math_workflow) on the taskset or on buffer.explorer_input"
            )
        if self.workflow not in WORKFLOWS:
            raise TasksetError(f"taskset '{self.name}': {WORKFLOWS.unknown_message(self.workflow)}")
        if self.reward_fn and self.reward_fn not in REWARD_FUNCTIONS:
            raise TasksetError(
                f"taskset '{self.name}': {REWARD_FUNCTIONS.unknown_message(self.reward_fn)}"
            )

    def _check_rows(self) -> None:
        """Every row holds what the workflow reads (``Workflow.required_fields``), non-null."""
        required = WORKFLOWS.get(self.workflow).required_fields(self.format)
        columns = _columns(self.rows)
        for what, keys in required.items():
            present = [key for key in keys if key in columns]
            where = f"taskset '{self.name}' ({self.path})"
            if not present:
                raise TasksetError(
                    f"{where}: the rows have no field for {what}, which {self.workflow} needs "
                    f"(fields: {', '.join(columns)}); set the taskset's format keys"
                )
            values = [_column(self.rows, key) for key in present]
            missing = [
                i
                for i, row in enumerate(zip(*values, strict=True))
                if all(v is None or (isinstance(v, str) and not v.strip()) for v in row)
            ]
            if missing:
                raise TasksetError(
                    f"{where}: {len(missing)} of {len(self.rows)} rows have no value for {what} "
                    f"(first: row {missing[0]}); fix or drop them"
                )

    def __len__(self) -> int:
        return len(self.rows)

    def total_steps(self) -> int:
        """``total_steps`` when given, else enough batches for ``total_epochs`` passes."""
        if self.max_steps:
            return int(self.max_steps)
        return math.ceil(len(self.rows) * self.total_epochs / self.batch_size)

    def _stream_end(self) -> int | None:
        return None if self.max_steps else len(self.rows) * self.total_epochs

    @property
    def batches_read(self) -> int:
        """Batches served so far, skipped ones included (what a resumed reader skips)."""
        return self._next_batch

    def skip_batches(self, n: int) -> None:
        """Resume: the next ``read_batch`` returns what batch ``n + already read`` would be."""
        self._next_batch += int(n)

    def read_batch(self) -> list[Task]:
        """The next ``batch_size`` tasks; the last one may be short; ``[]`` once done."""
        batch_id = self._next_batch
        if batch_id >= self.total_steps():
            return []
        start = batch_id * self.batch_size
        stop = start + self.batch_size
        end = self._stream_end()
        if end is not None:
            stop = min(stop, end)
        self._next_batch += 1
        return self._tasks(batch_id, start, stop, batch_id)

    def read_items(self, count: int, batch_id: int) -> list[Task]:
        """The next ``count`` items of this taskset's stream, for a ``TasksetScheduler`` whose
        batch ``batch_id`` they join (the selector sees one batch per call)."""
        start = self._cursor
        self._cursor += count
        self._next_batch += 1
        return self._tasks(self._next_batch - 1, start, start + count, batch_id)

    def _tasks(self, selector_batch: int, start: int, stop: int, batch_id: int) -> list[Task]:
        rows = self.selector.rows(selector_batch, start, stop)
        return [
            # the epoch is part of the id: with batch_size > rows one batch can hold a row twice,
            # and the explorer groups rollouts by task id
            self.make_task(
                row, task_id=f"{self.name}/{index // len(self.rows)}/{row}", batch_id=batch_id
            )
            for index, row in zip(range(start, stop), rows, strict=True)
        ]

    def feedback(self, pass_rates: dict[int, float]) -> None:
        """Measured pass rates by row (``pass_rate_calculator``), for adaptive selectors."""
        self.selector.feedback(pass_rates)

    def all_tasks(self) -> list[Task]:
        """Every row once, in file order (evaluation)."""
        return [self.make_task(i, task_id=f"{self.name}/{i}") for i in range(len(self.rows))]

    def __iter__(self) -> Iterator[list[Task]]:
        while batch := self.read_batch():
            yield batch

    def make_task(self, row: int, *, task_id: str, batch_id: int = 0) -> Task:
        raw = dict(self.rows[row])
        workflow_key = self.format.get("workflow_key")
        reward_key = self.format.get("reward_fn_key")
        return Task(
            task_id=task_id,
            raw=raw,
            workflow=(workflow_key and raw.get(workflow_key)) or self.workflow,
            repeat_times=self.repeat_times,
            reward_fn=(reward_key and raw.get(reward_key)) or self.reward_fn,
            format=dict(self.format),
            rollout_args=dict(self.rollout_args),
            workflow_args=dict(self.workflow_args),
            reward_fn_args=dict(self.reward_fn_args),
            is_eval=self.is_eval,
            batch_id=batch_id,
            row=row,
        )


class TasksetScheduler:
    """Several training tasksets (``buffer.explorer_input.tasksets``) read as one stream.

    The original's schedule: each epoch is a shuffle (seeded by ``seed + epoch``) of every
    taskset's id repeated once per row, so tasksets are mixed in proportion to their sizes and an
    epoch covers every row of each; batch ``k`` takes items ``[k*batch_size, (k+1)*batch_size)``
    of that stream and asks each taskset for its share, which the taskset's own ``data_selector``
    picks. Task rows are numbered across tasksets (taskset i's rows follow those of 0..i-1), so
    pass-rate feedback reaches the right selector. Same interface as ``TasksetReader``.
    """

    def __init__(
        self,
        readers: list[TasksetReader],
        *,
        batch_size: int,
        total_epochs: int = 1,
        total_steps: int | None = None,
        seed: int = 42,
    ):
        self.readers = readers
        self.name = "+".join(r.name for r in readers)
        self.batch_size = int(batch_size)
        self.total_epochs = max(1, int(total_epochs or 1))
        self.max_steps = total_steps or None
        self.seed = int(seed)
        sizes = [len(r) for r in readers]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.size = sum(sizes)
        self._orders: dict[int, list[int]] = {}
        self._next_batch = 0

    def __len__(self) -> int:
        return self.size

    def total_steps(self) -> int:
        if self.max_steps:
            return int(self.max_steps)
        return math.ceil(self.size * self.total_epochs / self.batch_size)

    @property
    def batches_read(self) -> int:
        return self._next_batch

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            ids = [i for i, reader in enumerate(self.readers) for _ in range(len(reader))]
            random.Random(self.seed + epoch).shuffle(ids)
            self._orders = {epoch: ids}  # one epoch at a time is enough
        return self._orders[epoch]

    def _shares(self, batch_id: int) -> dict[int, int]:
        """How many of batch ``batch_id``'s tasks each taskset gives, in stream order."""
        start = batch_id * self.batch_size
        stop = start + self.batch_size
        if not self.max_steps:
            stop = min(stop, self.size * self.total_epochs)
        ids = [self._order(i // self.size)[i % self.size] for i in range(start, stop)]
        return dict(collections.Counter(ids))

    def read_batch(self) -> list[Task]:
        batch_id = self._next_batch
        if batch_id >= self.total_steps():
            return []
        self._next_batch += 1
        tasks = []
        for i, count in self._shares(batch_id).items():
            for task in self.readers[i].read_items(count, batch_id):
                tasks.append(dataclasses.replace(task, row=task.row + self.offsets[i]))
        return tasks

    def skip_batches(self, n: int) -> None:
        """Resume: advance every taskset as the skipped batches would have."""
        for _ in range(int(n)):
            for i, count in self._shares(self._next_batch).items():
                self.readers[i].read_items(count, self._next_batch)
            self._next_batch += 1

    def feedback(self, pass_rates: dict[int, float]) -> None:
        for i, reader in enumerate(self.readers):
            lo, hi = self.offsets[i], self.offsets[i] + len(reader)
            mine = {row - lo: rate for row, rate in pass_rates.items() if lo <= row < hi}
            if mine:
                reader.feedback(mine)


def _columns(rows: Any) -> list[str]:
    names = getattr(rows, "column_names", None)  # a datasets.Dataset
    return list(names) if names is not None else list(dict.fromkeys(k for r in rows for k in r))


def _column(rows: Any, key: str) -> list[Any]:
    if getattr(rows, "column_names", None) is not None:
        return list(rows[key])
    return [row.get(key) for row in rows]


def load_rows(cfg: TasksetConfig) -> Any:
    """A sized, int-indexable collection of row dicts (a ``datasets.Dataset`` or a list)."""
    name = cfg.name or "taskset"
    path = (cfg.path or "").strip()
    storage = cfg.storage_type.lower()
    if storage not in ("file", "sql"):
        raise TasksetError(
            f"taskset '{name}': storage_type '{storage}' is not supported for tasksets; "
            "use file (a local file, a directory or a Hub dataset id) or sql (a database URL)"
        )
    if not path:
        raise TasksetError(f"taskset '{name}': 'path' is empty")
    if storage == "sql":
        return load_sql_rows(name, path, cfg.max_retry_times, cfg.max_retry_interval)
    if path.startswith(BUILTIN_PREFIX):
        kind = path[len(BUILTIN_PREFIX) :]
        if kind not in BUILTIN_TASKSETS:
            raise TasksetError(f"taskset '{name}': {BUILTIN_TASKSETS.unknown_message(kind)}")
        try:
            return build_builtin(kind, dict(cfg.builtin_args))
        except TypeError as exc:
            raise TasksetError(f"taskset '{name}' ({path}): bad builtin_args: {exc}") from exc

    import datasets

    if not cfg.enable_progress_bar:
        datasets.disable_progress_bars()
    split, subset = cfg.split, cfg.subset_name
    local = Path(path).expanduser()
    if local.is_file():
        builder = FILE_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise TasksetError(
                f"taskset '{name}': cannot read {path}: use one of {', '.join(FILE_BUILDERS)}"
            )
        if builder in TEXT_BUILDERS:
            _check_text_file(name, local)
        return _load(name, path, builder, data_files=str(local), split="train")
    if local.is_dir():
        if (local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(local))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return _load(name, path, str(local), name=subset, split=split)
    if local.suffix.lower() in FILE_BUILDERS or path.startswith(("/", ".", "~")):
        raise TasksetError(f"taskset '{name}': file or directory not found: {path}")
    offline = not _hub_reachable()
    with _hub_offline(offline):
        return _load(name, path, path, name=subset, split=split, hub_offline=offline)


def load_sql_rows(table: str, url: str, retries: int = 3, interval: float = 1.0) -> list[dict]:
    """Every row of table ``table`` in the database at SQLAlchemy URL ``url``, as dicts, in
    primary-key order; a failing connection is retried ``retries`` times, ``interval`` s apart."""
    import sqlalchemy as sa

    where = f"taskset '{table}' ({url})"
    attempt = 0
    while True:
        try:
            engine = sa.create_engine(url)
            try:
                with engine.connect() as conn:
                    rows = sa.Table(table, sa.MetaData(), autoload_with=conn)
                    query = sa.select(rows).order_by(*rows.primary_key.columns)
                    return [dict(row._mapping) for row in conn.execute(query)]
            finally:
                engine.dispose()
        except sa.exc.NoSuchTableError:
            raise TasksetError(f"{where}: the database has no table '{table}'") from None
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
            raise TasksetError(f"{where}: not a usable SQLAlchemy URL: {exc}") from None
        except sa.exc.SQLAlchemyError as exc:
            if attempt >= retries:
                detail = str(exc).splitlines()[0]
                raise TasksetError(f"{where}: cannot read: {detail}") from None
            attempt += 1
            time.sleep(interval)


def _check_text_file(taskset: str, path: Path) -> None:
    """Empty and non-UTF-8 files fail here, in one line, instead of mid-run (the datasets loader
    accepts undecodable bytes and fails only when that row is read)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, blank = 0, True
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as error:
                at = offset + error.start
                line = path.read_bytes()[:at].count(b"\n") + 1
                raise TasksetError(
                    f"taskset '{taskset}': {path} is not UTF-8 text (byte 0x{chunk[error.start]:02x}"
                    f" at line {line}); save it as UTF-8"
                ) from None
            blank = blank and not text.strip()
            offset += len(chunk)
    if blank:
        raise TasksetError(f"taskset '{taskset}': {path} is empty")


def _load(
    taskset: str, path: str, *args: Any, hub_offline: bool | None = None, **kwargs: Any
) -> Any:
    """``datasets.load_dataset(*args, **kwargs)`` with failures turned into a TasksetError."""
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        cause: BaseException = exc  # the reason, not "An error occurred while generating..."
        while cause.__cause__ is not None and str(cause.__cause__):
            cause = cause.__cause__
        detail = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
        if hub_offline is None:
            raise TasksetError(f"taskset '{taskset}': cannot load {path}: {detail}") from exc
        where = "the Hugging Face Hub is unreachable" if hub_offline else "the Hub load failed"
        raise TasksetError(
            f"taskset '{taskset}': cannot load '{path}' (subset={kwargs.get('name')}, "
            f"split={kwargs.get('split')}): it is not a local file or directory and {where} "
            f"({detail}). Download the data where there is network (datasets.load_dataset(...)"
            ".to_json('gsm8k.jsonl')) and set the taskset path to the local file."
        ) from exc


def _hub_reachable() -> bool:
    """A quick TCP probe, so an offline machine fails in seconds instead of ~25 s of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Cache-only loading while the Hub is unreachable (what ``HF_HUB_OFFLINE=1`` does)."""
    if not offline:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
