"""Build an (untrained) architecture from a user-supplied spec string.

Weights from an untrusted file are only ever loaded into a model whose code the *user*
chose, never code shipped inside the file. The spec names that code in one of three forms:

* ``torchvision:NAME`` -- ``torchvision.models.get_model(NAME, weights=None, num_classes=...)``
  (``weights=None``: nothing is downloaded);
* ``timm:NAME`` or ``timm:NAME,key=value,...`` -- ``timm.create_model(NAME, pretrained=False,
  num_classes=..., key=value, ...)`` (the optional extra ``fineprune[timm]``; ``pretrained=False``:
  nothing is downloaded, the user's file supplies every weight). The keys are the model's own
  constructor arguments, e.g. ``timm:vit_tiny_patch16_224,img_size=32,patch_size=8`` for a ViT
  trained on 32x32 images; values are Python literals (never evaluated as code);
* ``package.module:function`` -- an import path to a factory (or class) of the user's own;
* a built-in name registered with :func:`register_arch` (e.g. ``demo-cnn``).
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Callable, TypeVar

from torch import nn

from fineprune.errors import BadInputError
from fineprune.specs import split_spec

__all__ = ["BUILTIN", "register_arch", "build_arch", "SPEC_FORMS"]

BUILTIN: dict[str, Callable[..., nn.Module]] = {}
"""Built-in architectures by normalised name; filled by :func:`register_arch`."""

SPEC_FORMS = ("torchvision:NAME (e.g. torchvision:resnet18), timm:NAME[,key=value...] "
              "(e.g. timm:vit_tiny_patch16_224,img_size=32) or an import path package.module:function")
# timm arguments that would fetch or read weights other than the user's file.
_TIMM_FORBIDDEN = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                   "cache_dir", "num_classes", "in_chans")

# Modules imported on first built-in lookup so their @register_arch decorators have run.
_BUILTIN_PROVIDERS = ("fineprune.models",)

F = TypeVar("F", bound=Callable[..., nn.Module])


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_arch(name: str) -> Callable[[F], F]:
    """Decorator: make a factory ``f(num_classes=..., [in_channels=...]) -> nn.Module`` a built-in."""

    def deco(factory: F) -> F:
        key = _norm(name)
        old = BUILTIN.get(key)
        same = old is not None and (
            getattr(old, "__module__", None),
            getattr(old, "__qualname__", None),
        ) == (getattr(factory, "__module__", None), getattr(factory, "__qualname__", None))
        if old is not None and old is not factory and not same:
            raise ValueError(f"architecture name {name!r} is already registered by {old!r}")
        BUILTIN[key] = factory
        return factory

    return deco


def build_arch(spec: str, num_classes: int, in_channels: int | None = None) -> nn.Module:
    """Instantiate the architecture named by `spec` with `num_classes` outputs.

    `in_channels`, when given, is passed to factories that accept it; otherwise the
    model's first ``Conv2d`` is replaced by one taking `in_channels` inputs (e.g. 1 for
    grayscale data on a torchvision model), keeping all its other settings.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise BadInputError(f"empty architecture spec; use a built-in name, {SPEC_FORMS}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise BadInputError(f"`num_classes` must be a positive integer, got {num_classes!r}")
    spec = spec.strip()
    if spec.lower().startswith("torchvision:"):
        model = _torchvision(spec.split(":", 1)[1].strip(), num_classes)
        takes_channels = False
    elif spec.lower().startswith("timm:"):
        model = _timm(spec.split(":", 1)[1].strip(), num_classes, in_channels)
        takes_channels = in_channels is not None
    elif ":" in spec:
        factory = _import_factory(spec)
        model, takes_channels = _call(factory, spec, num_classes, in_channels)
    else:
        model, takes_channels = _call(_builtin(spec), spec, num_classes, in_channels)
    if in_channels is not None and not takes_channels:
        _adapt_in_channels(model, in_channels)
    return model


def _torchvision(name: str, num_classes: int) -> nn.Module:
    import torchvision

    known = sorted(torchvision.models.list_models())
    if name.lower() not in known:
        close = difflib.get_close_matches(name.lower(), known, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"e.g. {', '.join(known[:5])}"
        raise BadInputError(f"unknown torchvision model {name!r}; {hint} (see torchvision.models.list_models())")
    try:
        return torchvision.models.get_model(name.lower(), weights=None, num_classes=num_classes)
    except (TypeError, ValueError) as e:
        raise BadInputError(f"torchvision:{name} cannot be built with num_classes={num_classes}: {e}") from e


def _timm_kwargs(body: str, spec: str) -> tuple[str, dict[str, Any]]:
    """The model name and `key=value` pairs of a timm spec, split by the one spec syntax
    (`fineprune.specs`: values are literals, never code); keys that would bypass the user's file
    or the data's counts are refused."""
    name, kwargs = split_spec(body, f"`arch` {spec!r}")
    for key in kwargs:
        if key in _TIMM_FORBIDDEN:
            raise BadInputError(f"`arch` {spec!r}: {key} cannot be set here (the weights come from the "
                                "model file only, and `num_classes` / the data set the class and "
                                "channel counts)")
    return name, kwargs


def _timm(body: str, num_classes: int, in_channels: int | None) -> nn.Module:
    """A timm architecture, randomly initialised (never pretrained: no download); the caller
    loads the user's weights into it through the same safe path as every other arch."""
    spec = f"timm:{body}"
    try:
        import timm
    except ImportError:
        raise BadInputError(f"`arch` {spec!r} needs timm, which is not installed: "
                            "pip install 'fineprune[timm]'") from None
    name, kwargs = _timm_kwargs(body, spec) if body.strip() else ("", {})
    arch_name = timm.models.split_model_name_tag(name)[0] if name else ""
    if not arch_name or not timm.is_model(arch_name):
        known = timm.list_models()
        close = difflib.get_close_matches(arch_name.lower(), known, n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
        raise BadInputError(f"unknown timm model {name!r} in `arch`; {hint}")
    if in_channels is not None:
        kwargs["in_chans"] = in_channels
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise BadInputError(f"`arch` {spec!r} cannot be built with num_classes={num_classes} and "
                            f"{kwargs or 'no arguments'}: {e}") from e


def _import_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise BadInputError(f"malformed architecture spec {spec!r}; expected {SPEC_FORMS}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise BadInputError(
            f"cannot import module {module_name!r} for `arch` {spec!r} ({e}); is it installed or on PYTHONPATH?"
        ) from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise BadInputError(f"{module_name!r} has no attribute {attr_path!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BadInputError(f"{spec!r} is not callable; it must be a function or class returning an nn.Module")
    return obj


def _builtin(name: str) -> Callable[..., nn.Module]:
    key = _norm(name)
    if key not in BUILTIN:
        for provider in _BUILTIN_PROVIDERS:
            try:
                importlib.import_module(provider)
            except ModuleNotFoundError as e:
                if e.name != provider:
                    raise
    if key not in BUILTIN:
        names = sorted(BUILTIN)
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
        listed = ", ".join(names) if names else "none registered"
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise BadInputError(
            f"unknown architecture {name!r}; {hint}built-ins: {listed}; or use {SPEC_FORMS}"
        )
    return BUILTIN[key]


def _accepts(factory: Callable[..., Any], param: str) -> bool | None:
    """True/False if `factory` takes keyword `param`; None if its signature is unknowable."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    return any(p.name == param or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _call(
    factory: Callable[..., Any], spec: str, num_classes: int, in_channels: int | None
) -> tuple[nn.Module, bool]:
    """Call the factory with what it accepts; return the model and whether it took in_channels."""
    kwargs: dict[str, Any] = {}
    takes_nc = _accepts(factory, "num_classes")
    if takes_nc is not False:
        kwargs["num_classes"] = num_classes
    takes_channels = in_channels is not None and bool(_accepts(factory, "in_channels"))
    if takes_channels:
        kwargs["in_channels"] = in_channels
    try:
        model = factory(**kwargs)
    except TypeError:
        if takes_nc is not None:  # signature said it fits, so this is the factory's own error
            raise
        model = factory()  # opaque signature that rejected num_classes
    if not isinstance(model, nn.Module):
        raise BadInputError(f"`arch` {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model, takes_channels


def _adapt_in_channels(model: nn.Module, in_channels: int) -> None:
    """Swap the first Conv2d (in module order) for one with `in_channels` inputs."""
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or first[1].in_channels == in_channels:
        return  # nothing to adapt (e.g. an MLP), or it already fits
    name, conv = first
    if not name:
        return  # the model is a bare Conv2d; nothing sensible to swap
    if in_channels % conv.groups:
        raise BadInputError(
            f"cannot adapt the first convolution {name!r} (groups={conv.groups}) to {in_channels} input channels"
        )
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    setattr(parent, child_name, new)
