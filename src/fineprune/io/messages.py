"""What every model-file error says: attacker-controlled text made safe to print, and the list of
accepted formats each refusal ends with."""
from __future__ import annotations

ACCEPTED_FORMATS = (
    "accepted formats: a safetensors file, a state dict saved with torch.save(model.state_dict(), path) "
    "(.pt/.pth/.bin, zip or legacy format), or a TorchScript archive (weights only, used with `arch`)"
)
SAFE_ALTERNATIVE = (
    "save the weights with torch.save(model.state_dict(), path) or as a safetensors file "
    "(safetensors.torch.save_file(model.state_dict(), path)) and pass that instead"
)


def clean_text(text: object, limit: int = 80) -> str:
    """Render attacker-controlled text (key names, class names) safely on one line."""
    s = str(text)
    s = "".join(ch if ch.isprintable() else "?" for ch in s)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def first_line(exc: BaseException, limit: int = 200) -> str:
    for line in str(exc).splitlines():
        if line.strip():
            return clean_text(line.strip(), limit)
    return type(exc).__name__


def format_list(items: list[str], n: int = 5) -> str:
    shown = ", ".join(clean_text(i, 60) for i in items[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")
