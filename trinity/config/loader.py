"""Load a YAML config into a validated ``Config``; every problem becomes a one-line ``ConfigError``.

Loading is the original's ``OmegaConf.merge(OmegaConf.structured(Config), yaml)`` so
``${oc.env:VAR,default}`` and ``${a.b}`` interpolations behave the same, but OmegaConf's own
errors are multi-line and name schema classes. So the raw YAML is first walked against the
schema here (unknown keys with a did-you-mean, wrong literal types), OmegaConf errors that can
only appear while resolving interpolations are translated, and the combination checks and
derived values of the original's validators follow (``validate.py``).
"""

from __future__ import annotations

import dataclasses
import enum
import io
import logging
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    GrammarParseError,
    InterpolationKeyError,
    InterpolationResolutionError,
    InterpolationValidationError,
    OmegaConfBaseException,
    UnsupportedInterpolationType,
)

from trinity.config.errors import ConfigError, did_you_mean
from trinity.config.inert import NOT_YET, inert_keys, inert_warning, not_implemented
from trinity.config.schema import Config
from trinity.config.validate import finalize

log = logging.getLogger("trinity.config")


def load_config(
    path: str | Path, overrides: Sequence[str] | Mapping[str, Any] | None = None
) -> Config:
    """Read, merge, resolve and validate ``path``; ``overrides`` are ``a.b=c`` strings or a
    (nested or dotted-key) mapping applied on top of the file, as the YAML would set them."""
    raw = read_yaml(path)
    if overrides:
        raw = OmegaConf.merge(raw, _overrides_node(overrides))
    return build_config(raw)


def load_config_text(text: str, source: str) -> Config:
    """A config handed over as YAML text (``trinity studio``'s editor), checked exactly as a file
    would be; ``source`` names it in the messages that name the file."""
    return build_config(parse_yaml(text, source))


def read_yaml(path: str | Path) -> DictConfig:
    """The file as an unresolved OmegaConf mapping (interpolations still as text)."""
    where = f"cannot read config '{path}'"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{where}: {_first_line(error)}") from None
    return parse_yaml(text, path)


def parse_yaml(text: str, source: str | Path) -> DictConfig:
    """YAML text as an unresolved OmegaConf mapping; ``source`` names it in errors."""
    where = f"cannot read config '{source}'"
    try:
        data = yaml.safe_load(text)  # the shape; OmegaConf's loader reads 1e-5 as a float
        node = OmegaConf.load(io.StringIO(text)) if isinstance(data, dict) else None
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: invalid YAML{_yaml_where(error)}") from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{where}: {_first_line(error)}") from None
    if data is None:
        raise ConfigError(f"{where}: the file is empty")
    if not isinstance(node, DictConfig):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
        raise ConfigError(f"{where}: not a YAML mapping (the top level is {kind})")
    return node


def build_config(raw: DictConfig) -> Config:
    """Schema-check, merge onto the defaults, resolve, then validate and derive; then warn once,
    in one line, about every key set that does nothing here (``inert.py``); refuse, in one line,
    those set to a feature not implemented yet."""
    config = _build(raw)
    resolved = OmegaConf.merge(OmegaConf.structured(Config), raw)
    inert = inert_keys(
        OmegaConf.to_container(raw, resolve=False), OmegaConf.to_container(resolved, resolve=True)
    )
    refused = not_implemented(inert)
    if refused:
        raise ConfigError(refused)
    inert = [(path, why) for path, why in inert if why != NOT_YET]
    if inert:
        log.warning(inert_warning(inert))
    return config


def _build(raw: DictConfig) -> Config:
    container = OmegaConf.to_container(raw, resolve=False)
    check_types(container, Config, "")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(_translate(error, container)) from None
    assert isinstance(config, Config)
    finalize(config)
    for index, stage in enumerate(config.stages):
        stage.config = _build_stage(raw, config, index)
    return config


Section = TypeVar("Section")


def load_section(cls: type[Section], value: Any) -> Section:
    """``value`` as the schema section ``cls``, merged onto its defaults by the same OmegaConf merge
    as a YAML file, so that defaults live in the schema alone.

    The way in for sections handed to the Python API (and by tests) as a mapping, an OmegaConf
    node, a namespace or another dataclass (enums become their values); everything below the
    launcher then reads typed fields. A section that already is a ``cls`` is returned as is.
    """
    if isinstance(value, cls):
        return value
    data = _plain(value)
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a mapping, got {_show(data)}")
    check_types(data, cls, "")
    try:
        section = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data))
    except OmegaConfBaseException as error:
        raise ConfigError(f"{cls.__name__}: {_first_line(error)}") from None
    return typing.cast(Section, section)


def _plain(value: Any) -> Any:
    """Plain dicts, lists and scalars from OmegaConf nodes, dataclasses, namespaces and enums."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    elif isinstance(value, types.SimpleNamespace):
        value = vars(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _build_stage(raw: DictConfig, config: Config, index: int) -> Config:
    """Stage ``index`` as a full config: its sections merged over the global YAML."""
    stage = config.stages[index]
    label = f"stages[{index}]"
    if stage.config is not None:
        raise ConfigError(f"{label}.config is derived from the stage's sections; do not set it")
    stage.stage_name = stage.stage_name or f"stage_{index + 1}"
    stage_raw = raw.stages[index]
    node = OmegaConf.masked_copy(raw, [key for key in raw if key != "stages"])
    sections = [f.name for f in dataclasses.fields(stage) if f.name not in ("stage_name", "config")]
    for section in sections:
        if section in stage_raw and stage_raw[section] is not None:
            node = OmegaConf.merge(node, {section: stage_raw[section]})
    node.name = f"{config.name}/{stage.stage_name}"
    try:
        return _build(node)
    except ConfigError as error:
        raise ConfigError(f"{label} ('{stage.stage_name}'): {error}") from None


# ---- the schema walk --------------------------------------------------------------------------
_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n"}
_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def check_types(value: Any, hint: Any, path: str) -> None:
    """Raise ``ConfigError`` for the first unknown key or literal of the wrong type under
    ``path``; interpolations are left to OmegaConf, which checks what they resolve to."""
    if hint is Any or _is_interpolation(value):
        return
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return
        hint = next(arg for arg in args if arg is not type(None))
        check_types(value, hint, path)
    elif dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_show(value)}")
        fields = _field_hints(hint)
        for key, item in value.items():
            sub = _join(path, key)
            if key not in fields:
                raise ConfigError(f"unknown key '{sub}'{_suggest(str(key), fields)}")
            check_types(item, fields[key], sub)
    elif origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_show(value)}")
        for i, item in enumerate(value):
            check_types(item, args[0], f"{path}[{i}]")
    elif origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_show(value)}")
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{path}: keys must be strings, got {_show(key)}")
            check_types(item, args[1], _join(path, key))
    elif not _literal_ok(value, hint):
        raise ConfigError(f"{path}: expected {_EXPECTED[hint]}, got {_show(value)}")


def _literal_ok(value: Any, hint: type) -> bool:
    """What OmegaConf's typed nodes would accept (strings that convert, ints for floats)."""
    if value is None:
        return False
    if hint is str:
        return not isinstance(value, dict | list)
    if hint is bool:
        return isinstance(value, bool) or (
            isinstance(value, str) and value.strip().lower() in _BOOL_WORDS
        )
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        try:
            hint(value)
        except ValueError:
            return False
        return True
    return isinstance(value, int) if hint is int else isinstance(value, int | float)


def _field_hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _suggest(key: str, fields: Mapping[str, Any]) -> str:
    hint = did_you_mean(key, list(fields))
    return hint or f" (known keys: {', '.join(fields)})"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(value)
    return str(value)


# ---- OmegaConf errors -------------------------------------------------------------------------
def _translate(error: OmegaConfBaseException, container: Any) -> str:
    """One line for an error OmegaConf raised while merging or resolving."""
    key = getattr(error, "full_key", None) or ""
    source = _lookup(container, key)
    text = f"'{source}'" if isinstance(source, str) else "the interpolation"
    message = _first_line(error)
    if isinstance(error, InterpolationValidationError):
        hint = _hint_at(key)
        got = _show(getattr(error, "value", None))
        expected = _EXPECTED.get(hint, "a value of the schema's type")
        return f"{key}: expected {expected}, got {got} (from {text})"
    if isinstance(error, InterpolationKeyError):
        match = re.search(r"key '([^']*)'", message)
        missing = match.group(1) if match else message
        return f"{key}: cannot resolve {text}: key '{missing}' does not exist"
    env = re.search(r"Environment variable '([^']*)' not found", message)
    if env:
        name = env.group(1)
        return (
            f"{key}: cannot resolve {text}: environment variable '{name}' is not set "
            f"(set it, or give a default: ${{oc.env:{name},default}})"
        )
    if isinstance(error, UnsupportedInterpolationType | GrammarParseError):
        return f"{key}: cannot resolve {text}: {message}"
    if isinstance(error, InterpolationResolutionError):
        return f"{key}: cannot resolve {text}: {message}"
    return f"{key}: {message}" if key else message


def _hint_at(key: str) -> Any:
    """The schema type at a dotted/indexed key path, or None when the path leaves the schema."""
    hint: Any = Config
    for part in re.findall(r"[^.\[\]]+", key):
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
            origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            hint = _field_hints(hint).get(part)
        elif origin in (list, dict):
            hint = typing.get_args(hint)[-1]
        else:
            return None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _lookup(container: Any, key: str) -> Any:
    for part in re.findall(r"[^.\[\]]+", key):
        if isinstance(container, dict):
            container = container.get(part)
        elif isinstance(container, list) and part.isdigit() and int(part) < len(container):
            container = container[int(part)]
        else:
            return None
    return container


def _overrides_node(overrides: Sequence[str] | Mapping[str, Any]) -> DictConfig:
    try:
        if isinstance(overrides, Mapping):
            node = OmegaConf.create({})
            for key, value in overrides.items():
                OmegaConf.update(node, str(key), value, force_add=True)
            return node
        return OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, ValueError, yaml.YAMLError) as error:
        raise ConfigError(f"invalid override: {_first_line(error)}") from None


def _yaml_where(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or ""
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{at}: {problem}" if problem else at


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "msg", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__
