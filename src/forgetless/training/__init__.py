"""Training: one loop (accelerate, answer-only loss, resumable checkpoints) and the stage runner.

from forgetless.training import TrainConfig, run_strategy, load_stage

results = run_strategy("sequential_lora", {"r": 16}, "smollm2-135m-instruct", tasks,
                       TrainConfig(epochs=2), "runs/demo/seq_lora", setting="semi_cooperative",
                       on_stage_end=lambda stage, model, tokenizer: evaluate(model, tokenizer))
"""

from forgetless.training.config import TrainConfig
from forgetless.training.loop import TrainingDivergedError, TrainSummary, lr_factor, train_model
from forgetless.training.loss import AnswerOnlyLoss, answer_loss, label_positions
from forgetless.training.runner import StageResult, load_stage, results_table, run_strategy, stage_folder
from forgetless.training.sampling import joint_mixture, replay_mixture

__all__ = [
    "AnswerOnlyLoss",
    "StageResult",
    "TrainConfig",
    "TrainSummary",
    "TrainingDivergedError",
    "answer_loss",
    "joint_mixture",
    "label_positions",
    "load_stage",
    "lr_factor",
    "replay_mixture",
    "results_table",
    "run_strategy",
    "stage_folder",
    "train_model",
]
