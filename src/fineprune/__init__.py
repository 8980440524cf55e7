"""fineprune: the Fine-Pruning backdoor defense (Liu, Dolan-Gavitt, Garg, RAID 2018) for any
PyTorch classifier."""
from .attack.badnets import BadNets
from .attack.policy import AllToAll, AllToOne, SourceSpecific
from .attack.triggers import BlendTrigger, PatchTrigger
from .defense.api import DEFAULT_FINETUNE, DefenseResult, FinePruning, FineTuning, Pruning, RunOptions, defend
from .defense.layer import find_prune_layer
from .defense.mask import clear_mask, pruned_channels, set_pruned
from .purify.stop_rules import DEFAULT_THRESHOLD
from .defense.sweep import SweepCurve, sweep
from .evaluation.metrics import Metrics, TriggeredSet, evaluate
from .training import TrainConfig

__version__ = "0.1.0"

__all__ = [
    "AllToAll", "AllToOne", "BadNets", "BlendTrigger", "DEFAULT_FINETUNE", "DEFAULT_THRESHOLD",
    "DefenseResult", "FinePruning", "FineTuning", "Metrics", "PatchTrigger", "Pruning", "RunOptions",
    "SourceSpecific", "SweepCurve", "TrainConfig", "TriggeredSet", "clear_mask", "defend", "evaluate",
    "find_prune_layer", "pruned_channels", "set_pruned", "sweep",
]
