"""``trinity studio``: look at runs in a browser: curves, rollouts, configs, config checks.

    trinity studio [--root CHECKPOINT_ROOT] [--host 127.0.0.1] [--port 8765] [--poll SECONDS]

Lists every run under ``--root`` (default ``./checkpoints``, the default checkpoint_root_dir):
a directory holding ``monitor/metrics.jsonl`` or ``monitor/rollouts.db``. The page polls, so a
running run's curves update by themselves. Everything is served from this machine (no CDN).
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_ROOT = "./checkpoints"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "studio",
        help="a local web app to look at runs (curves, rollouts, configs)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", default=DEFAULT_ROOT, help="the checkpoint root to list runs of")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 shows it to the network")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--poll", type=float, default=3.0, metavar="SECONDS", help="how often the page refreshes"
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from trinity.studio.app import create_app

    if args.poll <= 0:
        print(f"trinity studio: error: --poll must be > 0, got {args.poll}", file=sys.stderr)
        return 2
    app = create_app(args.root, poll_seconds=args.poll)
    print(
        f"trinity studio: runs under {args.root} at http://{args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
