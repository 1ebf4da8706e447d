"""One run's directory, ``<checkpoint_root_dir>/<project>/<group>/<name>``, named in one place.

The trainer writes checkpoints here, the synchronizer publishes sampler weights (an explorer in
another process follows by polling the files), the launcher resumes and benchmarks from it, and
tools read finished runs through it. File names are the original's where it has one
(``global_step_N``, ``latest_checkpointed_iteration.txt``, ``latest_state_dict_iteration.txt``), so
its run directories read the same: a run directory the original's Tinker backend wrote resumes
here (``remote_checkpoint_path.txt``), and the original resumes ours. The original also reads
``global_step_N/remote_sampler_path.txt`` for the step ``latest_state_dict_iteration.txt`` names;
published weights get that file (and the marker moves) only at saved steps, so a run keeps one
``global_step_N`` per checkpoint while the marker always names a file that exists; our own
processes follow every publication through ``latest_sampler.json``. Markers are replaced
atomically and written last: a step is complete once its marker says so, whenever a process is
killed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

STEP_PREFIX = "global_step_"
CHECKPOINT_REF = "remote_checkpoint_path.txt"  # the original's name, whatever the backend
FULL_CHECKPOINT = ".full_checkpoint"  # the original's flag: weights and optimizer state
SAMPLER_REF = "remote_sampler_path.txt"  # the original's: the published weights of a step


class JobDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ---- layout -------------------------------------------------------------------------------
    def step_dir(self, step: int) -> Path:
        return self.path / f"{STEP_PREFIX}{step}"

    @property
    def latest_checkpoint_file(self) -> Path:
        return self.path / "latest_checkpointed_iteration.txt"

    @property
    def latest_sampler_file(self) -> Path:
        """The original's marker: the newest published version, a number."""
        return self.path / "latest_state_dict_iteration.txt"

    @property
    def latest_sampler_ref_file(self) -> Path:
        """The newest published version with its reference, one JSON object written at once."""
        return self.path / "latest_sampler.json"

    def sampler_dir(self, version: int) -> Path:
        """Where the local backend may write published weights (another process loads them)."""
        return self.path / "samplers" / f"{STEP_PREFIX}{version}"

    @property
    def trainer_finished_file(self) -> Path:
        return self.path / "trainer_finished.txt"

    @property
    def trainer_consumed_file(self) -> Path:
        """The last train step whose batch the trainer read (bounds the explorer's lead)."""
        return self.path / "trainer_consumed_step.txt"

    @property
    def explorer_end_file(self) -> Path:
        return self.path / "explorer_end_step.txt"

    def record_explorer_end(self, step: int) -> None:
        """The explorer stopped after ``step`` (written before it closes the buffer)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.explorer_end_file, str(step))

    def explorer_end(self) -> int | None:
        try:
            return int(self.explorer_end_file.read_text())
        except FileNotFoundError:
            return None

    @property
    def final_adapter_dir(self) -> Path:
        return self.path / "final_adapter"

    @property
    def monitor_dir(self) -> Path:
        return self.path / "monitor"

    @property
    def metrics_file(self) -> Path:
        """Every metric logged, one JSON object a line (``trinity.monitor.jsonl``)."""
        return self.monitor_dir / "metrics.jsonl"

    @property
    def rollouts_db(self) -> Path:
        """The explorer's rollouts, step by step (``trinity.monitor.rollouts``)."""
        return self.monitor_dir / "rollouts.db"

    @property
    def config_file(self) -> Path:
        """The run's resolved config, as ``trinity config check`` prints it."""
        return self.path / "config.yaml"

    def is_run(self) -> bool:
        """Whether a run has logged here: tools (``trinity studio``, ``trinity plot``) list these."""
        return self.metrics_file.is_file() or self.rollouts_db.is_file()

    @property
    def log_dir(self) -> Path:
        return self.path / "log"

    @property
    def server_dir(self) -> Path:
        """``model.tinker.base_url: local``: the data of the run's own ``trinity server``."""
        return self.path / "server"

    def buffer_db(self, name: str) -> Path:
        return self.path / "buffer" / f"{name}.db"

    def bench_dir(self, step: int) -> Path:
        return self.path / "bench" / f"{STEP_PREFIX}{step}"

    # ---- checkpoints (trainer state a run resumes from) ----------------------------------------
    def write_checkpoint(self, step: int, ref: str) -> None:
        """Record the state reference of ``step``; the marker goes last, so the step is complete."""
        step_dir = self.step_dir(step)
        step_dir.mkdir(parents=True, exist_ok=True)
        (step_dir / CHECKPOINT_REF).write_text(ref)
        (step_dir / FULL_CHECKPOINT).touch()
        (self.path / "trainer_meta.json").write_text(json.dumps({"step": step, "checkpoint": ref}))
        version, sampler = self.latest_sampler()
        if version == step and sampler is not None:  # published just before this save
            self._mark_sampler(step, sampler)
        atomic_write(self.latest_checkpoint_file, str(step))

    def checkpoint_ref(self, step: int) -> str:
        return (self.step_dir(step) / CHECKPOINT_REF).read_text().strip()

    def latest_checkpoint(self) -> tuple[int, str] | None:
        """(step, state reference) of the last complete checkpoint, or None for a fresh run."""
        if not self.latest_checkpoint_file.exists():
            return None
        step = int(self.latest_checkpoint_file.read_text().strip())
        return step, self.checkpoint_ref(step)

    def critic_dir(self, step: int) -> Path:
        """PPO's critic state at ``step`` (the original's ``global_step_N/critic``)."""
        return self.step_dir(step) / "critic"

    def hf_adapter_dir(self, step: int) -> Path:
        """``trainer.save_hf_checkpoint: always``: the weights of ``step`` as a peft adapter."""
        return self.step_dir(step) / "huggingface"

    def remove_step(self, step: int) -> None:
        """Forget ``step`` (an older checkpoint past ``max_checkpoints_to_keep``)."""
        shutil.rmtree(self.step_dir(step), ignore_errors=True)

    def checkpointed_steps(self) -> list[int]:
        """Every step with a saved checkpoint, in order."""
        return sorted(
            int(p.name.removeprefix(STEP_PREFIX))
            for p in self.path.glob(f"{STEP_PREFIX}*")
            if (p / CHECKPOINT_REF).exists()
        )

    # ---- the taskset's position (steps that read more than one batch) -----------------------------
    @property
    def taskset_position_file(self) -> Path:
        return self.path / "taskset_position.json"

    def record_taskset_position(self, step: int, batches_read: int) -> None:
        """After explore ``step`` the taskset had served ``batches_read`` batches. Recorded only
        where that departs from one batch a step since the last record (dynamic sampling read
        extra batches), so the file stays small; a rerun of a step replaces what followed it."""
        positions = self._taskset_positions()
        earlier = {k: v for k, v in positions.items() if int(k) < step}
        expected = _batches_after(earlier, step)
        if batches_read == expected and len(earlier) == len(positions):
            return
        if batches_read != expected:
            earlier[str(step)] = batches_read
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.taskset_position_file, json.dumps(earlier))

    def taskset_batches_read(self, step: int) -> int:
        """Batches the taskset had served after explore ``step``: a resumed reader skips these."""
        positions = self._taskset_positions()
        return _batches_after({k: v for k, v in positions.items() if int(k) <= step}, step)

    def _taskset_positions(self) -> dict[str, int]:
        path = self.taskset_position_file
        return json.loads(path.read_text()) if path.exists() else {}

    # ---- published sampler weights (what the explorer samples from) -----------------------------
    def write_sampler(self, version: int, ref: str | None) -> None:
        """Publish; no ``global_step_N`` directory per publication, only per saved checkpoint."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.latest_sampler_ref_file, json.dumps({"version": version, "ref": ref}))
        if ref is not None and (self.step_dir(version) / CHECKPOINT_REF).exists():
            self._mark_sampler(version, ref)

    def _mark_sampler(self, step: int, ref: str) -> None:
        """The original's record of published weights, at a saved step."""
        (self.step_dir(step) / SAMPLER_REF).write_text(ref)
        atomic_write(self.latest_sampler_file, str(step))

    def latest_sampler(self) -> tuple[int, str | None]:
        """(version, reference) of the newest publication on disk (in a run directory the
        original wrote, its marker's); (0, None) before the first."""
        if self.latest_sampler_ref_file.exists():
            latest = json.loads(self.latest_sampler_ref_file.read_text())
            return int(latest["version"]), latest["ref"]
        if self.latest_sampler_file.exists():
            version = int(self.latest_sampler_file.read_text().strip())
            ref_file = self.step_dir(version) / SAMPLER_REF
            if ref_file.exists():
                return version, ref_file.read_text().strip()
        return 0, None


def _batches_after(positions: dict[str, int], step: int) -> int:
    """One batch a step since the last recorded position (none recorded: ``step``)."""
    if not positions:
        return step
    last = max(int(k) for k in positions)
    return step + positions[str(last)] - last


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
