"""The ``trinity`` command.

    trinity run --config X.yaml [--dry-run] [--plugin-dir DIR ...] [--debug]
    trinity config check X.yaml [--plugin-dir DIR ...] [--debug]
    trinity server ...            (trinity.cli.server)
    trinity fetch-model ...       (trinity.cli.fetch_model)
    trinity plot ...              (trinity.cli.plot)
    trinity studio ...            (trinity.cli.studio)
    trinity convert ...           (trinity.cli.convert)

A config or plugin problem is one line on stderr (``trinity: error: ...``) and exit status 2;
``--debug`` or ``TRINITY_DEBUG=1`` adds the traceback. Heavy layers (launcher, torch) are imported
only by the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Any

from trinity.cli import convert, fetch_model, plot, server, studio
from trinity.config import ConfigError, load_config, to_yaml
from trinity.plugins import PluginError, load_plugins

SUBCOMMAND_MODULES = (
    server,
    fetch_model,
    plot,
    studio,
    convert,
)  # each exposes add_parser(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trinity", description="Reinforcement fine-tuning for LLMs on the Tinker API."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument(
        "--plugin-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="import every *.py in DIR first (repeatable; also env "
        "TRINITY_PLUGIN_DIRS, colon-separated)",
    )
    shared.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )

    run = commands.add_parser("run", parents=[shared], help="run an RFT job from a YAML config")
    run.add_argument("--config", "-c", required=True, help="the YAML config")
    run.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="override config keys (a.b.c=value)"
    )
    run.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and exit without running"
    )
    run.set_defaults(func=_run)

    config = commands.add_parser("config", help="work with config files")
    actions = config.add_subparsers(dest="config_action", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check", parents=[shared], help="validate a config and print it resolved"
    )
    check.add_argument("path", help="the YAML config")
    check.set_defaults(func=_check)

    for module in SUBCOMMAND_MODULES:
        module.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("TRINITY_DEBUG", "").lower() in ("1", "true", "yes")
    level = os.environ.get("TRINITY_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        format="trinity: %(levelname)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ConfigError, PluginError, FileNotFoundError) as error:
        if debug:
            traceback.print_exc()
        print(f"trinity: error: {error}", file=sys.stderr)
        return 2


def _load(path: str, plugin_dirs: list[str], overrides: list[str] | None = None) -> Any:
    """Plugins first, so the workflows, rewards and algorithms they register validate."""
    load_plugins(plugin_dirs)
    return load_config(path, overrides=overrides or None)


def _run(args: argparse.Namespace) -> int:
    config = _load(args.config, args.plugin_dir, args.overrides)
    if args.dry_run:
        print(to_yaml(config), end="")
        return 0
    from trinity.engine import configure_process
    from trinity.launcher.launcher import run

    configure_process()
    return run(config)


def _check(args: argparse.Namespace) -> int:
    config = _load(args.path, args.plugin_dir)
    print(to_yaml(config), end="")
    print(f"trinity: {args.path}: ok", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
