"""HTTP routes, one module per resource; `include_all` mounts them on an app."""

from __future__ import annotations

from fastapi import FastAPI


def include_all(app: FastAPI) -> None:
    from router.routes import admin, chat, completions, health, metrics, models, requests

    for module in (completions, chat, models, requests, health, metrics, admin):
        app.include_router(module.router)
