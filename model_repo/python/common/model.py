"""Triton Python-backend model of a trt-disagg instance (prefill, decode or colocated; see config.pbtxt).

A thin shell: tensors in and out, one Responder per request. Engine, scheduling, KV hand-off, registry
and cancellation live in the importable package (trt_disagg.triton.adapter / .instance), tested without
Triton. `trt-disagg render` copies this file into <repository>/<model>/1/model.py.
"""

import atexit
import dataclasses
import json
import logging
import os
import signal
import sys

import triton_python_backend_utils as pb_utils

from trt_disagg.contract import ErrorKind
from trt_disagg.triton.adapter import InstanceSettings, RunningInstance
from trt_disagg.triton.tensors import RequestParseError, output_arrays, parse_request

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
log = logging.getLogger(__name__)


SERVER_PID = os.getppid()  # the stub is started by its tritonserver


def tritonserver_alive():
    """False once this stub's tritonserver has died (killed, it is a zombie until reaped, then gone)."""
    try:
        with open(f"/proc/{SERVER_PID}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X") and os.getppid() == SERVER_PID


def stop_tritonserver(reason):
    """The engine broke: make this stub's tritonserver exit (SIGTERM: it finalizes the model, stopping the
    surviving ranks) so that its supervisor starts a fresh instance. Only a parent that is tritonserver is
    signalled."""
    ppid = SERVER_PID
    if not tritonserver_alive():
        log.error("instance failed (%s): its tritonserver (pid %d) is gone already", reason, ppid)
        return
    try:
        with open(f"/proc/{ppid}/comm") as f:
            parent = f.read().strip()
    except OSError:
        parent = "?"
    if parent != "tritonserver":
        log.error("engine failed (%s); the parent process (%s, pid %d) is not tritonserver: not stopping it",
                  reason, parent, ppid)
        return
    log.error("engine failed (%s); stopping tritonserver (pid %d) so that it is restarted", reason, ppid)
    os.kill(ppid, signal.SIGTERM)


def triton_error_code(kind):
    """The status a client sees: INVALID_ARGUMENT over gRPC / 400 over HTTP for a bad request (and a bad
    handle), UNAVAILABLE / 503 for a full or stopping instance, CANCELLED, else INTERNAL / 500."""
    codes = {ErrorKind.BAD_REQUEST: pb_utils.TritonError.INVALID_ARG,
             ErrorKind.INVALID_HANDLE: pb_utils.TritonError.INVALID_ARG,
             ErrorKind.OVERLOADED: pb_utils.TritonError.UNAVAILABLE,
             ErrorKind.SHUTTING_DOWN: pb_utils.TritonError.UNAVAILABLE,
             ErrorKind.CANCELLED: pb_utils.TritonError.CANCELLED}
    return codes.get(kind, pb_utils.TritonError.INTERNAL)


def _exit_now():
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class TritonResponder:
    """trt_disagg.triton.instance.Responder over a decoupled response sender."""

    def __init__(self, sender):
        self._sender = sender

    def send(self, token_ids, context_phase_params, final):
        tensors = [pb_utils.Tensor(name, arr) for name, arr in output_arrays(token_ids, context_phase_params).items()]
        self._sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if final else 0)

    def send_error(self, kind, message):
        error = pb_utils.TritonError(f"{kind}: {message}", triton_error_code(kind))
        self._sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error), flags=FINAL)

    def is_cancelled(self):
        return self._sender.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        settings = InstanceSettings.from_model_config(model_config)
        self.role = settings.role
        # Non-decoupled (prefill; decode/colocated rendered for HTTP): exactly one response per request.
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(model_config)
        self.instance = RunningInstance(settings, on_failure=stop_tritonserver, server_alive=tritonserver_alive)

    def execute(self, requests):
        for request in requests:
            responder = TritonResponder(request.get_response_sender())
            inputs = {t.name(): t.as_numpy() for t in request.inputs()}
            try:
                req = parse_request(inputs, request.parameters(), request.request_id(), self.role)
                if req.streaming and not self.decoupled:
                    req = dataclasses.replace(req, streaming=False)
            except RequestParseError as exc:
                responder.send_error(ErrorKind.BAD_REQUEST, str(exc))
                continue
            self.instance.server.submit(req, responder)
        return None

    def finalize(self):
        self.instance.stop()
        # The backend waits for this stub process to exit, and Triton looks for unloaded models once a
        # second. Python's own teardown with torch loaded takes most of a second and has nothing left to
        # release (the instance stopped above; the stub's C++ side cleans up before the interpreter runs its
        # exit hooks), so the stub ends at its first exit hook: an instance stops in under 3 s.
        atexit.register(_exit_now)
