"""softprompt: prompt tuning (Lester et al. 2021) for causal language models.

Train soft prompts on a frozen base model, keep them as PEFT-format adapter folders, evaluate
and compare them, and generate with many adapters in one batch.
"""

from .errors import UserError
from .evaluate import EvalResult, evaluate
from .generate import GenerateConfig, Request, generate
from .models import BaseModel, load_base_model
from .prompt import Adapter, SoftPromptModel, init_prompt, load_adapter
from .train import TrainConfig, TrainResult, save_trained, train

__all__ = [
    "Adapter",
    "BaseModel",
    "EvalResult",
    "GenerateConfig",
    "Request",
    "SoftPromptModel",
    "TrainConfig",
    "TrainResult",
    "UserError",
    "evaluate",
    "generate",
    "init_prompt",
    "load_adapter",
    "load_base_model",
    "save_trained",
    "train",
]

__version__ = "0.1.0"
