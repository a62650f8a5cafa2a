"""Names and Arrow schemas of every table the stages hand each other in the run directory."""

from __future__ import annotations

import pyarrow as pa

# ---------------------------------------------------------------------------------------------- run-dir file names
CORPUS = "corpus.parquet"
QUERIES = "queries.parquet"
PREPARE_REPORT = "prepare_report.json"
CANDIDATES = "candidates.parquet"
MINE_REPORT = "mine_report.json"
UTILITIES = "utilities"  # a directory of Parquet parts (resumable); read it as one table
LABEL_REPORT = "label_report.json"
REWARD_MODEL = "reward_model"
REWARD_REPORT = "reward_report.json"
TEACHER_SCORES = "teacher_scores.parquet"
ENCODER = "encoder"
ENCODER_INFONCE = "encoder_infonce"
CHECKPOINTS = "checkpoints"  # Ray Train storage_path
INDEX = "index"
EVAL = "eval"

SPLITS = ("train", "dev", "test")

# ------------------------------------------------------------------------------------------------------------ schemas
CORPUS_SCHEMA = pa.schema(
    [
        pa.field("pid", pa.string(), nullable=False),  # stable: f"{doc_id}#{para_idx}" or f"{doc_id}#{para}.{win}"
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("text", pa.string(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),  # in the prepare tokenizer's tokens
    ]
)

QUERIES_SCHEMA = pa.schema(
    [
        pa.field("qid", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answers", pa.list_(pa.string()), nullable=False),  # all acceptable gold answers
        pa.field("gold_pids", pa.list_(pa.string()), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)

CANDIDATES_SCHEMA = pa.schema(
    [
        pa.field("qid", pa.string(), nullable=False),
        pa.field("pid", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),  # 0-based rank in the pool
        pa.field("base_score", pa.float32(), nullable=False),  # cosine under the base encoder
        pa.field("is_gold", pa.bool_(), nullable=False),
    ]
)

UTILITIES_SCHEMA = pa.schema(
    [
        pa.field("qid", pa.string(), nullable=False),
        pa.field("pid", pa.string(), nullable=False),
        pa.field("logp_with", pa.float32(), nullable=False),  # mean log p(answer token | q, d)
        pa.field("logp_without", pa.float32(), nullable=False),  # mean log p(answer token | q)
        pa.field("n_answer_tokens", pa.int32(), nullable=False),
        pa.field("utility", pa.float32(), nullable=False),  # logp_with - logp_without = log PPL(a|q) - log PPL(a|q,d)
        pa.field("generator", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
    ]
)

TEACHER_SCORES_SCHEMA = pa.schema(
    [
        pa.field("qid", pa.string(), nullable=False),
        pa.field("pid", pa.string(), nullable=False),
        pa.field("teacher_score", pa.float32(), nullable=False),
    ]
)

INDEX_IDS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),  # FAISS global id
        pa.field("pid", pa.string(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
    ]
)

# ------------------------------------------------------------------------------------------- labeling (resumability)
LABEL_SKIPPED = "utilities_skipped"  # a directory of Parquet parts: pairs that could not be labeled, with the reason
LABEL_BASELINE = "label_baseline.parquet"  # no-passage log-probs, once per (query, answer)

LABEL_SKIPPED_SCHEMA = pa.schema(
    [
        pa.field("qid", pa.string(), nullable=False),
        pa.field("pid", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # empty_answer | prompt_too_long
        pa.field("generator", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
    ]
)

LABEL_BASELINE_SCHEMA = pa.schema(
    [
        pa.field("qid", pa.string(), nullable=False),
        pa.field("answers", pa.list_(pa.string()), nullable=False),  # the answers scored (empty ones removed)
        pa.field("logp", pa.list_(pa.float32()), nullable=False),  # mean log p(answer_j | q); NaN: too long
        pa.field("n_tokens", pa.list_(pa.int32()), nullable=False),  # answer tokens of answer_j
        pa.field("generator", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
    ]
)
