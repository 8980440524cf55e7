"""The experiment flow, written once: task setup -> the attacker's models -> defend one -> a row.

- `vocabulary`: the words (ATTACKS, DEFENSES, DEFAULT_THRESHOLD);
- `setup`: a task's data, attack, training settings and the attacker's / defender's splits;
- `models`: the attacker's models, trained once and kept on disk by provenance (`ModelStore`);
- `measure`: `defend_one`, a defense run and measured on the test split;
- users: `reproduce` (the paper's table), `demo` (the mnist task), `train` (one model to files),
  and the workers of `fineprune grid` (grid/work.py).
"""
from .measure import defend_one
from .models import ModelStore, get_model, model_provenance
from .setup import TaskSetup, load_task_data, prepare_task
from .vocabulary import ATTACKS, DEFAULT_THRESHOLD, DEFENSES

__all__ = ["ATTACKS", "DEFAULT_THRESHOLD", "DEFENSES", "ModelStore", "TaskSetup", "defend_one", "get_model",
           "load_task_data", "model_provenance", "prepare_task"]
