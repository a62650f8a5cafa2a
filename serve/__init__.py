"""Ray Serve retrieval app: ``serve.app:build_app``."""
