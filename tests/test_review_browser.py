"""`finegrain review` in a real browser against the real server: keyboard only, a SIGKILL in the middle, then the
new manifest row by row and a short supcon run on it; a species named like a script shows as text.

Drives the system Chromium through Playwright (never `playwright install`); skipped, saying why, when either
is missing (`apt-get install chromium`, `pip install playwright`).
"""

from __future__ import annotations

import shutil

import pytest
from review_helpers import Server, review_data
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.data.manifest import Manifest
from finegrain.data.synthetic import make_demo_dataset

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (apt-get install chromium)")
NEW = "Mystery finch"


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=BROWSER)
        yield b
        b.close()


def _key(page, key: str) -> None:
    """Press a deciding key and wait for the page the server sends next (it is sent only once the decision is saved)."""
    with page.expect_navigation():
        page.keyboard.press(key)


def _typed(page, key: str, text: str) -> None:
    """Open the species box with `key`, type `text` (no mouse), Enter."""
    page.keyboard.press(key)
    page.wait_for_selector("#species", state="visible")
    page.keyboard.type(text)
    _key(page, "Enter")


def _progress(page) -> tuple[int, int]:
    return int(page.inner_text("#done")), int(page.inner_text("#left"))


@pytest.mark.slow
def test_keyboard_review_survives_sigkill_and_its_manifest_trains(tmp_path, browser):
    birds = make_demo_dataset(tmp_path / "birds", classes=5, per_class=16, image_size=32, seed=5)
    data = review_data(birds, tmp_path, findings={"label": 6, "duplicate": 2, "outlier": 2}, suggested=20)
    species, audit, suggest = data["species"], data["audit_table"], data["suggest_table"]
    args = [str(data["manifest"]), "-o", str(tmp_path / "rev"), "--audit", str(data["audit"]), "--suggest",
            str(data["suggest"])]
    expected = {}  # path -> (label, split, label_source), or None: left out

    def row(path):
        r = data["table"].set_index("path").loc[path]
        return r["label"], r["split"]

    server = Server(*args)
    page = browser.new_page()
    page.goto(server.url)
    _key(page, "1")  # the first queue: probable label errors
    labels = audit[audit["issue"] == "label"].reset_index(drop=True)
    assert _progress(page) == (0, 6)
    _key(page, "s")
    _key(page, "u")  # undo: back on the same photo
    assert page.get_attribute("#item", "data-item") == f"label_error:{labels.path[0]}"
    _key(page, "g")
    _key(page, "g")
    other = next(s for s in species if s not in (labels.given_label[2], labels.suggested_label[2]))
    _typed(page, "a", other[:-2])  # type-ahead: a unique prefix is enough
    _key(page, "x")
    _key(page, "s")
    _key(page, "g")
    for i, outcome in enumerate([("given",), ("given",), ("other", other), ("drop",), ("suggested",), ("given",)]):
        label, split = row(labels.path[i])
        expected[labels.path[i]] = {"given": (label, split, "reviewed"), "other": (other, split, "reviewed"),
                                    "suggested": (labels.suggested_label[i], split, "reviewed"),
                                    "drop": None}[outcome[0]]
    assert page.is_visible("#queue-done")
    _key(page, "n")  # twins
    twins = audit[audit["issue"] == "duplicate"].reset_index(drop=True)
    _key(page, "k")
    _key(page, "b")
    expected[twins.path[0]] = None
    _key(page, "n")  # outliers
    outliers = audit[audit["issue"] == "outlier"].reset_index(drop=True)
    _key(page, "x")
    _key(page, "k")
    expected[outliers.path[0]] = None
    _key(page, "n")  # photos to label

    def label_photo(i):
        path, guess = suggest.path[i], suggest.best_guess[i]
        if i == 3:
            _typed(page, "n", NEW)
            expected[path] = (NEW, "train", "reviewed")
        elif i == 5:
            _key(page, "x")
            expected[path] = None
        elif i == 7:
            _key(page, "s")
        elif i == 9:
            _typed(page, "a", "mystery")  # the new species is on the list after a restart
            expected[path] = (NEW, "train", "reviewed")
        elif guess:
            _key(page, "1")
            expected[path] = (guess, "train", "reviewed")
        else:
            name = species[(i + 2) % len(species)]
            _typed(page, "a", name)
            expected[path] = (name, "train", "reviewed")

    for i in range(8):
        assert page.get_attribute("#item", "data-item") == f"to_label:{suggest.path[i]}"
        label_photo(i)
    server.kill()  # no shutdown code runs

    server = Server(*args)
    page.goto(server.url)
    assert "18 decision(s) so far" in page.inner_text("body")
    _key(page, "4")
    assert _progress(page) == (8, 12)
    for i in range(8, 20):
        assert page.get_attribute("#item", "data-item") == f"to_label:{suggest.path[i]}"
        label_photo(i)
    assert page.is_visible("#queue-done")
    server.stop()

    out = tmp_path / "new.csv"
    runner = CliRunner()
    res = runner.invoke(app, ["manifest", "relabel", str(data["manifest"]), "--from", str(tmp_path / "rev"), "-o",
                              str(out)])
    assert res.exit_code == 0, res.output
    new = Manifest.load(out).table.set_index("path")
    for path, label, split in zip(data["table"]["path"], data["table"]["label"], data["table"]["split"]):
        want = expected.get(path, (label, split, "given"))
        if want is None:
            assert path not in new.index, path
        else:
            assert tuple(new.loc[path, ["label", "split", "label_source"]]) == want, path
    assert len(new) == len(data["table"]) - sum(v is None for v in expected.values())
    assert runner.invoke(app, ["manifest", "validate", str(out)]).exit_code == 0

    from finegrain.config import SupconConfig
    from finegrain.stages.supcon import run_supcon

    art = run_supcon(SupconConfig(manifest=str(out), out=str(tmp_path / "s"), backbone="test_efficientnet",
                                  weights="none", image_size=32, batch_size=8, classes_per_batch=4, epochs=1,
                                  workers=0, wandb="disabled", knn_monitor=False, cache_dir=str(tmp_path / "cache"),
                                  proj_dim=16, proj_hidden=32))
    assert NEW in art.info["class_names"] and art.info["metrics"]["steps"] > 0


def test_a_script_species_shows_as_text(birds, tmp_path, browser):
    evil = "<script>alert(1)</script>"
    table = birds.table.copy()
    table.loc[table["label"] == table["label"].iloc[0], "label"] = evil
    Manifest.from_table(table, birds.root).save(birds.root / "evil.csv")
    data = review_data(Manifest.load(birds.root / "evil.csv"), tmp_path, findings={"label": 4}, suggested=2)
    server = Server(str(data["manifest"]), "-o", str(tmp_path / "rev"), "--audit", str(data["audit"]))
    try:
        page = browser.new_page()
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(server.url)
        _key(page, "1")
        shown = page.inner_text("body")
        for _ in range(3):
            if evil in shown:
                break
            _key(page, "g")
            shown = page.inner_text("body")
        assert evil in shown and not dialogs and page.evaluate("typeof window.alert") == "function"
    finally:
        server.stop()
