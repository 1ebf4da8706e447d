"""``trinity plot``: metric curves of one or more runs as an image, for reports and papers.

    trinity plot RUN_DIR [RUN_DIR ...] [--metric KEY ...] [-o out.png] [--smoothing 0.6]
        [--title TITLE]

One panel per metric, one line per run, labelled by the shortest trailing parts of the run
directories that tell them apart. The format follows the extension of ``-o`` (png, svg, pdf).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_METRIC = "critic/rewards/mean"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plot",
        help="draw metric curves of runs into an image",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run's checkpoint job dir")
    parser.add_argument(
        "--metric",
        "-m",
        action="append",
        default=[],
        metavar="KEY",
        help=f"a metric of metrics.jsonl (repeatable; default {DEFAULT_METRIC})",
    )
    parser.add_argument("--output", "-o", default="metrics.png", help="the image to write")
    parser.add_argument(
        "--smoothing",
        type=float,
        default=0.0,
        help="exponential moving average weight in [0, 1), as TensorBoard's (default 0: none)",
    )
    parser.add_argument("--title", default=None)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from trinity.jobdir import JobDir
    from trinity.monitor.plot import plot_runs, run_labels

    def fail(message: str) -> int:
        print(f"trinity plot: error: {message}", file=sys.stderr)
        return 2

    if not 0 <= args.smoothing < 1:
        return fail(f"--smoothing must be in [0, 1), got {args.smoothing}")
    files = [JobDir(run).metrics_file for run in args.runs]
    for run_dir, path in zip(args.runs, files, strict=True):
        if not path.is_file():
            return fail(f"{run_dir} is not a run directory (no {Path('monitor', path.name)})")
    try:
        out = plot_runs(
            dict(zip(run_labels(args.runs), files, strict=True)),
            args.metric or [DEFAULT_METRIC],
            args.output,
            smoothing=args.smoothing,
            title=args.title,
        )
    except (ValueError, ImportError, OSError) as error:
        return fail(str(error))
    print(out)
    return 0
