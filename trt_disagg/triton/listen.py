"""Which address an instance listens on, and which of its ports are fixed from outside.

Every server binds the address it is told to, never a wildcard by surprise:

    urls entry "10.0.0.3:8001"     ─▶ bind 10.0.0.3 (the host's own address on that network)
    urls entry "prefill-0.svc:8001" ─▶ bind what the name resolves to on this host
    no urls entry                   ─▶ bind 127.0.0.1 (a single-host deployment reaches nothing else)
    TRT_DISAGG_BIND_HOST=0.0.0.0    ─▶ bind that, whatever the urls say (a Kubernetes pod, whose own
                                       address is not known when its manifest is written)

Triton's HTTP port is what liveness/readiness probes knock on, so an orchestrator must be able to fix it:
TRT_DISAGG_HTTP_PORT, TRT_DISAGG_METRICS_PORT and TRT_DISAGG_KV_PORT replace the picked ports (the gRPC
port comes from the urls entry).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import replace
from typing import TYPE_CHECKING

from trt_disagg.errors import UserError

if TYPE_CHECKING:
    from trt_disagg.triton.launch import Ports

BIND_HOST_ENV = "TRT_DISAGG_BIND_HOST"
PORT_ENVS = {"http": "TRT_DISAGG_HTTP_PORT", "metrics": "TRT_DISAGG_METRICS_PORT", "kv": "TRT_DISAGG_KV_PORT"}


def bind_host(advertised: str) -> str:
    """The address to listen on for an instance advertised as `advertised` (see the module docstring)."""
    configured = os.environ.get(BIND_HOST_ENV)
    if configured:
        return configured
    try:
        return str(ipaddress.ip_address(advertised))
    except ValueError:
        pass
    try:
        return socket.gethostbyname(advertised)
    except OSError as exc:
        raise UserError(f"cannot resolve {advertised!r} (this instance's urls entry) to an address to listen on: "
                        f"{exc}; set {BIND_HOST_ENV} to the address to bind") from None


def fixed_ports(ports: Ports) -> Ports:
    """`ports` with any port fixed by the environment put in its place."""
    fixed: dict[str, int] = {}
    for name, var in PORT_ENVS.items():
        raw = os.environ.get(var)
        if raw:
            try:
                fixed[name] = int(raw)
            except ValueError:
                raise UserError(f"{var}={raw!r} is not a port number") from None
    return replace(ports, **fixed) if fixed else ports
