"""Command line: ``canary run | validate | version``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from canary import __version__
from canary.config import load_config
from canary.errors import ConfigError


def _run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    import uvloop

    from canary.runtime import serve  # imported late: `validate` needs no aiohttp

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config, args.config))
    except OSError as exc:
        print(f"canary: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _validate(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            config = load_config(path)
        except ConfigError as exc:
            print(f"{path}: {len(exc.issues)} error(s)")
            for issue in exc.issues:
                print(f"  {issue}")
            status = 1
        else:
            names = ", ".join(r.name for r in config.rollouts)
            print(f"{path}: ok ({len(config.rollouts)} rollout(s): {names})")
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canary", description="Performance-aware canary router for ML model endpoints."
    )
    parser.add_argument("--version", action="version", version=f"canary {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve the proxy and admin ports for a rollout file")
    run.add_argument("-c", "--config", required=True, help="rollout file (YAML)")
    run.set_defaults(func=_run)

    validate = sub.add_parser("validate", help="check rollout files; exit 1 listing every error")
    validate.add_argument("files", nargs="+", help="rollout files (YAML)")
    validate.set_defaults(func=_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
