"""The resolved config as YAML (``trinity run --dry-run``, ``trinity config check``)."""

from __future__ import annotations

import dataclasses

from omegaconf import OmegaConf

from trinity.config.schema import Config


def to_yaml(config: Config) -> str:
    """Every key with the value the run will use; each stage's derived ``config`` is left out
    (it repeats the whole file) so the output loads again as a config."""
    stages = [dataclasses.replace(stage, config=None) for stage in config.stages]
    node = OmegaConf.structured(dataclasses.replace(config, stages=stages))
    return OmegaConf.to_yaml(node)
