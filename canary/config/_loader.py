"""Load a rollout file: YAML -> typed frozen :class:`Config`, or every error with its line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from canary.config._models import Config, MatchConfig
from canary.errors import ConfigError, ConfigIssue


class _Loader(yaml.SafeLoader):
    """SafeLoader that reports duplicate keys instead of silently keeping the last one."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicate_keys: list[tuple[yaml.Node, str]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    self.duplicate_keys.append((key_node, str(key)))
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


def _message(err: Any) -> str:
    kind = err["type"]
    bad = err.get("input")
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; unknown keys are not ignored)"
    if kind == "missing":
        return "required key is missing"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        return msg[len("Value error, ") :]
    if kind in ("model_type", "dict_type"):
        return f"expected a mapping, got {bad!r}"
    if kind == "list_type":
        return f"expected a list, got {bad!r}"
    return f"{msg}, got {bad!r}"


def _location(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic adds the validator's tag for `Annotated` / union members; keep only real keys.
    return tuple(
        p for p in loc if isinstance(p, int) or not str(p).startswith(("function-", "tagged-"))
    )


def load_config_text(text: str, source: str | None = None) -> Config:
    """Parse and validate a rollout file's text; raise :class:`ConfigError` listing every issue."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError([ConfigIssue("", f"invalid YAML: {problem}", line)], source) from None
    finally:
        loader.dispose()

    issues = [
        ConfigIssue("", f"duplicate key {key!r}", _line(node))
        for node, key in loader.duplicate_keys
    ]
    if not isinstance(data, dict):
        issues.append(ConfigIssue("", f"expected a mapping with 'rollouts', got {data!r}", 1))
        raise ConfigError(issues, source)

    try:
        config: Config | None = Config.model_validate(data)
    except ValidationError as exc:
        config = None
        for err in exc.errors():
            loc = _location(tuple(err["loc"]))
            node = (
                _key_node_at(root, loc) if err["type"] == "extra_forbidden" else _node_at(root, loc)
            )
            issues.append(ConfigIssue(_format_path(loc), _message(err), _line(node)))
    issues += _cross_rollout_issues(data.get("rollouts"), root)
    if issues or config is None:
        raise ConfigError(issues, source)
    return config


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
                        f"duplicate rollout name {name!r} (also rollouts[{seen_names[name]}])",
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
                issues.append(
                    ConfigIssue(
                        _format_path(loc),
                        f"match (path_prefix {match.path_prefix!r}, host {match.host!r}) overlaps "
                        f"rollouts[{j}] ({other_name!r}); a request must belong to one rollout",
                        _line(_node_at(root, loc)),
                    )
                )
        matches.append((i, str(name), match))
    return issues


def load_config(path: str | Path) -> Config:
    """Read and validate a rollout file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [ConfigIssue("", f"cannot read {p}: {exc.strerror or exc}")], str(p)
        ) from None
    return load_config_text(text, str(p))
