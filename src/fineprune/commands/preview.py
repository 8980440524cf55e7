"""`fineprune trigger-preview`: a PNG of clean inputs above their triggered copies."""
from __future__ import annotations

import argparse
import os

from .registry import command


def _args(p: argparse.ArgumentParser) -> None:
    from ..tasks import task_names

    p.add_argument("--task", required=True, choices=task_names())
    p.add_argument("--data-root", default=os.environ.get("FINEPRUNE_DATA"),
                   help="dataset folder (default $FINEPRUNE_DATA); without one, synthetic inputs are used")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("-n", "--count", type=int, default=6, help="inputs to show (1-8, default 6)")
    p.add_argument("--seed", type=int, default=0)


@command("trigger-preview", _args)
def run(args: argparse.Namespace) -> int:
    """Render a task's trigger on a few inputs (clean vs triggered) as a PNG."""
    import torch

    from ..data.types import tensors
    from ..errors import BadInputError
    from ..models.spectrogram import LogSpectrogram
    from ..report.previews import plot_trigger_preview
    from ..tasks import get_task

    if not 1 <= args.count <= 8:
        raise BadInputError(f"--count must be between 1 and 8, got {args.count}")
    spec = get_task(args.task)
    if args.data_root:
        data = spec.load(args.data_root, seed=args.seed)
        attack = spec.make_attack(seed=args.seed, data=data)
        x, y = tensors(data.test)
        # Inputs the attack applies to (e.g. stop signs for the traffic task), spread over classes.
        idx = torch.nonzero(attack.policy.eligible(y)).flatten()
        pick = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(args.seed))[: args.count]]
        clean, labels = x[pick], [data.class_names[int(c)] if data.class_names else str(int(c)) for c in y[pick]]
        source = "test split"
    else:
        attack = spec.make_attack(seed=args.seed)
        clean, labels, source = spec.synthetic_inputs(args.count, args.seed), None, "synthetic inputs"
    spectrogram = None
    if spec.input_kind == "audio":
        model = spec.build_model()
        spectrogram = next((m for m in model.modules() if isinstance(m, LogSpectrogram)), LogSpectrogram())
    plot_trigger_preview(clean, attack.trigger, args.out, input_kind=spec.input_kind, spectrogram=spectrogram,
                         labels=labels, title=f"{spec.name}: {attack.trigger.name} trigger ({source})")
    print(f"wrote {args.out}")
    return 0
