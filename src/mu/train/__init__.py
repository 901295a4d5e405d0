"""Training: the trainer (single process, DDP, FSDP), objectives, FLOPs accounting, checkpoints.

    from mu.train import TrainConfig, train, training_flops
"""

from mu.train.config import TrainConfig
from mu.train.flops import flops_params, training_flops
from mu.train.trainer import TrainingDiverged, TrainResult, TrainState, train

__all__ = ["TrainConfig", "TrainResult", "TrainState", "TrainingDiverged", "flops_params", "train", "training_flops"]
