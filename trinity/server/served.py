"""A base model the server offers: its engine, the engine's worker, and resident sampler weights."""

from __future__ import annotations

import re
import shutil
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trinity.engine import LoraSpec
from trinity.engine.worker import EngineFuture, EngineWorker
from trinity.server.futures import ServiceError


@dataclass
class ServedModel:
    """One base model the server offers. ``name`` is what clients pass as ``base_model``."""

    name: str
    path: Path
    engine: Any
    aliases: set[str] = field(default_factory=set)
    worker: EngineWorker = field(init=False, repr=False)
    samplers: ResidentSamplers = field(init=False, repr=False)

    def start(self, spill_dir: Path, resident_samplers: int, batch_window_s: float) -> None:
        """Start the worker thread; from then on the engine is used only through it."""
        self.worker = EngineWorker(self.engine, batch_window_s=batch_window_s)
        self.samplers = ResidentSamplers(self, spill_dir, resident_samplers)

    @property
    def vocab_size(self) -> int:
        return int(self.engine.vocab_size)

    @property
    def max_context(self) -> int | None:
        value = getattr(self.engine, "max_context_length", None)
        return int(value) if value else None


def find_model(models: list[ServedModel], name: str | None) -> ServedModel | None:
    """The model served under ``name`` or one of its aliases."""
    return next((m for m in models if name == m.name or name in m.aliases), None)


def require_model(models: list[ServedModel], name: str | None) -> ServedModel:
    """The model served under ``name``; a 404 that lists the served ones otherwise."""
    model = find_model(models, name)
    if model is None:
        raise ServiceError(
            404, f"unknown base_model {name!r}; this server serves {[m.name for m in models]}"
        )
    return model


def lora_spec(lora: dict | None) -> LoraSpec | None:
    """The engine's adapter spec for a stored ``LoraConfig`` dump (None: full fine-tuning)."""
    if lora is None:
        return None
    return LoraSpec(
        **{
            k: lora[k]
            for k in ("rank", "seed", "train_mlp", "train_attn", "train_unembed")
            if lora.get(k) is not None
        }
    )


class ResidentSamplers:
    """Sampler weights held in one engine's memory: the ``capacity`` most recently used.

    Evicting weights that exist only in memory (the snapshots behind
    ``save_weights_and_get_sampling_client``) first writes them to ``spill_dir``; weights from a
    checkpoint are just dropped. Either way they load again on their next use, so eviction costs
    time, never a failed request, and a long RL run does not grow without bound. Bookkeeping runs
    on the event loop; engine work goes to the worker, whose FIFO order lands a load before the
    sample that needed it and a drop after the samples queued before it.
    """

    def __init__(self, base: ServedModel, spill_dir: Path, capacity: int):
        self.base, self.spill_dir, self.capacity = base, spill_dir, capacity
        self._resident: OrderedDict[str, None] = OrderedDict()
        self._loaders: dict[str, Callable[[], None]] = {}

    def known(self, name: str) -> bool:
        return name in self._resident or name in self._loaders

    def register(self, name: str, loader: Callable[[], None]) -> None:
        """Weights that ``loader`` (run on the worker) puts into the engine under ``name``."""
        self._loaders.setdefault(name, loader)

    def added(self, name: str) -> None:
        """A snapshot just queued on the worker under ``name``."""
        self._loaders.pop(name, None)
        self._resident[name] = None
        self._evict(keep=name)

    def use(self, name: str) -> EngineFuture | None:
        """Make ``name`` resident before anything queued later; the load job if one was needed."""
        job = None
        if name not in self._resident:
            if name not in self._loaders:
                raise ServiceError(
                    400,
                    f"sampler weights {name!r} are gone (they lived in memory "
                    "before a server restart); save weights for the sampler "
                    "again",
                )
            job = self.base.worker.call(self._loaders[name])
        self._resident[name] = None
        self._resident.move_to_end(name)
        self._evict(keep=name)
        return job

    def forget(self, name: str) -> None:
        self._loaders.pop(name, None)
        if name in self._resident:
            del self._resident[name]
            self.base.worker.call(self.base.engine.drop_sampler, name)

    def _evict(self, keep: str) -> None:
        engine = self.base.engine
        while len(self._resident) > self.capacity:
            name = next(n for n in self._resident if n != keep)
            del self._resident[name]
            if name not in self._loaders:  # in memory only: spill to disk first
                directory = str(self.spill_dir / safe_name(name))
                self.base.worker.call(_save_sampler, engine, name, directory)
                self._loaders[name] = lambda n=name, d=directory: engine.load_sampler(n, d)
            self.base.worker.call(engine.drop_sampler, name)


def _save_sampler(engine: Any, name: str, directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    Path(directory).mkdir(parents=True)
    engine.save_sampler(name, directory)


def safe_name(name: str) -> str:
    """``name`` as one path component."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
