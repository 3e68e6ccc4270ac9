"""A socket to the analysis worker, so that an analysis wakes no thread in the proxy's process.

``ProcessPoolExecutor`` moves each job through two helper threads of the submitting process
(a manager thread and a queue feeder) and its result back through the manager thread. On the
core the proxy runs on, waking them costs the event loop a context switch and then the GIL
for as long as they run Python code: a submission held the loop for 3-6 ms (measured, proxy
and worker pinned to one core), which requests arriving meanwhile wait out.

:meth:`AnalysisChannel.open` instead submits one long-running job, :func:`serve`, that answers
requests on a socket pair for as long as the channel is open. A request is one length-prefixed
frame written by the loop without blocking, the answer one frame read by the loop: no thread of
this process takes part. The pool's threads are idle meanwhile (they only wake again when the
job ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import socket
import struct
import traceback
from concurrent.futures import Executor
from typing import Any

from canary.analyzer.worker import analyze_packed
from canary.decision.analysis import Analysis
from canary.errors import AnalysisError
from canary.observe.inputs import InputHealth

_HEADER = struct.Struct("!Q")


class ChannelBroken(AnalysisError):
    """The worker is gone, or the channel was closed: analyse elsewhere."""


class AnalysisFailed(AnalysisError):
    """The analysis raised in the worker (the message carries its traceback)."""


def serve(sock: socket.socket) -> None:
    """Worker side: answer analysis requests on ``sock`` until the other end closes it."""
    with sock:
        while True:
            data = _receive(sock)
            if data is None:
                return
            config, inputs, failing_for, failing_requests, input_health = pickle.loads(data)
            try:
                result: tuple[str, Any] = (
                    "ok",
                    analyze_packed(
                        config,
                        inputs,
                        failing_for=failing_for,
                        failing_requests=failing_requests,
                        input_health=input_health,
                    ),
                )
            except Exception:
                result = ("error", traceback.format_exc())
            out = pickle.dumps(result, pickle.HIGHEST_PROTOCOL)
            sock.sendall(_HEADER.pack(len(out)) + out)


def _receive(sock: socket.socket) -> bytes | None:
    header = _read_exactly(sock, _HEADER.size)
    if header is None:
        return None
    return _read_exactly(sock, _HEADER.unpack(header)[0])


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class AnalysisChannel:
    """Event-loop side of :func:`serve`: one request at a time, answered in order."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        job: asyncio.Future[None],
        theirs: socket.socket,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._job = job
        self._theirs = theirs  # kept open: the pool pickles it after submit returns
        self._lock = asyncio.Lock()  # control path only
        self.closed = False

    @classmethod
    async def open(cls, executor: Executor) -> AnalysisChannel:
        """Start :func:`serve` in ``executor``; it occupies one of its workers until closed."""
        loop = asyncio.get_running_loop()
        mine, theirs = socket.socketpair()
        try:
            reader, writer = await asyncio.open_unix_connection(sock=mine)
            job = loop.run_in_executor(executor, serve, theirs)
        except BaseException:
            mine.close()
            theirs.close()
            raise
        return cls(reader, writer, job, theirs)

    @property
    def alive(self) -> bool:
        """Open, and the worker's job still running (False once the worker died)."""
        return not self.closed and not self._job.done()

    def ended(self) -> str:
        """Why the worker's job ended (for logs), once ``alive`` is False."""
        if not self._job.done():
            return "it is still running"
        if self._job.cancelled():
            return "cancelled"
        exc = self._job.exception()
        return "it returned" if exc is None else f"{type(exc).__name__}: {exc}"

    async def analyze(
        self,
        config: bytes,
        inputs: bytes,
        failing_for: float,
        failing_requests: int,
        input_health: InputHealth | None = None,
    ) -> Analysis:
        """Run :func:`analyze_packed` in the worker; ChannelBroken or AnalysisFailed."""
        async with self._lock:
            if self.closed:
                raise ChannelBroken("the analysis channel is closed")
            request = (config, inputs, failing_for, failing_requests, input_health)
            data = pickle.dumps(request, pickle.HIGHEST_PROTOCOL)
            try:
                self._writer.write(_HEADER.pack(len(data)) + data)
                answer = await self._answer()
            except BaseException:  # cancelled or broken: the stream is out of step for good
                await self.close()
                raise
        status, value = pickle.loads(answer)
        if status != "ok":
            raise AnalysisFailed(value)
        result: Analysis = value
        return result

    async def _answer(self) -> bytes:
        read = asyncio.ensure_future(self._read())
        read.add_done_callback(_retrieve)  # also when abandoned below: never "not retrieved"
        try:
            await asyncio.wait((read, self._job), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not read.done():  # cancelled meanwhile, or the job ended first
                read.cancel()
        if not read.done() or read.cancelled():  # the job ended first: the worker died
            exc = None if self._job.cancelled() else self._job.exception()
            raise ChannelBroken(f"the analysis worker stopped ({exc!r})") from exc
        try:
            return read.result()
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise ChannelBroken(f"the analysis worker stopped ({exc!r})") from exc

    async def _read(self) -> bytes:
        header = await self._reader.readexactly(_HEADER.size)
        return await self._reader.readexactly(_HEADER.unpack(header)[0])

    async def close(self, timeout: float = 5.0) -> None:
        """Close the socket; :func:`serve` then returns and frees the pool's worker."""
        if self.closed:
            return
        self.closed = True
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._job), timeout)
        self._theirs.close()  # after the job: in a thread pool it is the worker's own socket


__all__ = ["AnalysisChannel", "AnalysisFailed", "ChannelBroken", "serve"]
