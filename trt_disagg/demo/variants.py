"""The two deployments the demo compares, cut out of one config that describes both.

The config holds context + generation servers (disaggregated) and colocated servers (the baseline); each
variant keeps only its roles, under the same name so both find the engines one build wrote.
"""

from __future__ import annotations

from dataclasses import dataclass

from trt_disagg.config import Deployment
from trt_disagg.contract import Role
from trt_disagg.errors import UserError

DISAGGREGATED = "disaggregated"
COLOCATED = "colocated"


@dataclass(frozen=True)
class Variant:
    label: str
    deployment: Deployment

    @property
    def num_cores(self) -> int:
        """Cores the variant's instances use: instances x ranks x threads (GPUs on a GPU deployment)."""
        return sum(g.num_instances * g.world_size * g.threads_per_instance for g in self.deployment.groups().values())

    def describe(self) -> str:
        """e.g. "1 prefill + 1 decode" (every instance's tp/pp/threads are in the variant's YAML)."""
        return " + ".join(f"{g.num_instances} {role.value}" for role, g in self.deployment.groups().items())


def split_variants(dep: Deployment) -> list[Variant]:
    groups = dep.groups()
    if not {Role.PREFILL, Role.DECODE, Role.COLOCATED} <= groups.keys():
        raise UserError("demo: the config needs context_servers, generation_servers and colocated_servers "
                        "(the disaggregated deployment and its colocated baseline)")
    for role, g in groups.items():
        if g.backend != "python":
            raise UserError(f"demo: {role.value} backend must be 'python' (the CPU engine) to run here")
    disagg = dep.model_copy(update={"colocated_servers": None})
    colocated = dep.model_copy(update={"context_servers": None, "generation_servers": None})
    return [Variant(DISAGGREGATED, disagg), Variant(COLOCATED, colocated)]
