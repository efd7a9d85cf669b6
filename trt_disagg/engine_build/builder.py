"""`trt-disagg build`: one model source -> one engine directory per role of a deployment.

    plan_build      for each role: engine dir, inputs digest, up to date?   (reads only; cheap)
    load + check    load the source ONCE, validate every role (tp/pp, KV, tools) before writing anything
    build           python: shard -> rank{i}.safetensors + tokenizer + config.json, staged then renamed
                    tensorrtllm: convert_checkpoint.py + trtllm-build (or, dry run / not installed: render)

A role whose engine on disk carries the same inputs digest is skipped ("up to date") unless forced.
Progress goes to a `BuildObserver` (the CLI draws it with rich); this module never prints.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from trt_disagg.config import Deployment, ModelSource, ServerGroup
from trt_disagg.contract import ModelShape, Role
from trt_disagg.engine.device import check_device
from trt_disagg.engine.sharding import shard_state_dict, validate_parallelism
from trt_disagg.engine.weights import (
    LoadedModel,
    load_source,
    peek_shape,
    shape_from_hf_config,
    source_digest,
)
from trt_disagg.engine_dir import TOKENIZER_DIR
from trt_disagg.errors import UserError

from . import python_engine, tensorrtllm
from .digest import inputs_digest
from .staging import clean_stale, scratch_dir, staged_dir
from .xgrammar_info import XGRAMMAR_TOKENIZER_INFO, write_tokenizer_info

log = logging.getLogger(__name__)

ROLE_FIELD = {Role.PREFILL: "context_servers", Role.DECODE: "generation_servers",
              Role.COLOCATED: "colocated_servers"}


class BuildStatus(enum.StrEnum):
    BUILT = "built"
    UP_TO_DATE = "up to date"
    DRY_RUN = "dry run"  # validated and rendered, nothing written


@dataclass(frozen=True)
class RolePlan:
    role: Role
    group: ServerGroup
    where: str  # the config field of this role, for error messages
    engine_dir: Path
    inputs_digest: str
    up_to_date: bool
    commands: tensorrtllm.TrtllmCommands | None  # tensorrtllm only

    @property
    def backend(self) -> str:
        return self.group.backend

    @property
    def num_steps(self) -> int:
        """Progress steps: python = shard + one per rank + tokenizer/config; tensorrtllm = 2 tools + finish."""
        return self.group.world_size + 2 if self.backend == "python" else 3


@dataclass(frozen=True)
class RoleResult:
    role: Role
    backend: str
    tp: int
    pp: int
    engine_dir: Path
    status: BuildStatus
    seconds: float
    commands: tensorrtllm.TrtllmCommands | None = None


class BuildObserver(Protocol):
    def message(self, text: str) -> None: ...
    def role_started(self, plan: RolePlan) -> None: ...
    def role_step(self, role: Role, description: str) -> None: ...
    def role_finished(self, result: RoleResult) -> None: ...


class NullObserver:
    def message(self, text: str) -> None:
        log.info("%s", text)

    def role_started(self, plan: RolePlan) -> None:
        pass

    def role_step(self, role: Role, description: str) -> None:
        pass

    def role_finished(self, result: RoleResult) -> None:
        pass


def select_groups(dep: Deployment, roles: list[str] | None) -> dict[Role, ServerGroup]:
    groups = dep.groups()
    if not roles:
        return groups
    out: dict[Role, ServerGroup] = {}
    for name in roles:
        try:
            role = Role(name)
        except ValueError:
            raise UserError(f"--role: unknown role {name!r} (one of {', '.join(r.value for r in Role)})") from None
        if role not in groups:
            raise UserError(f"--role: deployment {dep.name} has no {role.value} role "
                            f"({ROLE_FIELD[role]} is not set)")
        out[role] = groups[role]
    return out


def _trtllm_source_id(source: ModelSource) -> str:
    """Identity of a (possibly huge, possibly remote) HF checkpoint without hashing its bytes."""
    model_dir = Path(tensorrtllm.model_dir_for(source))
    if not model_dir.is_dir():
        return f"path:{model_dir}"
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir() if p.is_file())
    return json.dumps({"path": str(model_dir.resolve()), "files": stats})


def plan_build(dep: Deployment, *, engines_root: Path | None = None, roles: list[str] | None = None,
               force: bool = False) -> list[RolePlan]:
    """What a build would do; reads configs and digests only. Raises UserError for a missing source."""
    groups = select_groups(dep, roles)
    python_id = source_digest(dep.model) if any(g.backend == "python" for g in groups.values()) else None
    plans = []
    for role, group in groups.items():
        target = dep.engine_dir(role, engines_root)
        commands = None
        if group.backend == "python":
            digest = inputs_digest(dep.model, group, role, source_id=python_id)
            on_disk = python_engine.existing_digest(target)
        else:
            digest = inputs_digest(dep.model, group, role, source_id=_trtllm_source_id(dep.model))
            on_disk = tensorrtllm.existing_digest(target, group.world_size)
            commands = tensorrtllm.render_commands(
                dep.model, group, model_dir=tensorrtllm.model_dir_for(dep.model),
                checkpoint_dir=target.parent / f".{target.name}.ckpt", engine_dir=target)
        plans.append(RolePlan(role, group, ROLE_FIELD[role], target, digest,
                              up_to_date=(not force and on_disk == digest), commands=commands))
    return plans


def _validate_static(dep: Deployment, plans: list[RolePlan], dry_run: bool) -> None:
    """The checks that need no weights (KV sizes, TensorRT-LLM flags and tools), before loading anything."""
    for plan in plans:
        if plan.backend == "python" and not dry_run:  # the engines it builds are served on that device
            check_device(plan.group.device, plan.group.world_size, f"{plan.where}.device")
        if plan.up_to_date:
            continue
        if plan.backend == "python":
            python_engine.kv_cache_spec(plan.group, plan.where)
            continue
        tensorrtllm.validate_group(plan.group, plan.where)
        hf_config = Path(tensorrtllm.model_dir_for(dep.model)) / "config.json"
        if hf_config.is_file():
            hf_shape = shape_from_hf_config(json.loads(hf_config.read_text()), "model.path", check=False)
            validate_parallelism(hf_shape, plan.group.tp, plan.group.pp, plan.where, even_tp=True)
    trtllm_todo = [p for p in plans if p.backend == "tensorrtllm" and not p.up_to_date]
    missing = tensorrtllm.missing_tools() if trtllm_todo and not dry_run else None
    if missing is not None:
        fields = ", ".join(f"{p.where}.backend" for p in trtllm_todo)
        shell = "\n".join(f"# {p.role.value}\n{p.commands.to_shell()}" for p in trtllm_todo if p.commands)
        raise UserError(f"{fields}: tensorrtllm cannot build here: {missing}.\n"
                        f"Run these on a machine with TensorRT-LLM (or use --dry-run to only print them):\n{shell}")


def _validate_parallelism(plans: list[RolePlan], shape: ModelShape) -> None:
    for plan in plans:
        if plan.backend == "python" and not plan.up_to_date:
            validate_parallelism(shape, plan.group.tp, plan.group.pp, plan.where)


def _build_python(dep: Deployment, plan: RolePlan, model: LoadedModel, observer: BuildObserver) -> None:
    config = python_engine.engine_config(plan.role, plan.group, model.shape, dtype=dep.model.dtype,
                                         fingerprint=model.fingerprint, inputs_digest=plan.inputs_digest,
                                         where=plan.where)
    shards = shard_state_dict(model.state_dict, model.shape, plan.group.tp, plan.group.pp)
    observer.role_step(plan.role, f"sharded tp={plan.group.tp} pp={plan.group.pp}")
    python_engine.write_python_engine(plan.engine_dir, config, shards, model.tokenizer,
                                      on_step=lambda desc: observer.role_step(plan.role, desc))


def _build_trtllm(dep: Deployment, plan: RolePlan, observer: BuildObserver) -> None:
    model_dir = tensorrtllm.model_dir_for(dep.model)
    with scratch_dir(plan.engine_dir, "ckpt") as ckpt, staged_dir(plan.engine_dir) as tmp:
        cmds = tensorrtllm.render_commands(dep.model, plan.group, model_dir=model_dir, checkpoint_dir=ckpt,
                                           engine_dir=tmp)
        tensorrtllm.run_commands(cmds, on_step=lambda desc: observer.role_step(plan.role, desc))
        _copy_tokenizer(model_dir, tmp)
        tensorrtllm.write_build_info(tmp, inputs_digest=plan.inputs_digest, role=plan.role.value,
                                     tp=plan.group.tp, pp=plan.group.pp, cmds=cmds)
        observer.role_step(plan.role, "tokenizer + build info")


def _copy_tokenizer(model_dir: str, engine_dir: Path) -> None:
    """The tokenizer into engine_dir/tokenizer, and the xgrammar_tokenizer_info.json the tensorrtllm backend's
    guided decoding reads (structured output, tool calls) next to the engine."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        tokenizer.save_pretrained(str(engine_dir / TOKENIZER_DIR))
    except Exception as exc:  # noqa: BLE001 - best effort: transformers raises many types for odd dirs
        log.warning("no tokenizer copied from %s (%s); point Triton's tokenizer_dir at it", model_dir, exc)
        return
    try:
        write_tokenizer_info(engine_dir, tokenizer)
    except ValueError as exc:
        log.warning("no %s written (%s): the tensorrtllm backend loads this engine only once it exists",
                    XGRAMMAR_TOKENIZER_INFO, exc)


def _check_loaded(source: ModelSource, model: LoadedModel) -> None:
    """A model handed to the build was loaded from `source` itself (a caller's mistake otherwise)."""
    if model.source != source:
        raise ValueError(f"the loaded model is not the deployment's model: loaded from {model.source}, "
                         f"the deployment names {source}")


def build_deployment(dep: Deployment, *, engines_root: Path | None = None, roles: list[str] | None = None,
                     force: bool = False, dry_run: bool = False, observer: BuildObserver | None = None,
                     model: LoadedModel | None = None) -> list[RoleResult]:
    """Build (or, dry run, validate and render) every selected role; returns one result per role.

    `model`: `dep.model` already loaded (load_source), for a caller that builds several deployments of one
    source, a sweep over layouts for instance: loading a GGUF (parsing, dequantizing) takes longer than
    sharding and writing a small engine, so it is done once."""
    obs = observer or NullObserver()
    plans = plan_build(dep, engines_root=engines_root, roles=roles, force=force)
    _validate_static(dep, plans, dry_run)
    python_todo = [p for p in plans if p.backend == "python" and not p.up_to_date]
    if model is not None:
        _check_loaded(dep.model, model)
    if python_todo and not dry_run:
        if model is None:
            obs.message(f"loading model source {dep.model.source} ({dep.model.path or 'default'})")
            model = load_source(dep.model)
        _validate_parallelism(plans, model.shape)
    elif python_todo:
        _validate_parallelism(plans, peek_shape(dep.model))

    if not dry_run:
        clean_stale(Path(engines_root or dep.engines_dir) / dep.name)
    results = []
    for plan in plans:
        t0 = time.perf_counter()
        if plan.up_to_date:
            status = BuildStatus.UP_TO_DATE
        elif dry_run:
            status = BuildStatus.DRY_RUN
        else:
            obs.role_started(plan)
            if plan.backend == "python":
                assert model is not None
                _build_python(dep, plan, model, obs)
            else:
                _build_trtllm(dep, plan, obs)
            status = BuildStatus.BUILT
        result = RoleResult(plan.role, plan.backend, plan.group.tp, plan.group.pp, plan.engine_dir, status,
                            time.perf_counter() - t0, plan.commands)
        obs.role_finished(result)
        results.append(result)
    return results
