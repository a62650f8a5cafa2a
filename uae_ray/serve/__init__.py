"""The Ray Serve retrieval app (``uae_ray.serve.app:build_app``), shipped in the package: an installed uae-ray can
``serve run uae_ray.serve.app:build_app`` or ``uae-ray serve`` without a checkout."""
