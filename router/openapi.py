"""The OpenAPI schema says what this deployment accepts, not just what any deployment could.

FastAPI builds the schema from the pydantic models, which know nothing of the deployment: `model` would
be any string and `max_tokens` any positive integer, so a client generated from the schema (or a fuzzer
such as schemathesis) would mostly send requests that are refused. `install_openapi` fills in, once per
app, what the settings fix:

    model                                  enum: [the served model]
    max_tokens, max_completion_tokens      maximum: max_seq_len - 1 (at least one prompt token)
    prompt as token ids                    each < the vocabulary size, at most max_input_len of them
    /metrics                               text/plain (Prometheus' text format), not JSON
    completions and chat 200               application/json, or text/event-stream when streamed
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from router.settings import RouterSettings

REQUEST_SCHEMAS = ("CompletionRequest", "ChatRequest")


def install_openapi(app: FastAPI, settings: RouterSettings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            tokenizer = getattr(getattr(app.state, "router", None), "tokenizer", None)
            restrict(schema, settings, getattr(tokenizer, "vocab_size", None))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def restrict(schema: dict[str, Any], settings: RouterSettings, vocab_size: int | None = None) -> None:
    schemas = schema.get("components", {}).get("schemas", {})
    prompt = schemas.get("CompletionRequest", {}).get("properties", {}).get("prompt", {})
    for option in prompt.get("anyOf", []):
        items = option.get("items", {})
        if option.get("type") == "array" and items.get("type") == "integer" and vocab_size is not None:
            items["maximum"] = vocab_size - 1
            option["maxItems"] = settings.max_input_len
    for name in REQUEST_SCHEMAS:
        props = schemas.get(name, {}).get("properties", {})
        if "model" in props:
            props["model"] = {"type": "string", "enum": [settings.served_model_name], "title": "Model"}
        for field in ("max_tokens", "max_completion_tokens"):
            for option in props.get(field, {}).get("anyOf", []):
                if option.get("type") == "integer":
                    option["maximum"] = settings.max_seq_len - 1
    for path in ("/v1/completions", "/v1/chat/completions"):  # stream: true answers server-sent events
        post = schema.get("paths", {}).get(path, {}).get("post")
        if post is not None:
            post["responses"]["200"].setdefault("content", {})["text/event-stream"] = {"schema": {}}
    metrics = schema.get("paths", {}).get("/metrics", {}).get("get")
    if metrics is not None:
        metrics["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    retrieve = schema.get("paths", {}).get("/v1/models/{model_id}", {}).get("get")
    for param in (retrieve or {}).get("parameters", []):
        if param.get("name") == "model_id":
            param["schema"] = {"type": "string", "enum": [settings.served_model_name]}
