"""`trt-disagg render --k8s CONFIG -o DIR`: the Kubernetes manifests of a deployment (trt_disagg/k8s)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from trt_disagg.config import load_deployment

out = Console()


def render_k8s_files(config: Path, output: Path, image: str | None, engines_claim: str | None,
                     max_instances_per_role: int | None = None) -> None:
    """Write the manifest set and print what `kubectl apply` will create. `max_instances_per_role`: how many
    prefill and decode instances the ConfigMap lists, the most the autoscaler may scale a role to."""
    from trt_disagg.k8s.manifests import K8sOptions, render_k8s

    defaults = K8sOptions()
    opts = K8sOptions(image=image or defaults.image, engines_claim=engines_claim,
                      max_instances_per_role=max_instances_per_role)
    manifests = render_k8s(load_deployment(config), opts)
    paths = manifests.write(output)
    table = Table("file", "objects")
    for path in paths:
        objs = manifests.files[path.name]
        table.add_row(str(path), ", ".join(f"{o['kind']}/{o['metadata']['name']}" for o in objs))
    out.print(table)
    out.print(f"apply with: kubectl apply -f {output}   (00-secret.yaml holds fresh random secrets: keep it private)")
