"""Deployment files of the retrieval app: ``serve/config.yaml`` and ``serve.app:build_app`` (a re-export of
``uae_ray.serve.app:build_app``)."""
