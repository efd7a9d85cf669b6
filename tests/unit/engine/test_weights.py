"""Model sources: the tiny seeded Llama, a Hugging Face safetensors dir, and (slow) the SmolLM2 GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trt_disagg.config import ModelSource
from trt_disagg.contract import ModelShape
from trt_disagg.engine import weights
from trt_disagg.engine.weights import (
    EMBED,
    LM_HEAD,
    LoadedModel,
    build_hf_reference,
    file_sha256,
    load_source,
    peek_shape,
    shape_from_hf_config,
    source_digest,
    tensors_sha256,
)
from trt_disagg.errors import UserError

TINY = ModelSource(source="tiny", seed=0)


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_source(TINY)


def test_tiny_shape_and_names(tiny: LoadedModel) -> None:
    assert tiny.shape == ModelShape(num_layers=4, hidden_size=256, intermediate_size=512, num_heads=8,
                                    num_kv_heads=4, vocab_size=49152, max_position_embeddings=2048,
                                    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                    bos_token_id=1, eos_token_id=2)
    assert tiny.shape == peek_shape(TINY)
    assert {EMBED, LM_HEAD, "model.norm.weight"} <= set(tiny.state_dict)
    assert len(tiny.state_dict) == 3 + 9 * 4
    assert all(t.dtype == torch.float32 for t in tiny.state_dict.values())


def test_tied_lm_head_is_materialised_as_its_own_tensor(tiny: LoadedModel) -> None:
    assert torch.equal(tiny.state_dict[LM_HEAD], tiny.state_dict[EMBED])
    assert tiny.state_dict[LM_HEAD].data_ptr() != tiny.state_dict[EMBED].data_ptr()


def test_tiny_equals_the_hf_reference_and_leaves_rng_alone(tiny: LoadedModel) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    ref = build_hf_reference(TINY)
    assert torch.equal(torch.rand(3), expected_next)  # building did not consume the caller's RNG
    assert not ref.training
    ref_state = ref.state_dict()
    for name, tensor in tiny.state_dict.items():
        assert torch.equal(ref_state[name], tensor), name


def test_tiny_digest_is_deterministic_and_seeded(tiny: LoadedModel) -> None:
    again = load_source(TINY)
    assert again.weights_digest == tiny.weights_digest == tensors_sha256(tiny.state_dict)
    other = load_source(ModelSource(source="tiny", seed=1))
    assert other.weights_digest != tiny.weights_digest
    assert other.fingerprint != tiny.fingerprint
    assert not torch.equal(other.state_dict[EMBED], tiny.state_dict[EMBED])


def test_dtype_is_applied() -> None:
    loaded = load_source(ModelSource(source="tiny", dtype="bfloat16"))
    assert all(t.dtype == torch.bfloat16 for t in loaded.state_dict.values())


def test_rope_theta_is_read_from_rope_parameters() -> None:
    cfg = weights.tiny_hf_config(0).to_dict()
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 100000.0}
    cfg.pop("rope_theta", None)
    assert shape_from_hf_config(cfg).rope_theta == 100000.0


def test_unsupported_rope_scaling_is_refused() -> None:
    cfg = weights.tiny_hf_config(0).to_dict()
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    with pytest.raises(UserError, match="rope type 'llama3'"):
        shape_from_hf_config(cfg, "model.path")
    assert shape_from_hf_config(cfg, check=False).rope_theta == 500000.0


@pytest.mark.parametrize("change,message", [
    ({"model_type": "qwen2"}, "model_type 'qwen2'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_what_the_engine_cannot_compute_is_refused(change: dict, message: str) -> None:
    cfg = {**weights.tiny_hf_config(0).to_dict(), **change}
    with pytest.raises(UserError, match=f"model.path: {message}"):
        shape_from_hf_config(cfg, "model.path")


def _save_hf_dir(path: Path, tiny: LoadedModel) -> None:
    ref = build_hf_reference(TINY)
    ref.save_pretrained(str(path))
    tiny.tokenizer.save_pretrained(str(path))


def test_hf_dir_loads_the_same_weights(tmp_path: Path, tiny: LoadedModel) -> None:
    _save_hf_dir(tmp_path, tiny)
    source = ModelSource(source="hf", path=str(tmp_path))
    loaded = load_source(source)
    assert loaded.shape == tiny.shape
    assert set(loaded.state_dict) == set(tiny.state_dict)
    for name, tensor in tiny.state_dict.items():
        assert torch.equal(loaded.state_dict[name], tensor), name
    assert loaded.weights_digest == source_digest(source)
    assert loaded.tokenizer("hello world")["input_ids"] == tiny.tokenizer("hello world")["input_ids"]
    ref = build_hf_reference(source)
    assert torch.equal(ref.state_dict()[EMBED], tiny.state_dict[EMBED])


def test_hf_dir_digest_changes_with_the_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(weights.tiny_hf_config(0).to_dict()))
    (tmp_path / "model.safetensors").write_bytes(b"one")
    source = ModelSource(source="hf", path=str(tmp_path))
    first = source_digest(source)
    (tmp_path / "model.safetensors").write_bytes(b"two!")
    assert source_digest(source) != first


@pytest.mark.parametrize("setup,message", [
    ("missing", "not found"),
    ("no_config", "no config.json"),
    ("no_safetensors", "no \\*.safetensors"),
])
def test_bad_hf_dir_names_model_path(tmp_path: Path, setup: str, message: str) -> None:
    path = tmp_path / "model"
    if setup != "missing":
        path.mkdir()
    if setup == "no_safetensors":
        (path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=f"model.path: .*{message}"):
        load_source(ModelSource(source="hf", path=str(path)))


def test_missing_gguf_names_model_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model.path: GGUF file not found"):
        load_source(ModelSource(source="gguf", path=str(tmp_path / "nope.gguf")))


def test_file_digest_is_sha256(tmp_path: Path) -> None:
    import hashlib

    f = tmp_path / "x.bin"
    f.write_bytes(b"abc" * 1000)
    assert file_sha256(f) == hashlib.sha256(b"abc" * 1000).hexdigest()


@pytest.mark.slow
def test_smollm2_gguf_loads() -> None:
    source = ModelSource(source="gguf")
    loaded = load_source(source)
    s = loaded.shape
    assert (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.vocab_size) == (30, 576, 9, 3, 49152)
    assert s.rope_theta == 100000.0  # from rope_parameters (transformers 5)
    assert s.tie_word_embeddings and torch.equal(loaded.state_dict[LM_HEAD], loaded.state_dict[EMBED])
    assert loaded.weights_digest == file_sha256(weights.default_gguf_path())
    assert peek_shape(source) == s
    # the tiny model borrows this tokenizer's figures without reading the file
    tok = loaded.tokenizer
    assert len(tok) == weights.SMOLLM2_VOCAB_SIZE
    assert (tok.bos_token_id, tok.eos_token_id) == (weights.SMOLLM2_BOS_ID, weights.SMOLLM2_EOS_ID)
