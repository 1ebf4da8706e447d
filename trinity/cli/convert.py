"""``trinity convert``: a saved checkpoint as a merged Hugging Face model or a peft adapter.

    trinity convert --checkpoint DIR --to hf|peft --output OUT [--base-model PATH] [--state-dir DIR]
        [--dtype auto|float32|bfloat16|float16]

``--checkpoint`` takes a run directory (its latest checkpoint), one of its ``global_step_N``
directories, an engine training state (``trinity_state.json``) or a sampler directory
(``trinity_sampler.json``), which is what a ``trinity server`` checkpoint directory holds. A
``global_step_N`` written through a Tinker service points at ``tinker://...``: it is found in the
run's embedded server (``<run>/server``) or in ``--state-dir``, a ``trinity server``'s state
directory. A hosted service's checkpoints live only there: download them first.

The weights load into the engine on the CPU, so the output equals what the run sampled from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trinity.config import ConfigError
from trinity.jobdir import CHECKPOINT_REF, STEP_PREFIX, JobDir

STATE_META = "trinity_state.json"  # trinity.engine.checkpoint.STATE_META (not imported: torch)
SAMPLER_META = "trinity_sampler.json"  # trinity.engine.samplers.SAMPLER_META
DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        help="write a checkpoint as a Hugging Face model directory or a peft adapter",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        "--checkpoint-dir",
        dest="checkpoint",
        required=True,
        help="a run directory, a global_step_N directory, or a checkpoint directory",
    )
    parser.add_argument("--to", choices=("hf", "peft"), default="hf", help="output format")
    parser.add_argument("--output", "-o", required=True, help="the directory to write")
    parser.add_argument(
        "--base-model",
        "--base-model-dir",
        dest="base_model",
        help="the base model (default: the one the checkpoint records)",
    )
    parser.add_argument(
        "--state-dir", help="a trinity server's state directory (tinker:// checkpoints)"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weights of a merged model (auto: the base model's torch_dtype, else float32)",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    source = find_checkpoint(args.checkpoint, args.state_dir)
    meta = _read_meta(source)
    if args.to == "peft" and not meta.get("lora"):
        raise ConfigError(
            f"--checkpoint {args.checkpoint}: a full fine-tune has no adapter; use --to hf"
        )
    base = args.base_model or meta.get("base_model")
    if not base:
        raise ConfigError(f"--checkpoint {args.checkpoint}: no base model recorded; --base-model")
    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"--output {output}: exists and is not empty")
    _convert(source, base, args.to, output, args.dtype)
    what = "a merged Hugging Face model" if args.to == "hf" else "a peft adapter"
    print(f"trinity convert: wrote {what} of {source} to {output}", file=sys.stderr)
    return 0


def find_checkpoint(path: str, state_dir: str | None = None) -> Path:
    """The engine state or sampler directory behind ``path`` (see the module docstring)."""
    given = Path(path).expanduser()
    if not given.is_dir():
        raise ConfigError(f"--checkpoint {path}: no such directory")
    if (given / STATE_META).is_file() or (given / SAMPLER_META).is_file():
        return given
    if (given / CHECKPOINT_REF).is_file():
        return _resolve_ref(given, given.parent, state_dir)
    latest = JobDir(given).latest_checkpoint()
    if latest is not None:
        return _resolve_ref(JobDir(given).step_dir(latest[0]), given, state_dir)
    raise ConfigError(
        f"--checkpoint {path}: not a checkpoint (expected a run directory, a {STEP_PREFIX}N "
        f"directory, or a directory holding {STATE_META} or {SAMPLER_META})"
    )


def _resolve_ref(step_dir: Path, run_dir: Path, state_dir: str | None) -> Path:
    ref = (step_dir / CHECKPOINT_REF).read_text().strip()
    if not ref.startswith("tinker://"):
        # the local backend's state sits in the step directory; prefer it when the run moved
        for candidate in (step_dir / "state", Path(ref)):
            if (candidate / STATE_META).is_file():
                return candidate
        raise ConfigError(f"--checkpoint {step_dir}: its state {ref} is missing")
    server = Path(state_dir) if state_dir else JobDir(run_dir).server_dir
    database = server / "server.sqlite"
    if not database.is_file():
        raise ConfigError(
            f"--checkpoint {step_dir}: {ref} is on a Tinker service and no trinity server state "
            f"is at {server}; pass --state-dir, or download the checkpoint from the service"
        )
    from trinity.server.checkpoints import stored_directory

    directory = stored_directory(server, ref)
    if directory is None:
        raise ConfigError(f"--checkpoint {step_dir}: {ref} is not in the server state at {server}")
    return directory


def _read_meta(source: Path) -> dict:
    for name in (STATE_META, SAMPLER_META):
        if (source / name).is_file():
            return json.loads((source / name).read_text())
    return {}


def _convert(source: Path, base: str, to: str, output: Path, dtype_name: str) -> None:
    import torch

    from trinity.engine import Engine, configure_process
    from trinity.engine.demo_model import resolve_model_path

    configure_process()
    if dtype_name == "auto":
        dtype_name = _config_dtype(Path(resolve_model_path(base)))
    try:
        engine = Engine(base, device="cpu", dtype=getattr(torch, dtype_name))
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"base model {base}: cannot load it ({first}); pass --base-model"
        ) from None
    engine.export_checkpoint(str(source), to, str(output))


def _config_dtype(model_dir: Path) -> str:
    config = model_dir / "config.json"
    if config.is_file():
        saved = json.loads(config.read_text())
        dtype = saved.get("torch_dtype") or saved.get("dtype")
        if dtype in DTYPES:
            return dtype
    return "float32"
