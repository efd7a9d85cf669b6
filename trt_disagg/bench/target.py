"""What the benchmark is aimed at: the deployment's tokenizer, limits and model, checked against the server.

A benchmark run against one deployment with another deployment's tokenizer or limits measures nothing
useful: prompts are counted with the wrong vocabulary, and requests the server cannot take are refused
and counted as SLO misses. So the lengths come from where the deployment says them:

    --config DEPLOYMENT   the deployment YAML: its name is the model, its engines' tokenizer counts the
                          prompts, its groups' limits cap them, its `slo` is the default SLO
    GET /v1/models/{id}   the router's card of the served model: `max_input_len` and `max_model_len`
                          (prompt + output tokens, vLLM's name); used when no config is given, and
                          compared with the config when one is

Flags (--tokenizer, --max-input-len, ...) still override, for servers that are not ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from trt_disagg.config import Deployment, load_deployment
from trt_disagg.errors import UserError


@dataclass(frozen=True)
class ServedLimits:
    """The token limits a server states for its model (None: it does not say)."""

    max_input_len: int | None  # longest prompt it takes
    max_model_len: int | None  # prompt + output tokens


@dataclass(frozen=True)
class DeploymentTarget:
    """What a deployment YAML says a benchmark of it must use."""

    config: Path
    deployment: Deployment
    tokenizer_dir: Path  # an engine directory of the deployment (its tokenizer/)
    max_input_len: int  # the smallest of its groups': what the router enforces
    max_seq_len: int

    @property
    def model(self) -> str:
        return self.deployment.name  # the router serves the deployment under its name


def deployment_target(config: Path, engines_root: Path | None = None) -> DeploymentTarget:
    """The model, tokenizer and limits of the deployment in `config` (its engines must be built)."""
    dep = load_deployment(config)
    groups = dep.groups()
    first = next(iter(groups))
    engine_dir = dep.engine_dir(first, engines_root)
    return DeploymentTarget(config=config, deployment=dep, tokenizer_dir=engine_dir,
                            max_input_len=min(g.max_input_len for g in groups.values()),
                            max_seq_len=min(g.max_seq_len for g in groups.values()))


async def fetch_served_limits(url: str, model: str, timeout_s: float = 5.0) -> ServedLimits:
    """The limits in GET /v1/models/{model}; both None when the server has no such card or states none."""
    base = url.rstrip("/")
    async with httpx.AsyncClient(timeout=timeout_s, trust_env=False) as client:
        try:
            resp = await client.get(f"{base}/v1/models/{model}")
            card: Any = resp.json() if resp.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            card = {}
    if not isinstance(card, dict):
        card = {}
    return ServedLimits(max_input_len=_positive_int(card.get("max_input_len")),
                        max_model_len=_positive_int(card.get("max_model_len")))


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_served_matches(target: DeploymentTarget, served: ServedLimits, url: str) -> None:
    """A UserError when the server states limits other than the config's: it serves another deployment."""
    theirs = {"max_input_len": served.max_input_len, "max_seq_len": served.max_model_len}
    ours = {"max_input_len": target.max_input_len, "max_seq_len": target.max_seq_len}
    differ = [f"{k}: config {ours[k]}, server {v}" for k, v in theirs.items() if v is not None and v != ours[k]]
    if differ:
        raise UserError(f"--config: {url} serves {target.model!r} with other limits than {target.config} "
                        f"({'; '.join(differ)}): benchmark the deployment the config describes")
