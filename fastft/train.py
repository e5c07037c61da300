"""The fine-tuning run's entry points, kept importable from here: the run itself lives in fastft.trainer (setup,
train_one_epoch, end_of_epoch) and the run folder in fastft.run_dir."""

from fastft.run_dir import _restarting, default_run_name, prepare_run_dir
from fastft.trainer import RunResult, finetune

__all__ = ["RunResult", "_restarting", "default_run_name", "finetune", "prepare_run_dir"]
