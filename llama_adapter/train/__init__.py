"""Training: ``python -m llama_adapter.train`` (``cli``) on a library of its parts, which other trainers reuse.

``data``/``image_data`` read and batch records, ``loss`` is the objective, ``optim`` the optimizer and
schedule, ``distributed`` the processes, ``state`` the checkpoint and metrics, ``visual`` the image side.
"""

from ..errors import TrainError
from .cli import main, parse_args, train
from .distributed import Dist, init_distributed, sum_across_ranks
from .loss import summed_nll
from .optim import lr_factor, make_optimizer
from .state import Metrics, Position

__all__ = [
    "Dist",
    "Metrics",
    "Position",
    "TrainError",
    "init_distributed",
    "lr_factor",
    "main",
    "make_optimizer",
    "parse_args",
    "sum_across_ranks",
    "summed_nll",
    "train",
]
