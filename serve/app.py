"""What ``serve run serve.app:build_app`` (from a checkout's root) imports: the app lives in the package,
:mod:`uae_ray.serve.app`; this module only re-exports its entry point. Deployers edit ``serve/config.yaml``."""

from uae_ray.serve.app import build_app

__all__ = ["build_app"]
