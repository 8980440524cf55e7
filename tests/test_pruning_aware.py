import torch

from fineprune import AllToOne, BadNets, PatchTrigger, defend, evaluate
from fineprune.attack.pruning_aware import PruningAwareAttack
from fineprune.data.embedded import load_mnist5k
from fineprune.data.splits import holdout
from fineprune.defense.sweep import layer_means
from fineprune.models.small import SmallCNN
from fineprune.training import TrainConfig, train


def test_pruning_aware_attack_defeats_pruning_but_not_fine_pruning(one_thread):
    data = load_mnist5k(seed=0)
    attack = BadNets(PatchTrigger(size=(3, 3)), AllToOne(0), rate=0.1, seed=0)
    defender_train, defender_val = holdout(data.val, 0.3, 0)
    # The attacker's validation data is held out of everything its models train on.
    attacker_train, attacker_val = holdout(data.train, 0.2, 1)
    torch.manual_seed(0)
    clean = SmallCNN(width=12)
    train(clean, attacker_train, TrainConfig(epochs=6, lr=1e-3, optimizer="adam", weight_decay=0.0,
                                         schedule="constant"), device=torch.device("cpu"))
    res = PruningAwareAttack(attack, backdoor=TrainConfig(epochs=4, lr=1e-3, optimizer="adam",
                                                          weight_decay=0.0, schedule="constant")).run(
        clean, attacker_train, attacker_val)
    assert res.decoys and res.bias_param == "features.6.bias"
    # The attacker checked its work as the defender would, and stopped at the first attempt that survived.
    assert res.attempts and res.attempts[-1]["asr_after_defender_pruning"] == res.survival_asr >= 0.8
    assert all(a["asr_after_defender_pruning"] < 0.8 for a in res.attempts[:-1])
    assert res.attacker_threshold == 4.0 + PruningAwareAttack.escalate[len(res.attempts) - 1]
    trig_test = attack.triggered(data.test)
    bad = evaluate(res.model, data.test, trig_test)
    assert bad.asr >= 0.9

    # Decoys stay dormant on clean and triggered inputs alike.
    for x in (data.test.tensors[0][:300], trig_test.x[:300]):
        means = layer_means(res.model, res.layer, x)
        assert torch.all(means[res.decoys] == 0)

    trig_val = attack.triggered(defender_val)
    pruned = defend(res.model, defender_train, defender_val, "prune", triggered=trig_val)
    # The defender prunes the decoys first (they have the lowest activation) ...
    assert set(res.decoys) <= set(pruned.pruned_channels)
    # ... and pruning alone leaves the backdoor in place.
    assert evaluate(pruned.model, data.test, trig_test).asr >= 0.8
    fp = defend(res.model, defender_train, defender_val, "fine-prune", triggered=trig_val)
    after = evaluate(fp.model, data.test, trig_test)
    assert after.asr <= 0.10
    assert bad.clean_acc - after.clean_acc <= 0.03
