"""Admin HTTP app: /metrics, /healthz, /readyz, /api/v1."""

from canary.admin.app import make_admin_app

__all__ = ["make_admin_app"]
