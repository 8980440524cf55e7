"""The attacker's models of one task setup, trained once and kept on disk by provenance.

A model's provenance is everything that made it (task, seed, data split, training settings,
architecture signature, attack); its fingerprint names the files, so `reproduce`, `grid` and
`demo` running in the same folder share models, and a changed provenance never reuses a stale
one. (Stores written before this was named "provenance" call it "recipe" in their info files and
safetensors metadata; the fingerprint, and so the file names, are the same, and `PROVENANCE_KEYS`
lists both names for readers.)
"""
from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..attack.pruning_aware import PruningAwareAttack
from ..defense.persist import load_pruned, save_pruned
from ..runtime import fingerprint, seed_everything, write_json_atomic
from ..training import TrainConfig, train
from .setup import TaskSetup
from .vocabulary import ATTACKS, DEFAULT_THRESHOLD

#: `make(checkpoint_prefix) -> (model, info)`: trains a model the store does not hold yet.
Maker = Callable[[str], tuple[nn.Module, dict]]


#: The key of a stored model's provenance in its info file (and, prefixed "fineprune.", in its
#: safetensors metadata): today's name first, then the one stores written before used.
PROVENANCE_KEYS = ("provenance", "recipe")


class ModelStore:
    """Trained models on disk keyed by a fingerprint of their provenance (reused by later runs).

    While a model trains, its per-epoch checkpoints live beside it (`<name>-<fp>.ckpt*`): a run
    killed mid-training resumes from the last finished epoch when rerun, and ends as an
    uninterrupted run would. They are deleted once the model is stored."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def files(self, name: str, provenance: dict) -> tuple[Path, Path]:
        """(weights, info) paths of the model `name` made as `provenance` says (they may not exist yet)."""
        fp = fingerprint(provenance)
        return self.folder / f"{name}-{fp}.safetensors", self.folder / f"{name}-{fp}.json"

    def get(self, name: str, provenance: dict, build: Callable[[], nn.Module], make: Maker
            ) -> tuple[nn.Module, dict, bool]:
        """(model, info, reused): loaded into `build()` when stored, else `make`d and stored."""
        weights, info_path = self.files(name, provenance)
        if weights.exists() and info_path.exists():
            model = load_pruned(build(), weights)
            return model, json.loads(info_path.read_text()), True
        self.folder.mkdir(parents=True, exist_ok=True)
        prefix = weights.with_suffix(".ckpt")
        model, info = make(str(prefix))
        save_pruned(model, weights, {f"fineprune.{PROVENANCE_KEYS[0]}": json.dumps(provenance, default=str)})
        write_json_atomic(info_path, {PROVENANCE_KEYS[0]: provenance, **info})  # last: marks the model complete
        for pattern in (prefix.name + "*", f".{prefix.name}*.tmp"):  # and a killed write's temp file
            for f in self.folder.glob(pattern):
                f.unlink(missing_ok=True)
        return model, info, False


def model_provenance(setup: TaskSetup, attack_name: str, pa_threshold: float = DEFAULT_THRESHOLD,
                     pa_widen: int = 0) -> tuple[str, dict]:
    """(file name stem, provenance) of the model `attack_name` ("none" = clean) trained for `setup`."""
    name = setup.task.name
    if attack_name == "none":
        return f"{name}-clean", setup.base
    if attack_name == "badnets":
        return f"{name}-badnets", {**setup.base, "attack": setup.attack.describe()}
    if attack_name == "pruning-aware":
        provenance = {**setup.base, "attack": setup.attack.describe(), "pa_threshold": pa_threshold,
                      "pa_escalate": list(PruningAwareAttack.escalate)}
        if pa_widen:  # a different architecture: its own files (and 0 keeps the provenance as it was)
            provenance["pa_widen"] = pa_widen
        return f"{name}-pruning-aware" + (f"-widen{pa_widen}" if pa_widen else ""), provenance
    raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, not {attack_name!r}")


def get_model(setup: TaskSetup, attack_name: str, store: ModelStore, *,
              pa_threshold: float = DEFAULT_THRESHOLD,
              clean: Callable[[], tuple[nn.Module, dict]] | None = None,
              pa_widen: int = 0) -> tuple[nn.Module, dict, bool]:
    """The model `attack_name` of `setup`: from `store` when its provenance was trained before, else
    trained now and stored. Returns (model, info, reused). The pruning-aware attack starts from
    the clean model: `clean()` must return (clean model, its info) when it has to be trained.
    `pa_widen`: channels the pruning-aware attacker adds to the pruned layer (0: none)."""
    name, provenance = model_provenance(setup, attack_name, pa_threshold, pa_widen)
    task, dev, seed, train_cfg = setup.task, setup.device, setup.seed, setup.train_cfg

    def make_trained(ckpt: str) -> tuple[nn.Module, dict]:  # clean, or BadNets-poisoned data
        t0 = time.perf_counter()
        m = setup.fresh()
        data = setup.attacker_train if attack_name == "none" else setup.attack.poison(setup.attacker_train).dataset
        train(m, data, train_cfg, device=dev, seed=seed, progress=setup.progress,
              desc=f"{task.name}: {'clean' if attack_name == 'none' else attack_name}",
              checkpoint_path=ckpt, resume=True)
        return m, {"train_seconds": time.perf_counter() - t0}

    def make_pruning_aware(ckpt: str) -> tuple[nn.Module, dict]:
        if clean is None:
            raise ValueError("the pruning-aware attack needs the clean model (pass clean=)")
        t0 = time.perf_counter()
        clean_model, clean_info = clean()
        seed_everything(seed)  # dropout draws: the same whether the clean model was trained or loaded
        # The attacker backdoors the pruned clean net with half its usual training per round.
        backdoor_cfg = TrainConfig(**{**train_cfg.to_dict(), "epochs": max(1, train_cfg.epochs // 2)})
        pa = PruningAwareAttack(setup.attack, threshold=pa_threshold, backdoor=backdoor_cfg, seed=seed,
                                device=dev, progress=setup.progress, checkpoint_prefix=ckpt, widen=pa_widen)
        res = pa.run(copy.deepcopy(clean_model), setup.attacker_train, setup.attacker_val)
        return res.model, {"train_seconds": time.perf_counter() - t0 + clean_info.get("train_seconds", 0.0),
                           "layer": res.layer, "decoys": res.decoys, "bias_param": res.bias_param,
                           "rounds": res.rounds, "attacker_threshold": res.attacker_threshold,
                           "attempts": res.attempts, "widen": res.widen}

    make = make_pruning_aware if attack_name == "pruning-aware" else make_trained
    return store.get(name, provenance, setup.builder(attack_name, pa_widen), make)
