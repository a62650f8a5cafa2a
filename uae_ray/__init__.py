"""uae-ray: Utility-Aligned Embeddings on Ray."""

__version__ = "0.1.0"
