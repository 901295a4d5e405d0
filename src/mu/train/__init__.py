"""Training: the trainer (single process, DDP, FSDP), objectives, FLOPs accounting, checkpoints; the parts every
training loop shares (budget, step, rundir, validation).

    from mu.train import TrainConfig, train, training_flops
"""

from mu.train.config import TrainConfig
from mu.train.flops import flops_params, training_flops
from mu.train.rundir import RunDir, TrainingInterrupted
from mu.train.step import train_step
from mu.train.trainer import TrainingDiverged, TrainResult, TrainState, train

__all__ = ["RunDir", "TrainConfig", "TrainResult", "TrainState", "TrainingDiverged", "TrainingInterrupted",
           "flops_params", "train", "train_step", "training_flops"]
