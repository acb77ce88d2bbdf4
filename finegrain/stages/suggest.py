"""`finegrain suggest`: which unlabelled photos of a manifest to label next, from an artifact's features (or, for
a cold start before any label, a bare backbone's: --backbone without --from).

Candidates are the manifest's 'unlabeled' rows, labelled photos its train rows. Features are the
artifact's L2-normalised embeddings (features/store.py), from the shared features cache (or
--features-dir) under a key that ignores labels and splits, so labelling a few photos between rounds,
or an audit of the same artifact before, leaves nothing to extract. The choosing is
curation/suggest.py's. Writes OUT.csv (rank, image_id, path, reason, score, represents, best_guess,
best_guess_prob) and the contact sheet OUT.html beside it (report/contact_sheet.py). No artifact is written.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from finegrain.config import SuggestConfig
from finegrain.curation.suggest import Picks, auto_strategy, suggest
from finegrain.data.manifest import Manifest
from finegrain.data.validate import load_checked_manifest
from finegrain.engine.device import resolve_amp, resolve_device
from finegrain.errors import FinegrainError
from finegrain.features.store import FeatureStore
from finegrain.features.subject import Subject
from finegrain.fsutil import atomic_write_text
from finegrain.report.contact_sheet import Tile, write_contact_sheet

log = logging.getLogger("finegrain")


def run_suggest(cfg: SuggestConfig) -> pd.DataFrame:
    """Rank the unlabelled photos as `cfg` says; write cfg.out (CSV) and its .html contact sheet; return the table."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # a bare backbone with random weights ('none') is drawn as evaluate draws it
    subject = Subject(cfg)  # the artifact is read before any photo is
    manifest = load_checked_manifest(cfg.manifest, root=cfg.root, on_bad_image=cfg.on_bad_image,
                                     unseen_classes="quiet")  # a cold start labels no species yet
    pool_rows, train_rows = manifest.rows("unlabeled"), manifest.rows("train")
    if not len(pool_rows):
        raise FinegrainError(f"{cfg.manifest} has no photos in split 'unlabeled': nothing to suggest (photos waiting "
                             "for a label go there, with an empty label)")
    budget = cfg.budget
    if budget > len(pool_rows):
        raise FinegrainError(f"--budget {budget} is more than the {len(pool_rows)} unlabelled photos of {cfg.manifest}: "
                             f"pass --budget {len(pool_rows)} to rank them all")

    pool, labelled = _features(cfg, subject, device, manifest, pool_rows, train_rows)
    classes = sorted(set(train_rows.table["label"]))
    known = (subject.artifact.info.get("class_names") or []) if subject.artifact is not None else []
    species = max(len(manifest.class_names), len(known))
    strategy, why = cfg.strategy, "chosen with --strategy"
    if strategy == "auto":
        strategy, why = auto_strategy(len(train_rows), len(classes), species, cfg.cold_start_per_class)
    log.info("suggest: %s (%s), %d of %d unlabelled photos", strategy, why, budget, len(pool_rows))
    picks = suggest(strategy, pool, labelled, train_rows.class_codes(classes).numpy(), budget, class_names=classes,
                    species=species, seed=cfg.seed, probcover_limit=cfg.probcover_limit)

    table = _table(pool_rows, picks, _best_guess(subject, pool[picks.index]))
    out = Path(cfg.out)
    atomic_write_text(out, table.to_csv(index=False))
    notes = {"manifest": cfg.manifest, "artifact": subject.source, "strategy": f"{strategy} ({why})",
             "unlabelled photos": len(pool_rows), "labelled train photos": len(train_rows), "table": out.name}
    if cfg.label_studio:
        from finegrain.data import label_studio as ls

        tasks = [ls.task(r.path, pool_rows.abspath(r.path), r.best_guess, r.best_guess_prob,
                         model_version="finegrain suggest", rank=int(r.rank), reason=r.reason)
                 for r in table.itertuples(index=False)]
        ls.write_tasks(cfg.label_studio, tasks, sorted(set(manifest.class_names) | set(classes)))
    tiles = [Tile(pool_rows.abspath(r.path), f"#{r.rank}", [r.reason] + _guess_line(r) + [r.path])
             for r in table.itertuples(index=False)]
    write_contact_sheet(out.with_suffix(".html"), title=f"Label these {len(table)} photos next", tiles=tiles,
                        notes=notes)
    return table


def _features(cfg: SuggestConfig, subject: Subject, device, manifest: Manifest, pool_rows: Manifest,
              train_rows: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) pool and (L, D) train features, float32, L2-normalised, in row order.

    Extracted as one set of rows sorted by path with labels and splits blanked, so the cache key
    (and the decoded-image cache) stays the same when photos move from unlabeled to train.
    """
    both = pd.concat([pool_rows.table, train_rows.table]).sort_values("path", kind="stable")
    photos = dataclasses.replace(manifest, table=both.assign(label="", split="unlabeled").reset_index(drop=True))
    store = FeatureStore(cfg, subject, device, amp_dtype=resolve_amp(cfg.amp, device))
    feats = store.features(photos, "photos")
    feats = torch.nn.functional.normalize(feats.float(), dim=1).numpy()
    position = {p: i for i, p in enumerate(photos.table["path"])}

    def of(rows: Manifest) -> np.ndarray:
        return feats[np.array([position[p] for p in rows.table["path"]], dtype=np.int64)]

    return of(pool_rows), of(train_rows)


def _best_guess(subject: Subject, feats: np.ndarray) -> tuple[list[str], np.ndarray] | None:
    """The artifact classifier's top species and its probability for each (B, D) feature row; None without one."""
    from finegrain.eval.linear import LinearProbe

    if subject.artifact is None:  # a bare backbone (cold start) has no classifier
        return None
    head, names = subject.artifact.state_dict("classifier."), subject.artifact.info.get("class_names")
    if not head or not names:
        return None
    probe = LinearProbe(head["weight"].float().numpy(), head["bias"].float().numpy(), C_reg=float("nan"),
                        val_top1=None, classes=len(names))
    probs = probe.predict_proba(feats)
    return [names[i] for i in probs.argmax(1)], probs.max(1)


def _table(pool_rows: Manifest, picks: Picks, guess) -> pd.DataFrame:
    """One row per pick, in order: rank (1..B), image_id, path, reason, score, represents, best_guess(_prob)."""
    rows = pool_rows.table.iloc[picks.index]
    return pd.DataFrame({
        "rank": np.arange(1, len(picks.index) + 1),
        "image_id": rows["image_id"].to_numpy(),
        "path": rows["path"].to_numpy(),
        "reason": picks.reason,
        "score": np.round(picks.score, 6),
        "represents": picks.represents,
        "best_guess": guess[0] if guess else "",
        "best_guess_prob": np.round(guess[1], 4) if guess else np.nan,
    })


def _guess_line(row) -> list[str]:
    return [f"best guess: {row.best_guess} ({row.best_guess_prob:.2f})"] if row.best_guess else []
