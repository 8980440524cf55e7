"""PyTorch state dicts (`torch.save(model.state_dict())`, zip or legacy format) read with
`torch.load(..., weights_only=True)`: anything that needs other globals (a pickled `nn.Module`, a
`__reduce__` payload) is refused as unsafe. There is deliberately no flag to bypass this."""
from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from fineprune.errors import BadInputError, UnsafeModelError

from .messages import ACCEPTED_FORMATS, SAFE_ALTERNATIVE, clean_text, first_line

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
_STRIP_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


def read_state_dict(p: Path, name: str, size: int) -> dict[str, torch.Tensor]:
    """torch.load restricted to weights; map its failures to our errors."""
    if tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) < (2, 6):
        # torch < 2.6 had a code-execution hole in weights_only loading (CVE-2025-32434).
        raise UnsafeModelError(
            f"{name}: PyTorch {torch.__version__} cannot load .pt files safely (weights_only loading "
            "is exploitable before 2.6); upgrade torch to >= 2.6 or convert the model to safetensors"
        )
    try:
        # A file object, not the path: torch.load dispatches on a ".safetensors" suffix,
        # and the content (already sniffed) must decide the format, not the name.
        with p.open("rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        m = re.search(r"GLOBAL (\S+)", msg)
        if m or re.search(r"Unsupported operand|Can only (create|build)|persistent", msg):
            why = f" (it references {clean_text(m.group(1), 100)})" if m else ""
            raise UnsafeModelError(
                f"{name}: refused, the file needs arbitrary unpickling{why}, which would run code from "
                f"the file's author; {SAFE_ALTERNATIVE}"
            ) from None
        raise BadInputError(f"{name}: corrupt PyTorch file ({first_line(e)}); {ACCEPTED_FORMATS}") from None
    except EOFError:
        raise BadInputError(f"{name}: the PyTorch file is truncated; {ACCEPTED_FORMATS}") from None
    except Exception as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise UnsafeModelError(
                f"{name}: refused, the file needs arbitrary unpickling, which would run code from the "
                f"file's author; {SAFE_ALTERNATIVE}"
            ) from None
        raise BadInputError(
            f"{name}: could not read the PyTorch file, it is truncated or corrupt ({first_line(e)}); "
            f"{ACCEPTED_FORMATS}"
        ) from None
    return _find_state_dict(obj, name)


def _is_tensor_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _find_state_dict(obj: object, name: str) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one wrapped in a training checkpoint dict."""
    found: Mapping[str, torch.Tensor] | None = None
    if _is_tensor_dict(obj):
        found = obj  # type: ignore[assignment]
    elif isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if _is_tensor_dict(inner):
                found = inner
                break
        if found is None:
            keys = [clean_text(repr(k), 40) for k in list(obj.keys())[:12]]
            more = f" (+{len(obj) - 12} more)" if len(obj) > 12 else ""
            raise BadInputError(
                f"{name}: no state dict found; top-level keys are [{', '.join(keys)}]{more}; expected a "
                f"dict of tensors, or one stored under {', '.join(repr(k) for k in _WRAPPER_KEYS)}"
            )
    else:
        what = "a single tensor" if isinstance(obj, torch.Tensor) else f"a {type(obj).__name__}"
        raise BadInputError(f"{name}: the file holds {what}, not a state dict; {SAFE_ALTERNATIVE}")

    sd = {k: v.detach() for k, v in found.items()}
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd
