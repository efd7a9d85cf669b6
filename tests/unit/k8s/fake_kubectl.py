"""A stand-in `kubectl` for tests: an executable on a temp PATH that answers the three calls the autoscaler
makes (get statefulset, get configmap, scale) from a JSON "cluster" file seeded with rendered manifests.

It records every argv (one JSON line each), keeps replica counts in the cluster file, answers NotFound for a
name or namespace the manifests do not have (so a wrong name fails the test, as it would a real cluster),
checks `--current-replicas` as kubectl does, and can fail on purpose: `fail_next` calls fail as an
unreachable API server does (only calls of `fail_verb`, when set); `lose_reply_next` scales succeed but report a failure (a reply lost after the
server applied it).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRIPT = r'''
import json, sys
state_path, log_path = sys.argv[1], sys.argv[2]
argv = sys.argv[3:]
with open(log_path, "a") as f:
    f.write(json.dumps(argv) + "\n")
state = json.load(open(state_path))

def save():
    json.dump(state, open(state_path, "w"))

def fail(msg, code=1):
    print(msg, file=sys.stderr)
    sys.exit(code)

ns = state["namespace_default"]
args = []
i = 0
while i < len(argv):
    if argv[i] in ("-n", "--namespace"):
        ns = argv[i + 1]
        i += 2
        continue
    args.append(argv[i])
    i += 1
if state["fail_next"] > 0 and state["fail_verb"] in ("", args[0]):
    state["fail_next"] -= 1
    save()
    fail("Unable to connect to the server: dial tcp 10.0.0.1:6443: i/o timeout")
objects = state["namespaces"].get(ns, {})
if args[:1] == ["get"] and len(args) == 5 and args[3:] == ["-o", "json"]:
    key = f"{args[1]}/{args[2]}"
    if key not in objects:
        fail(f'Error from server (NotFound): {args[1]}s "{args[2]}" not found in namespace "{ns}"')
    print(json.dumps(objects[key]))
    sys.exit(0)
if args[:1] == ["scale"] and len(args) in (3, 4):
    key = args[1]
    flags = dict(a[2:].split("=", 1) for a in args[2:])
    if key not in objects:
        fail(f'Error from server (NotFound): "{key}" not found in namespace "{ns}"')
    spec = objects[key]["spec"]
    if "current-replicas" in flags and int(flags["current-replicas"]) != spec["replicas"]:
        fail(f"error: Expected replicas to be {flags['current-replicas']}, was {spec['replicas']}")
    spec["replicas"] = int(flags["replicas"])
    lost = state["lose_reply_next"] > 0
    state["lose_reply_next"] = max(0, state["lose_reply_next"] - 1)
    save()
    if lost:
        fail("error: the server was unable to return a response in the time allotted")
    print(f"statefulset.apps/{key.split('/', 1)[1]} scaled")
    sys.exit(0)
fail(f"fake kubectl: unsupported call {argv}", 2)
'''


@dataclass
class FakeKubectl:
    """The fake's files and what tests read back: its argv log and the replica counts."""

    path: Path
    state_path: Path
    log_path: Path

    @classmethod
    def install(cls, root: Path, objects: list[dict[str, Any]], namespace: str = "llm") -> FakeKubectl:
        """Seed the cluster with `objects` (as `kubectl apply -n namespace` would create them)."""
        root.mkdir(parents=True, exist_ok=True)
        state_path, log_path, script = root / "cluster.json", root / "argv.jsonl", root / "fake_kubectl.py"
        keyed = {f"{o['kind'].lower()}/{o['metadata']['name']}": o for o in objects}
        state_path.write_text(json.dumps({"namespaces": {namespace: keyed}, "namespace_default": "default",
                                          "fail_next": 0, "fail_verb": "", "lose_reply_next": 0}))
        log_path.write_text("")
        script.write_text(SCRIPT)
        kubectl = root / "bin" / "kubectl"
        kubectl.parent.mkdir(exist_ok=True)
        kubectl.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "{state_path}" "{log_path}" "$@"\n')
        kubectl.chmod(kubectl.stat().st_mode | stat.S_IXUSR)
        return cls(kubectl, state_path, log_path)

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    def scale_calls(self) -> list[list[str]]:
        return [c for c in self.calls() if c[0] == "scale"]

    def replicas(self, statefulset: str, namespace: str = "llm") -> int:
        state = json.loads(self.state_path.read_text())
        return int(state["namespaces"][namespace][f"statefulset/{statefulset}"]["spec"]["replicas"])

    def set(self, **fields: int | str) -> None:
        """fail_next=N (fail_verb="scale": only scale calls fail), lose_reply_next=N."""
        state = json.loads(self.state_path.read_text())
        state.update(fields)
        self.state_path.write_text(json.dumps(state))

    def env_path(self) -> str:
        """A PATH with the fake first (what `trt-disagg autoscale --k8s` would find as `kubectl`)."""
        return f"{self.path.parent}{os.pathsep}{os.environ.get('PATH', '')}"
