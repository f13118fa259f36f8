"""The models this server holds: each with its own engine thread; `default` names the active one.

Loading, activation and unloading happen here; the admin routes and the app's lifespan call it. Event loop only,
except where a method says otherwise.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from engine.config import CacheConfig, SchedulerConfig
from engine.engine import LLMEngine
from engine.engine_loop import EngineLoop
from engine.loaded_model import LoadedModel
from server.metrics import Metrics

logger = logging.getLogger(__name__)

DEFAULT_ALIAS = "default"


@dataclass(eq=False)
class ServedModel:
    id: str
    model: LoadedModel
    engine_loop: EngineLoop
    created_s: int = field(default_factory=lambda: int(time.time()))

    @property
    def weight_bytes(self) -> int:
        return self.model.weights.num_bytes

    @property
    def kv_cache_bytes(self) -> int:
        return self.engine_loop.engine.cache.num_bytes


class UnknownModelError(KeyError):
    pass


class ModelRegistry:
    def __init__(self, metrics: Metrics, scheduler_config: SchedulerConfig, cache_config: CacheConfig) -> None:
        self.metrics = metrics
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.models: dict[str, ServedModel] = {}
        self.active_id: str | None = None

    def serve(self, model: LoadedModel, model_id: str | None = None) -> ServedModel:
        """Start an engine thread for a loaded model and warm its kernels. Blocking: call from a worker thread."""
        model_id = model_id or model.id
        engine = LLMEngine(model, self.scheduler_config, self.cache_config)
        warm_up(model)
        loop = EngineLoop(engine, self.scheduler_config.max_queue,
                          on_step=lambda stats: self.metrics.observe_step(model_id, stats), name=f"engine-{model_id}")
        served = ServedModel(model_id, model, loop)
        loop.start()
        self.metrics.register_model(model_id, served.weight_bytes, served.kv_cache_bytes)
        self.models[model_id] = served
        if self.active_id is None:
            self.active_id = model_id
        return served

    def get(self, name: str) -> ServedModel:
        model_id = self.active_id if name == DEFAULT_ALIAS else name
        if model_id is None or model_id not in self.models:
            raise UnknownModelError(name)
        return self.models[model_id]

    @property
    def active(self) -> ServedModel | None:
        return self.models.get(self.active_id) if self.active_id else None

    def stop_all(self, timeout_s: float) -> None:
        for served in self.models.values():
            served.engine_loop.stop(timeout_s)


def warm_up(model: LoadedModel) -> None:
    """Run every kernel shape a request will hit (a multi-token prefill and single-token decodes) once, so JIT or
    cache loading happens here and never inside a request."""
    model.generate([0, 1, 2], max_new_tokens=2)
