"""Training checkpoints without pickles: safetensors for model and optimizer tensors, JSON for the rest.

A checkpoint directory holds ``model.safetensors`` (the unwrapped module's state), ``optimizer.safetensors`` +
``optimizer.json`` (AdamW moments and hyper-parameters) and ``train_state.json`` (:class:`TrainState`), which
records the :func:`training_fingerprint` of the config and examples it was trained on: a run resumes only its own
checkpoints (:func:`resume_state`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

MODEL_FILE = "model.safetensors"
OPTIM_TENSORS = "optimizer.safetensors"
OPTIM_META = "optimizer.json"
STATE_FILE = "train_state.json"
log = logging.getLogger("uae_ray")

#: Settings that say where or how often, not what, a run trains: they never make a checkpoint foreign. Of the Ray
#: Train scaling only the worker count counts (it sets the global batch).
NOT_TRAINING = frozenset({"checkpoint_every_steps", "eval_max_queries", "output"})


@dataclass
class TrainState:
    """Where training is: the next (epoch, step in epoch) to run, the global step count and the loss history."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)  # global steps at which a run resumed
    config_fingerprint: str | None = None  # training_fingerprint() of the run (None: written before it existed)


def training_fingerprint(config: Mapping[str, Any], examples: Sequence[Any]) -> str:
    """Identifies what a run trains: its stage config (a ``model_dump()``) minus :data:`NOT_TRAINING`, with only
    ``num_workers`` of its scaling, and its training examples."""
    settings = {k: v for k, v in config.items() if k not in NOT_TRAINING}
    if isinstance(settings.get("scaling"), Mapping):
        settings["scaling"] = {"num_workers": settings["scaling"].get("num_workers")}
    h = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(json.dumps(list(examples), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model


def save_checkpoint(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState
) -> None:
    """Write model, optimizer and state into ``directory`` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_model(unwrap(model), str(directory / MODEL_FILE))
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, float]] = {}
    for idx, pstate in sd["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    save_file(tensors, str(directory / OPTIM_TENSORS))
    (directory / OPTIM_META).write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))
    (directory / STATE_FILE).write_text(json.dumps(asdict(state)))


def load_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Restore model and optimizer from ``directory``; return its :class:`TrainState`.

    Raises:
        FileNotFoundError: naming the missing file when the directory is not a complete checkpoint.
    """
    for name in (MODEL_FILE, OPTIM_TENSORS, OPTIM_META, STATE_FILE):
        if not (directory / name).exists():
            raise FileNotFoundError(f"checkpoint {directory} is incomplete: no {name}")
    missing, unexpected = load_model(unwrap(model), str(directory / MODEL_FILE), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {directory} does not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]} (was the config changed between runs?)"
        )
    meta = json.loads((directory / OPTIM_META).read_text())
    flat = load_file(str(directory / OPTIM_TENSORS))
    state: dict[int, dict[str, Any]] = {}
    for key, value in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, extra in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(extra)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return TrainState(**json.loads((directory / STATE_FILE).read_text()))


def read_state(directory: Path) -> TrainState:
    """Only the :class:`TrainState` of a checkpoint directory (the driver reads the loss history this way)."""
    return TrainState(**json.loads((directory / STATE_FILE).read_text()))


def resume_state(directory: Path | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 fingerprint: str) -> TrainState:
    """The state to train from: restored from checkpoint ``directory`` when it was written for ``fingerprint`` (the
    same config and examples), else a fresh start: a foreign checkpoint (another config, other data, or one that
    predates fingerprints) is ignored with a log line, never loaded."""
    fresh = TrainState(config_fingerprint=fingerprint)
    if directory is None:
        return fresh
    stored = read_state(directory).config_fingerprint
    if stored != fingerprint:
        log.warning("checkpoint %s belongs to another config or other data (fingerprint %s, this run %s): not "
                    "resumed, training from step 0", directory, stored, fingerprint)
        return fresh
    state = load_checkpoint(directory, model, optimizer)
    state.resumed_from.append(state.global_step)
    log.info("resuming from checkpoint %s at step %d", directory, state.global_step)
    return state
