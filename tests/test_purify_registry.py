"""The method registry: one spec syntax for every family, resolved in one place, and a new method
added as one file (a plugin) usable from defend(), `fineprune defend` and a grid axis."""
from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest
import torch

from fineprune import defend
from fineprune.cli import main
from fineprune.data.embedded import load_mnist5k
from fineprune.errors import BadInputError
from fineprune.grid import expand, parse_config
from fineprune.grid.config import cell_id
from fineprune.models.small import SmallCNN
from fineprune.purify import registry
from fineprune.purify.registry import canonical, load_plugins, methods, resolve
from fineprune.specs import split_spec
from fineprune.training import TrainConfig

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")

TOY_RECIPE = '''
from dataclasses import dataclass
from typing import ClassVar

from fineprune.purify.recipes import Recipe

CALLS = []


@dataclass
class ScaledLoss(Recipe):
    """Plain fine-tuning with the loss scaled by `scale` (a toy, for the registry's tests)."""

    name: ClassVar[str] = "toy-scaled"
    scale: float = 1.0

    def loss(self, model, logits, y):
        CALLS.append(self.scale)
        return self.scale * super().loss(model, logits, y)
'''

TOY_CRITERION = '''
from dataclasses import dataclass
from typing import ClassVar

from fineprune.purify.criteria import Criterion, activation_order


@dataclass
class Reversed(Criterion):
    """The paper's ranking reversed, most active channel first (a toy, for the registry's tests)."""

    name: ClassVar[str] = "toy-reversed"
    offset: int = 0

    def rank(self, model, layer, clean, *, device=None, seed=0, workers=0):
        order = activation_order(model, layer, clean, device=device, workers=workers)[::-1]
        return order[self.offset:] + order[:self.offset]
'''


@pytest.fixture(scope="module")
def toys(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("toys")
    (root / "toy_recipe.py").write_text(TOY_RECIPE)
    (root / "toy_criterion.py").write_text(TOY_CRITERION)
    paths = [str(root / "toy_recipe.py"), str(root / "toy_criterion.py")]
    load_plugins(paths)
    return paths


def _toy_module(name: str):
    import sys

    return next(m for m in list(sys.modules.values()) if getattr(m, "__file__", "") and m.__file__.endswith(name))


# ---- the spec syntax ---------------------------------------------------------------------------


def test_spec_syntax_splits_literals_and_refuses_malformed_text():
    assert split_spec("ft-sam,rho=8,adaptive=false") == ("ft-sam", {"rho": 8, "adaptive": False})
    assert split_spec(" anp , eps = 0.3 ") == ("anp", {"eps": 0.3})
    for bad in ("", ",rho=1", "fst,alpha", "fst,1x=2", "fst,alpha=1,alpha=2"):
        with pytest.raises(BadInputError):
            split_spec(bad)


def test_resolve_coerces_to_the_field_types_and_canonical_text_round_trips():
    r = resolve("recipe", "ft-sam,rho=8")
    assert r.rho == 8.0 and isinstance(r.rho, float)
    assert r.spec() == "ft-sam,rho=8" and canonical("recipe", "ft-sam,rho=2.0") == "ft-sam"
    assert canonical("recipe", {"name": "ft-sam", "rho": 8}) == "ft-sam,rho=8"  # config-file mappings
    assert resolve("recipe", r.spec()) == r and resolve("recipe", r) is not r  # instances are copied
    full = resolve("criterion", "anp,eps=0.3").options()
    assert full["name"] == "anp" and full["eps"] == 0.3 and full["iterations"] == 200  # every field
    assert resolve("recipe", "augment,flip=true").flip is True
    assert resolve("stop_rule", "bound,z=1").spec() == "bound,z=1"
    assert resolve("recipe", None).spec() == registry.base("recipe").default_spec


@pytest.mark.parametrize("family, spec, words", [
    ("recipe", "ft-sum", r"unknown fine-tuning recipe 'ft-sum' \(did you mean ft-sam\?\)"),
    ("recipe", "ft-sam,roh=2", r"ft-sam has no option 'roh' \(did you mean rho\?\); its options: "),
    ("recipe", "ft-sam,rho=big", r"option rho must be float, got 'big'"),
    ("recipe", "augment,flip=1", r"option flip must be bool"),
    ("criterion", "anp,eps=-1", r"anp: needs eps >= 0"),
    ("stop_rule", "paper,z=1", r"paper has no option 'z'"),
    ("criterion", 3, r"must be a spec NAME"),
])
def test_bad_specs_are_one_error_with_suggestions(family, spec, words):
    with pytest.raises(BadInputError, match=words):
        resolve(family, spec)


def test_a_method_of_another_family_is_refused():
    with pytest.raises(BadInputError, match="is a fine-tuning recipe, not a pruning criterion"):
        resolve("criterion", resolve("recipe", "plain"))


def test_every_builtin_method_has_a_source_and_round_trips():
    for family in ("recipe", "criterion", "stop_rule"):
        for name, cls in methods(family).items():
            assert cls.__doc__ and registry.summary(cls), name
            m = resolve(family, name)
            assert resolve(family, m.options()) == m and canonical(family, m.spec()) == name


# ---- one file adds a method ---------------------------------------------------------------------


def _tiny():
    data = load_mnist5k(seed=0)
    x, y = data.train.tensors
    keep = y < 4  # four classes, a few hundred digits: seconds
    perm = torch.randperm(int(keep.sum()), generator=torch.Generator().manual_seed(0))[:360]
    x, y = x[keep][perm], y[keep][perm]
    train_ds = torch.utils.data.TensorDataset(x[:240], y[:240])
    val_ds = torch.utils.data.TensorDataset(x[240:], y[240:])
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=4, width=4)
    return model, train_ds, val_ds


def test_toy_recipe_and_criterion_by_name_from_defend(toys):
    model, train_ds, val_ds = _tiny()
    calls = _toy_module("toy_recipe.py").CALLS
    calls.clear()
    res = defend(model, train_ds, val_ds, "fine-prune", recipe="toy-scaled,scale=0.5", criterion="toy-reversed",
                 finetune=TrainConfig(epochs=1, lr=0.01, batch_size=32), lr_factors=(1.0,))
    assert calls and set(calls) == {0.5}
    assert res.methods["recipe"] == {"name": "toy-scaled", "scale": 0.5, "augmentation": False, "flip": False,
                                     "label_smoothing": 0.0, "distill": 0.0, "temperature": 4.0}
    assert res.methods["criterion"] == {"name": "toy-reversed", "offset": 0}
    means = torch.tensor(res.sweep.channel_means)
    assert res.sweep.order == torch.sort(means, stable=True).indices.tolist()[::-1]
    assert res.sweep.criterion == "toy-reversed"


def test_toy_methods_from_the_cli_with_plugins(toys, tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    model, _, val_ds = _tiny()
    x, y = val_ds.tensors
    np.savez(tmp_path / "clean.npz", x=x.numpy(), y=y.numpy())
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    factory = tmp_path / "toy_nets.py"
    factory.write_text("from fineprune.models.small import SmallCNN\n"
                       "def tiny(num_classes=4, in_channels=1):\n"
                       "    return SmallCNN(in_channels=in_channels, num_classes=num_classes, width=4)\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        out = tmp_path / "out"
        rc = main(["defend", "--model", str(tmp_path / "model.safetensors"), "--arch", "toy_nets:tiny", "--num-classes", "4",
                   "--data", str(tmp_path / "clean.npz"), "--out", str(out), "--epochs", "1", "--no-compact",
                   "--plugin", toys[0], "--plugin", toys[1], "--recipe", "toy-scaled,scale=0.25",
                   "--criterion", "toy-reversed,offset=1", "--quiet"])
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("toy_nets", None)
    assert rc == 0
    info = json.loads((out / "model.json").read_text())
    assert info["finetune"]["recipe"]["name"] == "toy-scaled" and info["finetune"]["recipe"]["scale"] == 0.25
    assert info["sweep"]["criterion"] == {"name": "toy-reversed", "offset": 1}
    assert "--recipe toy-scaled,scale=0.25" in info["command"] and "--plugin" in info["command"]


def test_toy_methods_as_grid_axes(toys, monkeypatch):
    from fineprune import experiment
    from fineprune.defense import persist
    from fineprune.grid import work

    cfg = parse_config({"plugins": toys, "axes": {"task": "mnist", "defense": ["fine-pruning"],
                                                  "recipe": ["plain", "toy-scaled,scale=0.5", "toy-scaled,scale=1"],
                                                  "criterion": ["toy-reversed"]}})
    cells = expand(cfg)
    # "toy-scaled,scale=1" is the toy's default: canonically "toy-scaled", its own cell
    assert sorted(c.params["recipe"] for c in cells) == ["plain", "toy-scaled", "toy-scaled,scale=0.5"]
    seen = []
    monkeypatch.setattr(work, "_setup", lambda *a, **k: types.SimpleNamespace(fresh=lambda: None))
    monkeypatch.setattr(persist, "load_pruned", lambda net, path: net)
    monkeypatch.setattr(experiment, "defend_one", lambda *a, **kw: (seen.append(kw), ({"clean_acc": 1.0}, None))[1])
    for cell in cells:
        work.run_cell({"id": cell.id, "params": cell.params, "data_root": ".", "plugins": toys}, {"path": "-"})
    assert {kw["recipe"] for kw in seen} == {"plain", "toy-scaled", "toy-scaled,scale=0.5"}
    assert {kw["criterion"] for kw in seen} == {"toy-reversed"}


# ---- ids, help and README stay in step with the registry ----------------------------------------


@pytest.mark.parametrize("name", ["purification-mnist", "purification-real"])
def test_committed_grid_results_keep_their_cell_ids(name):
    """Every cell id in a committed results.jsonl is what today's code computes from its params:
    grids written before the registry resume, and their rows keep matching their cells."""
    from fineprune.grid.config import AXES

    rows = [json.loads(line) for line in (REPO / "bench" / "results" / name / "results.jsonl").read_text().splitlines()
            if line.strip()]
    assert rows
    for row in rows:
        params = {axis: row.get(axis) for axis in AXES}  # an axis added later is absent: None
        assert cell_id(params) == row["cell"], row["cell"]


def test_cli_help_lists_every_registered_method(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping inside a name such as ft-sam
    try:
        assert main(["defend", "--help"]) == 0
    except SystemExit as stop:  # argparse's help exits
        assert stop.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for family in ("recipe", "criterion", "stop_rule"):
        for name in methods(family):
            assert re.search(rf"\b{re.escape(name)}\b", text), name


def test_readme_method_tables_are_the_registry_s():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for family in ("recipe", "criterion", "stop_rule"):
        table = registry.help_table(family, builtin=True)
        assert table in readme, f"README's {family} table differs from the registry; paste:\n{table}"


def test_methods_command_prints_the_tables(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for family in ("recipe", "criterion", "stop_rule"):
        assert registry.help_table(family) in out
