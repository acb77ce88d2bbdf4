"""Apply the audit findings a person accepted to a manifest: relabel label errors, drop twins and outliers."""

from __future__ import annotations

import pandas as pd

from finegrain.data.manifest import Manifest
from finegrain.errors import FinegrainError

AUDIT_COLUMNS = ("rank", "issue", "path", "suggested_label")
YES = {"yes", "y", "true", "1", "x"}


def accepted_findings(audit: pd.DataFrame, accept: list[str], where: str) -> pd.DataFrame:
    """The findings to apply: ranks listed in `accept` ("all" = every finding), or, with no `accept`, the
    rows whose `accept` column the person filled with yes/y/true/1/x."""
    missing = [c for c in AUDIT_COLUMNS if c not in audit.columns]
    if missing:
        raise FinegrainError(f"{where} is not an audit.csv (missing column {missing[0]!r}); write one with `finegrain audit`")
    if "all" in accept:
        return audit
    if accept:
        try:
            ranks = {int(a) for a in accept}
        except ValueError:
            raise FinegrainError(f"--accept takes ranks from {where} (the 'rank' column) or 'all'; got {accept}") from None
        unknown = sorted(ranks - set(audit["rank"].astype(int)))
        if unknown:
            raise FinegrainError(f"--accept {unknown[0]}: no finding of that rank in {where}")
        return audit[audit["rank"].astype(int).isin(ranks)]
    if "accept" not in audit.columns:
        raise FinegrainError(f"nothing accepted: pass --accept RANK (repeatable) or --accept all, or fill an "
                             f"'accept' column in {where} with yes")
    return audit[audit["accept"].astype(str).str.strip().str.lower().isin(YES)]


def apply_findings(manifest: Manifest, findings: pd.DataFrame) -> tuple[Manifest, dict[str, int]]:
    """A new manifest: label findings take their suggested label; duplicate and outlier findings drop the photo.

    Returns the manifest and counts {"relabelled", "dropped"}."""
    table = manifest.table.copy()
    by_path = {p: i for i, p in zip(table.index, table["path"].astype(str))}
    unknown = [p for p in findings["path"].astype(str) if p not in by_path]
    if unknown:
        raise FinegrainError(f"{unknown[0]} is in the audit but not in the manifest: was the audit made on another one?")
    relabel = findings[findings["issue"] == "label"]
    for path, label in zip(relabel["path"].astype(str), relabel["suggested_label"].astype(str)):
        table.at[by_path[path], "label"] = label
    drop = [by_path[p] for p in findings.loc[findings["issue"] != "label", "path"].astype(str)]
    table = table.drop(index=drop)
    return Manifest.from_table(table.reset_index(drop=True), manifest.root), {"relabelled": len(relabel),
                                                                             "dropped": len(set(drop))}


# --- decisions from `finegrain review` ---------------------------------------------------------------------

LABEL_SOURCE = "label_source"  # column: "given" (as in the manifest it came from) or "reviewed" (a person decided)
_DROPS = {"exclude", "keep_one", "not_bird"}


def _effects(decisions) -> dict[str, tuple[str, str]]:
    """path -> ("label", species) | ("reviewed", "") | ("drop", ""), applying decisions oldest first (the later
    decision on a photo wins). A twin's keep_one drops the flagged photo; its exclude drops both."""
    from finegrain.data.decisions import LABEL_ACTIONS

    state: dict[str, tuple[str, str]] = {}
    for d in sorted(decisions, key=lambda d: d.seq):
        if d.action in LABEL_ACTIONS:
            state[d.path] = ("label", d.label)
        elif d.action == "given":
            state[d.path] = ("reviewed", "")
        elif d.action in _DROPS and not (d.queue == "predict" and d.new_row):
            state[d.path] = ("drop", "")
            if d.queue == "twin" and d.action == "exclude" and d.other_path:
                state[d.other_path] = ("drop", "")
    return state


def apply_decisions(manifest: Manifest, decisions, where: str) -> tuple[Manifest, dict[str, int]]:
    """A new manifest with a review's decisions (finegrain.data.decisions.Decision, in force) applied.

    Accepted labels replace the given ones (split kept; an unlabelled photo moves to train), excluded photos are
    left out, photos named by a prediction that were no manifest row become train rows. Column `label_source`:
    "reviewed" for rows a person decided, the old value (default "given") for the others.
    Returns the manifest and counts {"relabelled", "labelled", "added", "dropped", "confirmed"}."""
    table = manifest.table.copy()
    if LABEL_SOURCE not in table.columns:
        table[LABEL_SOURCE] = "given"
    by_path = {p: i for i, p in zip(table.index, table["path"].astype(str))}
    new_rows = {d.path for d in decisions if d.new_row}
    unknown = sorted({d.path for d in decisions if d.path not in by_path and not d.new_row}
                     | {d.other_path for d in decisions if d.other_path and d.other_path not in by_path})
    if unknown:
        raise FinegrainError(f"{unknown[0]} was reviewed but is not in the manifest: was {where} made on another one?")
    counts = dict.fromkeys(("relabelled", "labelled", "added", "dropped", "confirmed"), 0)
    added, drop = [], []
    for path, (what, label) in _effects(decisions).items():
        if path in new_rows and path not in by_path:
            if what == "label":
                added.append({"image_id": path, "path": path, "label": label, "split": "train", LABEL_SOURCE: "reviewed"})
                counts["added"] += 1
            continue
        i = by_path[path]
        if what == "drop":
            drop.append(i)
            continue
        table.at[i, LABEL_SOURCE] = "reviewed"
        if what == "reviewed" or label == table.at[i, "label"]:
            counts["confirmed"] += 1
        elif table.at[i, "split"] == "unlabeled":
            table.at[i, "label"], table.at[i, "split"] = label, "train"
            counts["labelled"] += 1
        else:
            table.at[i, "label"] = label
            counts["relabelled"] += 1
    counts["dropped"] = len(drop)
    table = table.drop(index=drop)
    if added:
        table = pd.concat([table, pd.DataFrame(added)], ignore_index=True)
    return Manifest.from_table(table.reset_index(drop=True), manifest.root), counts
