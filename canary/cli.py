"""Command line: ``canary run [--workers N] | validate | simulate FILE``, ``canary report
NAME`` (from the admin API or the state file), and the admin API commands ``status [NAME]
[--watch]``, ``promote [--full] | rollback | pause | resume | retry NAME`` and ``reload``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from canary import __version__
from canary.config import AdminConfig, load_config
from canary.errors import AdminError, CanaryError, ConfigError
from canary.simulate import add_parser as add_simulate_parser
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
DEFAULT_WIDTH = 120  # columns of output that goes to no terminal (a pipe, a file) without $COLUMNS
WATCH_DEFAULT = 2.0  # seconds between the snapshots of `canary status --watch`
_WATCH_RANGE = (0.1, 3600.0)
_FLEX_MIN = 12  # a free-text last column (reason, last decision) is cut down to this first
_PAST = {
    "pause": "paused",
    "resume": "resumed",
    "promote": "promoted",
    "advance": "advanced",
    "rollback": "rolled back",
    "retry": "retried",
}


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
    return _clip(text, width)


def _clip(line: str, width: int) -> str:
    """``line`` (one line, spacing kept) cut to ``width`` characters with an ellipsis."""
    return line if len(line) <= width else line[: max(width - 1, 0)] + "…"


def terminal_width() -> int:
    """Columns to fit: ``$COLUMNS``, else the terminal's, else :data:`DEFAULT_WIDTH`."""
    return max(20, shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns)


def _table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    width: int,
    *,
    flex: bool = True,
    drop: Sequence[int] = (),
) -> list[str]:
    """Left-aligned columns two spaces apart, every line at most ``width`` long.

    When the table is wider: the last column (free text, when ``flex``) is cut first, down to
    :data:`_FLEX_MIN` characters; then the columns of ``drop`` (indices, least useful first)
    are left out one at a time; and if it is still too wide, every line is cut at ``width``
    with an ellipsis (a row never wraps).
    """
    table = [[" ".join(str(c).split()) for c in row] for row in [headers, *rows]]
    cols = list(range(len(headers)))
    dropping = [i for i in drop if i < len(headers)]
    while True:
        widths = [max(len(row[i]) for row in table) for i in cols]
        used = sum(widths) + 2 * (len(cols) - 1)
        if used <= width:
            break
        if flex:
            room = width - (used - widths[-1])
            if room >= min(widths[-1], _FLEX_MIN):
                widths[-1] = room
                break
        if not dropping:
            break
        cols.remove(dropping.pop(0))
    lines = []
    for row in table:
        cells = [_cut(row[i], w).ljust(w) for i, w in zip(cols, widths, strict=True)]
        lines.append(_clip("  ".join(cells).rstrip(), width))
    return lines


def _clock(at: float, utc: bool = False) -> str:
    """A wall-clock time with its zone: ``2026-12-07 20:31:05 UTC``, ``... CET``, or the
    offset (``... +0530``) where the zone has no name of letters."""
    when = datetime.fromtimestamp(at, tz=UTC if utc else None).astimezone(UTC if utc else None)
    zone = when.tzname() or ""
    if not zone.isalpha():
        zone = when.strftime("%z")
    return f"{when:%Y-%m-%d %H:%M:%S} {zone}".rstrip()


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


def _decision_row(d: Mapping[str, Any], steps: Any, utc: bool = False) -> list[str]:
    at = d.get("at")
    when = _clock(at, utc) if isinstance(at, int | float) else "?"
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


_ROLLOUT_DROP = (5, 3, 4)  # ELAPSED, SAMPLES P/C, STEP PROGRESS go first on a narrow terminal
_METRIC_DROP = (5, 4, 2)  # SAMPLES P/C, TOLERANCE, ESTIMATE
_DECISION_DROP = (3, 1)  # BY, STEP


def _times(r: Mapping[str, Any], now: float, utc: bool) -> list[str]:
    """When the rollout started and when its max_duration ends, with the zone (the admin
    API gives durations: they are placed on this machine's clock)."""
    parts = []
    elapsed, deadline_in = r.get("elapsed"), r.get("deadline_in")
    if isinstance(elapsed, int | float):
        parts.append(f"started {_clock(now - elapsed, utc)} ({_duration(elapsed)} ago)")
    terminal = r.get("phase") in ("promoted", "rolled_back")
    if isinstance(deadline_in, int | float) and not terminal:
        when = _clock(now + deadline_in, utc)
        left = f"in {_duration(deadline_in)}" if deadline_in >= 0 else "passed"
        parts.append(f"max_duration ends {when} ({left})")
    return parts


def _rollout_lines(r: Mapping[str, Any], width: int, utc: bool, now: float) -> list[str]:
    """``canary status NAME``: the rollout's row, its times, metrics and last decisions."""
    lines = _table(_ROLLOUT_HEADERS, [_rollout_row(r)], width, drop=_ROLLOUT_DROP)
    times = _times(r, now, utc)
    if times and len("; ".join(times)) <= width:
        lines.append("; ".join(times))
    else:  # one line each on a narrow terminal
        lines += [_cut(t, width) for t in times]
    if r.get("status"):
        lines.append(_cut(f"now: {r['status']}", width))
    metrics = [m for m in r.get("metrics") or [] if isinstance(m, Mapping)]
    net = r.get("net_value")
    if isinstance(net, Mapping):
        metrics.append(net)
    metrics += [g for g in r.get("guards") or [] if isinstance(g, Mapping)]
    lines.append("")
    if metrics:
        rows = [_metric_row(m) for m in metrics]
        lines += _table(_METRIC_HEADERS, rows, width, flex=False, drop=_METRIC_DROP)
    else:
        lines.append("no metrics")
    lines += _promql_lines(r, width)
    decisions = [d for d in r.get("decisions") or [] if isinstance(d, Mapping)]
    decisions.sort(key=_decision_time)
    lines.append("")
    if decisions:
        lines.append(f"last {min(len(decisions), 10)} of {len(decisions)} decision(s):")
        rows = [_decision_row(d, r.get("steps", "?"), utc) for d in decisions[-10:]]
        lines += _table(_DECISION_HEADERS, rows, width, drop=_DECISION_DROP)
    else:
        lines.append("no decisions yet")
    return lines


def _promql_lines(r: Mapping[str, Any], width: int) -> list[str]:
    """Why a promql: metric has no value on an arm (its last answer), one line each."""
    out: list[str] = []
    promql = r.get("promql")
    for name, entry in promql.items() if isinstance(promql, Mapping) else ():
        arms = entry.get("arms") if isinstance(entry, Mapping) else None
        for arm, st in arms.items() if isinstance(arms, Mapping) else ():
            if isinstance(st, Mapping) and st.get("result") not in ("ok", None):
                why = f"promql {name} ({arm}): {st.get('result')}: {st.get('message', '')}"
                out.append(_cut(why, width))
    return out


def _list_lines(rollouts: Sequence[Any], width: int) -> list[str]:
    """``canary status``: one row per rollout."""
    if not rollouts:
        return ["no rollouts"]
    rows = [_rollout_row(r) for r in rollouts if isinstance(r, Mapping)]
    return _table(_ROLLOUT_HEADERS, rows, width, drop=_ROLLOUT_DROP)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def _snapshot(args: argparse.Namespace, client: AdminClient) -> Any:
    """What ``status`` shows, as the admin API answered it."""
    if args.name is not None:
        return client.rollout(args.name)
    return {"rollouts": client.rollouts()}


def _render(args: argparse.Namespace, data: Any, width: int) -> list[str]:
    if args.name is not None:
        return _rollout_lines(data, width, args.utc, time.time())
    return _list_lines(data["rollouts"], width)


def _status(args: argparse.Namespace, client: AdminClient) -> None:
    interval = _watch_interval(args)
    if interval is not None:
        _watch(args, client, interval)
        return
    data = _snapshot(args, client)
    if args.json:
        _print_json(data)
    else:
        print("\n".join(_render(args, data, terminal_width())))


def _watch_interval(args: argparse.Namespace) -> float | None:
    """``--watch [SECONDS]`` (None: no watching). ``status --watch NAME`` reads NAME as the
    rollout, not as seconds."""
    if args.watch is None:
        return None
    try:
        seconds = float(args.watch)
    except ValueError:
        if args.name is not None:
            raise AdminError(
                f"--watch: expected seconds such as 2 or 0.5, got {args.watch!r}", exit_code=2
            ) from None
        args.name, seconds = args.watch, WATCH_DEFAULT
    low, high = _WATCH_RANGE
    if not low <= seconds <= high:  # also NaN
        raise AdminError(
            f"--watch: expected {low:g} to {high:g} seconds, got {args.watch!r}", exit_code=2
        )
    return seconds


# Terminal control (ECMA-48): cursor home, erase to end of line / of screen, hide/show cursor.
_HOME, _ERASE_LINE, _ERASE_BELOW, _ERASE_ALL = "\x1b[H", "\x1b[K", "\x1b[J", "\x1b[2J"
_HIDE_CURSOR, _SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


def _watch(args: argparse.Namespace, client: AdminClient, interval: float) -> None:
    """``status --watch``: a snapshot every ``interval`` seconds until Ctrl-C.

    On a terminal each snapshot redraws the screen in place (cursor home, each line erased to
    its end, the rest of the screen erased; cut to the terminal's width and height); to a
    pipe or file each snapshot is printed after a blank line, without escape codes (with
    ``--json``: one JSON object per line). The admin API not answering shows an error line
    and the watch goes on; a refused token, or a rollout unknown at the first call, ends it
    as ``status`` would.
    """
    from canary.admin_client import AdminUnauthorizedError, AdminUnreachableError

    out = sys.stdout
    tty = out.isatty() and not args.json
    what = "canary status" + (f" {args.name}" if args.name else "")
    shown = False  # a snapshot came through
    last: list[str] = []
    first = True
    if tty:
        out.write(_HIDE_CURSOR + _ERASE_ALL)
    try:
        while True:
            size = shutil.get_terminal_size((DEFAULT_WIDTH, 24))
            width = max(20, size.columns)
            now = time.time()
            try:
                data = _snapshot(args, client)
            except AdminError as exc:
                if isinstance(exc, AdminUnauthorizedError):
                    raise
                if not shown and not isinstance(exc, AdminUnreachableError):
                    raise
                error = f"{_clock(now, args.utc)}: {exc}"
                if args.json:
                    print(f"canary: {error}", file=sys.stderr, flush=True)
                    body = None
                else:
                    body = [_cut(f"error: {error}", width)]
                    if tty and last:
                        body += ["", "last snapshot:", *last]
            else:
                shown = True
                if args.json:
                    body = [json.dumps(data, separators=(",", ":"))]
                else:
                    body = last = _render(args, data, width)
            if body is not None:
                if args.json:
                    lines = body
                else:
                    header = f"every {interval:g}s: {what}    {_clock(now, args.utc)}"
                    lines = [_clip(header, width), *([""] if tty else []), *body]
                if tty:
                    _redraw(out, lines, width, size.lines)
                else:
                    if not first and not args.json:
                        out.write("\n")
                    out.write("\n".join(lines) + "\n")
                out.flush()
                first = False
            time.sleep(interval)
    except KeyboardInterrupt:  # Ctrl-C: the way to stop watching, not an error
        pass
    finally:
        if tty:
            out.write(_SHOW_CURSOR)
            out.flush()


def _redraw(out: Any, lines: list[str], width: int, height: int) -> None:
    """Draw ``lines`` over the previous snapshot: from the top left, each line cut to
    ``width`` and erased to its end, the screen below erased; at most ``height - 1`` lines
    (one more would scroll the screen and break the redrawing in place)."""
    rows = max(height - 1, 1)
    if len(lines) > rows:
        more = len(lines) - rows + 1
        lines = [*lines[: rows - 1], f"… {more} more line(s): a taller terminal shows them"]
    text = "".join(_clip(line, width) + _ERASE_LINE + "\n" for line in lines)
    out.write(_HOME + text + _ERASE_BELOW)


def _action(args: argparse.Namespace, client: AdminClient) -> None:
    action = args.command
    if action == "promote" and not args.full:
        action = "advance"
    answer = client.action(args.name, action, args.reason)
    print(_action_line(args.name, action, answer))


def _action_line(name: str, action: str, answer: Mapping[str, Any]) -> str:
    """What an operator command did: ``fraud: advanced to step 3/4 (weight 25%), phase
    running``; ``fraud: promoted (phase promoted)``."""
    name = str(answer.get("name", name))
    phase = answer.get("phase", "?")
    done = answer.get("action")
    if done == "PROMOTE" or action in ("pause", "resume", "promote", "rollback"):
        verb = "promoted" if done == "PROMOTE" else _PAST[action]
        return f"{name}: {verb} (phase {phase})"
    step = _step(answer) if "steps" in answer else None
    if action == "advance":
        where = f" to step {step}" if step else ""
        return f"{name}: advanced{where} (phase {phase})"
    attempt = answer.get("attempt")
    tries = f", attempt {attempt}" if isinstance(attempt, int) else ""
    where = f" from step {step}" if step else ""
    return f"{name}: retried{where} with fresh samples (phase {phase}{tries})"


def _approve(args: argparse.Namespace, client: AdminClient) -> None:
    answer = client.action(args.name, "approve", args.reason)
    name, gate = answer.get("name", args.name), answer.get("gate", "its gate")
    step = _step(answer) if "steps" in answer else None
    where = f" at step {step}" if step else ""
    print(f"{name}: approved {gate}{where} (phase {answer.get('phase', '?')})")


def _reload(args: argparse.Namespace, client: AdminClient) -> None:
    answer = client.reload()
    names = [str(n) for n in answer.get("rollouts") or []]
    print(f"reloaded: {len(names)} rollout(s)" + (f": {', '.join(names)}" if names else ""))


def _report(args: argparse.Namespace) -> int:
    """``canary report NAME``: from the state store (``--state``) or the admin API."""
    from canary.report import from_admin, render_html, render_markdown, report_from_store

    if args.state == "" and not args.config:
        print("canary report: --state without FILE needs -c FILE (its state:)", file=sys.stderr)
        return 2
    try:
        if args.state is not None:
            config = load_config(args.config) if args.config else None
            where = args.state or None
            if where is not None and where.startswith(("redis://", "rediss://", "unix://")):
                store = {"backend": "redis", "url": where}
            elif where is not None:
                store = {"backend": "sqlite", "path": where}
            else:
                assert config is not None
                s = config.state
                store = {"backend": s.backend, "path": s.path, "url": s.url or ""}
            data = asyncio.run(report_from_store(args.name, config=config, **store))
        else:
            from canary.admin_client import AdminClient

            url, token = resolve_admin(args.admin, args.config, os.environ)
            with AdminClient(url, token, timeout=args.timeout) as client:
                data = from_admin(client, args.name)
        render = render_markdown if args.format == "md" else render_html
        text = render(data, utc=args.utc)
        if args.output in (None, "-"):
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            tmp = f"{args.output}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as out:
                out.write(text)
            os.replace(tmp, args.output)
            print(f"{args.output}: {data.name}: {data.phase} ({len(text):,} bytes)")
    except BrokenPipeError:
        return _closed_pipe()
    except AdminError as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    except CanaryError as exc:  # ConfigError, StoreError, UnknownRollout
        from canary.errors import UnknownRollout

        message = exc.args[0] if isinstance(exc, UnknownRollout) and exc.args else exc
        print(f"canary report: {message}", file=sys.stderr)
        return 4 if isinstance(exc, UnknownRollout) else 1
    except OSError as exc:
        print(f"canary report: cannot write {args.output}: {exc}", file=sys.stderr)
        return 1
    return 0


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
    add_simulate_parser(sub)

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
    status.add_argument(
        "-w",
        "--watch",
        nargs="?",
        const=str(WATCH_DEFAULT),
        default=None,
        metavar="SECONDS",
        help=f"show it again every SECONDS ({WATCH_DEFAULT:g} when omitted) until Ctrl-C: "
        "redrawn in place on a terminal, else a snapshot after a blank line each time "
        "(with --json one JSON object per line); the admin API not answering shows an "
        "error line and the watch goes on",
    )
    status.add_argument(
        "--utc", action="store_true", help="show times in UTC (default: the local time zone)"
    )
    _add_admin_options(status)
    status.set_defaults(func=_admin_command(_status))

    for action, what, more in (
        (
            "promote",
            "move the rollout to its next step now (--full: all traffic to the candidate)",
            "As an automatic advance: the next step's weight, its requests and min_duration "
            "counted from now; from the last step it promotes. From a shadow step the next "
            "step sends real users to the candidate. A paused or held rollout stays paused or "
            "held at the next step.",
        ),
        ("rollback", "send all traffic back to production now", ""),
        ("pause", "stop advancing (traffic split kept) until resume", ""),
        ("resume", "continue a paused rollout", ""),
        (
            "retry",
            "start a rolled-back rollout again from step 1 with the same candidate",
            "Its samples start from zero (those of the attempt that was rolled back no longer "
            "count), the step-1 weights are served, and the decision log keeps the history "
            "with a RETRY entry.",
        ),
    ):
        cmd = sub.add_parser(
            action,
            help=what,
            description=f"{what[0].upper()}{what[1:]}. {more + ' ' if more else ''}{token_note}",
        )
        cmd.add_argument("name", metavar="NAME", help="rollout name")
        if action == "promote":
            cmd.add_argument(
                "--full",
                action="store_true",
                help="promote all the way: the candidate gets 100%% now, from any step",
            )
        cmd.add_argument("--reason", metavar="TEXT", help="recorded in the decision log")
        _add_admin_options(cmd)
        cmd.set_defaults(func=_admin_command(_action))

    approve = sub.add_parser(
        "approve",
        help="open the gate an automatic advance or promotion waits at (docs/gates.md)",
        description="Open the gate (confirm-advance, confirm-promotion) of the transition "
        "pending at the rollout's current step, once: a manual gate, or a webhook gate that "
        "keeps saying no. The approval is stored with the rollout's state (a restart keeps it) "
        "and used when the analysis next calls for the transition; a rollback still happens "
        "if a metric turns out worse. " + token_note,
    )
    approve.add_argument("name", metavar="NAME", help="rollout name")
    approve.add_argument("--reason", metavar="TEXT", help="recorded in the decision log")
    _add_admin_options(approve)
    approve.set_defaults(func=_admin_command(_approve))

    reload = sub.add_parser(
        "reload",
        help="make a running canary re-read its rollout file",
        description="Make a running canary re-read its rollout file. " + token_note,
    )
    _add_admin_options(reload)
    reload.set_defaults(func=_admin_command(_reload))

    report = sub.add_parser(
        "report",
        help="write a rollout's report: one self-contained HTML file, or Markdown",
        description="A report of one rollout, running or finished: outcome and why, weights "
        "over time, each metric's interval over time against its tolerance, per-arm "
        "distributions, cost per 1k inferences, the decision log. From the admin API of a "
        "running canary, or with --state straight from the state store (read-only, no "
        "canary needed). " + token_note,
    )
    report.add_argument("name", metavar="NAME", help="rollout name")
    report.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default: stdout)")
    report.add_argument(
        "--format", choices=("html", "md"), default="html", help="html (default) or md"
    )
    report.add_argument(
        "--state",
        nargs="?",
        const="",
        default=None,
        metavar="FILE|URL",
        help="read the state store instead of the admin API: a SQLite file, a redis:// URL, "
        "or (no value) the state: section of -c FILE; -c FILE also gives the rollout's "
        "metrics, steps and pricing",
    )
    report.add_argument(
        "--utc", action="store_true", help="show times in UTC (default: the local time zone)"
    )
    _add_admin_options(report)
    report.set_defaults(func=_report)
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
    "DEFAULT_WIDTH",
    "WATCH_CONFIG_DEFAULT",
    "WATCH_DEFAULT",
    "build_parser",
    "main",
    "resolve_admin",
    "terminal_width",
]
