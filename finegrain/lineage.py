"""Where an artifact came from: its earlier artifacts and the backbone weights the chain started from.

evaluate compares an artifact with them on the same photos ("Compared with" in the report), so a
person sees what each stage bought over the weights they began with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from finegrain.artifacts import Artifact, load_artifact
from finegrain.errors import FinegrainError

log = logging.getLogger("finegrain")

ARTIFACT_SOURCE = "artifact:"  # weights_source of a stage that started from another artifact (--from)


@dataclass(frozen=True)
class Start:
    """The backbone weights a chain of artifacts began with: a timm name and build_backbone's arguments."""

    backbone: str
    weights: str | None  # "builtin", "none" or a file; None with pretrained (timm hub)
    pretrained: bool

    @property
    def label(self) -> str:
        """How a person reads it: 'tf_efficientnet_lite0 (offline ImageNet weights, frozen)'."""
        weights = "timm hub" if self.pretrained else {"builtin": "offline ImageNet", "none": "random"}.get(
            self.weights, str(self.weights))
        return f"{self.backbone} ({weights} weights, frozen: the start)"


def ancestors(artifact: Artifact) -> list[Artifact]:
    """The artifacts `artifact` was trained from, oldest first (not itself); stops at one that is gone."""
    chain, seen = [], {str(artifact.path.resolve())}
    parent = artifact.info.get("parent") or {}
    while parent.get("path") and parent["path"] not in seen:
        seen.add(parent["path"])
        try:
            current = load_artifact(parent["path"])
        except FinegrainError:
            log.warning("lineage: %s is gone; comparing with the artifacts after it only", parent["path"])
            break
        chain.append(current)
        parent = current.info.get("parent") or {}
    return chain[::-1]


def starting_weights(artifact: Artifact) -> Start | None:
    """The weights the oldest reachable artifact of the chain started from, or None when unknown or gone."""
    root = (ancestors(artifact) or [artifact])[0]
    source, backbone = str(root.info.get("weights_source") or ""), root.info.get("backbone")
    if not backbone or not source or source.startswith(ARTIFACT_SOURCE):
        return None
    if source == "timm-hub":
        return Start(backbone, None, True)
    if source not in ("builtin", "none") and not Path(source).is_file():
        log.warning("lineage: the starting weights %s are gone; no frozen baseline", source)
        return None
    return Start(backbone, source, False)
