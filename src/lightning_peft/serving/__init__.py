"""Serve one base with many adapters: ``lightning-peft serve``, or :class:`AdapterAPI` in
your own LitServe app. Requests name their adapter; requests for different adapters that
arrive together share a batch."""

from lightning_peft.serving.engine import AdapterEngine
from lightning_peft.serving.requests import Job, RequestError

__all__ = ["AdapterAPI", "AdapterEngine", "Job", "RequestError", "adapter_server"]


def __getattr__(name: str):  # LitServe is an optional dependency: imported on first use
    if name in ("AdapterAPI", "adapter_server"):
        from lightning_peft.serving import api

        return getattr(api, name)
    raise AttributeError(f"module 'lightning_peft.serving' has no attribute {name!r}")
