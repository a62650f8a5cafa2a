"""Ray Train loops (one per model) and the TorchTrainer that runs them.

Each ``*_train_loop(config)`` runs on every worker and reads top to bottom: build model + optimizer, resume from
``ray.train.get_checkpoint()`` (same ``storage_path`` + ``name`` as the interrupted run), wrap in DDP, step through
deterministic per-epoch batches read from Ray Data (every step reports its metrics; a checkpoint at every epoch end
and every ``checkpoint_every`` steps), then rank 0 writes the final model into the run directory atomically.

The examples come from the trainer's datasets (``ray.train.get_dataset_shard``, see :mod:`uae_ray.training.dataset`
for the order and the resume); ``config`` (built by the stages with :func:`loop_config`) is small and holds no data:
``cfg`` (the stage config as a dict), ``run_dir`` (URI), ``output`` (model directory name), ``checkpoint_every``
(0 = epoch ends only), ``fingerprint`` (of config and examples: only a checkpoint with the same one is resumed).
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from uae_ray.config import TrainEncoderConfig, TrainRewardConfig, TrainScaling
from uae_ray.distributed import gather_no_grad, gather_with_grad, mean_across_ranks
from uae_ray.losses import (
    ENCODER_LOSSES,
    USES_IN_BATCH,
    EncoderLoss,
    EncoderLossParams,
    GroupBatch,
    reward_listwise_loss,
)
from uae_ray.runtime import RunDir
from uae_ray.training.checkpoint import TrainState, resume_state, save_checkpoint, training_fingerprint, unwrap
from uae_ray.training.data import EncoderExample, RewardGroup, collate_encoder, collate_reward, steps_per_epoch
from uae_ray.training.dataset import (
    TRAIN,
    TRAIN_QIDS,
    TrainData,
    in_memory,
    rank_batches,
    rank_plan,
    sorted_qids,
)

StepFn = Callable[[list[Any], np.random.Generator], torch.Tensor]


# ---------------------------------------------------------------------------------------------------- shared steps
def _worker_setup(scaling: TrainScaling) -> tuple[int, int, torch.device]:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    if not scaling.use_gpu:
        torch.set_num_threads(max(1, int(scaling.cpus_per_worker)))
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def loop_config(cfg: TrainEncoderConfig | TrainRewardConfig, data: TrainData, run_dir: RunDir,
                output: str) -> dict[str, Any]:
    """The ``train_loop_config`` of a stage's run (no examples: those come from Ray Data), with the fingerprint its
    checkpoints are recorded under (config + the built examples' content hashes)."""
    dumped = cfg.model_dump()
    return {"cfg": dumped, "run_dir": run_dir.uri, "output": output, "checkpoint_every": cfg.checkpoint_every_steps,
            "fingerprint": training_fingerprint(dumped, data.row_hashes),
            "cache_examples": in_memory(data)}


def _resume(model: torch.nn.Module, optimizer: torch.optim.Optimizer, fingerprint: str) -> TrainState:
    """Resume from Ray Train's latest checkpoint when it belongs to this run's config and examples."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return resume_state(None, model, optimizer, fingerprint)
    with ckpt.as_directory() as d:
        return resume_state(Path(d), model, optimizer, fingerprint)


def _report(
    metrics: dict[str, float], *, save: bool, rank: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    state: TrainState,
) -> None:
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            save_checkpoint(Path(tmp), model, optimizer, state)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def _run_epochs(
    *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, step_fn: StepFn, kind: type,
    epochs: int, per_worker: int, seed: int, rank: int, world: int, checkpoint_every: int, desc: str,
    cache: bool = False,
) -> TrainState:
    """The step loop shared by both models (examples of type ``kind`` from the ``train`` dataset); returns the final
    state. ``cache``: read the (small) table once and keep it, instead of streaming it every epoch."""
    import ray.train
    from tqdm.auto import tqdm

    shard = ray.train.get_dataset_shard(TRAIN)
    cached: list[pa.Table] | None = None
    if cache:
        cached = list(shard.iter_batches(batch_format="pyarrow"))
        qids = sorted_qids(cached)
    else:
        qids = sorted_qids(ray.train.get_dataset_shard(TRAIN_QIDS).iter_batches(batch_format="pyarrow"))
    n_steps = steps_per_epoch(len(qids), world, per_worker)
    if n_steps == 0:
        raise ValueError(
            f"{desc}: {len(qids)} training examples cannot fill one step of {world} workers x {per_worker} queries"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    bar = tqdm(total=n_steps * epochs, initial=state.global_step, desc=desc, disable=rank != 0, mininterval=5)
    for epoch in range(state.epoch, epochs):
        state.epoch = epoch
        first = state.step_in_epoch  # > 0 only in the epoch a run resumed in: its done steps are skipped
        plan = rank_plan(qids, epoch=epoch, first_step=first, n_steps=n_steps, rank=rank, world=world,
                         per_worker=per_worker, seed=seed)
        table = cached if cached is not None else shard.iter_batches(batch_format="pyarrow")
        batches = rank_batches(table, plan, kind)
        for step, batch in enumerate(batches, start=first):
            model.train()
            loss = step_fn(batch, np.random.default_rng([seed, epoch, step, rank]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            global_loss = mean_across_ranks(loss.item())
            state.global_step += 1
            state.step_in_epoch = step + 1
            end_of_epoch = step + 1 == n_steps
            if end_of_epoch:
                state.epoch, state.step_in_epoch = epoch + 1, 0
            seconds = round(time.perf_counter() - t0, 3)  # since this run's first step (throughput; resets on resume)
            state.history.append({"step": state.global_step, "epoch": epoch, "loss": global_loss, "seconds": seconds})
            save = end_of_epoch or (checkpoint_every > 0 and state.global_step % checkpoint_every == 0)
            metrics = {"step": state.global_step, "epoch": epoch, "loss": global_loss}
            _report(metrics, save=save, rank=rank, model=model, optimizer=optimizer, state=state)
            bar.update(1)
            bar.set_postfix(loss=f"{global_loss:.4f}")
    bar.close()
    return state


# ---------------------------------------------------------------------------------------------------- reward model
def reward_train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop of the cross-encoder reward model (listwise KL + Huber on utilities)."""
    import ray.train.torch

    from uae_ray.models.reward import build_reward_model, save_reward_model, tokenize_pairs

    cfg = TrainRewardConfig.model_validate(config["cfg"])
    rank, world, device = _worker_setup(cfg.scaling)
    torch.manual_seed(cfg.seed)  # the fresh head starts identical on every worker

    model, tok = build_reward_model(cfg.base_model, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    state = _resume(model, optimizer, config["fingerprint"])
    model = ray.train.torch.prepare_model(model)

    def step(batch: list[RewardGroup], rng: np.random.Generator) -> torch.Tensor:
        qs, ps, utils, mask = collate_reward(batch, cfg.group_size, rng)
        feats = {k: v.to(device) for k, v in tokenize_pairs(tok, qs, ps, cfg.max_length).items()}
        flat = model(**feats).logits.reshape(-1).float()
        mask_t = torch.from_numpy(mask).to(device)
        scores = torch.zeros(mask.shape, device=device).masked_scatter(mask_t, flat)
        u = torch.from_numpy(utils).to(device)
        return reward_listwise_loss(scores, u, mask_t, tau=cfg.tau, huber_weight=cfg.huber_weight)

    state = _run_epochs(
        model=model, optimizer=optimizer, state=state, step_fn=step, kind=RewardGroup, epochs=cfg.epochs,
        per_worker=cfg.queries_per_step, seed=cfg.seed, rank=rank, world=world,
        checkpoint_every=int(config.get("checkpoint_every", 0)), desc="train-reward",
        cache=bool(config.get("cache_examples", False)),
    )
    if rank == 0:
        final = unwrap(model)
        with RunDir(config["run_dir"]).staged_dir(config["output"]) as out:
            save_reward_model(final, tok, out, cfg.max_length)  # a directory CrossEncoder(path) loads
            (out / "training.json").write_text(json.dumps({"config": config["cfg"], "state": asdict(state)}))


# ------------------------------------------------------------------------------------------------------ bi-encoder
def build_student(cfg: TrainEncoderConfig) -> Any:
    """A trainable copy of the base encoder (SentenceTransformer), with a LoRA adapter when configured."""
    from uae_ray.models.encoder import load_encoder

    model = copy.deepcopy(load_encoder(cfg.base_model, "cpu"))
    if cfg.gradient_checkpointing:
        # non-reentrant: recomputes with the saved RNG state (same dropout masks) and needs no input gradients (LoRA)
        model[0].model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora is not None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        module = model[0]
        peft_cfg = PeftLoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
        )
        module.model = get_peft_model(module.model, peft_cfg)
    return model


def save_student(model: Any, cfg: TrainEncoderConfig, out: Path) -> None:
    """Merge LoRA (if any) into the weights and save a directory ``SentenceTransformer(out)`` loads."""
    if cfg.lora is not None:
        model[0].model = model[0].model.merge_and_unload()
    model.save(str(out))


def _pad_cat(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate two tokenized batches along dim 0, right-padding the shorter one (one forward pass for DDP)."""
    length = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    out = {}
    for key in a:
        value = pad_id if key == "input_ids" else 0
        pa_ = F.pad(a[key], (0, length - a[key].shape[1]), value=value)
        pb_ = F.pad(b[key], (0, length - b[key].shape[1]), value=value)
        out[key] = torch.cat([pa_, pb_])
    return out


def encoder_train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop of the student bi-encoder (UAE InfoNCE, gold-only InfoNCE, the KL or listwise form)."""
    import ray.train.torch

    cfg = TrainEncoderConfig.model_validate(config["cfg"])
    rank, world, device = _worker_setup(cfg.scaling)
    torch.manual_seed(cfg.seed)
    loss_kind = EncoderLoss(cfg.loss)
    loss_fn = ENCODER_LOSSES[loss_kind]
    params = EncoderLossParams(tau_s=cfg.tau_s, tau_t=cfg.tau_t, gold_mix=cfg.gold_mix)
    use_in_batch = cfg.in_batch_negatives and USES_IN_BATCH[loss_kind]
    group_size = 1 + cfg.n_hard_negatives

    model = build_student(cfg)
    tok = model.tokenizer
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.01)
    state = _resume(model, optimizer, config["fingerprint"])
    # BERT's pooler is computed but unused by mean pooling: DDP must tolerate parameters without gradients
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    def step(batch: list[EncoderExample], rng: np.random.Generator) -> torch.Tensor:
        qs, ps, teacher, gold, valid = collate_encoder(batch, group_size)
        qf = tok(qs, padding=True, truncation=True, max_length=cfg.max_query_length, return_tensors="pt")
        pf = tok(ps, padding=True, truncation=True, max_length=cfg.max_passage_length, return_tensors="pt")
        feats = {k: v.to(device) for k, v in _pad_cat(dict(qf), dict(pf), tok.pad_token_id).items()}
        emb = F.normalize(model(feats)["sentence_embedding"].float(), dim=-1)
        b = len(qs)
        valid_t = torch.from_numpy(valid).to(device)
        flat = emb.new_zeros(b * group_size, emb.shape[1])
        flat = flat.index_put((valid_t.reshape(-1).nonzero().squeeze(1),), emb[b:])
        batch = GroupBatch(
            query=emb[:b], passages=flat.view(b, group_size, -1), teacher_scores=torch.from_numpy(teacher).to(device),
            gold_mask=torch.from_numpy(gold).to(device), valid_mask=valid_t,
            in_batch=gather_with_grad(flat) if use_in_batch else None,
            in_batch_valid=gather_no_grad(valid_t.reshape(-1)) if use_in_batch else None,
            in_batch_offset=rank * b * group_size,
        )
        return loss_fn(batch, params)

    state = _run_epochs(
        model=model, optimizer=optimizer, state=state, step_fn=step, kind=EncoderExample, epochs=cfg.epochs,
        per_worker=cfg.queries_per_step, seed=cfg.seed, rank=rank, world=world,
        checkpoint_every=int(config.get("checkpoint_every", 0)), desc=f"train-encoder ({cfg.loss})",
        cache=bool(config.get("cache_examples", False)),
    )
    if rank == 0:
        with RunDir(config["run_dir"]).staged_dir(config["output"]) as out:
            save_student(unwrap(model), cfg, out)
            (out / "training.json").write_text(json.dumps({"config": config["cfg"], "state": asdict(state)}))


# ---------------------------------------------------------------------------------------------------------- trainer
def checkpoint_storage(run_dir: RunDir) -> tuple[str, Any]:
    """Ray Train ``(storage_path, storage_filesystem)`` inside the run directory: a local path (no filesystem), or
    the object-store path with the run dir's own pyarrow filesystem (its endpoint; credentials stay on the nodes)."""
    from uae_ray.data.schema import CHECKPOINTS

    if run_dir.is_local:
        return str(run_dir.local_path(CHECKPOINTS)), None
    return run_dir.path(CHECKPOINTS), run_dir.fs


def make_trainer(
    loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], scaling: TrainScaling, run_dir: RunDir,
    name: str, datasets: dict[str, Any],
) -> Any:
    """A ``TorchTrainer`` (DDP; gloo on CPU, NCCL on GPU) checkpointing to ``<run_dir>/checkpoints/<name>``.

    ``datasets`` (:func:`uae_ray.training.dataset.train_datasets`) reach every worker whole (``datasets_to_split=[]``):
    each rank picks its own queries by the seeded plan, see :mod:`uae_ray.training.dataset`.

    Rerunning with the same run directory and name resumes from the latest checkpoint there; within one run, a
    failed worker group (a worker or its node died) is restarted up to ``scaling.max_failures`` times, each time
    from the latest checkpoint.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = checkpoint_storage(run_dir)
    resources = {**scaling.resources_per_worker, "CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
        ),
    )
