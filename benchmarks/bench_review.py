"""`finegrain review` on a queue of about 2,000 photos, measured from a real browser (headless Chromium via Playwright).

Measures: the server's start (process start to the printed URL, the queues built), the first queue page until
its photo has loaded (cold: the photo's thumbnail is made then; warm: from REVIEW_DIR/thumbs), and for each of
--decisions decisions the acknowledgement time the page itself measures (POST sent -> "saved", i.e. committed
to SQLite with synchronous=FULL) and the key -> next photo shown time. Prints a table, writes JSON.

    python benchmarks/bench_review.py --photos 2000 --decisions 100 --out benchmarks/results/review.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from _results import write_results


def _data(work: Path, photos: int) -> Path:
    """A synthetic-bird manifest (128 px) with at least `photos` unlabelled photos (made once, then reused)."""
    from finegrain.data.manifest import Manifest
    from finegrain.data.split import keep_label_fraction
    from finegrain.data.synthetic import make_demo_dataset

    manifest = work / f"review_{photos}.csv"
    if manifest.is_file():
        return manifest
    classes = 20
    per_class = math.ceil(photos / classes / 0.87)
    make_demo_dataset(work / "birds", classes=classes, per_class=per_class, image_size=128, test_fraction=0.1)
    m = keep_label_fraction(Manifest.load(work / "birds" / "manifest.csv"), 0.03, seed=0)
    m.save(manifest)
    return manifest


def _start(manifest: Path, folder: Path) -> tuple[subprocess.Popen, str, float]:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "finegrain", "review", str(manifest), "-o", str(folder), "--port",
                             "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        found = re.search(r"(http://\S+)", line)
        if found:
            return proc, found.group(1), time.perf_counter() - start
    raise RuntimeError("the review server printed no URL")


def _page_until_photo(page, url: str) -> float:
    start = time.perf_counter()
    page.goto(url, wait_until="load")
    page.wait_for_function("() => { const i = document.querySelector('figure.large img'); "
                           "return i && i.complete && i.naturalWidth > 0; }")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=2000)
    ap.add_argument("--decisions", type=int, default=100)
    ap.add_argument("--work", type=Path, default=Path("/tmp/finegrain_bench_review"))
    ap.add_argument("--browser", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/review.json"))
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    args.work.mkdir(parents=True, exist_ok=True)
    manifest = _data(args.work, args.photos)
    folder = args.work / "review"
    shutil.rmtree(folder, ignore_errors=True)
    proc, url, started = _start(manifest, folder)
    queue_url = re.sub(r"/(\?.*)?$", "/q/to_label", url)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.browser)
            page = browser.new_page()
            cold = _page_until_photo(page, queue_url)
            left = int(page.inner_text("#left"))
            warm = _page_until_photo(browser.new_page(), queue_url)
            shown = []
            for _ in range(args.decisions):
                t0 = time.perf_counter()
                with page.expect_navigation():
                    page.keyboard.press("s")
                page.wait_for_function("() => { const i = document.querySelector('figure.large img'); "
                                       "return i && i.complete && i.naturalWidth > 0; }")
                shown.append(1000 * (time.perf_counter() - t0))
            acks = json.loads(page.evaluate("sessionStorage.getItem('finegrainAckMs')"))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    q = lambda xs, f: sorted(xs)[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "queue_photos": left, "decisions": len(acks),
        "server_start_s": round(started, 3), "first_page_cold_s": round(cold, 3), "first_page_warm_s": round(warm, 3),
        "ack_ms_median": round(statistics.median(acks), 1), "ack_ms_p90": round(q(acks, 0.9), 1),
        "ack_ms_max": round(max(acks), 1),
        "key_to_next_photo_ms_median": round(statistics.median(shown), 1),
        "key_to_next_photo_ms_p90": round(q(shown, 0.9), 1),
    }
    for k, v in result.items():
        print(f"{k:32s} {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, result)


if __name__ == "__main__":
    main()
