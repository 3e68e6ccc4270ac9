"""The admin port: /metrics, /healthz, /readyz and /api/v1 (aiohttp).

It sees the data plane only through the narrow protocols :class:`RolloutRouting` and
:class:`FeedbackStores` that the runtime hands it, never the proxy itself.
"""

from canary.admin.app import FeedbackStores, RolloutRouting, make_admin_app, warn_if_public

__all__ = ["FeedbackStores", "RolloutRouting", "make_admin_app", "warn_if_public"]
