"""Training on the tasks' data: the `train` CLI, short real-data runs that plant a backdoor, the
grouped holdout and `shrink`, and the fine-tuning settings a defend job takes from its task."""
import json

import pytest
import torch

from fineprune.cli import main
from fineprune.evaluation.metrics import predict
from fineprune.experiment.train import save_trained, train_task
from fineprune.tasks import get_task, shrink
from fineprune.training import TrainConfig


def test_train_cli_without_data_root_is_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FINEPRUNE_DATA", raising=False)
    assert main(["train", "--task", "face", "--out", str(tmp_path)]) == 2
    assert "--data-root" in capsys.readouterr().err


# (task, train fraction, eval fraction, epochs, training overrides, minimum ASR). All-to-all
# (speech) is learnt late in training, so its short run takes smaller batches (more steps).
SHORT_RUNS = [
    ("face", 0.5, 0.5, 6, {}, 0.8),
    ("speech", 0.4, 0.5, 10, {"batch_size": 16}, 0.25),
    ("traffic", 0.1, 0.15, 4, {}, 0.5),
]


@pytest.mark.slow
@pytest.mark.parametrize("task,frac,eval_frac,epochs,overrides,min_asr", SHORT_RUNS)
def test_short_training_plants_backdoor(shared_data, tmp_path, one_thread, task, frac, eval_frac, epochs, overrides,
                                        min_asr):
    spec = get_task(task)
    data = shrink(spec.load(shared_data, seed=0), frac, seed=0, eval_fraction=eval_frac)
    attack = spec.make_attack(seed=0, data=data)
    cfg = TrainConfig(**{**spec.attacker.to_dict(), "epochs": epochs, **overrides})
    trained = train_task(spec, data, attack=attack, cfg=cfg, seed=0)
    # Control: how often the same inputs WITHOUT the trigger already get the attack's label
    # (what a clean model's ASR amounts to). The trigger must add clearly more than that.
    x, y = data.test.tensors
    keep = attack.policy.eligible(y)
    clean_hits = float((predict(trained.model, x[keep]) == attack.policy.target_of(y[keep])).float().mean())
    rec = trained.record
    assert trained.test.asr >= min_asr, rec["metrics"]
    assert trained.test.asr >= clean_hits + 0.2, (clean_hits, rec["metrics"])
    assert trained.test.clean_acc > 3.0 / spec.num_classes, rec["metrics"]
    assert rec["poisoned_samples"] == round(attack.rate * len(data.train))
    weights, meta = save_trained(trained, tmp_path)
    saved = json.loads(meta.read_text())
    assert saved["task"] == task and saved["attack"] == "badnets"
    assert saved["architecture"]["name"] == spec.arch
    assert set(saved["metrics"]["test"]) == {"clean_acc", "asr", "robust_acc"}
    assert len(saved["history"]) == epochs and weights.stat().st_size > 10_000


def test_grouped_holdout_keeps_groups_whole_and_shrink_keeps_groups_aligned():
    from fineprune.data.splits import holdout
    from fineprune.data.types import TaskData, make_dataset

    g = torch.Generator().manual_seed(0)
    groups = torch.arange(60).repeat_interleave(5)  # 60 "tracks" of 5 near-identical frames
    y = groups % 3
    x = groups.float().view(-1, 1, 1, 1) + 0.01 * torch.rand(300, 1, 1, 1, generator=g)
    fit, held = holdout(make_dataset(x, y), 0.3, seed=1, groups=groups)
    side = lambda ds: set(ds.tensors[0].floor().long().flatten().tolist())  # noqa: E731  (x encodes the group)
    assert side(fit).isdisjoint(side(held)) and len(side(fit) | side(held)) == 60
    assert len(held) == 5 * len(side(held)) and 0.2 < len(held) / 300 < 0.4
    _, plain = holdout(make_dataset(x, y), 0.3, seed=1)
    assert len(side(plain) & side(_)) > 0  # without groups, tracks straddle: the reason for groups

    data = TaskData(name="t", train=make_dataset(x, y), val=make_dataset(x, y), test=make_dataset(x, y),
                    num_classes=3, val_groups=groups)
    small = shrink(data, 0.5, seed=0)
    assert torch.equal(small.val.tensors[0].floor().long().flatten(), small.val_groups)


def test_defend_on_task_data_uses_the_tasks_fine_tuning():
    from fineprune.defense.api import DEFAULT_FINETUNE
    from fineprune.pipeline.job import DefendJob

    job = DefendJob(model="m.safetensors", arch="traffic-vgg", data="task:traffic", out="o")
    assert job.finetune_config() == get_task("traffic").finetune != DEFAULT_FINETUNE
    job.lr = 0.003  # a flag still wins
    assert job.finetune_config().lr == 0.003 and job.finetune_config().epochs == get_task("traffic").finetune.epochs
    assert DefendJob(model="m", arch="a", data="clean.npz", out="o").finetune_config() == DEFAULT_FINETUNE
    assert DefendJob(model="m", arch="a", data="task:mnist", out="o").finetune_config() == DEFAULT_FINETUNE
