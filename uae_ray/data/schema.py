"""Names and Arrow schemas of every table the stages hand each other in the run directory."""

from __future__ import annotations

import pyarrow as pa

# ---------------------------------------------------------------------------------------------- run-dir file names
CORPUS = "corpus.parquet"
QUERIES = "queries.parquet"
PREPARE_REPORT = "prepare_report.json"
CANDIDATES = "candidates.parquet"
MINE_REPORT = "mine_report.json"
UTILITIES = "utilities"  # a directory of Parquet parts; read it as one table (label: the current view, see below)
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

# ------------------------------------------------------------------------------------------- labeling (content cache)
# ``utilities/`` (UTILITIES) and ``utilities_skipped/`` (LABEL_SKIPPED) are the label stage's *current view*: exactly
# one row per current (qid, pid) pair, rewritten atomically at the end of every label run. The labels themselves live
# in an append-only cache keyed by content fingerprints (uae_ray.labeling.fingerprint): a row is reused whenever a
# pair's question, answers, passage text and numeric label settings are the same, whatever its qid/pid.
LABEL_SKIPPED = "utilities_skipped"  # the current view of pairs that could not be labeled, with the reason
LABEL_CACHE = "label_cache"  # Parquet parts part-<writer id>-NNNNNN.parquet: labeled and skipped pair fingerprints
LABEL_BASELINE = "label_baseline"  # Parquet parts: no-passage log-probs, once per baseline fingerprint
LEGACY_LABEL_BASELINE = "label_baseline.parquet"  # before content keys: keyed by qid only (ignored, removed)

FINGERPRINT_FIELD = pa.field("fingerprint", pa.string(), nullable=False)  # hex hash of what determined the row

#: ``utilities/`` as the label stage writes it: the downstream columns plus each row's pair fingerprint.
UTILITIES_VIEW_SCHEMA = UTILITIES_SCHEMA.append(FINGERPRINT_FIELD)

LABEL_SKIPPED_SCHEMA = pa.schema(
    [
        pa.field("qid", pa.string(), nullable=False),
        pa.field("pid", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # empty_answer | prompt_too_long
        pa.field("generator", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
        FINGERPRINT_FIELD,
    ]
)

LABEL_CACHE_SCHEMA = pa.schema(
    [
        FINGERPRINT_FIELD,  # pair fingerprint: settings, question, answers, passage text
        pa.field("qid", pa.string(), nullable=False),  # the pair it was made for (provenance only: never a key)
        pa.field("pid", pa.string(), nullable=False),
        pa.field("logp_with", pa.float32(), nullable=False),  # NaN for a skip
        pa.field("logp_without", pa.float32(), nullable=False),
        pa.field("n_answer_tokens", pa.int32(), nullable=False),
        pa.field("utility", pa.float32(), nullable=False),
        pa.field("skip_reason", pa.string(), nullable=False),  # "" when labeled
        pa.field("generator", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
        pa.field("settings", pa.string(), nullable=False),  # settings key (part of the fingerprint), for the report
    ]
)

LABEL_BASELINE_SCHEMA = pa.schema(
    [
        FINGERPRINT_FIELD,  # baseline fingerprint: settings, question, scored answers
        pa.field("qid", pa.string(), nullable=False),  # the query it was made for (provenance only)
        pa.field("answers", pa.list_(pa.string()), nullable=False),  # the answers scored (empty ones removed)
        pa.field("logp", pa.list_(pa.float32()), nullable=False),  # mean log p(answer_j | q); NaN: too long
        pa.field("n_tokens", pa.list_(pa.int32()), nullable=False),  # answer tokens of answer_j
        pa.field("generator", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
        pa.field("settings", pa.string(), nullable=False),
    ]
)
