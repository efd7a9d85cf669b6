"""Runs the model's forward pass on one process (TP1 x PP1) or on tp*pp rank processes.

    driver (scheduler, sampling)                         rank processes (spawned, one per TP x PP rank)
      | ForwardCmd(step) --pipe--> every rank      stage 0: embed + layers --dist.send--> stage 1 ...
      |                                            TP ranks of a stage all-reduce o/down outputs
      |                                            (gloo on the CPU, NCCL on CUDA: engine/device.py)
      | <--pipe-- logits [B, vocab]                last stage, tp rank 0 replies with the logits
      | <--pipe-- Ack from every other rank        so a failed rank is seen at once, not as a hang

Ranks load their own weight shard from the engine directory: no weights cross a pipe. Commands are typed
dataclasses, not strings. Every rank answers every command; the driver raises `RankFailure` on an error
reply or a dead rank (any rank: a survivor may be blocked in a collective with the dead one), and
`failure()` says, without a command, whether every rank is still alive (the instance's health watch).
`shutdown()` stops and joins every rank (then kills what did not stop).

The ranks rendezvous through a FileStore in a private temp dir, not torch's TCP store: the TCP store's
server listens on every interface whatever address `init_method` names, and nothing here should be
reachable from outside the host. Gloo's own sockets bind the loopback interface (GLOO_SOCKET_IFNAME=lo).
The store is needed only until every rank has built its groups, so the dir is removed once they are ready.
On CUDA each rank owns one device (`device.rank_device`) and NCCL's bootstrap sockets bind the loopback too
(NCCL_SOCKET_IFNAME=lo); what goes back over the pipes (logits, KV) is copied to the host first.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trt_disagg.contract import pp_layer_ranges, rank_of, tp_slices
from trt_disagg.engine.device import check_device, collective_backend, rank_device
from trt_disagg.engine.model import RankModel
from trt_disagg.engine.step_input import StepInput, build_step_tensors
from trt_disagg.engine_dir import EngineConfig, rank_file

log = logging.getLogger(__name__)

RANK_START_TIMEOUT_S = 300.0
RANK_STOP_TIMEOUT_S = 1.5  # all ranks together; a rank still alive then is killed (instances stop in < 3 s)
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)


class RankFailure(RuntimeError):
    """A rank process raised or died; the engine cannot continue."""


class ModelRunner(Protocol):
    def forward(self, step: StepInput) -> torch.Tensor: ...  # logits [num_seqs, vocab]
    def read_kv(self, slots: list[int]) -> dict[int, torch.Tensor]: ...  # rank -> its KV slice
    def write_kv(self, slots: list[int], shards: dict[int, torch.Tensor]) -> None: ...
    def failure(self) -> str | None: ...  # why the ranks cannot serve (one died), None while they can
    def shutdown(self) -> None: ...


def _torch_dtype(name: str) -> torch.dtype:
    if name == "fp8":
        return torch.float8_e4m3fn
    return getattr(torch, name)


def build_rank_model(cfg: EngineConfig, engine_dir: Path, rank: int, all_reduce=None,
                     device: torch.device | None = None) -> RankModel:
    # Imported here, not at the top: the engine itself runs without safetensors when its weights come from
    # memory (benchmarks/gpu_profile.py on a machine that has torch and nothing else).
    from safetensors.torch import load_file

    dev = device or torch.device("cpu")
    tp_rank, pp_rank = rank % cfg.tp, rank // cfg.tp
    weights = load_file(str(engine_dir / rank_file(rank)), device=str(dev))
    dtype = _torch_dtype(cfg.dtype)
    weights = {k: v.to(dtype) for k, v in weights.items()}
    kwargs = {"all_reduce": all_reduce} if all_reduce is not None else {}
    return RankModel(
        cfg.shape, weights, tp_slice=tp_slices(cfg.shape, cfg.tp)[tp_rank],
        layers=pp_layer_ranges(cfg.shape.num_layers, cfg.pp)[pp_rank],
        is_first_stage=pp_rank == 0, is_last_stage=pp_rank == cfg.pp - 1,
        num_kv_slots=cfg.kv_cache.num_blocks * cfg.kv_cache.tokens_per_block,
        kv_dtype=_torch_dtype(cfg.kv_cache.dtype),
        max_positions=cfg.limits.max_seq_len,
        device=dev,
        **kwargs,
    )


class LocalRunner:
    """TP1 x PP1: the model runs in the driver's process (no IPC on the hot path); logits stay on its device."""

    def __init__(self, cfg: EngineConfig, model: RankModel) -> None:
        self.cfg = cfg
        self.model = model

    @classmethod
    def load(cls, cfg: EngineConfig, engine_dir: Path, device: str = "cpu") -> LocalRunner:
        return cls(cfg, build_rank_model(cfg, engine_dir, 0, device=rank_device(device, 0)))

    def forward(self, step: StepInput) -> torch.Tensor:
        st = build_step_tensors(step, self.cfg.kv_cache.tokens_per_block, self.model.device)
        return self.model.forward(st, None)

    def read_kv(self, slots: list[int]) -> dict[int, torch.Tensor]:
        return {0: self.model.read_kv(slots)}

    def write_kv(self, slots: list[int], shards: dict[int, torch.Tensor]) -> None:
        self.model.write_kv(slots, shards[0])

    def failure(self) -> str | None:
        return None  # the model runs in this process: if it is gone, so is whoever would ask

    def shutdown(self) -> None:
        return None


# -- commands and replies between driver and ranks ------------------------------------------------------------

@dataclass(frozen=True)
class ForwardCmd:
    step: StepInput


@dataclass(frozen=True)
class ReadKVCmd:
    slots: list[int]


@dataclass(frozen=True)
class WriteKVCmd:
    slots: list[int]
    kv: torch.Tensor


@dataclass(frozen=True)
class StopCmd:
    pass


@dataclass(frozen=True)
class Ready:
    rank: int


@dataclass(frozen=True)
class Ack:
    payload: torch.Tensor | None = None


@dataclass(frozen=True)
class Failed:
    rank: int
    error: str


def _rank_main(engine_dir: str, rank: int, scratch_dir: str, conn, threads: int, device: str) -> None:
    """Entry point of one rank process. Its temporary files go under the runner's `scratch_dir`: sending a
    tensor to the driver starts multiprocessing's fd sharer, whose socket lives in a `pymp-*` directory that
    only a normal interpreter exit removes, and a rank ends with os._exit (below) or is killed; the runner
    removes the scratch directory whichever way its ranks ended."""
    tempfile.tempdir = scratch_dir
    torch.set_num_threads(threads)
    cfg = EngineConfig.load(engine_dir)
    tp_rank, pp_rank = rank % cfg.tp, rank // cfg.tp
    dev = rank_device(device, rank)
    try:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # NCCL binds each rank's communicator to its current device
        store = dist.FileStore(str(Path(scratch_dir) / "store"), cfg.world_size)
        dist.init_process_group(collective_backend(device), store=store, rank=rank, world_size=cfg.world_size,
                                timeout=COLLECTIVE_TIMEOUT)
        # Every rank creates every stage's TP group, in the same order (a torch.distributed rule).
        groups = [dist.new_group([rank_of(t, s, cfg.tp) for t in range(cfg.tp)]) for s in range(cfg.pp)]
        tp_group = groups[pp_rank]

        def all_reduce(t: torch.Tensor) -> None:
            dist.all_reduce(t, group=tp_group)

        model = build_rank_model(cfg, Path(engine_dir), rank, all_reduce if cfg.tp > 1 else None, dev)
        conn.send(Ready(rank))
    except Exception:
        conn.send(Failed(rank, traceback.format_exc()))
        return
    tpb = cfg.kv_cache.tokens_per_block
    is_last = pp_rank == cfg.pp - 1
    while True:
        try:
            cmd = conn.recv()
        except EOFError:  # the driver is gone
            break
        if isinstance(cmd, StopCmd):
            break
        try:
            if isinstance(cmd, ForwardCmd):
                st = build_step_tensors(cmd.step, tpb, dev)
                hidden = None
                if pp_rank > 0:
                    hidden = torch.empty(cmd.step.num_tokens, cfg.shape.hidden_size, dtype=_torch_dtype(cfg.dtype),
                                         device=dev)
                    dist.recv(hidden, src=rank_of(tp_rank, pp_rank - 1, cfg.tp))
                out = model.forward(st, hidden)
                if not is_last:
                    dist.send(out, dst=rank_of(tp_rank, pp_rank + 1, cfg.tp))
                conn.send(Ack(out.cpu() if is_last and tp_rank == 0 else None))
            elif isinstance(cmd, ReadKVCmd):
                conn.send(Ack(model.read_kv(cmd.slots)))
            elif isinstance(cmd, WriteKVCmd):
                model.write_kv(cmd.slots, cmd.kv)
                conn.send(Ack())
        except Exception:
            conn.send(Failed(rank, traceback.format_exc()))
    dist.destroy_process_group()
    conn.close()
    # Everything is released; skip the interpreter's teardown, which takes about a second with torch loaded
    # and would put that second into every instance stop (multiprocessing ends forked children this way too).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class DistributedRunner:
    """tp*pp rank processes started with torch.multiprocessing (spawn) and joined on shutdown."""

    def __init__(self, cfg: EngineConfig, engine_dir: Path, threads_per_rank: int, device: str = "cpu") -> None:
        self.cfg = cfg
        ctx = mp.get_context("spawn")
        # the rendezvous store and the ranks' temporary files (_rank_main), removed at shutdown
        self._scratch_dir: Path | None = Path(tempfile.mkdtemp(prefix="trtd-ranks-"))
        self._conns = []
        self._procs = []
        try:
            for rank in range(cfg.world_size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_rank_main, args=(str(engine_dir), rank, str(self._scratch_dir), child,
                                                            threads_per_rank, device),
                                   name=f"trt-disagg-rank{rank}", daemon=True)
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
            for rank in range(cfg.world_size):
                reply = self._recv(rank, timeout_s=RANK_START_TIMEOUT_S)
                if not isinstance(reply, Ready):
                    raise RankFailure(f"rank {rank} did not start: {reply}")
        except BaseException:
            self.shutdown()
            raise
        self._last_rank = rank_of(0, cfg.pp - 1, cfg.tp)

    def _remove_scratch(self) -> None:
        scratch, self._scratch_dir = self._scratch_dir, None
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    def failure(self) -> str | None:
        """None while every rank process is alive; else which died (cheap: no command is sent)."""
        dead = [f"rank {r} (exit code {p.exitcode})" for r, p in enumerate(self._procs) if not p.is_alive()]
        return f"rank process died: {', '.join(dead)}" if dead else None

    def _recv(self, rank: int, timeout_s: float | None = None):
        conn = self._conns[rank]
        # Poll in slices so a rank that died is noticed instead of waiting forever.
        waited = 0.0
        while not conn.poll(1.0):
            waited += 1.0
            failure = self.failure()  # any rank: the one we wait for may be blocked on a dead peer
            if failure is not None:
                raise RankFailure(failure)
            if timeout_s is not None and waited >= timeout_s:
                raise RankFailure(f"rank {rank} did not answer within {timeout_s:.0f} s")
        reply = conn.recv()
        if isinstance(reply, Failed):
            raise RankFailure(f"rank {reply.rank} failed:\n{reply.error}")
        return reply

    def _broadcast(self, cmds: list) -> list:
        for conn, cmd in zip(self._conns, cmds, strict=True):
            conn.send(cmd)
        return [self._recv(rank) for rank in range(len(cmds))]

    def forward(self, step: StepInput) -> torch.Tensor:
        replies = self._broadcast([ForwardCmd(step)] * self.cfg.world_size)
        logits = replies[self._last_rank].payload
        assert logits is not None
        return logits

    def read_kv(self, slots: list[int]) -> dict[int, torch.Tensor]:
        replies = self._broadcast([ReadKVCmd(slots)] * self.cfg.world_size)
        return {rank: r.payload for rank, r in enumerate(replies)}

    def write_kv(self, slots: list[int], shards: dict[int, torch.Tensor]) -> None:
        self._broadcast([WriteKVCmd(slots, shards[rank]) for rank in range(self.cfg.world_size)])

    def shutdown(self) -> None:
        for conn in self._conns:
            try:
                conn.send(StopCmd())
            except (OSError, BrokenPipeError):
                pass
        deadline = time.monotonic() + RANK_STOP_TIMEOUT_S
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("rank process %s did not stop; killing it", proc.pid)
                proc.kill()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []
        self._remove_scratch()


def make_runner(cfg: EngineConfig, engine_dir: Path, threads_per_rank: int, device: str = "cpu") -> ModelRunner:
    """The runner for `cfg`'s layout on `device` ("cpu", "cuda" or "cuda:N"); UserError when that device
    is not here (checked before any rank starts)."""
    check_device(device, cfg.world_size)
    if cfg.world_size == 1:
        torch.set_num_threads(threads_per_rank)
        return LocalRunner.load(cfg, engine_dir, device)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    return DistributedRunner(cfg, engine_dir, threads_per_rank, device)
