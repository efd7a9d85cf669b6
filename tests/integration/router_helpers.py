"""Shared by the router integration tests: a token-id tokenizer for fake engines, the tiny deployment,
and (from the unit router testkit, so there is one copy) uvicorn serving an app in the test's event loop."""

from __future__ import annotations

import re
from pathlib import Path

from tests.unit.router.router_testkit import serve
from trt_disagg.config import Deployment, load_deployment
from trt_disagg.triton.fake_engine import FAKE_SHAPE, fake_next_token

__all__ = ["EOS", "IdTokenizer", "expected", "serve", "tiny"]

REPO = Path(__file__).resolve().parents[2]
EOS = int(FAKE_SHAPE.eos_token_id or 2)


class IdTokenizer:
    """Text is the ids spelled out, so the client's text gives back the exact token list."""

    eos_token_id = EOS
    vocab_size = FAKE_SHAPE.vocab_size

    def encode(self, text: str) -> list[int]:
        return [int(x) for x in re.findall(r"<(\d+)>", text)]

    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{t}>" for t in ids if t != EOS)

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return [1] + [t for m in messages for t in self.encode(m["content"])]


def expected(prompt: list[int], n: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        t = fake_next_token(seq)
        if t == EOS:
            break
        out.append(t)
        seq.append(t)
    return out


def tiny(num_decode: int = 1) -> Deployment:
    dep = load_deployment(REPO / "configs" / "tiny.yaml")
    assert dep.generation_servers is not None
    return dep.model_copy(update={"generation_servers": dep.generation_servers.model_copy(
        update={"num_instances": num_decode})})
