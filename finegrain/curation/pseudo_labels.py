"""Pseudo-labels for unlabelled photos from a few labelled ones, on fixed features (scikit-learn, POT).

Curriculum self-training with the linear probe (Cascante-Bonilla et al., AAAI 2021, "Curriculum
labeling"): fit the probe on the labelled photos; in round r of R, each species keeps the r/R of the
unlabelled photos it is predicted for that it is most confident about, and the probe is refit from
scratch on labelled + named photos. Ranking within each species, not one probability threshold,
names photos of every species (a probe with strong regularisation is never confident, a weak one
always is). With `prior`, the probe's class probabilities are first balanced by Sinkhorn-Knopp
(POT's `ot.sinkhorn`, cost -log p, entropic weight 1) so that the unlabelled photos' species come in
the labelled photos' proportions (as in SwAV and transductive few-shot work), which stops a few
species from absorbing most photos. Photos outside `allowed` (unknown species by the open-set score)
are never named and take no part in the balancing.

The number of rounds is chosen by `choose_rounds` on held-out parts of the LABELLED photos (never on
test labels): over several draws of a stratified hold-out, the rounds are run on the rest and the probe
after each round is scored on the held-out photos. The most rounds whose held-out top-1 is within one
standard error of the best are kept (the one-standard-error rule of Breiman et al., CART 1984, here
towards more rounds): the simulation runs on fewer labels than the real run, so its pseudo-labels are
worse and it understates what later rounds gain; a round is dropped only when the held-out photos say
it costs more than their noise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from finegrain.eval.linear import LinearProbe, fit_linear_probe, stratified_holdout

log = logging.getLogger("finegrain")

HOLDOUT_DRAWS = 5  # hold-out draws of the labelled photos that choose the rounds


@dataclass
class Labelling:
    """The outcome of pseudo-labelling rounds on U unlabelled photos.

    Attributes:
        probe: the classifier of the last round that named photos (the labelled-only probe if none did).
        labels: (U,) int64 class ids, -1 for photos left unnamed.
        confidence: (U,) float32 (balanced) probability of each photo's best class in the last round.
        rounds: rounds that named photos; history: one dict per round run (round, named, note).
    """

    probe: LinearProbe
    labels: np.ndarray
    confidence: np.ndarray
    rounds: int
    history: list[dict] = field(default_factory=list)


def _probe(x: np.ndarray, y: np.ndarray, *, num_classes: int, C: float, seed: int) -> LinearProbe:
    """The probe at a fixed C."""
    return fit_linear_probe(x, y, num_classes=num_classes, Cs=(C,), seed=seed)


def balanced(probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """(U, C) probabilities -> (U, C) rows rescaled by Sinkhorn-Knopp so the columns sum to U x prior (C,)."""
    import ot

    plan = ot.sinkhorn(np.full(len(probs), 1.0 / len(probs)), prior / prior.sum(), -np.log(probs + 1e-12), reg=1.0,
                       numItermax=1000)
    return plan / np.maximum(plan.sum(1, keepdims=True), 1e-30)


def _top_per_class(probs: np.ndarray, fraction: float) -> np.ndarray:
    """(U,) bool: for each class, the `fraction` (rounded up) of the rows predicted as it with the highest probability."""
    guess, conf = probs.argmax(1), probs.max(1)
    keep = np.zeros(len(probs), bool)
    for c in np.unique(guess):
        idx = np.flatnonzero(guess == c)
        keep[idx[np.argsort(-conf[idx], kind="stable")[:int(np.ceil(fraction * len(idx) - 1e-9))]]] = True
    return keep


def label_rounds(xl: np.ndarray, yl: np.ndarray, xu: np.ndarray, *, num_classes: int, rounds: int, of: int, C: float,
                 allowed: np.ndarray | None = None, prior: np.ndarray | None = None, seed: int = 0,
                 verbose: bool = False, on_round: Callable[[int, LinearProbe], None] | None = None) -> Labelling:
    """Pseudo-label xu (U, D) from xl (L, D), yl (L,) int: rounds 1..`rounds` of a curriculum of `of` rounds.

    Round r names r/of of each species' predicted photos (see the module). A round that names no photo
    is reported and ends the rounds: the previous round's classifier and labels are kept. `allowed`: (U,)
    bool, photos that may be named (default all); `prior`: (C,) class proportions to balance to, or None.
    on_round(r, probe) is called after each round that named photos.
    """
    allowed = np.ones(len(xu), bool) if allowed is None else np.asarray(allowed, bool)
    fit = dict(num_classes=num_classes, C=C, seed=seed)
    probe = _probe(xl, yl, **fit)
    labels, confidence = np.full(len(xu), -1, np.int64), np.zeros(len(xu), np.float32)
    history, done, candidates = [], 0, np.flatnonzero(allowed)
    for r in range(1, rounds + 1):
        named = np.zeros(len(xu), bool)
        if len(candidates):
            probs = probe.predict_proba(xu[candidates])
            probs = balanced(probs, prior) if prior is not None else probs
            named[candidates[_top_per_class(probs, r / of)]] = True
        if not named.any():
            note = (f"round {r}: no unlabelled photo could be named; keeping the "
                    f"{'labelled-only' if done == 0 else f'round {done}'} classifier")
            (log.info if verbose else log.debug)("pseudo-label: %s", note)
            history.append({"round": r, "named": 0, "note": note})
            break
        labels = np.full(len(xu), -1, np.int64)
        labels[candidates] = probs.argmax(1)
        labels[~named] = -1
        confidence = np.zeros(len(xu), np.float32)
        confidence[candidates] = probs.max(1)
        probe = _probe(np.concatenate([xl, xu[named]]), np.concatenate([yl, labels[named]]), **fit)
        done = r
        history.append({"round": r, "named": int(named.sum())})
        if verbose:
            log.info("pseudo-label: round %d of %d named %d of %d unlabelled photos", r, of, named.sum(), len(xu))
        if on_round is not None:
            on_round(r, probe)
    return Labelling(probe, labels, confidence, done, history)


def choose_rounds(xl: np.ndarray, yl: np.ndarray, xu: np.ndarray, *, num_classes: int, of: int, C: float,
                  seed: int = 0, draws: int = HOLDOUT_DRAWS, **kw) -> tuple[int, list[dict]]:
    """(rounds in 0..of, table) by the one-standard-error rule on `draws` stratified hold-outs of the labelled photos.

    Table rows: rounds, held_top1 (mean over every held-out photo of every draw; rounds 0: the probe on the labels
    alone), behind_best (held_top1 of the best row minus this one) and se (standard error of that paired
    difference). With no class having two labelled photos to hold out, nothing is chosen: (of, []).
    """
    correct = [[] for _ in range(of + 1)]  # correct[r]: (held,) bool per draw, concatenated below
    for draw in range(draws):
        fit, held = stratified_holdout(yl, seed + draw)
        if not len(held):
            return of, []
        hit = lambda r, probe: correct[r].append(probe.predict(xl[held]) == yl[held])  # noqa: E731
        hit(0, _probe(xl[fit], yl[fit], num_classes=num_classes, C=C, seed=seed))
        named = label_rounds(xl[fit], yl[fit], xu, num_classes=num_classes, rounds=of, of=of, C=C, seed=seed,
                             on_round=hit, **kw).rounds
        for r in range(named + 1, of + 1):  # rounds that named nothing keep the last classifier
            correct[r].append(correct[named][-1])
    hits = np.stack([np.concatenate(c) for c in correct]).astype(float)  # (of + 1, held photos of all draws)
    best = int(hits.mean(1).argmax())
    table = []
    for r in range(of + 1):
        gap = hits[best] - hits[r]
        table.append({"rounds": r, "held_top1": float(hits[r].mean()), "behind_best": float(gap.mean()),
                      "se": float(gap.std(ddof=1) / np.sqrt(len(gap))) if len(gap) > 1 else 0.0})
    chosen = max(row["rounds"] for row in table if row["behind_best"] <= row["se"])
    return chosen, table


@dataclass
class Found:
    """What `pseudo_label` found: the labelling, the classifier refit on labelled + named photos, the open-set
    filter ((U,) allowed and unknown_score), and how the rounds were chosen (table, held-out top-1s, where)."""

    labelling: Labelling
    probe: LinearProbe
    allowed: np.ndarray
    unknown_score: np.ndarray
    table: list[dict]
    held_top1: float | None
    held_top1_labels_only: float | None
    chosen_on: str


def pseudo_label(xl: np.ndarray, yl: np.ndarray, xu: np.ndarray, *, num_classes: int, rounds: int = 5,
                 balance: bool = True, open_set_keep: float = 0.95, seed: int = 0) -> Found:
    """The whole step on features xl (L, D), yl (L,), xu (U, D): C of the probe chosen on the labels (as evaluate's
    probe), photos of unknown species left out (open-set score past the threshold accepting `open_set_keep` of
    held-out labelled photos; 1: none), rounds chosen on held-out labelled photos, then every unlabelled photo
    labelled with the chosen rounds; the probe of the last round is the classifier."""
    import torch

    from finegrain.eval.open_set import fit_open_set

    C = fit_linear_probe(xl, yl, num_classes=num_classes, seed=seed).C_reg
    allowed, unknown_score = np.ones(len(xu), bool), np.zeros(len(xu), np.float32)
    reference = fit_open_set(torch.from_numpy(xl), torch.from_numpy(yl), keep=open_set_keep, seed=seed) \
        if open_set_keep < 1 else None
    if reference is not None:
        unknown_score = reference.scores(torch.from_numpy(xu)).numpy()
        allowed = unknown_score <= reference.threshold
        log.info("pseudo-label: %d of %d unlabelled photos look like no labelled species (open-set score above "
                 "%.4g) and stay unnamed", (~allowed).sum(), len(xu), reference.threshold)
    prior = np.bincount(yl, minlength=num_classes).astype(float) if balance else None
    options = dict(num_classes=num_classes, of=rounds, C=C, allowed=allowed, prior=prior, seed=seed)
    chosen, table = choose_rounds(xl, yl, xu, **options)
    labelling = label_rounds(xl, yl, xu, rounds=chosen, verbose=True, **options)
    held = next((r["held_top1"] for r in table if r["rounds"] == chosen), None)
    return Found(labelling, labelling.probe, allowed, unknown_score, table, held,
                 table[0]["held_top1"] if table else None,
                 f"{HOLDOUT_DRAWS} hold-outs of the labelled photos, one-standard-error rule" if table
                 else "not chosen (no species has 2 labels)")
