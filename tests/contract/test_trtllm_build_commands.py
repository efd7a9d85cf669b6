"""Contract: the TensorRT-LLM commands `build` renders for the tensorrtllm backend carry the right flags, and
the run path (exercised with stand-in tools that write what the real ones write) is atomic and idempotent.

Flag names checked here are TensorRT-LLM's (tensorrt_llm/commands/build.py, tensorrt_llm/plugin/plugin.py,
examples/llama/convert_checkpoint.py); see trt_disagg/engine_build/tensorrtllm.py for the references.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml

from trt_disagg.config import Deployment, load_deployment, parse_deployment
from trt_disagg.contract import Role
from trt_disagg.engine_build import tensorrtllm
from trt_disagg.engine_build.builder import BuildStatus, build_deployment
from trt_disagg.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def flags(cmd: tuple[str, ...]) -> dict[str, str | None]:
    """`--flag value` pairs (value None for store_true flags); duplicates are a test failure."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(cmd):
        arg = cmd[i]
        if arg.startswith("--"):
            assert arg not in out, f"duplicate flag {arg}"
            has_value = i + 1 < len(cmd) and not cmd[i + 1].startswith("--")
            out[arg] = cmd[i + 1] if has_value else None
            i += 2 if has_value else 1
        else:
            i += 1
    return out


@pytest.fixture
def llama70b(tmp_path: Path) -> Deployment:
    data = yaml.safe_load((REPO / "configs" / "llama3-70b-8xh100.yaml").read_text())
    data["engines_dir"] = str(tmp_path / "engines")
    return parse_deployment(data, "llama3-70b")


def test_the_shipped_gpu_config_loads() -> None:
    dep = load_deployment(REPO / "configs" / "llama3-70b-8xh100.yaml")
    assert {g.backend for g in dep.groups().values()} == {"tensorrtllm"}


def test_rendered_flags_per_role(llama70b: Deployment, tmp_path: Path) -> None:
    results = build_deployment(llama70b, dry_run=True)
    assert [r.status for r in results] == [BuildStatus.DRY_RUN, BuildStatus.DRY_RUN]
    assert not (tmp_path / "engines").exists()
    by_role = {r.role: r for r in results}
    for role, tp, pp, batch, num_tokens in ((Role.PREFILL, 4, 1, 16, 16384), (Role.DECODE, 2, 2, 256, 8192)):
        cmds = by_role[role].commands
        assert cmds is not None
        convert, build = cmds.convert, cmds.build
        assert convert[0] == "python3" and convert[1].endswith("llama/convert_checkpoint.py")
        engine_dir = str(llama70b.engine_dir(role))
        ckpt = flags(convert)["--output_dir"]
        assert flags(convert) == {
            "--model_dir": "/models/Meta-Llama-3-70B-Instruct", "--output_dir": ckpt, "--dtype": "bfloat16",
            "--tp_size": str(tp), "--pp_size": str(pp), "--fp8_kv_cache": None}
        assert build[0] == "trtllm-build"
        assert flags(build) == {
            "--checkpoint_dir": ckpt, "--output_dir": engine_dir,
            "--gemm_plugin": "auto", "--gpt_attention_plugin": "auto",
            "--kv_cache_type": "paged", "--use_paged_context_fmha": "enable",
            "--remove_input_padding": "enable", "--tokens_per_block": "32",
            "--max_batch_size": str(batch), "--max_input_len": "8192", "--max_seq_len": "10240",
            "--max_num_tokens": str(num_tokens), "--use_fp8_context_fmha": "enable"}


def test_non_fp8_kv_has_no_quantization_flags(llama70b: Deployment) -> None:
    group = llama70b.context_servers
    assert group is not None
    bf16 = group.model_copy(update={"kv_cache_config": group.kv_cache_config.model_copy(
        update={"dtype": "bfloat16"})})
    cmds = tensorrtllm.render_commands(llama70b.model, bf16, model_dir="/m", checkpoint_dir="/c", engine_dir="/e")
    assert "--fp8_kv_cache" not in cmds.convert and "--int8_kv_cache" not in cmds.convert
    assert "--use_fp8_context_fmha" not in cmds.build
    assert "--paged_kv_cache" not in cmds.build  # deprecated spelling of --kv_cache_type paged


def test_examples_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(tensorrtllm.ENV_EXAMPLES_DIR, str(tmp_path))
    assert tensorrtllm.convert_script() == tmp_path / "llama" / "convert_checkpoint.py"
    newer = tmp_path / "models" / "core" / "llama" / "convert_checkpoint.py"
    newer.parent.mkdir(parents=True)
    newer.write_text("")
    assert tensorrtllm.convert_script() == newer


def test_shell_rendering_is_copy_pasteable() -> None:
    line = tensorrtllm.shell_line(("trtllm-build", "--output_dir", "/a b", "--x", "1"))
    assert line == "trtllm-build \\\n    --output_dir '/a b' \\\n    --x 1"


def test_missing_tools_is_a_user_error_with_the_commands(llama70b: Deployment, tmp_path: Path) -> None:
    with pytest.raises(UserError) as exc:
        build_deployment(llama70b)
    msg = str(exc.value)
    assert "context_servers.backend" in msg and "generation_servers.backend" in msg
    assert "trtllm-build \\\n    --checkpoint_dir" in msg and "convert_checkpoint.py" in msg
    assert not (tmp_path / "engines").exists()


def test_gguf_source_needs_hf_model_name(llama70b: Deployment) -> None:
    dep = llama70b.model_copy(update={"model": llama70b.model.model_copy(update={"source": "gguf", "path": None})})
    with pytest.raises(UserError, match="model.hf_model_name"):
        build_deployment(dep, dry_run=True)


def test_tokens_per_block_must_be_a_power_of_two(llama70b: Deployment) -> None:
    data = llama70b.model_dump(mode="json")
    data["context_servers"]["kv_cache_config"]["tokens_per_block"] = 48
    with pytest.raises(UserError, match="context_servers.kv_cache_config.tokens_per_block"):
        build_deployment(parse_deployment(data), dry_run=True)


def hf_dir(tmp_path: Path, num_kv_heads: int = 8, num_heads: int = 64) -> Path:
    path = tmp_path / "hf"
    path.mkdir(parents=True)
    cfg = {"model_type": "llama", "num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672,
           "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "vocab_size": 128256,
           "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def with_model_dir(dep: Deployment, path: Path) -> Deployment:
    return dep.model_copy(update={"model": dep.model.model_copy(update={"path": str(path)})})


def test_tp_must_divide_kv_heads_of_the_hf_checkpoint(llama70b: Deployment, tmp_path: Path) -> None:
    """TensorRT-LLM needs equal TP splits (the CPU engine would accept 4 ranks over 6 KV heads)."""
    dep = with_model_dir(llama70b, hf_dir(tmp_path, num_kv_heads=6, num_heads=48))
    with pytest.raises(UserError, match="context_servers.tensor_parallel_size: 4 does not divide the model's KV heads"):
        build_deployment(dep, dry_run=True)
    # and the real Llama-3-70B figures pass
    build_deployment(with_model_dir(llama70b, hf_dir(tmp_path / "ok")), dry_run=True)


FAKE_CONVERT = """
import argparse, json, os
p = argparse.ArgumentParser()
for f in ("--model_dir", "--output_dir", "--dtype", "--tp_size", "--pp_size"):
    p.add_argument(f)
p.add_argument("--fp8_kv_cache", action="store_true")
a = p.parse_args()
os.makedirs(a.output_dir, exist_ok=True)
ws = int(a.tp_size) * int(a.pp_size)
json.dump({"mapping": {"world_size": ws}}, open(os.path.join(a.output_dir, "config.json"), "w"))
"""

FAKE_TRTLLM_BUILD = """#!{python}
import json, os, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
if os.environ.get("FAKE_TRTLLM_FAIL"):
    sys.exit(3)
ckpt, out = args["--checkpoint_dir"], args["--output_dir"]
ws = json.load(open(os.path.join(ckpt, "config.json")))["mapping"]["world_size"]
os.makedirs(out, exist_ok=True)
json.dump({{"build_config": args}}, open(os.path.join(out, "config.json"), "w"))
for r in range(ws):
    open(os.path.join(out, "rank%d.engine" % r), "wb").write(b"engine")
"""


@pytest.fixture
def fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stand-ins for convert_checkpoint.py and trtllm-build that write the files the real ones write."""
    examples = tmp_path / "examples"
    (examples / "llama").mkdir(parents=True)
    (examples / "llama" / "convert_checkpoint.py").write_text(FAKE_CONVERT)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "trtllm-build"
    tool.write_text(FAKE_TRTLLM_BUILD.format(python=sys.executable))
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv(tensorrtllm.ENV_EXAMPLES_DIR, str(examples))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(tensorrtllm, "missing_tools", lambda: None)  # tensorrt_llm itself is not importable
    return tmp_path


def test_run_path_builds_atomically_and_idempotently(llama70b: Deployment, fake_tools: Path) -> None:
    dep = with_model_dir(llama70b, hf_dir(fake_tools))
    results = build_deployment(dep)
    assert [r.status for r in results] == [BuildStatus.BUILT, BuildStatus.BUILT]
    for role, world in ((Role.PREFILL, 4), (Role.DECODE, 4)):
        engine_dir = dep.engine_dir(role)
        assert sorted(p.name for p in engine_dir.glob("rank*.engine")) == [f"rank{r}.engine" for r in range(world)]
        info = json.loads((engine_dir / tensorrtllm.BUILD_INFO_FILE).read_text())
        assert info["role"] == role.value and info["inputs_digest"]
    assert sorted(p.name for p in (Path(dep.engines_dir) / dep.name).iterdir()) == ["decode", "prefill"]
    again = build_deployment(dep)
    assert [r.status for r in again] == [BuildStatus.UP_TO_DATE, BuildStatus.UP_TO_DATE]


def test_failing_tool_leaves_nothing(llama70b: Deployment, fake_tools: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    dep = with_model_dir(llama70b, hf_dir(fake_tools))
    monkeypatch.setenv("FAKE_TRTLLM_FAIL", "1")
    with pytest.raises(tensorrtllm.BuildFailed, match="trtllm-build exited with code 3"):
        build_deployment(dep, roles=["prefill"])
    root = Path(dep.engines_dir) / dep.name
    assert list(root.iterdir()) == []


def save_byte_level_tokenizer(path: Path) -> None:
    """A small byte-level BPE tokenizer (the kind Llama 3 and SmolLM2 use), saved as a model dir has it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"Ġt": len(alphabet), "Ġth": len(alphabet) + 1}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t"), ("Ġt", "h")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")
    fast.add_special_tokens({"eos_token": "<|end|>"})
    fast.save_pretrained(str(path))


def test_the_build_writes_the_xgrammar_tokenizer_info_the_rendered_config_points_at(
        llama70b: Deployment, fake_tools: Path) -> None:
    """Guided decoding on the tensorrtllm backend: the engine dir holds xgrammar_tokenizer_info.json in the
    format the backend reads (encoded_vocab, tokenizer_str, stop_token_ids), at the path the rendered
    config.pbtxt names, and it rebuilds the tokenizer's xgrammar TokenizerInfo exactly."""
    import xgrammar as xgr
    from google.protobuf import text_format
    from transformers import AutoTokenizer
    from tritonclient.grpc import model_config_pb2

    from trt_disagg.engine_build.xgrammar_info import tokenizer_info_from_file
    from trt_disagg.triton.render import render_deployment

    model_dir = hf_dir(fake_tools)
    save_byte_level_tokenizer(model_dir)
    dep = with_model_dir(llama70b, model_dir)
    build_deployment(dep, roles=["prefill"])
    (plan, repo), = [(p, r) for p, r in render_deployment(dep, fake_tools / "repos") if p.role is Role.PREFILL]
    cfg = text_format.Parse((repo / plan.model_name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    path = Path(cfg.parameters["xgrammar_tokenizer_info_path"].string_value)
    assert path == dep.engine_dir(Role.PREFILL) / "xgrammar_tokenizer_info.json" and path.is_file()
    data = json.loads(path.read_text())
    assert sorted(data) == ["encoded_vocab", "stop_token_ids", "tokenizer_str"]

    hf = AutoTokenizer.from_pretrained(str(model_dir))
    assert data["stop_token_ids"] == [hf.eos_token_id] and len(data["encoded_vocab"]) == len(hf)
    loaded, reference = tokenizer_info_from_file(path), xgr.TokenizerInfo.from_huggingface(hf)
    assert loaded.vocab_type == reference.vocab_type == xgr.VocabType.BYTE_LEVEL
    assert loaded.decoded_vocab == reference.decoded_vocab and loaded.stop_token_ids == reference.stop_token_ids
    assert loaded.add_prefix_space == reference.add_prefix_space
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(loaded).compile_json_schema('{"type": "object"}'))
    assert all(matcher.accept_token(t) for t in hf.encode('{"the": 1}', add_special_tokens=False))
    assert matcher.accept_token(hf.eos_token_id) and matcher.is_terminated()
