"""An engine whose inputs did not change is not rebuilt; a changed engine field rebuilds only its role."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.unit.engine_build.build_support import LoadCounter
from trt_disagg.config import Deployment
from trt_disagg.contract import Role
from trt_disagg.engine_build.builder import BuildStatus, build_deployment
from trt_disagg.engine_dir import CONFIG_FILE, EngineConfig


def statuses(results: list) -> dict[Role, BuildStatus]:
    return {r.role: r.status for r in results}


def test_second_build_skips_without_loading(make_dep: Callable[..., Deployment], loads: LoadCounter) -> None:
    dep = make_dep()
    build_deployment(dep)
    mtimes = {role: (dep.engine_dir(role) / CONFIG_FILE).stat().st_mtime_ns for role in dep.groups()}
    again = build_deployment(dep)
    assert set(statuses(again).values()) == {BuildStatus.UP_TO_DATE}
    assert loads.calls == 1  # the second run did not even load the model
    assert {role: (dep.engine_dir(role) / CONFIG_FILE).stat().st_mtime_ns for role in dep.groups()} == mtimes


def test_changed_engine_field_rebuilds_that_role_only(make_dep: Callable[..., Deployment],
                                                      loads: LoadCounter) -> None:
    build_deployment(make_dep())
    dep = make_dep(generation_servers={"max_batch_size": 16})
    results = build_deployment(dep)
    assert statuses(results) == {Role.PREFILL: BuildStatus.UP_TO_DATE, Role.DECODE: BuildStatus.BUILT,
                                 Role.COLOCATED: BuildStatus.UP_TO_DATE}
    assert EngineConfig.load(dep.engine_dir(Role.DECODE)).limits.max_batch_size == 16


def test_block_reuse_is_an_engine_field(make_dep: Callable[..., Deployment], loads: LoadCounter) -> None:
    """The engine reads block reuse from its own config: turning it off in the deployment rebuilds the role."""
    build_deployment(make_dep(), roles=["colocated"])
    dep = make_dep(colocated_servers={"kv_cache_config": {"enable_block_reuse": False}})
    assert statuses(build_deployment(dep, roles=["colocated"])) == {Role.COLOCATED: BuildStatus.BUILT}
    assert EngineConfig.load(dep.engine_dir(Role.COLOCATED)).kv_cache.enable_block_reuse is False


def test_serve_only_fields_do_not_rebuild(make_dep: Callable[..., Deployment], loads: LoadCounter) -> None:
    build_deployment(make_dep(), roles=["prefill"])
    dep = make_dep(context_servers={"num_instances": 3,
                                    "cache_transceiver_config": {"backend": "tcp"}},
                   slo={"ttft_s": 9.0})
    assert statuses(build_deployment(dep, roles=["prefill"])) == {Role.PREFILL: BuildStatus.UP_TO_DATE}


def test_force_and_seed_rebuild(make_dep: Callable[..., Deployment], loads: LoadCounter) -> None:
    dep = make_dep()
    build_deployment(dep, roles=["colocated"])
    forced = build_deployment(dep, roles=["colocated"], force=True)
    assert statuses(forced) == {Role.COLOCATED: BuildStatus.BUILT}
    before = EngineConfig.load(dep.engine_dir(Role.COLOCATED)).inputs_digest
    changed = make_dep(model={"seed": 1})
    from trt_disagg.engine_build.builder import plan_build

    plan = plan_build(changed, roles=["colocated"])[0]
    assert not plan.up_to_date and plan.inputs_digest != before


def test_a_model_loaded_by_the_caller_is_built_from_and_must_be_the_source(
        make_dep: Callable[..., Deployment], loads: LoadCounter, tiny_model) -> None:
    """A sweep over layouts loads its source once and hands it to each build; one loaded from another source
    (another seed, another dtype) is refused before anything is written."""
    dep = make_dep()
    results = build_deployment(dep, model=tiny_model)
    assert set(statuses(results).values()) == {BuildStatus.BUILT} and loads.calls == 0
    for other in (make_dep(model={"source": "tiny", "seed": 1}),
                  make_dep(model={"source": "tiny", "seed": 0, "dtype": "bfloat16"})):
        with pytest.raises(ValueError, match="the loaded model is not"):
            build_deployment(other, force=True, model=tiny_model)
