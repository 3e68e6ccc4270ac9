"""``canary report``: one rollout, running or finished, as a self-contained HTML file or as
Markdown for a pull-request comment: the outcome and why, the weights over time, each metric's
interval over time against its tolerance, per-arm distributions, cost per 1,000 inferences
and the decision log.

The data comes from the admin API of a running canary (:func:`from_admin`) or straight from
the state store with no canary running (:func:`report_from_store`, read-only); both give a
:class:`ReportData`, which :func:`render_html` and :func:`render_markdown` turn into text.
"""

from canary.report._html import render_html
from canary.report._markdown import render_markdown
from canary.report._model import Distribution, HistoryPoint, Outcome, ReportData, outcome
from canary.report._sources import from_admin, from_store, report_from_store

__all__ = [
    "Distribution",
    "HistoryPoint",
    "Outcome",
    "ReportData",
    "from_admin",
    "from_store",
    "outcome",
    "render_html",
    "render_markdown",
    "report_from_store",
]
