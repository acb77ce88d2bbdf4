"""The evaluation report in a real browser: headless Chromium loads every image and logs no error.

Skipped when no Chromium is installed (`apt-get install chromium` brings one).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from finegrain.config import EvaluateConfig, SupconConfig
from finegrain.stages.evaluate import run_evaluate
from finegrain.stages.supcon import run_supcon

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium installed")

# Appended to a copy of the page (the report itself has no scripts): after every image has loaded or
# failed, write what the browser saw into the DOM, which --dump-dom prints.
PROBE = """<script>
var errors = [];
window.addEventListener('error', function (e) { errors.push(String(e.message || e.type)); }, true);
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; });
  var p = document.createElement('pre'); p.id = 'probe';
  p.textContent = 'IMAGES ' + imgs.length + ' BROKEN ' + broken.length + ' [' + broken.join('|') + '] ERRORS ' + errors.length + ' [' + errors.join('|') + ']';
  document.body.appendChild(p);
});
</script>"""


def test_the_report_renders_with_every_image_and_no_error(birds, tmp_path):
    sup = run_supcon(SupconConfig(manifest=str(birds.root / "manifest.csv"), out=str(tmp_path / "s"),
                                  backbone="test_efficientnet", weights="none", image_size=32, batch_size=8,
                                  classes_per_batch=4, epochs=1, workers=0, wandb="disabled", knn_monitor=False,
                                  cache_dir=str(tmp_path / "cache"), proj_dim=16, proj_hidden=32))
    art = run_evaluate(EvaluateConfig(manifest=str(birds.root / "manifest.csv"), from_artifact=str(sup.path),
                                      out=str(tmp_path / "e"), workers=0, wandb="disabled", report_examples=1,
                                      cache_dir=str(tmp_path / "cache")))
    report = art.path / "report"
    probe = report / "probe.html"  # beside index.html, so its relative image links resolve the same way
    probe.write_text((report / "index.html").read_text().replace("</body>", PROBE + "</body>"))
    dom = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r"IMAGES (\d+) BROKEN (\d+) \[(.*?)\] ERRORS (\d+) \[(.*?)\]", dom)
    assert found, dom[-2000:]
    images, broken, which, errors, messages = found.groups()
    # plots (confusion, per-class, t-SNE) and the inline thumbnails (mistakes, confused pairs, examples)
    assert int(images) >= 3 + 4 and broken == "0", which
    assert errors == "0", messages
