"""`finegrain audit`: the photos of a collection worth a second look, ranked, with a page of thumbnails.

From an artifact's embeddings of every manifest photo (from the shared features cache, so photos an
evaluate of the same artifact read are not read again): probable label errors (confident learning on
out-of-sample probabilities of the labelled photos), near-duplicates (within and across splits,
labelled or not) and outliers. Writes OUT/audit.csv and OUT/audit.html (report/audit_page.py);
`finegrain manifest relabel` applies the findings a person accepts.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pandas as pd
import torch

from finegrain.config import AuditConfig
from finegrain.curation import audit
from finegrain.curation.audit import SUMMARY_FILE
from finegrain.features.store import FeatureStore
from finegrain.features.subject import Subject
from finegrain.fsutil import atomic_write_text
from finegrain.report.audit_page import write_audit_page
from finegrain.stages.skeleton import stage_run

log = logging.getLogger("finegrain")

COLUMNS = ["rank", "issue", "path", "split", "given_label", "suggested_label", "score", "reason", "other_path"]
ISSUE_ORDER = {"label": 0, "duplicate": 1, "outlier": 2}


def run_audit(cfg: AuditConfig) -> pd.DataFrame:
    """Audit the manifest's photos with the artifact's embeddings; write audit.csv and audit.html; return the findings."""
    with stage_run("audit", cfg) as run:
        subject = Subject(cfg)
        store = FeatureStore(cfg, subject, run.device, amp_dtype=run.amp_dtype)
        rows = run.manifest.table.reset_index(drop=True)
        feats = store.features(run.manifest, "all")
        start = time.perf_counter()
        labelled = ((rows["split"] != "unlabeled") & (rows["label"].astype(str) != "")).to_numpy()
        typical = _typical_photos(rows, feats, labelled, cfg.examples)
        findings = (_label_findings(cfg, rows, feats, labelled) + _duplicate_findings(cfg, rows, feats)
                    + _outlier_findings(rows, feats))
        table = _ranked(findings)
        seconds = time.perf_counter() - start
        atomic_write_text(run.out / "audit.csv", table.to_csv(index=False))
        write_audit_page(run.out / "audit.html", table, run.manifest, typical, source=subject.source,
                         manifest_name=str(cfg.manifest), max_shown=cfg.max_flagged)
        if cfg.label_studio:
            _label_studio_tasks(cfg.label_studio, table, run.manifest)
        counts = {issue: int((table["issue"] == issue).sum()) for issue in ISSUE_ORDER}
        atomic_write_text(run.out / SUMMARY_FILE, json.dumps({
            "artifact": subject.source, "manifest": str(cfg.manifest), "photos": len(rows), "flagged": counts,
            "label_probs": cfg.label_probs, "seconds": round(seconds, 1)}, indent=2) + "\n")
        run.track()
        if run.tracker is not None:
            run.tracker.summary({f"audit/{k}": v for k, v in counts.items()})
            run.tracker.log_report({"audit": table.drop(columns="row")}, {})
        log.info("audit: %d photos, %d label issues, %d near-duplicate pairs, %d outliers in %.1f s (+%.1f s features)",
                 len(rows), counts.get("label", 0), counts.get("duplicate", 0), counts.get("outlier", 0), seconds,
                 store.seconds)
        return table


def _label_studio_tasks(out, table: pd.DataFrame, manifest) -> None:
    """The findings as Label Studio tasks: a label error's suggested species, or the exclude choice, pre-annotated."""
    from finegrain.data import label_studio as ls

    tasks = [ls.task(r.path, manifest.abspath(r.path), r.suggested_label if r.issue == "label" else ls.EXCLUDE,
                     r.score, model_version="finegrain audit", rank=int(r.rank), issue=r.issue,
                     given_label=r.given_label, reason=r.reason, other_path=r.other_path)
             for r in table.itertuples(index=False)]
    ls.write_tasks(out, tasks, manifest.class_names)


def _label_findings(cfg: AuditConfig, rows: pd.DataFrame, feats: torch.Tensor, labelled: np.ndarray) -> list[dict]:
    """Label quality on the labelled photos: one finding per probable label error."""
    idx = np.nonzero(labelled)[0]
    names = sorted(set(rows["label"].astype(str)[labelled]))
    if len(idx) < 3 or len(names) < 2:
        log.warning("audit: fewer than 3 labelled photos or 2 species: no label check")
        return []
    codes = np.searchsorted(names, rows["label"].astype(str).to_numpy()[idx])
    x = feats[idx]
    probs = audit.out_of_sample_probabilities(cfg.label_probs, x, codes, len(names), k=cfg.knn_k,
                                              temperature=cfg.knn_t, seed=cfg.seed)
    flagged, quality = audit.label_issues(codes, probs)
    out = []
    for j in np.nonzero(flagged)[0]:
        suggested = int(probs[j].argmax())
        out.append(_finding("label", rows, idx[j], names[suggested], 1.0 - quality[j],
                            f"looks like {names[suggested]} ({probs[j, suggested]:.0%}); "
                            f"{names[codes[j]]} gets {probs[j, codes[j]]:.0%}"))
    return out


def _duplicate_findings(cfg: AuditConfig, rows: pd.DataFrame, feats: torch.Tensor) -> list[dict]:
    """One finding per near-duplicate pair, on the second photo of the pair (the first is kept)."""
    out = []
    for a, b, cos in audit.near_duplicates(feats, relative_threshold=cfg.duplicate_threshold):
        where = "same split" if rows.at[a, "split"] == rows.at[b, "split"] else f"{rows.at[a, 'split']} vs {rows.at[b, 'split']}"
        f = _finding("duplicate", rows, b, str(rows.at[a, "label"]), cos, f"near-duplicate ({where}), cosine {cos:.3f}")
        f["other_path"] = str(rows.at[a, "path"])
        out.append(f)
    return out


def _outlier_findings(rows: pd.DataFrame, feats: torch.Tensor) -> list[dict]:
    """One finding per photo far below the others' typicality (not a bird, a blank frame, another subject)."""
    if len(rows) < 3:
        return []
    scores, flagged = audit.outlier_scores(feats)
    return [_finding("outlier", rows, i, "", 1.0 - float(scores[i]), f"far from every other photo (typicality {scores[i]:.3f})")
            for i in np.nonzero(flagged)[0]]


def _finding(issue: str, rows: pd.DataFrame, i: int, suggested: str, score: float, reason: str) -> dict:
    return {"issue": issue, "row": int(i), "path": str(rows.at[i, "path"]), "split": str(rows.at[i, "split"]),
            "given_label": str(rows.at[i, "label"]), "suggested_label": suggested, "score": round(float(score), 4),
            "reason": reason, "other_path": ""}


def _ranked(findings: list[dict]) -> pd.DataFrame:
    """Findings sorted by kind (labels, duplicates, outliers), then by score, highest first; rank from 1."""
    table = pd.DataFrame(findings, columns=COLUMNS[1:] + ["row"])
    table = table.sort_values(["issue", "score"], key=lambda c: c.map(ISSUE_ORDER) if c.name == "issue" else -c,
                              kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table[COLUMNS + ["row"]]


def _typical_photos(rows: pd.DataFrame, feats: torch.Tensor, labelled: np.ndarray, n: int) -> dict[str, list[int]]:
    """Species -> up to n labelled row indices closest to the species' mean embedding."""
    x = torch.nn.functional.normalize(feats.float(), dim=1)
    labels = rows["label"].astype(str).to_numpy()
    out = {}
    for name in sorted(set(labels[labelled])):
        members = np.nonzero(labelled & (labels == name))[0]
        centre = torch.nn.functional.normalize(x[members].mean(0), dim=0)
        order = torch.argsort(x[members] @ centre, descending=True)[:n].numpy()
        out[name] = [int(members[k]) for k in order]
    return out
