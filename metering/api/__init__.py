"""The HTTP API (FastAPI): :func:`create_app`."""

from metering.api.app import create_app

__all__ = ["create_app"]
