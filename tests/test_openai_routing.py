"""OpenAI routing without servers: finding and splicing the body's model, the route table's
model rules, their config checks; and the fake model's served names and endpoints."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import textwrap
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canary.config import MatchConfig, load_config_text
from canary.decision.state import fingerprint
from canary.errors import ConfigError
from canary.proxy.openai import ModelError, find_model, is_model_path, model_json
from canary.proxy.routing import NEEDS_MODEL, RouteTable
from loadtest.fake_model import FakeModelConfig, build_parser, config_from_args, running_fake_model

# -- finding the model ---------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    doc=st.dictionaries(st.text().filter(lambda k: k != "model"), _json_values, max_size=5),
    name=st.text(min_size=1),
    at=st.integers(0, 5),
    ascii_only=st.booleans(),
    indent=st.sampled_from([None, 0, 2, "\t"]),
    new=st.text(min_size=1),
)
def test_the_model_is_found_and_spliced_in_any_serialisation(
    doc: dict[str, Any], name: str, at: int, ascii_only: bool, indent: Any, new: str
) -> None:
    items = list(doc.items())
    items.insert(min(at, len(items)), ("model", name))
    body = json.dumps(dict(items), ensure_ascii=ascii_only, indent=indent).encode()
    field = find_model(body)
    assert field.name == name
    assert json.loads(body[field.start : field.end]) == name  # the span is the value's bytes
    out = field.with_model(model_json(new))
    assert out[: field.start] == body[: field.start] and out.endswith(body[field.end :])
    assert json.loads(out) == {**dict(items), "model": new}
    assert field.with_model(None) is body


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "model_missing"),
        (b"  \n", "model_missing"),
        (b"{}", "model_missing"),
        (b'{"messages": [{"model": "m"}], "tools": {"model": "m"}}', "model_missing"),
        (b'{"model": null}', "model_missing"),
        (b'{"model": ""}', "model_missing"),
        (b'{"model": ["m"]}', "model_missing"),
        (b'{"model": "a", "x": 1, "model": "a"}', "model_duplicate"),
        (b'{"model": "a", "\\u006dodel": "b"}', "model_duplicate"),  # an escaped key is a key
        (b'"model"', "model_bad_json"),
        (b'{"model": "a"', "model_bad_json"),
        (b'{"model": "a",}', "model_bad_json"),
        (b'{"model": "a"}}', "model_bad_json"),
        (b'{"model" "a"}', "model_bad_json"),
        (b"{'model': 'a'}", "model_bad_json"),
        (b'{"model": "a\x01"}', "model_bad_json"),  # a raw control character in a string
        (b'{"model": "a", "x": tru}', "model_bad_json"),
        (b'\xef\xbb\xbf{"model": "a"}', "model_bad_json"),  # a BOM, as json.loads refuses it
        (b'{"model": "\xc3"}', "model_bad_json"),  # not UTF-8
        (b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b', "model": "a"}', "model_bad_json"),
    ],
)
def test_bodies_without_one_readable_model_say_why(body: bytes, reason: str) -> None:
    with pytest.raises(ModelError) as info:
        find_model(body)
    assert info.value.reason == reason and info.value.status == 400
    err = json.loads(info.value.body())["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "model"


def test_escapes_and_non_ascii_keep_byte_offsets() -> None:
    body = '{"p": "ü🙂\\"model\\": \\"x\\"", "model": "a\\u00fc\\/b"}'.encode()
    field = find_model(body)
    assert field.name == "aü/b"
    assert body[field.start : field.end] == b'"a\\u00fc\\/b"'
    assert (
        field.with_model(model_json("é"))
        == '{"p": "ü🙂\\"model\\": \\"x\\"", "model": "\\u00e9"}'.encode()
    )


def test_model_paths_are_the_three_openai_endpoints_below_any_prefix() -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/gw/v1/embeddings"):
        assert is_model_path(path)
    for path in ("/v1/models", "/v1/chat/completions/", "/v1/responses", "/completions", "/"):
        assert not is_model_path(path)


# -- the route table -----------------------------------------------------------------------------


def _table(*rules: tuple[dict[str, Any], str]) -> RouteTable:
    return RouteTable([(MatchConfig(**m), name) for m, name in rules])


def test_model_rules_own_model_paths_and_win_over_model_less_ones() -> None:
    t = _table(
        ({"path_prefix": "/"}, "rest"),
        ({"model": "a"}, "a"),
        ({"model": ["b", "c"]}, "bc"),
        ({"path_prefix": "/gw", "model": "a"}, "gw-a"),
        ({"host": "x.example", "path_prefix": "/"}, "host-x"),
    )
    assert t.lookup(None, "/v1/chat/completions") is NEEDS_MODEL
    assert t.lookup(None, "/v1/models") == "rest"  # not a model path: model rules skip it
    assert t.lookup(None, "/gw/v1/models") == "rest"
    assert t.lookup("x.example:8080", "/v1/embeddings") == "host-x"  # the host decides first
    assert t.lookup_model(None, "/v1/embeddings", "a") == "a"
    assert t.lookup_model(None, "/v1/embeddings", "c") == "bc"
    assert t.lookup_model(None, "/v1/embeddings", "zz") == "rest"  # the model-less rule
    assert t.lookup_model(None, "/v1/embeddings", None) == "rest"
    assert t.lookup_model(None, "/gw/v1/completions", "a") == "gw-a"  # longest prefix
    assert t.lookup_model(None, "/gw/v1/completions", "b") == "bc"
    only_models = _table(({"model": "a"}, "a"))
    assert only_models.lookup(None, "/v1/completions") is NEEDS_MODEL
    assert only_models.lookup(None, "/predict") is None
    assert only_models.lookup_model(None, "/v1/completions", "b") is None
    assert only_models.lookup_model(None, "/v1/completions", None) is None


# -- config --------------------------------------------------------------------------------------


def _rollout(name: str, port: int, extra: str = "", arm: str = "") -> str:
    return textwrap.indent(
        textwrap.dedent(f"""\
        - name: {name}
          production: {{endpoints: [http://127.0.0.1:{port}]{arm}}}
          candidate: {{endpoints: [http://127.0.0.1:{port + 1}]}}
          steps: [{{weight: 5}}]
        """)
        + textwrap.indent(extra, "  "),
        "  ",
    )


def _issues(*rollouts: str) -> list[tuple[str, str, int | None]]:
    with pytest.raises(ConfigError) as info:
        load_config_text("rollouts:\n" + "".join(rollouts))
    return [(i.path, i.message, i.line) for i in info.value.issues]


def test_match_model_takes_one_name_or_a_list() -> None:
    cfg = load_config_text(
        "rollouts:\n"
        + _rollout("a", 8001, "match: {model: llama-3.1-8b}\n", ", model: ' x'").replace(
            "' x'", "meta-llama/Llama-3.1-8B:q4"
        )
        + _rollout("b", 8003, "match: {model: [mistral, mistral-7b]}\n")
        + _rollout("rest", 8005)
    )
    a, b, rest = cfg.rollouts
    assert a.match.model == ["llama-3.1-8b"] and b.match.model == ["mistral", "mistral-7b"]
    assert a.production.model == "meta-llama/Llama-3.1-8B:q4" and a.candidate.model is None
    assert rest.match.model is None


def test_model_rules_overlap_only_through_a_shared_name() -> None:
    found = _issues(
        _rollout("a", 8001, "match: {model: [x, y]}\n"),
        _rollout("b", 8003, "match: {model: [y, z]}\n"),
    )
    assert found == [
        (
            "rollouts[1].match",
            "match (path_prefix '/', host None, model ['y']) overlaps rollouts[0] ('a'); "
            "a request must belong to one rollout",
            11,
        )
    ]
    # different prefixes that nest, the same name: the same overlap as without models
    assert _issues(
        _rollout("a", 8001, "match: {model: x}\n"),
        _rollout("b", 8003, "match: {model: x, path_prefix: /gw}\n"),
    )[0][1].startswith("match (path_prefix '/gw', host None, model ['x']) overlaps")
    assert not MatchConfig(model=["x"]).overlaps(MatchConfig())


@pytest.mark.parametrize(
    ("extra", "arm", "path", "message"),
    [
        ("match: {model: []}\n", "", "rollouts[0].match.model", "at least one model name"),
        ("match: {model: [a, b, a]}\n", "", "rollouts[0].match.model", "duplicate model names"),
        ("match: {model: 7}\n", "", "rollouts[0].match.model", "a model name or a list"),
        ("match: {models: a}\n", "", "rollouts[0].match.models", "unknown key"),
        ("", ', model: ""', "rollouts[0].production.model", "1-256 printable"),
        ("", ', model: "a\\tb"', "rollouts[0].production.model", "1-256 printable"),
        ("", f", model: {'m' * 257}", "rollouts[0].production.model", "1-256 printable"),
    ],
)
def test_bad_model_settings_name_their_key(extra: str, arm: str, path: str, message: str) -> None:
    found = _issues(_rollout("a", 8001, extra, arm))
    assert any(p == path and message in m for p, m, _ in found), found


def test_a_new_served_model_name_starts_a_new_rollout() -> None:
    def fp(arm: str) -> str:
        return fingerprint(
            load_config_text("rollouts:\n" + _rollout("a", 8001, "", arm)).rollouts[0]
        )

    plain = fp("")
    assert fp("") == plain
    assert fp(", model: x") != plain and fp(", model: y") != fp(", model: x")
    # Without models the fingerprint is what it was before models existed: stored rollouts
    # resume after an upgrade.
    before = hashlib.blake2b(b"http://127.0.0.1:8001|http://127.0.0.1:8002", digest_size=8)
    assert plain == before.hexdigest()


# -- the fake model ------------------------------------------------------------------------------


async def test_fake_model_accepts_only_its_served_names() -> None:
    cfg = FakeModelConfig(model="a", served_models=("a", "alias"), latency="fixed",
                          latency_median=0.0, ttft=0.0, inter_token=0.0)  # fmt: skip
    async with running_fake_model(cfg) as url, httpx.AsyncClient() as http:
        answers = {
            path: [
                await http.post(url + path, json={"model": m, **body})
                for m in ("a", "alias", "b", None)
            ]
            for path, body in (
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                ("/v1/completions", {"prompt": "x"}),
                ("/v1/embeddings", {"input": "x", "encoding_format": "float"}),
            )
        }
        tokens = {"model": "a", "input": [[1, 2], [3]], "dimensions": 4}
        b64 = await http.post(url + "/v1/embeddings", json={**tokens, "encoding_format": "base64"})
        floats = await http.post(url + "/v1/embeddings", json=tokens)  # the API's default
    for path, (a, alias, b, missing) in answers.items():
        assert a.status_code == alias.status_code == 200, (path, a.text)
        assert b.status_code == 404 and missing.status_code == 400, path
        err = b.json()["error"]
        assert (
            err["code"] == "model_not_found" and err["param"] == "model" and "`b`" in err["message"]
        )
    comp = answers["/v1/completions"][0].json()
    assert comp["object"] == "text_completion" and comp["choices"][0]["text"]
    assert comp["usage"]["completion_tokens"] == 16
    decoded = [
        list(struct.unpack("<4f", base64.b64decode(d["embedding"]))) for d in b64.json()["data"]
    ]
    plain = [d["embedding"] for d in floats.json()["data"]]
    assert len(decoded) == len(plain) == 2
    for got, want in zip(decoded, plain, strict=True):  # float32 of the same vectors
        assert got == pytest.approx(want, rel=1e-6)
    assert sum(x * x for x in plain[0]) == pytest.approx(1.0)


async def test_fake_model_accepts_any_name_by_default() -> None:
    async with running_fake_model(FakeModelConfig(model="a", ttft=0.0)) as url:
        async with httpx.AsyncClient() as http:
            r = await http.post(url + "/v1/completions", json={"model": "zz", "prompt": "x"})
    assert r.status_code == 200 and r.json()["model"] == "a"


def test_fake_model_cli_takes_served_model_names() -> None:
    args = build_parser().parse_args(["--served-model-name", "a", "b"])
    assert config_from_args(args).served_models == ("a", "b")
    assert config_from_args(build_parser().parse_args([])).served_models == ()
    assert FakeModelConfig(served_models="one").served_models == ("one",)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="served_models"):
        FakeModelConfig(served_models=("",))
