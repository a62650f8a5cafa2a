"""One frozen config model per stage, loadable from YAML and overridable from the command line.

A config file holds one section per stage, named as the stage's subcommand, plus optional top-level ``run_dir``
and ``address``::

    run_dir: runs/qasper
    prepare: {format: qasper, inputs: [{split: train, path: ../shared/data/qasper/qasper-train-v0.3.json}]}
    label: {batch_size: 16, max_actors: 2}

Overrides use dotted keys relative to the stage section (``--set batch_size=16`` or ``--set lora.r=8``); values are
parsed as YAML scalars. Everything is validated on the driver, before any Ray work starts; a bad key or value is a
:class:`ConfigError` naming the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

C = TypeVar("C", bound="StageConfig")
# How text is encoded on CPU (uae_ray.models.fast_encoder): the torch model, or its ONNX export run by ONNX Runtime or
# OpenVINO (cosine >= 0.999 to torch; needs the `fast` extra). With CUDA the torch encoder is used whatever this says.
EncoderBackend = Literal["torch", "onnx", "openvino"]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and field."""


class StageConfig(BaseModel):
    """Base of every stage config: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def run_dir_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an entry of the run directory (None when it can): it must be a relative path of
    plain segments that stays inside the run directory, so writing or removing it never touches anything else."""
    if not isinstance(name, str) or not name.strip():
        return "is empty"
    if "://" in name or name.startswith(("/", "~")) or "\\" in name or (len(name) > 1 and name[1] == ":"):
        return "must be a name inside the run directory, not an absolute path or URI"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "has an empty, '.' or '..' segment (it must stay inside the run directory)"
    if any(ch in name for ch in "\0\n\r\t") or name != name.strip():
        return "has control characters or surrounding spaces"
    return None


def _output_name(value: str) -> str:
    """A configured output name: inside the run directory and none of the names the stages write (see
    :mod:`uae_ray.data.schema`)."""
    from uae_ray.data import schema as S
    from uae_ray.storage import LEASE_FILE

    problem = run_dir_name_problem(value)
    if problem:
        raise ValueError(f"output {value!r} {problem}")
    reserved = {S.CORPUS, S.QUERIES, S.PREPARE_REPORT, S.CANDIDATES, S.MINE_REPORT, S.UTILITIES, S.LABEL_REPORT,
                S.LABEL_SKIPPED, S.LABEL_BASELINE, S.REWARD_MODEL, S.REWARD_REPORT, S.TEACHER_SCORES, S.CHECKPOINTS,
                S.INDEX, S.EVAL, "pipeline", LEASE_FILE}
    if value.split("/")[0] in reserved:
        raise ValueError(f"output {value!r} would overwrite the run directory's {value.split('/')[0]!r}")
    return value


# --------------------------------------------------------------------------------------------------------- prepare
class InputSpec(StageConfig):
    """One input file, optionally tagged with the split all its records belong to."""

    path: str
    split: Literal["train", "dev", "test"] | None = None

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        """Parse ``PATH`` or ``SPLIT=PATH`` as given on the command line."""
        split, sep, path = text.partition("=")
        if sep and split in ("train", "dev", "test"):
            return cls(path=path, split=split)  # type: ignore[arg-type]
        return cls(path=text)


class SplitRatios(StageConfig):
    """Fractions of documents per split, for sources whose records carry no split (by document, never by query)."""

    train: float = 0.8
    dev: float = 0.1
    test: float = 0.1

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitRatios:
        total = self.train + self.dev + self.test
        if abs(total - 1.0) > 1e-6 or min(self.train, self.dev, self.test) < 0:
            raise ValueError(f"split ratios must be >= 0 and sum to 1, got {total:.4f}")
        return self


class PrepareConfig(StageConfig):
    """``uae-ray prepare``: raw QA data -> corpus.parquet + queries.parquet + prepare_report.json."""

    format: Literal["qasper", "mrqa", "squad", "jsonl", "hf"]
    inputs: list[InputSpec] = Field(default_factory=list)
    hf_dataset: str | None = None  # format=hf: a hub id (allenai/qasper) or a datasets save_to_disk folder
    hf_config: str | None = None
    hf_layout: Literal["qasper", "squad", "generic"] = "generic"  # how the hub rows are laid out
    tokenizer: str = "all-minilm-l6-v2"  # passages are windowed in this model's tokens
    max_passage_tokens: int = Field(256, ge=16)
    window_overlap: int = Field(32, ge=0)
    split_ratios: SplitRatios = SplitRatios()
    seed: int = 13
    # first N documents of each split, for small runs: one N for every split, or {train: 100, dev: 35}
    max_docs_per_split: PositiveInt | dict[Literal["train", "dev", "test"], PositiveInt] | None = None
    max_queries_per_doc: PositiveInt | None = None  # first N kept questions of each document (skips are counted)
    require_gold: bool = True  # questions whose gold passage cannot be resolved are skipped (counted by reason)

    @model_validator(mode="after")
    def _check(self) -> PrepareConfig:
        if 2 * self.window_overlap > self.max_passage_tokens:
            raise ValueError("window_overlap must be at most half of max_passage_tokens")
        if self.format == "hf" and not self.hf_dataset:
            raise ValueError("format=hf needs hf_dataset (e.g. allenai/qasper)")
        if self.format == "hf" and self.inputs:
            raise ValueError("format=hf reads hf_dataset (--hf-dataset), not inputs (--input)")
        if self.format != "hf" and self.hf_dataset:
            raise ValueError(f"hf_dataset is only read with format=hf (format is {self.format!r})")
        if self.format != "hf" and not self.inputs:
            raise ValueError(f"format={self.format} needs at least one input (--input [SPLIT=]PATH)")
        return self

    def doc_cap(self, split: str) -> int | None:
        """The most documents ``split`` may hold (``max_docs_per_split``), or None for no cap."""
        if isinstance(self.max_docs_per_split, dict):
            return self.max_docs_per_split.get(split)  # type: ignore[call-overload]
        return self.max_docs_per_split


# ------------------------------------------------------------------------------------------------------------ mine
class ActorPool(StageConfig):
    """Size and resources of a Ray Data actor pool; it autoscales between min_size and max_size actors."""

    min_size: int = Field(1, ge=1)
    max_size: int = Field(2, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    batch_size: int = Field(32, ge=1)
    # custom Ray resources every actor asks for, e.g. {label_node: 1} to keep the pool on the nodes that declare it
    # (`ray start --resources='{"label_node": 8}'`, a launcher node type's `resources`); the autoscaler adds such
    # nodes when actors wait for them
    resources: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ActorPool:
        if self.max_size < self.min_size:
            raise ValueError("max_size must be >= min_size")
        bad = [k for k, v in self.resources.items() if k in ("CPU", "GPU", "memory") or v < 0]
        if bad:
            raise ValueError(f"resources: {bad}: custom resources only (CPU/GPU are num_cpus/num_gpus), each >= 0")
        return self

    def map_batches_args(self) -> dict[str, Any]:
        """``Dataset.map_batches`` arguments that place this pool: the autoscaling actor pool and each actor's
        CPUs, GPUs and custom resources (the batch size is the stage's to choose)."""
        import ray

        args: dict[str, Any] = {
            "compute": ray.data.ActorPoolStrategy(min_size=self.min_size, max_size=self.max_size),
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
        }
        if self.resources:
            args["resources"] = dict(self.resources)
        return args


class MineConfig(StageConfig):
    """``uae-ray mine``: candidate pools of K passages per query from the base encoder (+ optional reward mix)."""

    encoder: str = "all-minilm-l6-v2"
    pool_size: int = Field(50, ge=1)
    scope: Literal["auto", "document", "corpus"] = "auto"  # auto: document-scoped when documents have >1 passage
    splits: list[Literal["train", "dev", "test"]] = Field(default_factory=lambda: ["train", "dev", "test"])
    reward_weight: float = Field(0.0, ge=0.0, le=1.0)  # >0 mixes teacher_scores.parquet into the pool ranking
    # splits whose pools get the gold passages added when the encoder missed them (rank K, replacing the last
    # candidate). [dev]: train pools exactly as the base encoder retrieved them, with no passage annotation used
    # (UAE from answers alone, issue #15), while dev stays comparable with gold-inserted runs.
    insert_gold: list[Literal["train", "dev", "test"]] = Field(default_factory=lambda: ["train", "dev", "test"])
    # answer-aware mining, no passage annotation read: the top N passages of the query's search scope by BM25 of its
    # answer strings (yes/no-like answers match nothing) join the pools of answer_splits when the encoder missed them,
    # ranked among the pool by their base cosine, so the generator labels passages the answer points at (DPR mines
    # its positives with the answer the same way). 0: pools are the encoder's top pool_size only.
    answer_passages: int = Field(0, ge=0)
    answer_splits: list[Literal["train", "dev", "test"]] = Field(default_factory=lambda: ["train"])
    pool: ActorPool = ActorPool(batch_size=64)

    @model_validator(mode="after")
    def _check(self) -> MineConfig:
        if self.answer_passages > 0 and self.reward_weight > 0:
            raise ValueError("answer_passages and reward_weight > 0 do not combine: the reward mix ranks the pool by "
                             "mixed scores, answer passages join it by base cosine; set one of them")
        return self


# ----------------------------------------------------------------------------------------------------------- label
class LabelConfig(StageConfig):
    """``uae-ray label``: utility u(q,d) = mean log p(a|q,d) - mean log p(a|q) under the generator."""

    generator: str = "smollm2-135m-instruct"
    backend: Literal["hf", "vllm"] = "hf"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 only on hardware that has it
    prompt: Literal["extractive", "qasper", "custom"] = "extractive"
    system_prompt: str | None = None  # required with prompt=custom
    prompt_version: str = "v1"
    answer_aggregate: Literal["first", "max", "mean"] = "max"
    max_passage_tokens: int = Field(256, ge=8)  # passages are cut to this many generator tokens
    max_model_len: int = Field(1024, ge=64)
    splits: list[Literal["train", "dev", "test"]] = Field(default_factory=lambda: ["train", "dev", "test"])
    pool: ActorPool = ActorPool(batch_size=16)  # batch_size: sequences per forward pass inside an actor
    rows_per_batch: int = Field(64, ge=1)  # pairs per actor call (sorted by length inside, then batched)
    rows_per_part: int = Field(2048, ge=1)  # resumability granularity: one Parquet part per chunk of pairs
    # the LLM budget: only the pools of the first N documents of each split (in prepare's order) are labeled; one N
    # for every split or {train: 100}; the reward model then scores every pool (a teacher that scales past the
    # labels, issue #15)
    max_docs_per_split: PositiveInt | dict[Literal["train", "dev", "test"], PositiveInt] | None = None
    # other run dirs whose label caches are read (never written): pairs labeled there under the same generator,
    # prompt and settings are reused instead of re-scored (e.g. a second run over the same questions)
    reuse_from: list[str] = Field(default_factory=list)
    # vllm backend (Ray Data LLM engines; the engine pool is `pool`: min/max engines, each on a bundle of
    # pool.num_cpus CPUs, pool.num_gpus GPUs and pool.resources)
    tensor_parallel_size: int = Field(1, ge=1)  # GPUs per engine (vllm backend)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # vllm backend, GPU only
    enable_prefix_caching: bool = False  # must stay off: vLLM's prompt_logprobs depend on request order with it on

    @model_validator(mode="after")
    def _check(self) -> LabelConfig:
        if self.prompt == "custom" and not self.system_prompt:
            raise ValueError("prompt=custom needs system_prompt")
        if self.prompt != "custom" and self.system_prompt:
            raise ValueError(f"system_prompt is only used with prompt=custom (prompt is {self.prompt!r})")
        if self.enable_prefix_caching:
            raise ValueError("enable_prefix_caching: vLLM reports prompt_logprobs that depend on request order with "
                             "prefix caching on (vLLM issue #42019), so labels would not be reproducible: leave it off")
        if self.backend == "vllm" and self.tensor_parallel_size > 1 and self.pool.num_gpus == 0:
            raise ValueError("tensor_parallel_size > 1 needs GPUs: set pool.num_gpus (the CPU engine runs on one "
                             "worker)")
        return self

    def doc_cap(self, split: str) -> int | None:
        """The most documents of ``split`` whose pools are labeled (``max_docs_per_split``), or None for all."""
        if isinstance(self.max_docs_per_split, dict):
            return self.max_docs_per_split.get(split)  # type: ignore[call-overload]
        return self.max_docs_per_split


# ---------------------------------------------------------------------------------------------------- train-reward
class TrainScaling(StageConfig):
    """Ray Train scaling: DDP over num_workers (gloo on CPU, NCCL on GPU)."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    # custom Ray resources per worker (e.g. {train_node: 1}) and how workers are placed: SPREAD puts DDP workers on
    # different nodes where it can, STRICT_SPREAD must (Ray placement-group strategies)
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # worker-group restarts after a failure (a worker or its node died), each resuming from the latest checkpoint
    # (so set checkpoint_every_steps); -1: without limit, 0: a failure ends the run
    max_failures: int = Field(0, ge=-1)


class TrainRewardConfig(StageConfig):
    """``uae-ray train-reward``: cross-encoder r(q,d) fit on utilities (listwise KL + Huber)."""

    base_model: str = "all-minilm-l6-v2"
    max_length: int = Field(256, ge=16)
    epochs: int = Field(2, ge=1)
    lr: float = Field(3e-5, gt=0)
    queries_per_step: int = Field(4, ge=1)  # per worker; each query brings its group of candidates
    group_size: int = Field(16, ge=2)  # candidates per query per step (sampled from the pool)
    tau: float = Field(1.0, gt=0)  # temperature of the listwise target over standardised utilities
    huber_weight: float = Field(0.5, ge=0)
    heldout_fraction: float = Field(0.1, ge=0, lt=1)  # of training documents, for Spearman / NDCG
    eval_max_queries: int = Field(200, ge=1)  # per evaluated split (held-out, dev), for the report
    checkpoint_every_steps: int = Field(0, ge=0)  # 0: checkpoint at epoch ends only
    seed: int = 13
    scaling: TrainScaling = TrainScaling()


class ScoreRewardConfig(StageConfig):
    """``uae-ray score-reward``: every candidate scored by the reward model -> teacher_scores.parquet."""

    max_length: int = Field(256, ge=16)
    pool: ActorPool = ActorPool(batch_size=64)


# --------------------------------------------------------------------------------------------------- train-encoder
class LoraConfig(StageConfig):
    """LoRA adapter on the student's transformer (peft), merged into the weights when the model is saved."""

    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = None  # None: peft's default for the architecture (BERT: query, value)


class TrainEncoderConfig(StageConfig):
    """``uae-ray train-encoder``: the student bi-encoder, distilled from the teacher (or gold-only InfoNCE).

    tau_s, tau_t, n_hard_negatives and lr were swept one at a time on QASPER dev (bench/README.md, "Sweep"): no point
    beat these defaults at the configured 2 epochs; lr 5e-5 trains runs of a few dozen steps faster. gold_mix 1.0 (gold
    one-hot targets; the teacher keeps passages it rates useful out of the negatives and, with positives
    teacher_top, picks the positive): on the 888 QASPER dev questions gold_mix 0.5 was below the gold-only ablation
    (R@1 -2.3 [-3.8, -0.7]) and 1.0 level with it (+0.5 [-0.8, +1.7]; bench/README.md, "Eleventh session")."""

    base_model: str = "all-minilm-l6-v2"
    # uae: soft teacher targets + in-batch negatives; infonce: gold only (the ablation); kl: the KL form over the
    # group; listwise: Plackett-Luce likelihood of the teacher's ranking, positives first (kl and listwise are
    # group-only: in_batch_negatives does not apply)
    loss: Literal["uae", "infonce", "kl", "listwise"] = "uae"
    output: str = "encoder"  # directory name in the run dir (the ablation writes encoder_infonce)
    tau_s: float = Field(0.05, gt=0)
    tau_t: float = Field(1.0, gt=0)
    n_hard_negatives: int = Field(7, ge=0)
    gold_mix: float = Field(1.0, ge=0, le=1)  # teacher target = (1-mix) softmax(r/tau_t) + mix * gold one-hot
    # r in the teacher: the reward model's scores (score-reward, the paper's method) or the raw utility labels of
    # the label stage (no denoising; the pools of the trained splits must be labeled)
    teacher: Literal["reward_model", "utilities"] = "reward_model"
    useful_quantile: float = Field(0.9, gt=0, le=1)  # teacher scores above this pool quantile are never negatives
    # the group's positives: the annotated gold passages; gold plus the pool's passages the teacher scores above
    # useful_quantile (multi-positive); the teacher's top passage of the pool (no passage annotation: UAE from
    # answers alone); or every pool passage that contains an answer string (distant supervision, no teacher)
    positives: Literal["gold", "gold_and_useful", "teacher_top", "answer_match"] = "gold"
    # positives teacher_top: skip a query whose teacher top score leads the pool's second best by less than this
    # (in the teacher's units: nats of per-token log-perplexity with teacher=utilities); 0 keeps every query
    min_teacher_margin: float = Field(0.0, ge=0)
    in_batch_negatives: bool = True
    max_query_length: int = Field(64, ge=8)
    max_passage_length: int = Field(256, ge=16)
    epochs: int = Field(2, ge=1)
    lr: float = Field(2e-5, gt=0)
    queries_per_step: int = Field(8, ge=1)  # per worker
    # recompute activations in backward: half the memory for ~40% more time (MiniLM, 72 sequences of 256 tokens:
    # peak 8.2 -> 4.1 GB, bench/bench_train_memory.py); for long passages or large groups that do not fit, where
    # fewer queries per step would also shrink the in-batch negatives
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None
    splits: list[Literal["train", "dev", "test"]] = Field(default_factory=lambda: ["train"])  # queries trained on
    checkpoint_every_steps: int = Field(0, ge=0)  # 0: checkpoint at epoch ends only
    seed: int = 13
    scaling: TrainScaling = TrainScaling()

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        return _output_name(v)

    @model_validator(mode="after")
    def _check_margin(self) -> TrainEncoderConfig:
        if self.min_teacher_margin > 0 and self.positives != "teacher_top":
            raise ValueError(f"min_teacher_margin applies to positives: teacher_top only (positives is "
                             f"{self.positives!r})")
        return self

    @property
    def needs_teacher(self) -> bool:
        """Whether the examples need teacher scores (soft targets, utility-aware negatives or teacher positives)."""
        return self.loss != "infonce" or self.positives in ("gold_and_useful", "teacher_top")


# ----------------------------------------------------------------------------------------------------------- index
class IndexConfig(StageConfig):
    """``uae-ray index``: encode the corpus and build S shards of a FAISS index."""

    encoder: str = "run:encoder"  # run:<dir> is a model directory in the run dir; else a registry name/id/path
    factory: str = "Flat"  # Flat, IVF{n},Flat, IVF{n},PQ{m}, HNSW{m}
    num_shards: int = Field(2, ge=1)
    train_sample: int = Field(100_000, ge=1)  # rows that train the IVF quantizer (once, cloned into every shard)
    nprobe: int | None = Field(None, ge=1)  # IVF lists probed per query (default min(nlist, 32)); in the manifest
    ef_search: int | None = Field(None, ge=1)  # HNSW efSearch (default 64); in the manifest
    use_gpu: bool | Literal["auto"] = "auto"  # auto: faiss-gpu when faiss sees a GPU (HNSW always builds on CPU)
    pool: ActorPool = ActorPool(batch_size=64)
    keep_versions: int = Field(3, ge=1)  # index/<version>/ dirs kept (newest; the one CURRENT names never deleted)
    encoder_backend: EncoderBackend = "torch"  # passage encoding on CPU actors (see EncoderBackend)

    @field_validator("factory")
    @classmethod
    def _factory(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"Flat|IVF\d+,Flat|IVF\d+,PQ\d+(x\d+)?|HNSW\d+(,Flat)?", v):
            raise ValueError(f"unsupported factory {v!r}: use Flat, IVF{{n}},Flat, IVF{{n}},PQ{{m}} or HNSW{{m}}")
        return v


# -------------------------------------------------------------------------------------------------------- evaluate
class EvaluateConfig(StageConfig):
    """``uae-ray evaluate``: every system in the pool and open-retrieval settings -> eval/report.{json,md,png}."""

    split: Literal["train", "dev", "test"] = "dev"
    systems: list[str] = Field(
        default_factory=lambda: ["bm25", "base", "infonce", "uae", "reward_rerank", "upr", "rankgpt"]
    )
    settings: list[Literal["pool", "open"]] = Field(default_factory=lambda: ["pool", "open"])
    max_queries: int | None = Field(None, ge=1)
    llm_rerank_max_queries: int | None = Field(50, ge=1)  # LLM re-rankers are slow on CPU: a subset, stated
    generate: bool = True  # Token F1 / ROUGE-L of the generator's greedy answer on the top-1 context
    generate_max_queries: int | None = Field(100, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    ks: list[int] = Field(default_factory=lambda: [1, 3, 5, 10])
    label_on_demand: bool = True  # ExpUtil@k: unlabeled top-k pairs are labeled with the same generator/prompt
    exp_util_ks: list[int] = Field(default_factory=lambda: [1, 3])  # ExpUtil@k cut-offs (top-k labeled on demand)
    # ExpUtil on a stated subset: only the first N queries (the seed's stable order) are labeled on demand; the others
    # get no ExpUtil (the report counts them). None: every query. Retrieval metrics always use every query.
    exp_util_max_queries: int | None = Field(None, ge=1)
    generate_ks: list[int] = Field(default_factory=lambda: [1])  # answers from the top-k passages joined
    label: LabelConfig | None = None  # generator + prompt for ExpUtil and answers; `uae-ray run` fills in its label
    base_encoder: str = "all-minilm-l6-v2"  # the base system (and first stage of every re-ranker)
    encoder_backend: EncoderBackend = "torch"  # query encoding of every dense system (see EncoderBackend)
    rerank_top_k: int = Field(20, ge=1)  # re-rankers re-order the base encoder's top K
    open_scope: Literal["auto", "document", "corpus"] = "auto"  # auto: as mine_report.json says, else by corpus
    rankgpt_window: int = Field(5, ge=2)
    rankgpt_step: int = Field(3, ge=1)
    rankgpt_passage_tokens: int = Field(64, ge=8)
    reward_max_length: int = Field(256, ge=16)
    # LLM re-rankers + answers; None: label.dtype
    llm_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    seed: int = 13  # which queries form the LLM / generation subsets (deterministic)
    # extra dense students, evaluated beside the systems: name -> ``run:<model dir>`` of this run dir, or a model
    # directory / registry name / hub id (e.g. the students of another run dir: runs/qasper/encoder)
    students: dict[str, str] = Field(default_factory=dict)
    # the systems every other one is compared with (paired differences, bootstrap intervals, p-values)
    compare_to: list[str] = Field(default_factory=lambda: ["base", "infonce"])
    output: str = "eval"  # directory name in the run dir (a second evaluation writes e.g. eval_fulldev)

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        return v if v == "eval" else _output_name(v)

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        known = {"bm25", "base", "infonce", "uae", "reward_rerank", "upr", "rankgpt"}
        unknown = sorted(set(self.systems) - known)
        if unknown:
            raise ValueError(f"unknown systems {unknown}; known: {sorted(known)}")
        clash = sorted(set(self.students) & (known | {"generator"}))  # report.json keys systems and "generator"
        if clash:
            raise ValueError(f"students {clash}: the name of a built-in system; choose another")
        bad = sorted(n for n in self.students if not n or not n.replace("_", "").replace("-", "").isalnum())
        if bad:
            raise ValueError(f"students {bad}: names are letters, digits, '_' and '-'")
        unknown_refs = sorted(set(self.compare_to) - known - set(self.students))  # absent systems: skipped
        if unknown_refs:
            raise ValueError(f"compare_to {unknown_refs}: neither a system ({sorted(known)}) nor a student")
        if min([*self.ks, *self.exp_util_ks, *self.generate_ks], default=1) < 1:
            raise ValueError("every k in ks, exp_util_ks and generate_ks must be >= 1")
        if self.rankgpt_step > self.rankgpt_window:
            raise ValueError("rankgpt_step must be <= rankgpt_window (else windows leave gaps)")
        return self


# ----------------------------------------------------------------------------------------------------------- serve
class ServeConfig(StageConfig):
    """``uae-ray serve``: Retriever ingress (query encoder inside) -> ShardGroup (every shard, FAISS threads)."""

    host: str = "127.0.0.1"  # not loopback: refuses to start without a token unless allow_unauthenticated
    port: int = Field(8000, ge=1, le=65535)
    grpc_port: int | None = Field(None, ge=1, le=65535)  # also serve gRPC uae_ray.Retrieval/Search (all interfaces)
    index_version: str | None = None  # None: the version index/CURRENT names at start (pinned for the app's life)
    encoder: str | None = None  # None: the encoder recorded in the index manifest (queries match passages)
    shard_replicas: int = Field(1, ge=1)
    encoder_replicas: int = Field(1, ge=1)  # ingress replicas: each holds the query encoder
    encoder_backend: EncoderBackend = "torch"  # the query encoder's runtime in the ingress (see EncoderBackend)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    max_k: int = Field(100, ge=1)
    token_env: str = "UAE_RAY_TOKEN"  # bearer token read from this environment variable; set but empty: an error
    allow_unauthenticated: bool = False  # serve a non-loopback host without a token (logged loudly)
    request_timeout_s: float = Field(30.0, gt=0)  # per request; a 504 when exceeded


# --------------------------------------------------------------------------------------------------------- storage
class StorageConfig(StageConfig):
    """Where an ``s3://`` run directory lives (the config file's top-level ``storage`` section). No credentials here,
    ever: each node takes them from its own environment. Unset fields fall back to ``AWS_ENDPOINT_URL`` /
    ``AWS_REGION``."""

    endpoint_url: str | None = None  # http(s)://host:port of MinIO, Ceph RGW, ...; None: AWS_ENDPOINT_URL or AWS
    region: str | None = None
    path_style: bool = True  # host/bucket/key addressing (MinIO, most on-premise stores); False: bucket.host/key

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"endpoint_url must start with http:// or https://, got {v!r}")
        return v


#: top-level keys of a config file that are not stage sections
RUN_SETTINGS = ("run_dir", "address", "num_cpus", "storage")


def storage_config(config_file: str | Path | None) -> StorageConfig:
    """The ``storage`` section of ``config_file`` (defaults when absent), validated."""
    section = read_config_file(config_file).get("storage") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{config_file}: section 'storage' must be a mapping")
    return build_config(StorageConfig, section, source=f"{config_file} [storage]")


# --------------------------------------------------------------------------------------------------------- loading
def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """The YAML file as a dict ({} when no file). Errors name the file."""
    if path is None:
        return {}
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{p}: config file not found") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of stage sections")
    return data


def apply_overrides(section: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``section`` with ``key.sub=value`` overrides applied (values parsed as YAML)."""
    out: dict[str, Any] = _deep_copy(section)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def build_config(
    cls: type[C], section: dict[str, Any], *, source: str, overrides: list[str] | None = None
) -> C:
    """Validate one stage section (after overrides) into its frozen model; errors name source and field."""
    data = apply_overrides(section, overrides or [])
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "<section>"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError(f"{source}: invalid {cls.__name__}:\n" + "\n".join(lines)) from e


def load_stage_config(
    cls: type[C], stage: str, config_file: str | Path | None, overrides: list[str] | None = None
) -> C:
    """Load the ``stage`` section of ``config_file`` (may be absent) with overrides, validated."""
    data = read_config_file(config_file)
    section = data.get(stage) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{config_file}: section {stage!r} must be a mapping")
    source = f"{config_file or '<defaults>'} [{stage}]"
    return build_config(cls, section, source=source, overrides=overrides)


def load_pipeline_config(config_file: str | Path, overrides: list[str] | None = None) -> Any:
    """The whole pipeline's config (:class:`uae_ray.stages.registry.PipelineConfig`, one section per pipeline step);
    overrides are ``step.key=value``."""
    from uae_ray.stages.registry import PipelineConfig

    data = read_config_file(config_file)
    data = {k: v for k, v in data.items() if k not in RUN_SETTINGS}
    return build_config(PipelineConfig, data, source=str(config_file), overrides=overrides)


def __getattr__(name: str) -> Any:
    """``PipelineConfig`` and ``STAGE_CONFIGS`` live in :mod:`uae_ray.stages.registry` (built from the one stage
    list); importing them from here still works."""
    if name in ("PipelineConfig", "STAGE_CONFIGS"):
        from uae_ray.stages import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
