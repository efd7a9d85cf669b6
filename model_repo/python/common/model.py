"""Triton Python-backend model of a trt-disagg instance (prefill, decode or colocated; see config.pbtxt).

A thin shell: tensors in and out, one Responder per request. Engine, scheduling, KV hand-off, registry
and cancellation live in the importable package (trt_disagg.triton.adapter / .instance), tested without
Triton. `trt-disagg render` copies this file into <repository>/<model>/1/model.py.
"""

import dataclasses
import json
import logging

import triton_python_backend_utils as pb_utils

from trt_disagg.contract import ErrorKind
from trt_disagg.triton.adapter import InstanceSettings, RunningInstance
from trt_disagg.triton.tensors import RequestParseError, output_arrays, parse_request

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonResponder:
    """trt_disagg.triton.instance.Responder over a decoupled response sender."""

    def __init__(self, sender):
        self._sender = sender

    def send(self, token_ids, context_phase_params, final):
        tensors = [pb_utils.Tensor(name, arr) for name, arr in output_arrays(token_ids, context_phase_params).items()]
        self._sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if final else 0)

    def send_error(self, kind, message):
        error = pb_utils.TritonError(f"{kind}: {message}")
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
        self.instance = RunningInstance(settings)

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
