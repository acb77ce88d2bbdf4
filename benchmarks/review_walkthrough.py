"""The README's review walkthrough on the synthetic birds, end to end through the command line, with screenshots.

demo-data -> half the labels kept, 4 train labels flipped, a twin and a blank frame added -> supcon -> audit ->
suggest -> review (headless Chromium; a scripted person answers with the true species, keyboard only, and each
queue's first page is saved as a PNG) -> manifest relabel -> supcon again -> evaluate both. Prints what the
review fixed and both models' kNN top-1 on the same test photos; writes JSON.

    python benchmarks/review_walkthrough.py --work /tmp/walk --shots docs/review --out benchmarks/results/review_walkthrough.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from _runner import finegrain
from _results import write_results

TRAIN = ["--image-size", "64", "--batch-size", "24", "--classes-per-batch", "6", "--epochs", "12", "--loss",
         "supcon_ce", "--device", "cpu", "--workers", "0", "--wandb", "disabled"]


def _collection(work: Path) -> tuple[Path, dict]:
    """mine.csv: demo birds with half the train labels kept, 4 of them flipped, a re-encoded twin and a grey frame.
    Returns it and path -> true species."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from finegrain.data.manifest import Manifest

    finegrain("demo-data", str(work / "birds"), "--classes", "6", "--per-class", "30", "--image-size", "96")
    finegrain("manifest", "split", str(work / "birds" / "manifest.csv"), "--label-fraction", "0.5", "-o",
              str(work / "half.csv"))
    m = Manifest.load(work / "half.csv")
    truth = dict(zip(m.table["path"], m.table["label"]))
    full = Manifest.load(work / "birds" / "manifest.csv").table
    truth.update({p: lab for p, lab in zip(full["path"], full["label"]) if not truth.get(p)})
    table = m.table.copy()
    species = m.class_names
    rng = np.random.default_rng(0)
    train = table.index[table["split"] == "train"]
    for i in rng.choice(train, 4, replace=False):
        table.at[i, "label"] = rng.choice([s for s in species if s != table.at[i, "label"]])
    first = table.loc[train[0]]
    with Image.open(m.abspath(first["path"])) as im:
        im.convert("RGB").save(m.root / "twin.jpg", quality=80)
    Image.new("RGB", (96, 96), (128, 128, 128)).save(m.root / "blank.jpg")
    extra = pd.DataFrame([{"image_id": "twin", "path": "twin.jpg", "label": first["label"], "split": "train"},
                          {"image_id": "blank", "path": "blank.jpg", "label": species[0], "split": "train"}])
    truth.update({"twin.jpg": truth[first["path"]], "blank.jpg": None})
    Manifest.from_table(pd.concat([table, extra], ignore_index=True), m.root).save(work / "mine.csv")
    return work / "mine.csv", truth


def _shot(page, path: Path) -> None:
    """A screenshot as a 128-colour PNG (a few times smaller than the browser's, fine for a README)."""
    from PIL import Image

    page.screenshot(path=str(path))
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def _press(page, key: str) -> None:
    with page.expect_navigation():
        page.keyboard.press(key)


def _answer(page, truth: dict) -> dict:
    """Decide every item of every queue as a person who knows the true species would; count the answers."""
    counts: dict[str, int] = {}
    while True:
        item = page.get_attribute("#item", "data-item") if page.query_selector("#item") else None
        if item is None:
            if not page.query_selector('kbd[data-key="n"]'):
                return counts
            _press(page, "n")
            continue
        queue, path = item.split(":", 1)
        keys = {k.get_attribute("data-action"): (k.get_attribute("data-key"), k.get_attribute("data-label"))
                for k in page.query_selector_all("main kbd[data-key]")}
        true = truth.get(path)
        if queue == "twin":
            choice = "keep_one"
        elif queue == "outlier" or true is None:
            choice = "exclude" if "exclude" in keys else "not_bird"
        elif queue == "label_error" and keys["suggested"][1] == true:
            choice = "suggested"
        elif queue == "label_error" and keys["given"][1] == true:
            choice = "given"
        else:
            guess = next((key for key, label in [(k.get_attribute("data-key"), k.get_attribute("data-label"))
                                                 for k in page.query_selector_all("main kbd[data-action=label]")]
                          if label == true), None)
            choice = "guess" if guess else "typed"
            if guess:
                _press(page, guess)
            else:
                page.keyboard.press("a")
                page.keyboard.type(true)
                _press(page, "Enter")
            counts[f"{queue}:{choice}"] = counts.get(f"{queue}:{choice}", 0) + 1
            continue
        _press(page, keys[choice][0])
        counts[f"{queue}:{choice}"] = counts.get(f"{queue}:{choice}", 0) + 1


def _review(work: Path, manifest: Path, truth: dict, shots: Path, browser_path: str) -> dict:
    from playwright.sync_api import sync_playwright

    proc = subprocess.Popen([sys.executable, "-m", "finegrain", "review", str(manifest), "-o", str(work / "review"),
                             "--audit", str(work / "audit"), "--suggest", str(work / "next.csv"), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    url = next(m.group(1) for line in proc.stdout if (m := re.search(r"(http://\S+)", line)))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path)
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.goto(url)
            shots.mkdir(parents=True, exist_ok=True)
            _shot(page, shots / "index.png")
            for q in re.findall(r'href="/q/(\w+)"', page.content()):
                page.goto(f"{url}q/{q}", wait_until="load")
                _shot(page, shots / f"{q}.png")
            page.goto(url)
            _press(page, "1")
            counts = _answer(page, truth)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/finegrain_walkthrough"))
    ap.add_argument("--shots", type=Path, default=Path("docs/review"))
    ap.add_argument("--browser", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/review_walkthrough.json"))
    ap.add_argument("--fresh", action="store_true", help="start over (default: reuse the steps --work holds)")
    args = ap.parse_args()
    from finegrain.data.manifest import Manifest

    w = args.work
    if args.fresh:
        shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True, exist_ok=True)
    os.environ["FINEGRAIN_CACHE"] = str(w / "cache")  # decoded photos and features stay in the work folder
    if (w / "truth.json").is_file():  # steps already done are reused (--fresh starts over)
        manifest, truth = w / "mine.csv", json.loads((w / "truth.json").read_text())
    else:
        manifest, truth = _collection(w)
        with open(w / "truth.json", "w") as f:  # a work file, not a result
            json.dump(truth, f)
    if not (w / "supcon" / "artifact.json").is_file():
        finegrain("supcon", "--manifest", str(manifest), "--out", str(w / "supcon"), *TRAIN)
    if not (w / "audit" / "audit.csv").is_file():
        finegrain("audit", str(w / "supcon"), "--manifest", str(manifest), "-o", str(w / "audit"), "--device", "cpu",
                  "--workers", "0", "--wandb", "disabled")
    if not (w / "next.csv").is_file():
        finegrain("suggest", "--manifest", str(manifest), "--from", str(w / "supcon"), "--budget", "12", "-o",
                  str(w / "next.csv"), "--device", "cpu", "--workers", "0")
    shutil.rmtree(w / "review", ignore_errors=True)
    answers = _review(w, manifest, truth, args.shots, args.browser)
    finegrain("manifest", "relabel", str(manifest), "--from", str(w / "review"), "-o", str(w / "fixed.csv"))
    shutil.rmtree(w / "supcon_fixed", ignore_errors=True)
    finegrain("supcon", "--manifest", str(w / "fixed.csv"), "--out", str(w / "supcon_fixed"), *TRAIN)
    top1 = {}
    shutil.rmtree(w / "eval_supcon_fixed", ignore_errors=True)
    for name in ("supcon", "supcon_fixed"):
        if (w / f"eval_{name}" / "report" / "metrics.json").is_file():
            top1[name] = json.loads((w / f"eval_{name}" / "report" / "metrics.json").read_text())["knn_top1"]
            continue
        finegrain("evaluate", "--manifest", str(manifest), "--from", str(w / name), "--out", str(w / f"eval_{name}"),
                  "--device", "cpu", "--workers", "0", "--wandb", "disabled", "--no-embedding-map")
        top1[name] = json.loads((w / f"eval_{name}" / "report" / "metrics.json").read_text())["knn_top1"]
    before, after = Manifest.load(manifest).table, Manifest.load(w / "fixed.csv").table
    wrong = lambda t: int(sum(truth.get(p) not in (None, lab) for p, lab, s in zip(t["path"], t["label"], t["split"])  # noqa: E731
                              if s != "unlabeled"))
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "answers": answers,
              "wrong_labels_before": wrong(before), "wrong_labels_after": wrong(after),
              "labelled_train_before": int((before["split"] == "train").sum()),
              "labelled_train_after": int((after["split"] == "train").sum()),
              "knn_top1_before": top1["supcon"], "knn_top1_after": top1["supcon_fixed"]}
    for k, v in result.items():
        print(f"{k:24s} {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, result)


if __name__ == "__main__":
    main()
