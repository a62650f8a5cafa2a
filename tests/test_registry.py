"""Model registry: name resolution, clear errors, and the GGUF -> Hugging Face folder conversion."""

from __future__ import annotations

from pathlib import Path

import pytest

from uae_ray.models.registry import (
    MINILM,
    SMOLLM2,
    ModelNotFoundError,
    hf_folder,
    load_causal_lm,
    load_tokenizer,
    resolve,
)


def test_resolve_embedded_names():
    gguf = resolve(SMOLLM2)
    assert gguf.source == "embedded" and gguf.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (Path(gguf.path) / gguf.gguf_file).is_file()
    minilm = resolve("All-MiniLM-L6-v2 ")  # case and surrounding space do not matter
    assert minilm.source == "embedded" and minilm.gguf_file is None
    assert (Path(minilm.path) / "config.json").is_file()


def test_resolve_local_paths_and_hub_ids(tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    assert resolve(str(model_dir)).source == "local" and resolve(str(model_dir)).path == str(model_dir.resolve())
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    ref = resolve(str(gguf))
    assert ref.source == "local" and ref.gguf_file == "m.gguf" and ref.path == str(tmp_path.resolve())
    assert resolve("sentence-transformers/all-MiniLM-L6-v2").source == "hub"


def test_unknown_names_give_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"'no such model' is not a known model: use 'smollm2-135m-instruct'"):
        resolve("no such model")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match=r"neither a model directory nor a \.gguf file"):
        resolve(str(weights))
    with pytest.raises(ModelNotFoundError, match="could not load tokenizer"):
        load_tokenizer(str(tmp_path))  # an existing but empty folder


def test_tokenizers_load_once():
    tok = load_tokenizer(MINILM)
    assert load_tokenizer(MINILM) is tok
    assert tok("a b")["input_ids"][0] == tok.cls_token_id


@pytest.mark.slow
def test_gguf_folder_matches_the_gguf_model():
    """The converted folder holds exactly the GGUF weights rounded to bf16 (how it is stored), so with those
    weights the GGUF-loaded model gives the same logits; with the full fp32 GGUF weights only rounding differs."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = hf_folder(SMOLLM2)
    assert (Path(folder) / "_SUCCESS").is_file() and hf_folder(SMOLLM2) == folder  # converted once, then cached
    model, tok = load_causal_lm(SMOLLM2, "float32")
    assert load_causal_lm(SMOLLM2, "float32")[0] is model and tok.padding_side == "left" and tok.pad_token
    ref = resolve(SMOLLM2)
    gguf = AutoModelForCausalLM.from_pretrained(ref.path, gguf_file=ref.gguf_file, dtype=torch.float32).eval()
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt")
    with torch.inference_mode():
        converted = model(**ids).logits
        original = gguf(**ids).logits
        assert torch.equal(converted.argmax(-1), original.argmax(-1))
        assert (converted - original).abs().max().item() < 1.0  # bf16 storage: measured 0.22 on logits up to 27
        folder_sd = model.state_dict()
        for name, w in gguf.state_dict().items():
            assert torch.equal(w.to(torch.bfloat16).float(), folder_sd[name]), name
            w.copy_(w.to(torch.bfloat16).float())
        rounded = gguf(**ids).logits
    torch.testing.assert_close(rounded, converted, rtol=0, atol=1e-4)
    assert tok.decode(converted[0, -1].argmax()).strip() == "Rome"


def test_auto_dtype_picks_bf16_only_where_the_hardware_has_it():
    from uae_ray.models.registry import cpu_has_bf16, resolve_dtype

    assert resolve_dtype("float32", "cuda") == "float32"  # explicit choices are kept
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert resolve_dtype("auto", "cuda:0") == "bfloat16"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert cpu_has_bf16() is native
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
