"""Load a rollout file: YAML -> typed frozen :class:`Config`, or every error with its line."""

from __future__ import annotations

import functools
import os
import re
import reprlib
import types
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from canary.config._models import Config, MatchConfig
from canary.errors import ConfigError, ConfigIssue

# Limits of a rollout file. A real one is a few KiB with a few hundred values nested a handful
# of levels deep; these bound the time and memory reading any file can take (an alias "billion
# laughs" bomb, 100k-deep nesting, a huge file: under a second each), and each has its message.
MAX_FILE_BYTES = 1024 * 1024  # 1 MiB
MAX_DEPTH = 64  # nesting of mappings and lists, aliases expanded
MAX_NODES = 20_000  # values (scalars, lists, mappings) with every alias counted as a copy
MAX_QUOTE = 80  # characters of a bad value quoted in a message
MAX_ISSUES = 100  # errors listed; the rest are counted


class _LimitError(yaml.YAMLError):
    """A limit of the rollout file was exceeded while composing; ``mark`` says where."""

    def __init__(self, message: str, mark: yaml.Mark | None) -> None:
        super().__init__(message)
        self.message = message
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """SafeLoader that reports duplicate keys instead of silently keeping the last one, and
    bounds nesting depth and the size of the document with aliases expanded."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicate_keys: list[tuple[yaml.Node, str]] = []
        self._depth = 0
        # id(node) -> (values in it with aliases expanded, nesting depth with aliases expanded);
        # a node is entered here once it is complete, so an alias to a node still being
        # composed (a recursive structure) finds no entry.
        self._sizes: dict[int, tuple[int, int]] = {}
        self._total = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)
            known = self._sizes.get(id(node))
            if known is None:
                raise _LimitError(
                    f"alias *{_clip(str(event.anchor), 40)} refers to a node that contains it "
                    "(a recursive structure)",
                    event.start_mark,
                )
            size, depth = known
            self._count(size, depth, event.start_mark)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _LimitError(
                f"nesting deeper than {MAX_DEPTH} levels (a rollout file needs fewer than 10)",
                self.peek_event().start_mark,
            )
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is None:
            return None
        size, depth = 1, 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                s, d = self._sizes[id(child)]
                size, depth = size + s, max(depth, d + 1)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                for child in (key, value):
                    s, d = self._sizes[id(child)]
                    size, depth = size + s, max(depth, d + 1)
        self._sizes[id(node)] = (size, depth)
        if not isinstance(node, yaml.ScalarNode):
            self._count(0, depth, node.start_mark)
        self._total += 1
        self._check_total(node.start_mark)
        return node

    def _count(self, size: int, depth: int, mark: yaml.Mark | None) -> None:
        """An alias used here adds its node's expanded size and depth to the document."""
        if depth + self._depth > MAX_DEPTH:
            raise _LimitError(
                f"nesting deeper than {MAX_DEPTH} levels once aliases are expanded", mark
            )
        self._total += size
        self._check_total(mark)

    def _check_total(self, mark: yaml.Mark | None) -> None:
        if self._total > MAX_NODES:
            raise _LimitError(
                f"more than {MAX_NODES:,} values once aliases are expanded (an alias counts as a "
                "copy of what it refers to; a rollout file needs a few hundred)",
                mark,
            )

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    self.duplicate_keys.append((key_node, _clip(str(key), MAX_QUOTE)))
                seen.add(key)
            except TypeError:
                pass  # an unhashable key; SafeLoader itself reports it
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads `on`, `off`, `yes` and `no` as booleans, which would turn the webhook key `on:`
# into True. Accept only true/false as booleans (the YAML 1.2 rule).
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def _format_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _node_at(root: yaml.Node | None, loc: tuple[Any, ...]) -> yaml.Node | None:
    """Deepest YAML node along ``loc`` (for the line number of an error)."""
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                    nxt = v
                    break
            if nxt is None:
                return node
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return node
            node = node.value[part]
        else:
            return node
    return node


def _key_node_at(root: yaml.Node | None, loc: tuple[Any, ...]) -> yaml.Node | None:
    """The key node of the last element of ``loc`` (unknown keys point at the key itself)."""
    parent = _node_at(root, loc[:-1])
    if isinstance(parent, yaml.MappingNode):
        for k, _ in parent.value:
            if isinstance(k, yaml.ScalarNode) and k.value == str(loc[-1]):
                return k
    return _node_at(root, loc)


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None else None


_REPR = reprlib.Repr()
_REPR.maxstring = MAX_QUOTE
_REPR.maxother = MAX_QUOTE
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = 5
_REPR.maxdict = 4
_REPR.maxlevel = 3
_LONG_QUOTE = re.compile(rf"'([^'\n]{{{MAX_QUOTE}}})[^'\n]+'")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _short(value: object) -> str:
    """A bad value as quoted in a message: its repr, cut to about ``MAX_QUOTE`` characters."""
    return _clip(_REPR.repr(value), MAX_QUOTE + 10)


def _clip_message(message: str) -> str:
    """Cut long quoted values inside a message (a validator's ``got {v!r}``), and the whole."""
    return _clip(_LONG_QUOTE.sub(r"'\1...'", message), 400)


def _field_at(loc: tuple[Any, ...]) -> FieldInfo | None:
    """The model field a pydantic error location ends at (None: a list item, a dict value)."""
    tp: Any = Config
    info: FieldInfo | None = None
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(part, int):
            if get_origin(tp) is not list:
                return None
            tp, info = get_args(tp)[0], None
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            info = tp.model_fields.get(str(part))
            if info is None:
                return None
            tp = info.annotation
        elif get_origin(tp) is dict:
            tp, info = get_args(tp)[1], None
        else:
            return None
    return info


def _unwrap(tp: Any) -> Any:
    """``X | None`` and ``Annotated[X, ...]`` -> X."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _bounds(info: FieldInfo | None, ctx: dict[str, Any]) -> str:
    """The allowed range of a number, in words: 'greater than 0 and less than 0.5'."""
    found: dict[str, Any] = {}
    for meta in info.metadata if info is not None else ():
        for attr in ("gt", "ge", "lt", "le"):
            if getattr(meta, attr, None) is not None:
                found[attr] = getattr(meta, attr)
    for attr in ("gt", "ge", "lt", "le"):  # the bound that failed, when not found above
        if attr in ctx:
            found.setdefault(attr, ctx[attr])
    if "ge" in found and "le" in found:
        return f"between {found['ge']} and {found['le']}"
    low = (
        f"greater than {found['gt']}"
        if "gt" in found
        else f"at least {found['ge']}"
        if "ge" in found
        else ""
    )
    high = (
        f"less than {found['lt']}"
        if "lt" in found
        else f"at most {found['le']}"
        if "le" in found
        else ""
    )
    return " and ".join(part for part in (low, high) if part)


_TYPE_WORDS = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dict_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
}


def _message(err: Any, loc: tuple[Any, ...]) -> str:
    """canary's wording of a pydantic error: the key, the bad value, what is allowed."""
    kind = err["type"]
    bad = err.get("input")
    ctx: dict[str, Any] = err.get("ctx") or {}
    key = next((str(p) for p in reversed(loc) if not isinstance(p, int)), "value")
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; unknown keys are not ignored)"
    if kind == "missing":
        return "required key is missing"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        return _clip_message(msg[len("Value error, ") :])
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{key} must be {_bounds(_field_at(loc), ctx)}, got {_short(bad)}"
    if kind == "too_short":
        n = ctx.get("min_length", 1)
        return f"{key} must list at least {n} item{'s' if n != 1 else ''}, got {_short(bad)}"
    if kind == "too_long":
        return (
            f"{key} may list at most {ctx.get('max_length')} items, got {ctx.get('actual_length')}"
        )
    if kind == "literal_error":
        return f"{key} must be one of {ctx.get('expected', '?')}, got {_short(bad)}"
    if kind in _TYPE_WORDS:
        return f"expected {_TYPE_WORDS[kind]}, got {_short(bad)}"
    return _clip_message(f"{msg.replace('Input should be', 'expected')}, got {_short(bad)}")


def _location(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic adds the validator's tag for `Annotated` / union members; keep only real keys.
    return tuple(
        p for p in loc if isinstance(p, int) or not str(p).startswith(("function-", "tagged-"))
    )


_BAD_CHAR = re.compile("[^\t\n\r\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_NOT_TEXT = "a rollout file is UTF-8 YAML text; is this a binary file?"


def _too_large(size: int | None) -> ConfigIssue:
    """``size`` None: unknown (a device or a pipe), only that it is beyond the limit."""
    what = f"{size:,} bytes" if size is not None else f"larger than {MAX_FILE_BYTES:,} bytes"
    return ConfigIssue(
        "",
        f"the file is {what}; a rollout file may be at most {MAX_FILE_BYTES:,} bytes "
        f"({MAX_FILE_BYTES // 1024 // 1024} MiB)",
    )


def _position(text: str, index: int) -> tuple[int, int]:
    """1-based line and column of ``text[index]``."""
    return text.count("\n", 0, index) + 1, index - (text.rfind("\n", 0, index) + 1) + 1


def _text_issues(text: str) -> list[ConfigIssue]:
    """Refuse what is not a rollout file before YAML sees it: too large, binary, control bytes."""
    if len(text) > MAX_FILE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        return [_too_large(len(text.encode("utf-8", "surrogatepass")))]
    m = _BAD_CHAR.search(text)
    if m is None:
        return []
    line, column = _position(text, m.start())
    char = m.group()
    what = "a NUL byte" if char == "\0" else f"the control character U+{ord(char):04X}"
    return [ConfigIssue("", f"contains {what} at line {line}, column {column}: {_NOT_TEXT}", line)]


def decode_config(raw: bytes, source: str | None = None) -> str:
    """The text of a rollout file's bytes; :class:`ConfigError` when too large or not UTF-8."""
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError([_too_large(len(raw))], source)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            [
                ConfigIssue(
                    "",
                    f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at line {line}, column "
                    f"{column}): {_NOT_TEXT}",
                    line,
                )
            ],
            source,
        ) from None


def parse_yaml_text(text: str, source: str | None = None) -> Any:
    """The data of a YAML text within the rollout file's limits (no validation against the
    models); :class:`ConfigError` when it is not."""
    return _parse(text, source)[1]


def _parse(text: str, source: str | None) -> tuple[yaml.Node | None, Any, list[ConfigIssue]]:
    """(root node, data, duplicate-key issues) of a rollout file's text, within the limits."""
    issues = _text_issues(text)
    if issues:
        raise ConfigError(issues, source)
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except _LimitError as exc:
        line = exc.mark.line + 1 if exc.mark is not None else None
        raise ConfigError([ConfigIssue("", exc.message, line)], source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        line = mark.line + 1 if mark is not None else None
        message = _clip_message(f"invalid YAML: {problem}")
        raise ConfigError([ConfigIssue("", message, line)], source) from None
    except RecursionError:  # not expected within MAX_DEPTH; never a traceback
        raise ConfigError([ConfigIssue("", "nesting too deep")], source) from None
    finally:
        loader.dispose()
    duplicates = [
        ConfigIssue("", f"duplicate key {key!r}", _line(node))
        for node, key in loader.duplicate_keys
    ]
    return root, data, duplicates


def load_config_text(text: str, source: str | None = None) -> Config:
    """Parse and validate a rollout file's text; raise :class:`ConfigError` listing every issue."""
    root, data, issues = _parse(text, source)
    if not isinstance(data, dict):
        issues.append(ConfigIssue("", f"expected a mapping with 'rollouts', got {_short(data)}", 1))
        raise ConfigError(issues, source)

    try:
        config: Config | None = Config.model_validate(data)
    except ValidationError as exc:
        config = None
        issues += _validation_issues(exc, (), root)
        issues += _more_issues(data, exc, root)
    issues += _cross_rollout_issues(data.get("rollouts"), root)
    if issues or config is None:
        if len(issues) > MAX_ISSUES:
            more = len(issues) - MAX_ISSUES
            issues = [*issues[:MAX_ISSUES], ConfigIssue("", f"... and {more:,} more errors")]
        raise ConfigError(issues, source)
    return config


def _validation_issues(
    exc: ValidationError, prefix: tuple[Any, ...], root: yaml.Node | None
) -> list[ConfigIssue]:
    out = []
    for err in exc.errors():
        loc = prefix + _location(tuple(err["loc"]))
        node = _key_node_at(root, loc) if err["type"] == "extra_forbidden" else _node_at(root, loc)
        out.append(ConfigIssue(_format_path(loc), _message(err, loc), _line(node)))
    return out


def _more_issues(
    data: dict[Any, Any], exc: ValidationError, root: yaml.Node | None
) -> list[ConfigIssue]:
    """The cross-field errors pydantic did not reach because some field failed.

    pydantic runs a model's ``mode="after"`` checks only when every field of the model is
    valid, so a file with a typo in one metric and a tradeoff naming an unknown metric took one
    round of `validate` per nesting level. Here every model on the way to a failed field is
    rebuilt from its fields that did validate, the failed ones replaced by :data:`_FAILED`, and
    its checks run: a check that reads a failed field is skipped (it cannot be decided), every
    other check reports what it finds now.
    """
    bad = {_location(tuple(err["loc"])) for err in exc.errors()}
    if len(bad) > MAX_ISSUES:  # enough to fix first (and the search below is O(errors x size))
        return []
    found: list[tuple[tuple[Any, ...], str]] = []
    try:
        _partial(Config, data, (), bad, found)
    except RecursionError:  # not expected (depth is bounded); the field errors still stand
        return []
    return [ConfigIssue(_format_path(loc), msg, _line(_node_at(root, loc))) for loc, msg in found]


class _Unavailable(Exception):
    """A check read a field that failed validation: it cannot be decided, skip it."""


class _Failed:
    """Stands in for a value that failed validation: any use of it raises _Unavailable."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        raise _Unavailable

    def _refuse(self, *args: object) -> Any:
        raise _Unavailable

    __bool__ = __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __iter__ = __len__ = __contains__ = __getitem__ = __hash__ = _refuse
    __str__ = __repr__ = __format__ = __add__ = __radd__ = __sub__ = __mul__ = _refuse


_FAILED: Any = _Failed()


def _under(bad: set[tuple[Any, ...]], loc: tuple[Any, ...]) -> bool:
    n = len(loc)
    return any(b[:n] == loc for b in bad)


def _partial(
    tp: Any,
    data: object,
    loc: tuple[Any, ...],
    bad: set[tuple[Any, ...]],
    found: list[tuple[tuple[Any, ...], str]],
) -> Any:
    """``data`` validated as ``tp`` as far as it goes: failed parts are ``_FAILED``; the
    checks of models with failed parts run on what validated (their errors go to ``found``)."""
    tp = _unwrap(tp)
    is_model = isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(data, dict)
    if loc in bad and not is_model:  # the value itself failed: already reported
        return _FAILED
    if not _under(bad, loc):
        try:
            return _adapter(tp).validate_python(data)
        except (ValidationError, TypeError):
            return _FAILED
    if get_origin(tp) is list and isinstance(data, list):
        (item,) = get_args(tp)
        return [_partial(item, x, (*loc, i), bad, found) for i, x in enumerate(data)]
    if get_origin(tp) is dict and isinstance(data, dict):
        _, value = get_args(tp)
        return {k: _partial(value, v, (*loc, k), bad, found) for k, v in data.items()}
    if not is_model or not isinstance(data, dict):
        return _FAILED
    # a model that failed its own checks still serves its parent's with its valid fields
    return _partial_model(tp, data, loc, bad, found, run_checks=loc not in bad)


def _partial_model(
    model: type[BaseModel],
    data: dict[Any, Any],
    loc: tuple[Any, ...],
    bad: set[tuple[Any, ...]],
    found: list[tuple[tuple[Any, ...], str]],
    *,
    run_checks: bool,
) -> Any:
    checks = model.__pydantic_decorators__.model_validators.values()
    if any(c.info.mode == "wrap" for c in checks):
        return _FAILED
    try:
        for check in checks:
            if check.info.mode == "before":  # shorthands such as `- shadow:` (null)
                data = check.func(data)
    except Exception:
        return _FAILED
    if not isinstance(data, dict):
        return _FAILED
    instance = model.model_construct()  # the defaults; required fields unset
    validator = model.__pydantic_validator__
    for name, info in model.model_fields.items():
        key = info.alias or name
        floc = (*loc, key)
        if _under(bad, floc):
            value = _partial(info.annotation, data[key], floc, bad, found) if key in data else None
            instance.__dict__[name] = _FAILED if value is None else value
        elif key in data:
            # validate_assignment sets the field once it validated (with its field validators),
            # then runs the model's checks on this unfinished instance: their complaints mean
            # nothing yet. A field that did not validate stays _FAILED.
            instance.__dict__[name] = _FAILED
            try:
                validator.validate_assignment(instance, name, data[key])
            except Exception:
                pass
    for check in checks:
        if check.info.mode != "after" or not run_checks:
            continue
        try:
            check.func(instance)
        except _Unavailable:
            continue
        except ValueError as exc:
            message = _clip_message(str(exc))
            if not any(loc == f and message == m for f, m in found):
                found.append((loc, message))
        except Exception:  # a check tripping over a missing required field: undecidable
            continue
    return instance


@functools.lru_cache(maxsize=256)
def _adapter(tp: Any) -> TypeAdapter[Any]:
    return TypeAdapter(tp)


def _cross_rollout_issues(rollouts: object, root: yaml.Node | None) -> list[ConfigIssue]:
    """Duplicate names and overlapping matches, checked on the raw data so that they are
    reported together with every other error."""
    if not isinstance(rollouts, list):
        return []
    issues = []
    seen_names: dict[str, int] = {}
    matches: list[tuple[int, str, MatchConfig]] = []
    for i, raw in enumerate(rollouts):
        if not isinstance(raw, dict):
            continue
        name = raw.get("name")
        if isinstance(name, str):
            if name in seen_names:
                loc: tuple[Any, ...] = ("rollouts", i, "name")
                issues.append(
                    ConfigIssue(
                        _format_path(loc),
                        f"duplicate rollout name {_short(name)} "
                        f"(also rollouts[{seen_names[name]}])",
                        _line(_node_at(root, loc)),
                    )
                )
            seen_names.setdefault(name, i)
        try:
            match = MatchConfig.model_validate(raw.get("match", {}))
        except ValidationError:
            continue  # already reported with its key path
        for j, other_name, other in matches:
            if match.overlaps(other):
                loc = ("rollouts", i, "match")
                # Model rules overlap only through the names both serve: say which.
                models = sorted(set(match.model or ()) & set(other.model or ()))
                issues.append(
                    ConfigIssue(
                        _format_path(loc),
                        f"match (path_prefix {_short(match.path_prefix)}, host "
                        f"{_short(match.host)}{f', model {models}' if models else ''}) "
                        f"overlaps rollouts[{j}] ({_short(other_name)}); "
                        "a request must belong to one rollout",
                        _line(_node_at(root, loc)),
                    )
                )
        matches.append((i, name if isinstance(name, str) else "?", match))
    return issues


def read_config_text(path: str | Path) -> str:
    """A rollout file's text: at most ``MAX_FILE_BYTES``, UTF-8; :class:`ConfigError` if not."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_FILE_BYTES:  # refused without reading it
                raise ConfigError([_too_large(size)], str(p))
            raw = f.read(MAX_FILE_BYTES + 1)  # a pipe or device may say 0 and never end
    except OSError as exc:
        raise ConfigError(
            [ConfigIssue("", f"cannot read {p}: {exc.strerror or exc}")], str(p)
        ) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError([_too_large(None)], str(p))
    return decode_config(raw, str(p))


def load_config(path: str | Path) -> Config:
    """Read and validate a rollout file (blocking: run it off the event loop)."""
    return load_config_text(read_config_text(path), str(path))


def load_config_result(path: str) -> tuple[Config | None, list[ConfigIssue]]:
    """:func:`load_config` for a worker process: ``(config, [])`` or ``(None, issues)`` (a
    ConfigError does not survive pickling; both values do)."""
    try:
        return load_config(path), []
    except ConfigError as exc:
        return None, exc.issues


__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_ISSUES",
    "MAX_NODES",
    "MAX_QUOTE",
    "decode_config",
    "load_config",
    "load_config_result",
    "load_config_text",
    "parse_yaml_text",
    "read_config_text",
]
