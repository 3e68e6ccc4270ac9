"""The rollout controller: snapshot -> analyze -> decide -> apply, on a timer.

A thin async loop around the pure parts (:mod:`canary.decision`). Every ``flush_interval`` it
takes the proxy's accumulator deltas (:meth:`Recorder.swap`), adds them to each rollout's
totals and to the store; every ``analysis.interval`` of a rollout it has its
:class:`~canary.analyzer.Analyzer` run the tests, runs the policy, and carries out the
decision: an atomic weight swap through ``apply_weights`` (the proxy reads it on its next
request), the new state and a decision-log entry in the store, webhooks (fire and forget) and
gauges. Operator commands (:meth:`Controller.command`) go through the same path. The
controller never imports the proxy: the runtime wires the two together. What the admin API
shows of a rollout is a :class:`RolloutView` (:meth:`Controller.view`); its JSON is
:mod:`canary.admin.views`.

When the store fails, the proxy keeps its weights, the controller holds every rollout (no
decisions on data it could not persist) and retries on the next flush; ``/readyz`` and
``canary_store_up`` say so (:class:`StoreGuard`). "Fails" includes a store call that has not
finished within ``store_timeout`` (a hung disk) and a state file deleted or replaced under the
running process (a watchdog task asks the store's ``health()``; a deleted file is opened again
and everything the controller holds is written back to it).
"""

from canary.controller.loop import FLUSH_INTERVAL, STORE_TIMEOUT, Controller, Notifier, WeightSink
from canary.controller.persistence import StoreGuard
from canary.controller.rollout import DECISIONS_SHOWN, RolloutView

__all__ = [
    "DECISIONS_SHOWN",
    "FLUSH_INTERVAL",
    "STORE_TIMEOUT",
    "Controller",
    "Notifier",
    "RolloutView",
    "StoreGuard",
    "WeightSink",
]
