"""canary: a performance-aware canary router for ML model endpoints."""

__version__ = "0.1.0"

__all__ = ["__version__"]
