"""softprompt: prompt tuning (Lester et al. 2021) for causal language models.

Train soft prompts on a frozen base model, keep them as PEFT-format adapter folders, evaluate
and compare them, and serve many adapters from one base model in one running batch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:  # the same names, seen statically (type checkers, IDEs, the API docs)
    from .adapters import Adapter, load_adapter
    from .engine import Engine, EngineConfig, RequestError, SamplingParams
    from .generation import Request, generate
    from .insight.evaluate import EvalResult, evaluate
    from .models import BaseModel, load_base_model
    from .prompt import SoftPromptModel
    from .tuning.config import TrainConfig, TrainResult
    from .tuning.init import init_prompt
    from .tuning.run import RunRequest, TaskSource, plan_training, run_training
    from .tuning.save import save_trained
    from .tuning.train import train

# Public names and the module of each. They load on first use, so that `softprompt --help`
# does not pay for importing torch.
_EXPORTS = {
    "EvalResult": "insight.evaluate",
    "evaluate": "insight.evaluate",
    "Engine": "engine",
    "EngineConfig": "engine",
    "RequestError": "engine",
    "SamplingParams": "engine",
    "Request": "generation",
    "generate": "generation",
    "BaseModel": "models",
    "load_base_model": "models",
    "Adapter": "adapters",
    "SoftPromptModel": "prompt",
    "init_prompt": "tuning.init",
    "load_adapter": "adapters",
    "TrainConfig": "tuning.config",
    "TrainResult": "tuning.config",
    "save_trained": "tuning.save",
    "train": "tuning.train",
    "RunRequest": "tuning.run",
    "TaskSource": "tuning.run",
    "plan_training": "tuning.run",
    "run_training": "tuning.run",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'softprompt' has no attribute {name!r}")


__all__ = [
    "Adapter",
    "BaseModel",
    "EvalResult",
    "Engine",
    "EngineConfig",
    "Request",
    "RequestError",
    "RunRequest",
    "SamplingParams",
    "SoftPromptModel",
    "TaskSource",
    "TrainConfig",
    "TrainResult",
    "UserError",
    "evaluate",
    "generate",
    "init_prompt",
    "load_adapter",
    "load_base_model",
    "plan_training",
    "run_training",
    "save_trained",
    "train",
]

__version__ = "0.1.0"
