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
