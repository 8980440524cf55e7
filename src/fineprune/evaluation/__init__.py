from .metrics import Metrics, TriggeredSet, accuracy, attack_metrics, evaluate, predict

__all__ = ["Metrics", "TriggeredSet", "accuracy", "attack_metrics", "evaluate", "predict"]
