"""bitserve's inference engine: model formats, Numba kernels, KV cache, scheduler. Never imports the web layer."""

from engine.loader import load_model

__all__ = ["load_model"]
