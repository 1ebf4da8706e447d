"""``trinity server``: run the Tinker-compatible service, or export a checkpoint as a peft adapter.

    trinity server --model PATH|demo [--model NAME=PATH ...] [--host 127.0.0.1] [--port 8000]
        [--state-dir DIR] [--api-key tml-KEY=USER ...] [--session-idle-timeout SECONDS]
        [--max-body-mb N] [--max-decoded-mb N] [--max-lora-rank N] [--held-timeout-s S]
        [--max-held N] [--inject-latency-ms N]
    trinity server export tinker://RUN/weights/NAME OUT_DIR [--state-dir DIR] [--model PATH]
        (OUT_DIR: a new or empty directory, outside the state dir or under its exports/)

Clients: ``TINKER_BASE_URL=http://HOST:PORT TINKER_API_KEY=tml-... python train.py`` with the
official ``tinker`` SDK. ``--api-key`` (repeatable; a file of such lines works too; default env
``TRINITY_SERVER_API_KEYS``) maps keys to users, who never see each other's runs or checkpoints.
With no keys any ``tml-`` key is accepted and every client is one user. A session with no
heartbeat or call for ``--session-idle-timeout`` seconds (default 600; 0 = never) is finished and
its models and samplers freed: the SDK heartbeats every 10 s while its client lives.
``--inject-latency-ms N`` delays every API call by N ms, as a far service would (for measuring
how well a client hides latency; bench/tinker_latency.py).
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_STATE_DIR = "trinity-server-state"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "server",
        help="run a Tinker-compatible training service over the engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="tml-KEY=USER",
        help="an API key and its user (repeatable), or a file of such lines",
    )
    limits = parser.add_argument_group("limits per client (docs/server.md)")
    limits.add_argument("--max-body-mb", type=float, default=64, help="request body as sent")
    limits.add_argument(
        "--max-decoded-mb", type=float, default=256, help="body after decompression, and tensors"
    )
    limits.add_argument("--max-lora-rank", type=int, default=256)
    limits.add_argument(
        "--held-timeout-s",
        type=float,
        default=300,
        help="how long a command waits for an earlier seq_id before it fails",
    )
    limits.add_argument(
        "--max-held", type=int, default=64, help="commands waiting for a seq_id gap, per user"
    )
    parser.add_argument(
        "--session-idle-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="finish sessions silent this long, freeing their models (default 600; 0 = never)",
    )
    parser.add_argument(
        "--inject-latency-ms",
        default="0",
        metavar="N",
        help="delay every API call by N milliseconds, for measurement (default 0)",
    )
    actions = parser.add_subparsers(dest="server_action", metavar="{export}")
    export = actions.add_parser("export", help="write a checkpoint as a peft adapter directory")
    export.add_argument("tinker_path")
    export.add_argument("out_dir")
    _common(export)
    parser.set_defaults(func=run)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS on both levels, so `server --state-dir X export ...` and `export --state-dir X`
    # both work without the subcommand's default overwriting the parent's value.
    parser.add_argument(
        "--model",
        action="append",
        default=argparse.SUPPRESS,
        help="HF model dir, 'demo', or NAME=DIR to serve; repeat for several",
    )
    parser.add_argument(
        "--state-dir",
        "--data-dir",
        dest="state_dir",
        default=argparse.SUPPRESS,
        help=f"SQLite + checkpoints live here (default ./{DEFAULT_STATE_DIR})",
    )


def run(args: argparse.Namespace) -> int:
    from trinity.engine import configure_process
    from trinity.server import build_service, parse_api_keys, serve
    from trinity.server.limits import Limits, MiB

    configure_process()
    state_dir = getattr(args, "state_dir", DEFAULT_STATE_DIR)
    models = getattr(args, "model", None)
    if getattr(args, "server_action", None) == "export":
        return _export(args.tinker_path, args.out_dir, state_dir, models)
    if not models:
        print(
            "trinity server: error: at least one --model PATH (or --model demo) is required",
            file=sys.stderr,
        )
        return 2
    latency_ms = _latency_ms(args.inject_latency_ms)
    if latency_ms is None:
        print(
            "trinity server: error: --inject-latency-ms must be a number of milliseconds >= 0, "
            f"got {args.inject_latency_ms!r}",
            file=sys.stderr,
        )
        return 2
    idle_s = getattr(args, "session_idle_timeout", None)
    if idle_s is not None and not idle_s >= 0:
        print(
            f"trinity server: error: --session-idle-timeout must be >= 0 seconds, got {idle_s}",
            file=sys.stderr,
        )
        return 2
    try:
        limits = Limits(
            max_body_bytes=int(args.max_body_mb * MiB),
            max_decoded_bytes=int(args.max_decoded_mb * MiB),
            max_lora_rank=args.max_lora_rank,
            held_timeout_s=args.held_timeout_s,
            max_held_per_tenant=args.max_held,
        )
        keys: dict[str, str] = {}
        for spec in args.api_key or [os.environ.get("TRINITY_SERVER_API_KEYS", "")]:
            keys.update(parse_api_keys(spec))
        idle = {} if idle_s is None else {"session_idle_s": idle_s}
        service = build_service(models, state_dir, keys, limits=limits, **idle)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"trinity server: error: {exc}", file=sys.stderr)
        return 2
    if not service.api_keys:
        print("trinity server: no API keys configured; any tml- key is accepted", file=sys.stderr)
    delayed = f", every call delayed {latency_ms:g} ms" if latency_ms else ""
    print(
        f"trinity server: serving {[m.name for m in service.models]} on "
        f"http://{args.host}:{args.port} (state in {state_dir}{delayed})",
        file=sys.stderr,
    )
    serve(service, args.host, args.port, latency_ms)
    return 0


def _latency_ms(text: str) -> float | None:
    """``--inject-latency-ms``: a finite number >= 0, else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 <= value < float("inf") else None


def _export(path: str, out_dir: str, state_dir: str, models: list[str] | None) -> int:
    """Offline: reads the state dir directly, so the server need not be running."""
    from trinity.server import ServiceError, build_service, parse_tinker_path
    from trinity.server.store import Store
    from trinity.server.wire import offline_export_dir

    try:
        run_id, kind, name = parse_tinker_path(path)
        out_dir = str(offline_export_dir(state_dir, out_dir))
    except ServiceError as exc:
        print(f"trinity server export: error: {exc.message}", file=sys.stderr)
        return 2
    store = Store(os.path.join(state_dir, "server.sqlite"))
    ckpt, run = store.checkpoint(run_id, f"{kind}/{name}"), store.run(run_id)
    store.close()
    if ckpt is None or run is None:
        print(f"trinity server export: error: {path} not found in {state_dir}", file=sys.stderr)
        return 1
    service = build_service(models or [run["base_model"]], state_dir, {}, recover=False)
    try:
        service.export_peft(ckpt["tenant"], path, out_dir).result()
    except ServiceError as exc:
        print(f"trinity server export: error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        service.close(autosave=False)
    print(f"trinity server export: wrote a peft adapter to {out_dir}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m trinity.cli.server ...``: the same as ``trinity server ...``."""
    parser = argparse.ArgumentParser(prog="trinity")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["server", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
