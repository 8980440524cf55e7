"""Shared pieces of the benchmark scripts: machine facts, alternating timers, models and data.

Benchmarks run on a shared, noisy machine, so competing implementations are always timed in the
same process, in alternating order, and compared by medians and by per-round (paired) ratios.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def data_root() -> Path:
    """Where the real datasets are: $FINEPRUNE_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("FINEPRUNE_DATA", REPO.parent / "shared" / "data"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """What a reader needs to compare figures: cores, CPU, torch, threads, load, date."""
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def finish(payload: dict) -> dict:
    """Stamp the load average at the end into the payload's machine description."""
    payload["machine"]["loadavg_end"] = list(os.getloadavg())
    return payload


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="seconds-long run on synthetic data (smoke test)")
    p.add_argument("--out", type=Path, default=None, help="JSON result path (default bench/results/NAME.json)")
    p.add_argument("--rounds", type=int, default=None, help="alternating timing rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine, 2 OpenMP threads stall at "
                        "barriers whenever another process holds a core; see BENCHMARKS.md)")
    return p


def setup(args: argparse.Namespace) -> dict:
    """Threads and seed as asked; the machine description (taken after setting threads)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return machine()


def alternate(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each function per round; the order flips every round so drift hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num/den (robust when the machine's load changes between rounds)."""
    return median([a / b for a, b in zip(num, den)])


def summary(times: dict[str, list[float]]) -> dict:
    return {k: {"median_s": round(median(v), 4), "runs_s": [round(x, 4) for x in v]} for k, v in times.items()}


# ---- models ---------------------------------------------------------------------------------

def build_model(name: str, num_classes: int) -> nn.Module:
    """The benchmark models: the traffic and face task networks, and torchvision's resnet18."""
    if name == "traffic":
        from fineprune.models.traffic import TrafficVGG
        return TrafficVGG(num_classes=num_classes)
    if name == "face":
        from fineprune.models.face import DeepIDFace
        return DeepIDFace(num_classes=num_classes)
    if name == "speech":
        from fineprune.models.speech import SpeechAlexNet
        return SpeechAlexNet(num_classes=num_classes)
    if name == "resnet18":
        import torchvision
        return torchvision.models.resnet18(weights=None, num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}")


MODEL_TASK = {"traffic": "traffic", "face": "faces", "speech": "speech", "resnet18": "traffic"}
SYNTHETIC_SHAPE = {"traffic": (3, 32, 32), "faces": (1, 64, 56), "speech": (1, 8192)}
SYNTHETIC_CLASSES = {"traffic": 43, "faces": 38, "speech": 10}


def load_task(task: str, synthetic: bool, seed: int = 0):
    """The task's TaskData from the real archives, or random data of the same shape (labelled)."""
    from fineprune.data.types import TaskData, make_dataset
    root = data_root()
    if not synthetic and root.is_dir():
        if task == "traffic":
            from fineprune.data.traffic import load_traffic
            return load_traffic(root, seed=seed), "real"
        if task == "faces":
            from fineprune.data.faces import load_faces
            return load_faces(root, seed=seed), "real"
        if task == "speech":
            from fineprune.data.speech import load_speech
            return load_speech(root, seed=seed), "real"
    g = torch.Generator().manual_seed(seed)
    shape, k = SYNTHETIC_SHAPE[task], SYNTHETIC_CLASSES[task]

    def part(n: int):
        x = torch.rand(n, *shape, generator=g)
        if task == "speech":
            x = x * 2 - 1
        return make_dataset(x, torch.randint(0, k, (n,), generator=g))

    return TaskData(name=task, train=part(512), val=part(512), test=part(128), num_classes=k), "synthetic"


def trained_model(name: str, data, epochs: float, seed: int = 0, max_train: int | None = None) -> nn.Module:
    """`name` trained briefly on `data.train` (weights cached under ~/.cache/fineprune/bench), so
    that logit margins look like a real model's rather than a random initialisation's."""
    from fineprune.data.types import make_dataset, tensors
    from fineprune.training import TrainConfig, train

    torch.manual_seed(seed)
    model = build_model(name, data.num_classes)
    if epochs <= 0:
        return model.eval()
    x, y = tensors(data.train)
    if max_train is not None and x.shape[0] > max_train:
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_train]
        x, y = x[idx], y[idx]
    from fineprune.experiment.setup import arch_signature

    sig = arch_signature(model)  # a changed architecture never loads stale weights
    key = hashlib.sha256(f"{name}|{sig}|{data.name}|{x.shape}|{int(y.sum())}|{epochs}|{seed}".encode()).hexdigest()[:16]
    path = Path.home() / ".cache" / "fineprune" / "bench" / f"{name}-{key}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    cfg = TrainConfig(epochs=max(1, int(epochs)), lr=1e-3, batch_size=64, optimizer="adam",
                      weight_decay=0.0, schedule="constant")
    train(model, make_dataset(x, y), cfg, device=torch.device("cpu"), seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def write_result(name: str, out: Path | None, payload: dict) -> Path:
    from fineprune.runtime import write_json_atomic
    path = out or RESULTS / f"{name}.json"
    write_json_atomic(path, payload)
    print(f"wrote {path}")
    return path
