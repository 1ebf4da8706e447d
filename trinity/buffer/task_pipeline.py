"""The task pipeline: operators over the training taskset's rows, once, before exploring.

The original's ``data_processor.task_pipeline`` sends the raw task files through Data-Juicer
operators, then orders the rows by ``priority_weights`` (a weighted sum of per-row fields) and
keeps the ``top_k`` best. Here the Data-Juicer operators that need neither a model nor a service
run in process, under their Data-Juicer names and arguments, on the row fields listed in
``target_fields`` (default: the taskset's ``prompt_key``); the others, and ``config_path`` (a
Data-Juicer recipe), are refused at config check. The pipeline works on the training taskset's
own rows: ``inputs`` / ``output`` (raw files in, a written taskset out) are refused too.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from trinity.registry import TASK_OPERATORS

Row = dict[str, Any]
RowOp = Callable[[list[Row], Sequence[str]], list[Row]]


def _text_filter(measure: Callable[[str], int], low: int, high: int) -> RowOp:
    def apply(rows: list[Row], fields: Sequence[str]) -> list[Row]:
        return [r for r in rows if all(low <= measure(str(r.get(f) or "")) <= high for f in fields)]

    return apply


def _text_mapper(edit: Callable[[str], str]) -> RowOp:
    def apply(rows: list[Row], fields: Sequence[str]) -> list[Row]:
        return [{**r, **{f: edit(r[f]) for f in fields if isinstance(r.get(f), str)}} for r in rows]

    return apply


@TASK_OPERATORS.register("text_length_filter")
def text_length_filter(min_len: int = 10, max_len: int = sys.maxsize) -> RowOp:
    return _text_filter(len, int(min_len), int(max_len))


@TASK_OPERATORS.register("words_num_filter")
def words_num_filter(min_num: int = 10, max_num: int = sys.maxsize) -> RowOp:
    return _text_filter(lambda text: len(text.split()), int(min_num), int(max_num))


@TASK_OPERATORS.register("specified_field_filter")
def specified_field_filter(field_key: str = "", target_value: list | None = None) -> RowOp:
    """Keep rows whose ``field_key`` is one of ``target_value``."""
    if not field_key:
        raise ValueError("field_key is required")
    targets = list(target_value or [])
    return lambda rows, fields: [r for r in rows if r.get(field_key) in targets]


@TASK_OPERATORS.register("specified_numeric_field_filter")
def specified_numeric_field_filter(
    field_key: str = "", min_value: float = -sys.maxsize, max_value: float = sys.maxsize
) -> RowOp:
    """Keep rows whose numeric ``field_key`` is in [min_value, max_value]."""
    if not field_key:
        raise ValueError("field_key is required")

    def inside(row: Row) -> bool:
        try:
            return float(min_value) <= float(row.get(field_key)) <= float(max_value)
        except (TypeError, ValueError):
            return False

    return lambda rows, fields: [r for r in rows if inside(r)]


@TASK_OPERATORS.register("whitespace_normalization_mapper")
def whitespace_normalization_mapper() -> RowOp:
    return _text_mapper(lambda text: " ".join(text.split()))


@TASK_OPERATORS.register("remove_specific_chars_mapper")
def remove_specific_chars_mapper(chars_to_remove: str = "◆●■►▼▲▴∆▻▷❖♡□") -> RowOp:
    pattern = re.compile("[" + re.escape(chars_to_remove) + "]") if chars_to_remove else None
    return _text_mapper(lambda text: pattern.sub("", text) if pattern else text)


@TASK_OPERATORS.register("document_deduplicator")
def document_deduplicator(lowercase: bool = False, ignore_non_character: bool = False) -> RowOp:
    """Drop rows whose target fields repeat an earlier row's (exact match after normalizing)."""

    def key(text: str) -> str:
        text = text.lower() if lowercase else text
        return re.sub(r"[^\w]", "", text) if ignore_non_character else text

    def apply(rows: list[Row], fields: Sequence[str]) -> list[Row]:
        seen: set[tuple[str, ...]] = set()
        kept = []
        for row in rows:
            signature = tuple(key(str(row.get(f) or "")) for f in fields)
            if signature not in seen:
                seen.add(signature)
                kept.append(row)
        return kept

    return apply


def run_task_pipeline(rows: Any, pipeline: dict[str, Any], prompt_key: str) -> list[Row]:
    """``rows`` through the operators, then ordered by priority and cut to ``top_k``
    (``pipeline`` was checked by ``trinity.config.validate``)."""
    fields = list(pipeline.get("target_fields") or [prompt_key])
    out = [dict(row) for row in rows]
    for operator in pipeline.get("operators") or []:
        op = TASK_OPERATORS.get(operator["name"])(**(operator.get("args") or {}))
        out = op(out, fields)
    weights = pipeline.get("priority_weights") or {}
    if weights:
        out.sort(
            key=lambda r: sum(w * float(r.get(k) or 0.0) for k, w in weights.items()),
            reverse=True,
        )
    top_k = pipeline.get("top_k", -1)
    return out if top_k == -1 else out[:top_k]
