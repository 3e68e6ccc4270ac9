"""OpenAI-compatible routing: the request body's top-level ``model``, read and rewritten.

Requests to the model-routed paths (a path ending in ``/v1/chat/completions``,
``/v1/completions`` or ``/v1/embeddings``) of a rollout that routes on ``match.model`` or
rewrites an arm's ``model`` are buffered (up to ``proxy.replay_buffer``) and scanned once:
the top-level keys are walked with the C JSON scanner, each value parsed as ``json.loads``
would, and the byte span of the ``model`` value kept. Rewriting splices the arm's name into
that span; every other byte of the body is forwarded as the client sent it.

Canary answers the failures itself, in the OpenAI API's error format (``invalid_request_error``):
404 ``model_not_found`` for a name no rollout serves, 400 for a missing model, a body that is
not a JSON object, two top-level ``model`` keys, or a body too large to read.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from json.decoder import scanstring  # type: ignore[attr-defined]  # the C one when available
from typing import Final, Protocol

from canary.errors import ClientError
from canary.proxy.h1_server import BadRequestBody, HttpRequest

__all__ = [
    "FALLBACK_REASONS",
    "MODEL_PATHS",
    "ModelError",
    "ModelField",
    "error_body",
    "find_model",
    "is_model_path",
    "model_json",
    "not_found",
    "read_body",
    "resolve",
    "respond",
]

#: Paths whose body's ``model`` canary routes on and rewrites (the tail of the request path).
MODEL_PATHS: Final = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")

# JSON whitespace and the punctuation between top-level keys; group 1 ends at a key's
# opening quote, group 2 at the object's closing brace.
_OPEN = re.compile(r'[ \t\n\r]*\{[ \t\n\r]*(?:(")|(\}))')
_COLON = re.compile(r"[ \t\n\r]*:[ \t\n\r]*")
_NEXT = re.compile(r'[ \t\n\r]*(?:,[ \t\n\r]*(")|(\}))')
_END = re.compile(r"[ \t\n\r]*\Z")
# The C scanner behind json.loads: (value, end) of one JSON value starting at an index.
_scan_value = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def is_model_path(path: str) -> bool:
    """True for a path ending in one of :data:`MODEL_PATHS` (``/llm/v1/embeddings`` too)."""
    return path.endswith(MODEL_PATHS)


def model_json(name: str) -> bytes:
    """A model name as the JSON string spliced into request bodies."""
    return json.dumps(name).encode()


class ModelError(ClientError):
    """The request cannot be routed by its model: what canary answers, and why."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        code: str | None = None,
        param: str | None = "model",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = self.kind = reason  # the label of canary_proxy_rejected_total
        self.message = message
        self.code = code
        self.param = param

    def body(self) -> bytes:
        return error_body(self.message, self.code, self.param)


def error_body(message: str, code: str | None = None, param: str | None = "model") -> bytes:
    """An error answer shaped as the OpenAI API's (``openai`` clients read ``error.message``)."""
    return json.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": param,
                "code": code,
            }
        }
    ).encode()


def not_found(model: str) -> ModelError:
    """The OpenAI API's answer for a model nobody serves."""
    return ModelError(
        404,
        "model_not_found",
        f"The model `{model}` does not exist or you do not have access to it.",
        "model_not_found",
    )


class ModelField:
    """A request body and where its top-level ``model`` string lies in it (byte offsets)."""

    __slots__ = ("body", "end", "name", "start")

    def __init__(self, body: bytes, name: str, start: int, end: int) -> None:
        self.body = body
        self.name = name
        self.start = start
        self.end = end

    def with_model(self, encoded: bytes | None) -> bytes:
        """The body with the model value replaced by ``encoded`` (a JSON string), or as it
        is when None: the bytes before and after the value are the client's own."""
        if encoded is None:
            return self.body
        return self.body[: self.start] + encoded + self.body[self.end :]


def _bad_json(detail: str) -> ModelError:
    return ModelError(
        400,
        "model_bad_json",
        f"We could not parse the JSON body of your request ({detail}). The OpenAI API "
        "expects a JSON object with a 'model' field.",
    )


def find_model(body: bytes) -> ModelField:
    """Find the top-level ``model`` of a JSON-object body; :class:`ModelError` if there is none.

    Cost: one UTF-8 decode and one C-scanner pass over the body, as ``json.loads`` (each
    top-level value is parsed, so the whole body is checked to be JSON), plus a Python step
    per top-level key. Nested ``model`` keys (in messages, tools) are values, never looked at.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_json("not UTF-8") from None
    m = _OPEN.match(text)
    if m is None:
        if not text.strip(" \t\n\r"):
            raise ModelError(400, "model_missing", "you must provide a model parameter")
        if text.lstrip(" \t\n\r").startswith("{"):
            raise _bad_json("expected a key after '{'")
        raise _bad_json("not a JSON object")
    i = m.end()
    found: tuple[object, int, int] | None = None
    try:
        # Two regex matches and two C calls per top-level key: ws ':' ws, the value, and
        # ws (',' ws '"' | '}'); each value is parsed in full, so the body is checked as JSON.
        while m.lastindex == 1:  # just past a key's opening quote
            key, i = scanstring(text, i)
            m = _COLON.match(text, i)
            if m is None:
                raise _bad_json(f"expected ':' at character {i}")
            start = m.end()
            value, i = _scan_value(text, start)
            if key == "model":
                if found is not None:
                    raise ModelError(
                        400,
                        "model_duplicate",
                        "The request body has more than one top-level 'model' key.",
                    )
                found = (value, start, i)
            m = _NEXT.match(text, i)
            if m is None:
                raise _bad_json(f"expected ',' and a key, or '}}', at character {i}")
            i = m.end()
    except StopIteration as exc:  # the scanner found no value at this index
        raise _bad_json(f"expected a value at character {exc.value}") from None
    except ValueError as exc:  # JSONDecodeError: a bad string, number or escape
        raise _bad_json(str(exc)) from None
    except RecursionError:  # nested deeper than the interpreter allows (json.loads too)
        raise _bad_json("nested too deeply") from None
    if _END.match(text, i) is None:
        raise _bad_json("extra data after the JSON object")
    if found is None or found[0] is None:
        raise ModelError(400, "model_missing", "you must provide a model parameter")
    value, start, end = found
    if not isinstance(value, str) or not value:
        raise ModelError(
            400, "model_missing", "'model' must be a non-empty string naming the model"
        )
    if not body.isascii():  # offsets so far count characters; the splice needs bytes
        start, end = len(text[:start].encode()), len(text[:end].encode())
    return ModelField(body, value, start, end)


#: Failures that leave a request to a model-less rollout covering the same path, if any: it
#: takes the requests no model rule claims. A duplicate ``model`` is ambiguous and an unread
#: body may name any model: those are always answered by canary.
FALLBACK_REASONS: Final = frozenset({"model_missing", "model_bad_json"})


class RouteLookup(Protocol):
    """The route table's model lookup (:meth:`canary.proxy.routing.RouteTable.lookup_model`)."""

    def lookup_model(self, host: str | None, path: str, model: str | None) -> str | None: ...


async def resolve(
    request: HttpRequest,
    path: str,
    owner: str | None,
    table: RouteLookup,
    needs_model: Callable[[str], bool],
    limits: tuple[int, int, float],
) -> tuple[str, bytes, ModelField | None]:
    """Read a model-routed request's body and decide its rollout: ``(rollout, body, model)``.

    ``owner`` is the rollout the path and host chose, or None when model rules cover the
    request and the body's model decides. ``needs_model(rollout)`` says whether that rollout
    rewrites an arm's model (then the body must have one). :class:`ModelError` says what to
    answer instead.
    """
    body = await read_body(request, *limits)
    try:
        field: ModelField | None = find_model(body)
    except ModelError as exc:
        field, failure = None, exc
    if owner is None:
        if field is not None:
            owner = table.lookup_model(request.host, path, field.name)
            if owner is None:
                raise not_found(field.name)
        elif failure.reason in FALLBACK_REASONS:
            owner = table.lookup_model(request.host, path, None)
    if field is None and (owner is None or needs_model(owner)):
        raise failure
    assert owner is not None
    return owner, body, field


async def read_body(
    request: HttpRequest, replay_buffer: int, max_body_size: int, client_timeout: float
) -> bytes:
    """Buffer a model-routed request's body: it must fit ``replay_buffer`` (a chunked body is
    read up to that limit). Raises :class:`ModelError` with what to answer: 413 past
    ``max_body_size``, 400 past ``replay_buffer`` (the model cannot be read without buffering
    the body), 408 for a stalled client, 400 for broken framing.
    """
    length = request.content_length
    if length is not None and length > max_body_size:
        raise _too_large(max_body_size)
    if length is not None and length > replay_buffer:
        raise _unreadable(replay_buffer)
    if not request.body_exists:
        return b""
    try:
        if request.body_complete():  # it came with the head: no timer needed
            body = request.take_body()
            if len(body) > max_body_size:  # chunked: no length was checked above
                raise _too_large(max_body_size)
            if len(body) > replay_buffer:
                raise _unreadable(replay_buffer)
            return body
        if length is not None:
            async with asyncio.timeout(client_timeout):
                return await request.read_body()
        parts: list[bytes] = []  # chunked: read no more than the limit
        total = 0
        async with asyncio.timeout(client_timeout):
            while chunk := await request.read_chunk():
                total += len(chunk)
                if total > max_body_size:
                    raise _too_large(max_body_size)
                if total > replay_buffer:
                    raise _unreadable(replay_buffer)
                parts.append(chunk)
        return b"".join(parts)
    except (TimeoutError, ConnectionError):
        raise ModelError(
            408, "client_timeout", "request body was not received in time", None, None
        ) from None
    except BadRequestBody as exc:
        raise ModelError(400, "bad_request", f"bad request body: {exc}", None, None) from None


def _too_large(limit: int) -> ModelError:
    return ModelError(413, "body_too_large", f"request body exceeds {limit} bytes", None, None)


def _unreadable(limit: int) -> ModelError:
    return ModelError(
        400,
        "model_body_too_large",
        f"The request body is larger than proxy.replay_buffer ({limit} bytes), so its "
        "'model' cannot be read; raise proxy.replay_buffer to route such requests.",
    )


def respond(request: HttpRequest, err: ModelError, rid: str) -> None:
    """Answer ``err`` in the OpenAI error format, with the request id."""
    headers = (("Content-Type", "application/json"), ("X-Request-Id", rid))
    request.respond(err.status, "", headers, err.body())
