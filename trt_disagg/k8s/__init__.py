"""Kubernetes: the plain manifest set `trt-disagg render --k8s CONFIG -o DIR` writes (manifests.py)."""
