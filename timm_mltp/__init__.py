"""timm-mltp: meta-learning based training (MLTP, arXiv:2002.12455) for timm and Hugging Face models."""
from .distributed import average_gradients
from .errors import MLTPConfigError
from .inner_step import InnerStepSize
from .mltp import (ALPHA_RULES, MLTPConfig, MLTPStats, SecondOrderCheck, alpha_from_optimizer, mltp_backward,
                   second_order_check, second_order_in_use)
from .preemption import PREEMPTED_EXIT_CODE
from .step import MLTPStep
from .tasks import split_tasks
from .selection import VARIANTS, select_parameters, summarize_selection

__version__ = "0.1.0"

__all__ = ["ALPHA_RULES", "InnerStepSize", "MLTPConfig", "MLTPStep", "MLTPConfigError", "MLTPStats", "MLTPTrainer",
           "MLTPTrainingArguments", "PREEMPTED_EXIT_CODE", "PreemptionCallback", "SecondOrderCheck", "VARIANTS",
           "alpha_from_optimizer", "average_gradients", "mltp_backward", "second_order_check", "second_order_in_use",
           "select_parameters", "split_tasks", "summarize_selection"]


def __getattr__(name):
    # MLTPTrainer imports transformers.Trainer (seconds); load it on first use only
    if name in ("MLTPTrainer", "MLTPTrainingArguments", "PreemptionCallback"):
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
