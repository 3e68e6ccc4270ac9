"""Running the analysis: in the event loop or in a worker process reached over a socket.

- :class:`Analyzer`: what the controller asks (:class:`AnalysisJob` in, ``Analysis`` out).
- :class:`InlineAnalyzer`: the statistics in the event loop.
- :class:`WorkerAnalyzer`: the statistics in a worker process (``canary run``), falling back to
  the event loop while the worker is being started again.

:mod:`canary.analyzer.worker` is what runs in that process, :mod:`canary.analyzer.channel` the
socket to it.
"""

from canary.analyzer.base import AnalysisJob, Analyzer, InlineAnalyzer
from canary.analyzer.pool import WorkerAnalyzer

__all__ = ["AnalysisJob", "Analyzer", "InlineAnalyzer", "WorkerAnalyzer"]
