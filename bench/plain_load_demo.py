"""(bench/plain_load_demo.py; issue 12 item 3) Plain-load CA/ASR of `fineprune defend`'s model.safetensors in the demo setup.

prepare DIR: train the demo's backdoored SmallCNN (seed 0) and write its weights + the demo's
defender data (clean fine-tune part, clean validation part, triggered validation) + the demo's
test split (clean and triggered) to DIR.
run DIR LABEL: `fineprune defend` (demo-cnn, --val) for prune and fine-prune, then evaluate the
written model.safetensors loaded (a) plainly into SmallCNN() and (b) with load_pruned, on the test split.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

import fineprune


def prepare(d: Path):
    from fineprune.attack.badnets import BadNets
    from fineprune.attack.policy import AllToOne
    from fineprune.attack.triggers import PatchTrigger
    from fineprune.data.embedded import load_mnist5k
    from fineprune.data.splits import stratified_split
    from fineprune.data.types import tensors
    from fineprune.models.small import SmallCNN
    from fineprune.runtime import seed_everything
    from fineprune.tasks import get_task
    from fineprune.training import train

    ATTACKER_TRAINING = get_task("mnist").attacker
    from safetensors.torch import save_file
    d.mkdir(parents=True, exist_ok=True)
    seed_everything(0)
    data = load_mnist5k(seed=0)
    attack = BadNets(PatchTrigger(size=(3, 3), position=(-2, -2), color=(1.0,)), AllToOne(0), rate=0.1, seed=0)
    poisoned = attack.poison(data.train)
    xd, yd = tensors(data.val)
    ft, va = stratified_split(yd, (0.7, 0.3), 0)
    torch.manual_seed(0)
    m = SmallCNN(width=16)
    train(m, poisoned.dataset, ATTACKER_TRAINING, device=torch.device("cpu"), seed=0, desc="train backdoored")
    save_file(m.state_dict(), str(d / "bad.safetensors"))
    np.savez(d / "train.npz", x=xd[ft].numpy(), y=yd[ft].numpy())
    np.savez(d / "val.npz", x=xd[va].numpy(), y=yd[va].numpy())
    tv = attack.triggered(torch.utils.data.TensorDataset(xd[va], yd[va]))
    np.savez(d / "trig_val.npz", x=tv.x.numpy(), y=tv.y_true.numpy())
    xt, yt = tensors(data.test)
    tt = attack.triggered(data.test)
    np.savez(d / "test.npz", x=xt.numpy(), y=yt.numpy(), tx=tt.x.numpy(), ty=tt.y_true.numpy())

def metrics(model, d):
    t = np.load(d / "test.npz")
    model.eval()
    with torch.no_grad():
        ca = float((model(torch.from_numpy(t["x"])).argmax(1) == torch.from_numpy(t["y"])).float().mean())
        asr = float((model(torch.from_numpy(t["tx"])).argmax(1) == 0).float().mean())
    return round(100 * ca, 1), round(100 * asr, 1)

def run(d: Path, label: str):
    import safetensors.torch

    from fineprune.cli import main
    from fineprune.defense.persist import load_pruned
    from fineprune.models.small import SmallCNN
    rows = {"fineprune": fineprune.__file__}
    m = SmallCNN(); m.load_state_dict(safetensors.torch.load_file(str(d / "bad.safetensors")))
    rows["received"] = metrics(m, d)
    for method in ("prune", "fine-prune"):
        out = d / f"out-{label}-{method}"
        rc = main(["defend", "--model", str(d / "bad.safetensors"), "--arch", "demo-cnn", "--data", str(d / "train.npz"),
                   "--val", str(d / "val.npz"), "--triggered", str(d / "trig_val.npz"), "--target", "0",
                   "--method", method, "--out", str(out), "--force", "--quiet"])
        assert rc == 0
        plain = SmallCNN(); plain.load_state_dict(safetensors.torch.load_file(str(out / "model.safetensors")))
        masked = load_pruned(SmallCNN(), out / "model.safetensors")
        info = json.loads((out / "model.json").read_text())
        rows[method] = {"plain_load": metrics(plain, d), "load_pruned": metrics(masked, d),
                        "pruned": info["pruned_count"], "plain_load_is_defended": info.get("plain_load_is_defended")}
    print(label, json.dumps(rows, indent=1))
    (d / f"result-{label}.json").write_text(json.dumps(rows, indent=1))

if __name__ == "__main__":
    (prepare if sys.argv[1] == "prepare" else lambda d: run(d, sys.argv[3]))(Path(sys.argv[2]))
