"""A continuous-batching engine that serves the base model and many adapters in one batch.

Split as nano-vllm splits its engine, each part plain and testable alone:

- ``scheduler``: which requests run (a FIFO queue admitted into free slots between steps) and
  how much of their prompts a step computes (long prompts in chunks);
- ``prefix_cache``: keys/values of prompt text kept and reused by prompts that start the same;
- ``runner``: runs the frozen model (adapter prefixes, prefill, decode);
- ``kv_cache``: a slot-based KV cache that rows join and leave without copying the batch;
- ``registry``: the adapters, each a cached KV prefix, resident under an LRU bound;
- ``sampling``: per-request parameters and per-row token choice;
- ``engine``: ties them together (submit, stream, cancel, step, a background thread).
"""

from .batch import EngineStats
from .config import EngineConfig
from .engine import Engine, RequestHandle, eos_ids
from .registry import AdapterRegistry, Prefix
from .sampling import RequestError, SamplingParams
from .sequence import Completion, Output

__all__ = [
    "AdapterRegistry",
    "Completion",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "Output",
    "Prefix",
    "RequestError",
    "RequestHandle",
    "SamplingParams",
    "eos_ids",
]
