"""Loaders: one module per input format, each turning a file into a stream of :class:`Chunk` objects."""

from uae_ray.data.loaders.common import Chunk, DataError, LoadStats, Passage, Query
from uae_ray.data.loaders.generic import load_generic
from uae_ray.data.loaders.hf import load_hf
from uae_ray.data.loaders.mrqa import load_mrqa
from uae_ray.data.loaders.qasper import load_qasper
from uae_ray.data.loaders.squad import load_squad

#: format name -> loader(path, split, stats) for file inputs (``hf`` takes a dataset id instead).
FILE_LOADERS = {"qasper": load_qasper, "mrqa": load_mrqa, "squad": load_squad, "jsonl": load_generic}

__all__ = ["FILE_LOADERS", "Chunk", "DataError", "LoadStats", "Passage", "Query", "load_hf"]
