"""User plugins: every ``*.py`` in a plugin directory is imported so its registrations run.

A plugin is an ordinary module that decorates its classes/functions with a registry, e.g.
``@WORKFLOWS.register("my_workflow")`` or ``@REWARD_FUNCTIONS.register("my_reward")``; configs
then name them. Directories come from ``--plugin-dir`` and from ``TRINITY_PLUGIN_DIRS``
(colon-separated), as in the original. Each directory is put on ``sys.path`` so plugin files can
import their sibling helpers; a file is imported once per process however often it is listed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path

ENV_VAR = "TRINITY_PLUGIN_DIRS"
_loaded: dict[Path, str] = {}  # resolved file -> module name
_loaded_dirs: list[Path] = []  # in load order: what a Ray actor must load too


class PluginError(RuntimeError):
    """A plugin directory or file that could not be loaded; one line naming the file."""


def plugin_dirs(dirs: Iterable[str | os.PathLike[str]] | None = None) -> list[Path]:
    """The given directories followed by those in ``TRINITY_PLUGIN_DIRS``, without repeats."""
    listed = [Path(d) for d in dirs or []]
    listed += [Path(d) for d in os.environ.get(ENV_VAR, "").split(os.pathsep) if d.strip()]
    unique: list[Path] = []
    for d in listed:
        resolved = d.expanduser().resolve()
        if resolved not in unique:
            unique.append(resolved)
    return unique


def load_plugins(dirs: Iterable[str | os.PathLike[str]] | None = None) -> list[str]:
    """Import every ``*.py`` (not ``_*.py``) in each directory; returns the module names loaded."""
    names = []
    for directory in plugin_dirs(dirs):
        if not directory.is_dir():
            raise PluginError(f"plugin directory not found: {directory}")
        if str(directory) not in sys.path:
            sys.path.insert(0, str(directory))
        for file in sorted(directory.glob("*.py")):
            if not file.name.startswith("_"):
                names.append(load_plugin_file(file))
        if directory not in _loaded_dirs:  # only once every file loaded: actors load these too
            _loaded_dirs.append(directory)
    return names


def loaded_plugin_dirs() -> list[Path]:
    """Every directory ``load_plugins`` loaded in this process (``--plugin-dir`` and env)."""
    return list(_loaded_dirs)


def load_plugin_file(file: Path) -> str:
    file = file.resolve()
    if file in _loaded:
        return _loaded[file]
    digest = hashlib.sha1(str(file).encode()).hexdigest()[:8]  # same stem in two dirs: no clash
    name = f"trinity_plugins.{file.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot import plugin {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise PluginError(
            f"plugin {file_and_line(file, exc)} failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    _loaded[file] = name
    return name


def file_and_line(file: Path, exc: BaseException) -> str:
    """``file:line`` of the plugin's own statement that failed (a syntax error, or the deepest
    frame in the file: the import or decorator whose error came from elsewhere)."""
    if isinstance(exc, SyntaxError) and exc.filename and Path(exc.filename) == file:
        return f"{file}:{exc.lineno}"
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == file]
    return f"{file}:{lines[-1]}" if lines else str(file)
