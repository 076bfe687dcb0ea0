"""An engine's limits and its decode path's switches (``EngineConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

from .runner import LINEAR_DTYPES, DecodeSwitches


@dataclass
class EngineConfig:
    """Limits of one engine."""

    max_batch_size: int = 32
    """Requests decoded together at most (slots of the KV cache)."""
    max_prefill_tokens: int = 128
    """Prompt tokens computed in one engine step at most while rows are running, and the
    largest chunk of one prompt. A longer prompt is computed in chunks over several steps while
    the running rows keep getting a token every step: this bounds how long a stream waits
    between two tokens, and the attention memory of a prefill (chunk x context, never
    prompts x length²). Chosen by measurement (docs/benchmarks/engine.md, ``benchmarks/
    bench_long_prompts.py --workloads budget``)."""
    idle_prefill_tokens: int = 2048
    """Prompt tokens one step computes at most when no row is running (no stream waits on it):
    many short prompts arriving together then join in one forward. Long prompts are still
    chunked at ``max_prefill_tokens``."""
    prefix_cache_mb: float = 2048.0
    """Memory for the prefix cache of prompt text (MiB; 0 turns it off): keys/values of prompt
    blocks kept after their request and reused by later prompts that start the same way (same
    adapter, same tokens), least recently used evicted first (``prefix_cache.py``)."""
    prefix_cache_block: int = 32
    """Tokens per block of the prefix cache: a prompt reuses whole blocks only."""
    max_new_tokens_cap: int = 4096
    """Requests asking for more new tokens are refused."""
    max_resident_adapters: int = 64
    """Adapter prefixes kept in memory at most; the least recently used idle one goes first."""
    max_queue: int | None = None
    """Requests waiting for a slot at most (None: no bound, for offline batches; the server sets
    one); a submission beyond it is refused with ``QueueFull``. A waiting request holds at most
    the model's context in token ids and its capped stop strings, so this bounds the queue's
    memory."""
    prefill_padding: float = 0.3
    """Joining requests are prefilled in groups of similar length, a new group whenever padding
    would exceed this share of a group's positions (1.0: one group; 0.2: at most a fifth
    padding, a few more forwards). On prompts of similar length grouping neither paid nor cost
    (0.3 within 4% of one group, docs/benchmarks/engine.md, ``benchmarks/bench_prefill.py``);
    with the prefix cache the text left to compute is very uneven (a few tokens after a cached
    system prompt beside whole new prompts), and one group would pad every short row to the
    longest."""
    policy: str = "continuous"
    """``continuous`` (join between steps) or ``static`` (a new batch when the last one ends)."""
    packed_weights: bool | None = None
    """The CPU fast path: linear layers on weights packed for oneDNN, and the lean forward
    (CPU float32; None: when that applies)."""
    lean_forward: bool = True
    """Run the model through the engine's lean forward (``lean.py``) where its family is one
    ``families.py`` knows (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3); False: transformers' own
    forward, as for every other model (for comparison, or to rule the lean forward out)."""
    graphs: bool | None = None
    """Decode steps of fixed shape recorded as CUDA graphs and replayed (``graphs.py``; None:
    on a GPU, where the lean forward runs). On the CPU, True runs the same step eagerly."""
    full_batch_pack: bool | None = None
    """With packed weights, a second copy packed for MKL at ``max_batch_size`` rows for full
    decode batches (a loaded server's); faster on some CPUs, slower on others
    (docs/benchmarks/engine.md). None: measured on this machine at start-up, the decision cached
    (``autotune.py``; ``$SOFTPROMPT_FULL_BATCH_PACK`` 0 or 1 forces it)."""
    cpu_kernels: bool | None = None
    """With the lean forward on the CPU, decode steps run the fused C kernels of
    ``cpu_kernels.py`` (attention over the slot cache, RMSNorm, SwiGLU), compiled on first use
    (None: when a C compiler is found, ``$SOFTPROMPT_CPU_KERNELS`` is not 0 and they are
    measured faster)."""
    panel_linear: bool | None = None
    """With the fused CPU kernels, linear layers on the C kernel's panel layout instead of
    oneDNN/MKL (written for AVX2; None: if measured faster at start-up,
    ``$SOFTPROMPT_PANEL_LINEAR`` 0 or 1 forces it; figures in docs/benchmarks/engine.md).
    Only the chosen layout's copy of the weights is kept."""
    cpu_linear_dtype: str | None = None
    """What the CPU's lean forward multiplies its linear layers in (activations, norms and
    attention arithmetic stay float32): ``float32``, ``bfloat16`` (weights packed in bfloat16
    for oneDNN, products accumulated in float32: about twice float32's speed on CPUs with
    native bfloat16 dot products, AVX512-BF16 or AMX, and much slower without; the KV cache is
    then bfloat16 too, half the bytes for attention to read), or
    ``auto`` (both measured at start-up, the faster kept; bfloat16 only where this CPU has native
    bfloat16 or the model is in bfloat16 already). None: float32 for a float32 model (exact),
    ``auto`` for a bfloat16 one. The serve command's ``--dtype auto`` sets ``auto``. What
    bfloat16 costs in agreement with float32: docs/benchmarks/engine.md."""
    tune: bool = True
    """Measure the undecided CPU decode switches above at start-up (a few decode steps per
    combination, once per machine, torch version and model shape; ``autotune.py``). False:
    MKL off, the kernels on where they build."""
    retune: bool = False
    """Measure those switches again even when this machine has a decision cached, and cache the
    new one (``$SOFTPROMPT_RETUNE=1`` does the same): for a decision measured on a busy machine."""

    def __post_init__(self) -> None:
        for name in (
            "max_batch_size",
            "max_prefill_tokens",
            "idle_prefill_tokens",
            "max_new_tokens_cap",
            "max_resident_adapters",
            "prefix_cache_block",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if self.prefix_cache_mb < 0:
            raise ValueError("prefix_cache_mb cannot be negative")
        if not 0 <= self.prefill_padding <= 1:
            raise ValueError("prefill_padding must be between 0 and 1")
        if self.cpu_linear_dtype not in LINEAR_DTYPES:
            raise ValueError(
                f"cpu_linear_dtype must be one of {', '.join(map(str, LINEAR_DTYPES))}, "
                f"not {self.cpu_linear_dtype!r}"
            )

    def switches(self) -> DecodeSwitches:
        """The decode-path switches, handed whole to the model runner."""
        return DecodeSwitches(
            packed_weights=self.packed_weights,
            lean_forward=self.lean_forward,
            graphs=self.graphs,
            full_batch_pack=self.full_batch_pack,
            cpu_kernels=self.cpu_kernels,
            panel_linear=self.panel_linear,
            linear_dtype=self.cpu_linear_dtype,
            tune=self.tune,
            retune=self.retune,
        )
