"""Placement types: the cluster the planner may use, and what it proposes (typed, never positional tuples).

A pool is a set of identical nodes (`nodes` x `gpus_per_node` GPUs of one type, each GPU weighted by
`cost`). Most clusters are one pool; mixed clusters (H100 nodes for prefill, A100 nodes for decode) are
several. A placement is a unit that the cluster replicates: `num_prefill` prefill instances and
`num_decode` decode instances, each with its own GPU type and TP x PP.
"""

from __future__ import annotations

from dataclasses import dataclass

from trt_disagg.errors import UserError
from trt_disagg.planner.hardware import GPUSpec
from trt_disagg.sim.spec import ColocatedPolicy

DEFAULT_NETWORK_BYTES_PER_S = 25e9  # 200 Gb/s InfiniBand per node, DistServe's "high node-affinity" cluster


@dataclass(frozen=True)
class Pool:
    gpu: GPUSpec
    nodes: int
    gpus_per_node: int
    cost: float = 1.0  # relative price of one GPU of this pool (1.0: count GPUs)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise UserError(f"pool {self.gpu.name}: nodes and gpus_per_node must be >= 1")
        if not self.cost > 0:
            raise UserError(f"pool {self.gpu.name}: cost must be > 0")

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Cluster:
    pools: tuple[Pool, ...]
    network_bytes_per_s: float = DEFAULT_NETWORK_BYTES_PER_S

    def __post_init__(self) -> None:
        if not self.pools:
            raise UserError("cluster: at least one GPU pool is needed")
        if not self.network_bytes_per_s > 0:
            raise UserError("cluster: network bandwidth must be > 0")

    @property
    def num_gpus(self) -> int:
        return sum(p.num_gpus for p in self.pools)

    @property
    def cost(self) -> float:
        return sum(p.num_gpus * p.cost for p in self.pools)


@dataclass(frozen=True)
class ParallelConfig:
    """How one instance is built."""

    gpu: str
    tp: int
    pp: int

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp

    def __str__(self) -> str:
        return f"{self.gpu} TP{self.tp}xPP{self.pp}"


@dataclass(frozen=True)
class Placement:
    """A disaggregated unit: num_prefill x prefill + num_decode x decode instances, replicated `replicas` times."""

    prefill: ParallelConfig
    decode: ParallelConfig
    num_prefill: int
    num_decode: int
    replicas: int = 1

    @property
    def unit_gpus(self) -> int:
        return self.num_prefill * self.prefill.num_gpus + self.num_decode * self.decode.num_gpus

    def __str__(self) -> str:
        return (f"{self.num_prefill}x prefill [{self.prefill}] + {self.num_decode}x decode [{self.decode}]"
                + (f" (x{self.replicas} replicas)" if self.replicas > 1 else ""))


@dataclass(frozen=True)
class ColocatedPlacement:
    config: ParallelConfig
    policy: ColocatedPolicy = ColocatedPolicy.PREFILL_FIRST
    replicas: int = 1

    def __str__(self) -> str:
        return f"colocated [{self.config}] {self.policy}" + (f" (x{self.replicas})" if self.replicas > 1 else "")


@dataclass(frozen=True)
class Candidate:
    """A placement and what simulation says about it. Goodput is for one unit; per-cost divides by its cost."""

    placement: Placement | ColocatedPlacement
    goodput_rps: float
    unit_gpus: int
    unit_cost: float
    engine: str | None = None  # colocated: which engine's fits it was simulated with (a key of ENGINE_LABELS)

    @property
    def per_gpu_goodput(self) -> float:
        return self.goodput_rps / self.unit_gpus

    @property
    def per_cost_goodput(self) -> float:
        return self.goodput_rps / self.unit_cost


@dataclass(frozen=True)
class DeploymentGoodput:
    """A whole deployment on the cluster: goodput of all its instances together, per GPU of the cluster.

    Idle GPUs count: they are paid for, so per-GPU goodput divides by every GPU of the cluster, not only by
    those the deployment uses (`idle_reason` says why any are left).
    """

    deployed: Candidate  # the deployment's placement (all instances) and its simulated goodput
    cluster_gpus: int
    cluster_cost: float
    idle_gpus: int
    idle_reason: str  # empty when no GPU is idle

    @property
    def goodput_rps(self) -> float:
        return self.deployed.goodput_rps

    @property
    def per_gpu_goodput(self) -> float:
        return self.deployed.goodput_rps / self.cluster_gpus

    @property
    def per_cost_goodput(self) -> float:
        return self.deployed.goodput_rps / self.cluster_cost
