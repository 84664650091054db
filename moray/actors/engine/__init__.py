"""The inference engine host: continuous batching over the paged MLA latent cache."""

from moray.actors.engine.block_cache import BlockPool, PagedCacheView
from moray.actors.engine.engine import (
    AsyncEngine,
    CacheTooSmall,
    ContextLengthExceeded,
    Engine,
    EngineConfig,
    EngineError,
    InvalidPrompt,
    ModelRunner,
    Overloaded,
    RequestOutput,
    TokenLogprob,
    Unavailable,
)
from moray.actors.engine.scheduler import Request, RequestParams, Scheduler
from moray.actors.engine.tokenizer import Detokenizer, Tokenizer

__all__ = [
    "AsyncEngine", "BlockPool", "CacheTooSmall", "ContextLengthExceeded", "Detokenizer", "Engine",
    "EngineConfig", "EngineError", "InvalidPrompt", "ModelRunner", "Overloaded", "PagedCacheView", "Request",
    "RequestOutput", "RequestParams", "Scheduler", "TokenLogprob", "Tokenizer", "Unavailable",
]  # fmt: skip
