"""Every HTML page escapes what it shows: species named with <script>&" in a folder named with <b>&"."""

from __future__ import annotations

import shutil
from html.parser import HTMLParser

from finegrain.config import AuditConfig, EvaluateConfig, SuggestConfig, SupconConfig
from finegrain.data.manifest import Manifest
from finegrain.data.split import keep_label_fraction
from finegrain.stages.audit import run_audit
from finegrain.stages.evaluate import run_evaluate
from finegrain.stages.suggest import run_suggest
from finegrain.stages.supcon import run_supcon

MARKS = '<script>&"'  # in every species name
FOLDER = 'odd <b>&" birds'  # the photos' folder: in every photo's title attribute


class _Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.attributes, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += [value or "" for _, value in attrs]

    def handle_data(self, data):
        self.text.append(data)


def _read(page: str) -> _Page:
    parsed = _Page()
    parsed.feed(page)
    parsed.close()
    return parsed


def test_every_page_escapes_species_names_and_paths(birds, tmp_path):
    root = tmp_path / FOLDER
    shutil.copytree(birds.root, root)
    table = birds.table.assign(label=[f"{MARKS} {name}" for name in birds.table["label"]])
    keep_label_fraction(Manifest(table, root), 0.5, seed=0).save(root / "evil.csv")
    small = dict(manifest=str(root / "evil.csv"), workers=0, wandb="disabled", cache_dir=str(tmp_path / "cache"))
    sup = run_supcon(SupconConfig(out=str(tmp_path / "sup"), backbone="test_efficientnet", weights="none",
                                  image_size=32, batch_size=8, classes_per_batch=4, epochs=1, knn_monitor=False,
                                  proj_dim=16, **small))
    small["from_artifact"] = str(sup.path)
    run_evaluate(EvaluateConfig(out=str(tmp_path / "eval"), embedding_map=False, report_examples=1, **small))
    run_audit(AuditConfig(out=str(tmp_path / "audit"), **small))
    run_suggest(SuggestConfig(out=str(tmp_path / "next.csv"), budget=3,
                              **{k: v for k, v in small.items() if k != "wandb"}))  # suggest tracks nothing
    pages = {"evaluation": tmp_path / "eval" / "report" / "index.html", "audit": tmp_path / "audit" / "audit.html",
             "contact sheet": tmp_path / "next.html"}
    for name, path in pages.items():
        page = path.read_text(encoding="utf-8")
        parsed = _read(page)
        assert "script" not in parsed.tags and "<script" not in page.lower(), name
        assert "&lt;script&gt;&amp;" in page, name  # shown, escaped ...
        assert any(MARKS in text for text in parsed.text), name  # ... and read back as it was
        # a quote in a value never ends an attribute early: each one that holds the marks holds them whole
        broken = [v for v in parsed.attributes if ("script" in v or "odd" in v) and MARKS not in v and FOLDER not in v]
        assert not broken, (name, broken)
    for name in ("evaluation", "audit"):
        parsed = _read(pages[name].read_text(encoding="utf-8"))
        assert any(FOLDER in v for v in parsed.attributes), name  # the photos' title attributes
