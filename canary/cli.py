"""Command line: ``canary run | validate``, and the admin API commands ``status``,
``promote | rollback | pause | resume NAME`` and ``reload``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from canary import __version__
from canary.config import AdminConfig, load_config
from canary.errors import AdminError, CanaryError, ConfigError
from canary.workers import WorkerSpec, check_workers, parse_workers

if TYPE_CHECKING:
    from canary.admin_client import AdminClient


def _run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    import uvloop

    try:
        worker = WorkerSpec.from_env()
        if args.workers > 1 and worker is None:
            check_workers(config, args.workers)
            from canary.supervisor import supervise  # imported late: `validate` needs no aiohttp

            job = supervise(
                config,
                args.config,
                args.workers,
                watch_config=args.watch_config,
                log_level=str(args.log_level),
            )
        else:
            from canary.runtime import serve

            job = serve(config, args.config, watch_config=args.watch_config, worker=worker)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(job)
    except (OSError, CanaryError) as exc:
        print(f"canary: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


WATCH_CONFIG_DEFAULT = 5.0  # seconds between checks of `canary run --watch-config`
_WATCH_CONFIG_RANGE = (0.1, 3600.0)


def _watch_seconds(text: str) -> float:
    """``--watch-config SECONDS``: a number of seconds within ``_WATCH_CONFIG_RANGE`` (faster
    only burns CPU hashing the file; slower than an hour is no watching)."""
    low, high = _WATCH_CONFIG_RANGE
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected seconds such as 5 or 0.5, got {text!r}"
        ) from None
    if not low <= seconds <= high:  # also NaN
        raise argparse.ArgumentTypeError(f"expected {low:g} to {high:g} seconds, got {text!r}")
    return seconds


def _workers(text: str) -> int:
    try:
        return parse_workers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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


# --- admin API commands ----------------------------------------------------------------------

ADMIN_URL_ENV = "CANARY_ADMIN_URL"
ADMIN_TOKEN_ENV = "CANARY_ADMIN_TOKEN"
_WIDTH = 120  # status lines are cut to this many columns
_PAST = {"pause": "paused", "resume": "resumed", "promote": "promoted", "rollback": "rolled back"}


def _admin_section(path: str) -> AdminConfig:
    """``admin:`` of a rollout file; read on its own when the rest of the file is invalid.

    ``canary reload -c FILE`` is typically run right after editing FILE, so a mistake in a
    rollout must not stop the CLI from finding the admin API (which then reports the mistake).
    """
    try:
        return load_config(path).admin
    except ConfigError as exc:
        from pydantic import ValidationError

        from canary.config._loader import parse_yaml_text, read_config_text

        try:  # within the same limits (size, aliases, depth) as the full load
            data = parse_yaml_text(read_config_text(path), path)
            section = data.get("admin") if isinstance(data, dict) else None
            return AdminConfig.model_validate(section or {})
        except (ConfigError, ValidationError):
            raise exc from None


def _listen_url(listen: tuple[str, int], source: str) -> str:
    host, port = listen
    if port == 0:
        raise AdminError(
            f"admin.listen in {source} uses port 0 (any free port): pass --admin URL",
            exit_code=2,
        )
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # wildcard: reach loopback
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def resolve_admin(
    admin: str | None, config: str | None, environ: Mapping[str, str]
) -> tuple[str, str | None]:
    """The admin base URL and bearer token to use.

    Parameters
    ----------
    admin
        ``--admin URL``; wins when given.
    config
        ``-c FILE``: its ``admin.listen`` gives the URL when neither ``--admin`` nor
        ``$CANARY_ADMIN_URL`` is set (a wildcard host 0.0.0.0 or :: is reached on loopback), and
        its ``admin.token_env`` names the token variable when ``$CANARY_ADMIN_TOKEN`` is unset.
    environ
        The environment (``os.environ``).

    Returns
    -------
    tuple of (str, str or None)
        Base URL without trailing slash, and the token (None: send none).

    Raises
    ------
    ConfigError
        ``config`` cannot be read, or neither it nor its ``admin:`` section is valid.
    AdminError
        ``admin.listen`` uses port 0 (exit code 2).
    """
    from canary.admin_client import DEFAULT_ADMIN_URL

    url = admin or environ.get(ADMIN_URL_ENV) or None
    token = environ.get(ADMIN_TOKEN_ENV) or None
    if config is not None and (url is None or token is None):
        section = _admin_section(config)
        if url is None:
            url = _listen_url(section.listen, config)
        if token is None and section.token_env:
            token = environ.get(section.token_env) or None
    return (url or DEFAULT_ADMIN_URL).rstrip("/"), token


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())  # reasons may hold newlines: keep one row per line
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart; the last column is cut to fit ``_WIDTH``."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    room = max(_WIDTH - sum(w + 2 for w in widths[:-1]), len(headers[-1]), 20)
    widths[-1] = min(widths[-1], room)
    lines = []
    for row in [list(headers), *rows]:
        cells = [*row[:-1], _cut(row[-1], widths[-1])]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    return lines


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or seconds != seconds or seconds < 0:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _pct(value: Any) -> str:
    return f"{value:g}%" if isinstance(value, int | float) else "?"


def _step_number(d: Mapping[str, Any]) -> int | None:
    """The 1-based step of a rollout or decision entry: ``step`` with ``step_index`` beside
    it (this canary), else ``step`` + 1 (an admin API from before ``step`` was 1-based)."""
    step, index = d.get("step"), d.get("step_index")
    if isinstance(index, int):
        return index + 1
    return step + 1 if isinstance(step, int) else None


def _step(r: Mapping[str, Any]) -> str:
    step, steps = _step_number(r), r.get("steps")
    where = f"{step}/{steps}" if step is not None else f"?/{steps}"
    if r.get("step_kind") == "shadow":
        return f"{where} shadow"
    weights = r.get("weights") or {}
    return f"{where} weight {_pct(weights.get('candidate'))}"


def _pair(d: Any, a: str, b: str) -> str:
    d = d if isinstance(d, Mapping) else {}
    return f"{d.get(a, '?')}/{d.get(b, '?')}"


def _last_decision(r: Mapping[str, Any]) -> str:
    d = r.get("last_decision")
    if not isinstance(d, Mapping):
        return "-"
    reason = d.get("reason") or ""
    return f"{d.get('action', '?')}: {reason}" if reason else str(d.get("action", "?"))


_ROLLOUT_HEADERS = (
    "NAME",
    "PHASE",
    "STEP",
    "SAMPLES P/C",
    "STEP PROGRESS",
    "ELAPSED",
    "LAST DECISION",
)
_METRIC_HEADERS = ("METRIC", "VERDICT", "ESTIMATE", "INTERVAL", "TOLERANCE", "SAMPLES P/C")
_DECISION_HEADERS = ("AT", "STEP", "ACTION", "BY", "REASON")


def _rollout_row(r: Mapping[str, Any]) -> list[str]:
    return [
        str(r.get("name", "?")),
        str(r.get("phase", "?")),
        _step(r),
        _pair(r.get("samples"), "production", "candidate"),
        f"{r.get('step_samples', '?')}/{r.get('step_required', '?')}",
        _duration(r.get("elapsed")),
        _last_decision(r),
    ]


def _signed(value: float, unit: str) -> str:
    text = f"{value:+.0f}" if abs(value) >= 1000 else f"{value:+.3g}"
    return text + unit


def _metric_value(m: Mapping[str, Any], value: Any) -> str:
    """An estimate or bound on a reader's scale: ratio -> %, rate difference -> pp."""
    if not isinstance(value, int | float):
        return "?"  # null: not enough data yet, or unbounded
    if m.get("relative"):
        return _signed((value - 1.0) * 100.0, "%")
    if m.get("kind") in ("error_rate", "rate"):
        return _signed(value * 100.0, "pp")
    return _signed(value, "")


def _tolerance(m: Mapping[str, Any]) -> str:
    margin = m.get("margin")
    if m.get("kind") in ("net_value", "srm") or not isinstance(margin, int | float):
        return "-"
    sign = "-" if m.get("direction") == "decrease" else "+"
    if m.get("relative"):
        return f"{sign}{margin * 100:g}%"
    if m.get("kind") in ("error_rate", "rate"):
        return f"{sign}{margin * 100:g}pp"
    return f"{sign}{margin:g}"


def _metric_row(m: Mapping[str, Any]) -> list[str]:
    lo, hi = _metric_value(m, m.get("lower")), _metric_value(m, m.get("upper"))
    return [
        str(m.get("name", "?")),
        str(m.get("verdict", "?")),
        _metric_value(m, m.get("estimate")),
        f"[{lo}, {hi}]",
        _tolerance(m),
        f"{m.get('n_production', '?')}/{m.get('n_candidate', '?')}",
    ]


def _decision_row(d: Mapping[str, Any], steps: Any) -> list[str]:
    at = d.get("at")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
        if isinstance(at, int | float)
        else "?"
    )
    step = _step_number(d)
    return [
        when,
        f"{step}/{steps}" if step is not None else "?",
        str(d.get("action", "?")),
        "manual" if d.get("manual") else "auto",
        str(d.get("reason") or ""),
    ]


def _decision_time(d: Mapping[str, Any]) -> float:
    at = d.get("at")
    return float(at) if isinstance(at, int | float) else 0.0


def _print_rollout(r: Mapping[str, Any]) -> None:
    print("\n".join(_table(_ROLLOUT_HEADERS, [_rollout_row(r)])))
    if r.get("status"):
        print(f"now: {r['status']}")
    metrics = [m for m in r.get("metrics") or [] if isinstance(m, Mapping)]
    net = r.get("net_value")
    if isinstance(net, Mapping):
        metrics.append(net)
    metrics += [g for g in r.get("guards") or [] if isinstance(g, Mapping)]
    print()
    if metrics:
        print("\n".join(_table(_METRIC_HEADERS, [_metric_row(m) for m in metrics])))
    else:
        print("no metrics")
    decisions = [d for d in r.get("decisions") or [] if isinstance(d, Mapping)]
    decisions.sort(key=_decision_time)
    print()
    if decisions:
        print(f"last {min(len(decisions), 10)} of {len(decisions)} decision(s):")
        rows = [_decision_row(d, r.get("steps", "?")) for d in decisions[-10:]]
        print("\n".join(_table(_DECISION_HEADERS, rows)))
    else:
        print("no decisions yet")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def _status(args: argparse.Namespace, client: AdminClient) -> None:
    if args.name is not None:
        rollout = client.rollout(args.name)
        if args.json:
            _print_json(rollout)
        else:
            _print_rollout(rollout)
        return
    rollouts = client.rollouts()
    if args.json:
        _print_json({"rollouts": rollouts})
    elif not rollouts:
        print("no rollouts")
    else:
        rows = [_rollout_row(r) for r in rollouts if isinstance(r, Mapping)]
        print("\n".join(_table(_ROLLOUT_HEADERS, rows)))


def _action(args: argparse.Namespace, client: AdminClient) -> None:
    answer = client.action(args.name, args.command, args.reason)
    name = answer.get("name", args.name)
    print(f"{name}: {_PAST[args.command]} (phase {answer.get('phase', '?')})")


def _reload(args: argparse.Namespace, client: AdminClient) -> None:
    answer = client.reload()
    names = [str(n) for n in answer.get("rollouts") or []]
    print(f"reloaded: {len(names)} rollout(s)" + (f": {', '.join(names)}" if names else ""))


def _admin_command(
    command: Callable[[argparse.Namespace, AdminClient], None],
) -> Callable[[argparse.Namespace], int]:
    """Wrap an admin command: resolve URL and token, translate errors into message + exit code."""

    def run(args: argparse.Namespace) -> int:
        from canary.admin_client import AdminClient

        try:
            url, token = resolve_admin(args.admin, args.config, os.environ)
            with AdminClient(url, token, timeout=args.timeout) as client:
                command(args, client)
            sys.stdout.flush()  # here, where a closed pipe is caught (not at exit)
        except BrokenPipeError:
            return _closed_pipe()
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
        except AdminError as exc:
            print(exc, file=sys.stderr)
            return exc.exit_code
        return 0

    return run


CLOSED_PIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for `head` closing the pipe


def _closed_pipe() -> int:
    """The reader of stdout went away (``canary status | head``): stop quietly, as ``cat``
    or ``git log`` do, and keep the interpreter from complaining when it flushes stdout."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (tests): nothing to do
        pass
    return CLOSED_PIPE_EXIT


def _add_admin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin",
        metavar="URL",
        help=f"admin API base URL (default: ${ADMIN_URL_ENV}, else admin.listen of -c FILE, "
        "else http://127.0.0.1:9901)",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="rollout file: gives admin.listen and admin.token_env",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="per call (default 5)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canary", description="Performance-aware canary router for ML model endpoints."
    )
    parser.add_argument("--version", action="version", version=f"canary {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve the proxy and admin ports for a rollout file")
    run.add_argument("-c", "--config", required=True, help="rollout file (YAML)")
    run.add_argument(
        "--watch-config",
        nargs="?",
        const=WATCH_CONFIG_DEFAULT,
        default=None,
        type=_watch_seconds,
        metavar="SECONDS",
        help="reload the rollout file when its content changes, checked every SECONDS "
        f"({WATCH_CONFIG_DEFAULT:g} when omitted; no checks without this flag). Like SIGHUP: "
        "an invalid file is rejected and the running config stays. For a file updated in "
        "place, such as a Kubernetes ConfigMap volume",
    )
    run.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="data-plane processes sharing the proxy port (SO_REUSEPORT): a number, or "
        "'auto' for one per CPU (default 1: one process). With N > 1 this process supervises "
        "them: it owns the admin port (metrics of every worker, labelled worker), restarts "
        "a worker that dies, and one worker at a time analyses and decides (needs "
        "state.backend sqlite, the default, or redis)",
    )
    run.set_defaults(func=_run)

    validate = sub.add_parser("validate", help="check rollout files; exit 1 listing every error")
    validate.add_argument("files", nargs="+", help="rollout files (YAML)")
    validate.set_defaults(func=_validate)

    token_note = (
        f"The bearer token is read from ${ADMIN_TOKEN_ENV}, else from the variable named by "
        "admin.token_env in -c FILE."
    )
    status = sub.add_parser(
        "status",
        help="show rollouts: phase, step, samples, last decision",
        description="Show every rollout, or one with its metrics and decisions. " + token_note,
    )
    status.add_argument("name", nargs="?", metavar="NAME", help="one rollout, in detail")
    status.add_argument("--json", action="store_true", help="print the admin API's JSON")
    _add_admin_options(status)
    status.set_defaults(func=_admin_command(_status))

    for action, what in (
        ("promote", "send all traffic to the candidate now"),
        ("rollback", "send all traffic back to production now"),
        ("pause", "stop advancing (traffic split kept) until resume"),
        ("resume", "continue a paused rollout"),
    ):
        cmd = sub.add_parser(
            action, help=what, description=f"{what[0].upper()}{what[1:]}. {token_note}"
        )
        cmd.add_argument("name", metavar="NAME", help="rollout name")
        cmd.add_argument("--reason", metavar="TEXT", help="recorded in the decision log")
        _add_admin_options(cmd)
        cmd.set_defaults(func=_admin_command(_action))

    reload = sub.add_parser(
        "reload",
        help="make a running canary re-read its rollout file",
        description="Make a running canary re-read its rollout file. " + token_note,
    )
    _add_admin_options(reload)
    reload.set_defaults(func=_admin_command(_reload))
    return parser


def _worker_tag() -> str:
    """``worker-N `` in a ``--workers`` worker's log lines (their output is interleaved)."""
    try:
        spec = WorkerSpec.from_env()
    except CanaryError:
        return ""
    return f"worker-{spec.index} " if spec is not None else ""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s " + _worker_tag() + "%(name)s: %(message)s",
    )
    if str(args.log_level).upper() != "DEBUG":
        # httpx logs every request (webhook URLs can carry secrets) at INFO.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "ADMIN_TOKEN_ENV",
    "ADMIN_URL_ENV",
    "CLOSED_PIPE_EXIT",
    "WATCH_CONFIG_DEFAULT",
    "build_parser",
    "main",
    "resolve_admin",
]
