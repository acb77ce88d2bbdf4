"""Stages: plain functions `run_<stage>(config) -> Artifact`, and the one table of them that the command
line and pipelines both read (it imports no torch: a stage's module is imported when it runs)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from finegrain.config import (AuditConfig, EvaluateConfig, PretrainConfig, PseudoLabelConfig, StageConfig, SuggestConfig,
                              SupconConfig)


@dataclass(frozen=True)
class Stage:
    """A stage's config class and its run function ("module:function", imported on first run)."""

    config: type[StageConfig]
    runner: str

    def run(self, config: StageConfig):
        module, function = self.runner.split(":")
        return getattr(importlib.import_module(module), function)(config)


STAGES = {
    "pretrain": Stage(PretrainConfig, "finegrain.stages.pretrain:run_pretrain"),
    "supcon": Stage(SupconConfig, "finegrain.stages.supcon:run_supcon"),
    "evaluate": Stage(EvaluateConfig, "finegrain.stages.evaluate:run_evaluate"),
    "audit": Stage(AuditConfig, "finegrain.stages.audit:run_audit"),
    "suggest": Stage(SuggestConfig, "finegrain.stages.suggest:run_suggest"),
    "pseudo-label": Stage(PseudoLabelConfig, "finegrain.stages.pseudo_label:run_pseudo_label"),
}

# What a pipeline file may name, in the order it runs them. distill: a second supcon whose teacher is the
# artifact before it (supcon --teacher); its student starts from the backbone weights (Su et al.'s self-training).
# pseudo_label: names the unlabelled photos with the features of the artifact before it (or the backbone's).
PIPELINE_STAGES = {"pretrain": STAGES["pretrain"], "supcon": STAGES["supcon"], "distill": STAGES["supcon"],
                   "pseudo_label": STAGES["pseudo-label"], "evaluate": STAGES["evaluate"]}
