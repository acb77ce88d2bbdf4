"""`finegrain review` without a browser: the decisions file (durable across SIGKILL, undo), relabelling from a
review row by row, the app's refusals (traversal, token, escaping) through Starlette's test client, and the
one-line errors of the command."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys

import pandas as pd
import pytest
from review_helpers import review_data
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.data.decisions import DecisionLog
from finegrain.data.manifest import Manifest

pytest.importorskip("fastapi")


def test_decisions_survive_reopening_and_undo_marks_the_latest(tmp_path):
    log = DecisionLog(tmp_path / "rev")
    log.record("a", "to_label", "label", "p/a.jpg", label="Wren")
    log.record("b", "outlier", "exclude", "p/b.jpg")
    log.record("a", "to_label", "skip", "p/a.jpg")
    with pytest.raises(ValueError):
        log.record("c", "outlier", "label", "p/c.jpg", label="Wren")  # an outlier takes keep / exclude
    with pytest.raises(ValueError):
        log.record("c", "to_label", "new", "p/c.jpg", label="  ")
    assert log.undo().seq == 3
    log.close()
    again = DecisionLog(tmp_path / "rev", create=False)
    latest = again.latest()
    assert {k: (d.action, d.label) for k, d in latest.items()} == {"a": ("label", "Wren"), "b": ("exclude", "")}
    db = sqlite3.connect(again.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT count(*) FROM decisions").fetchone()[0] == 3  # the undone one is kept, marked
    assert again.undo().item == "b" and again.undo().item == "a" and again.undo() is None


_WRITER = """
import sys
from finegrain.data.decisions import DecisionLog
log = DecisionLog(sys.argv[1])
for i in range(100000):
    d = log.record(f"item{i}", "to_label", "label", f"p/{i}.jpg", label="Wren")
    print(d.seq, flush=True)
"""


def test_a_sigkilled_writer_loses_no_acknowledged_decision(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "rev")], stdout=subprocess.PIPE, text=True)
    acked = []
    while len(acked) < 40:  # killed while it writes: some decision is mid-commit
        acked.append(int(proc.stdout.readline()))
    proc.kill()
    proc.wait()
    acked += [int(line) for line in proc.stdout.read().split()]  # printed before the kill landed
    stored = {d.seq for d in DecisionLog(tmp_path / "rev", create=False).in_force()}
    assert set(acked) <= stored and len(stored) >= 40


def _decisions(folder, plan):
    log = DecisionLog(folder)
    for item, queue, action, path, label, other, new in plan:
        log.record(item, queue, action, path, label=label, other_path=other, new_row=new)
    log.close()


def test_relabel_from_a_review_applies_every_kind_of_decision_row_by_row(birds, tmp_path):
    data = review_data(birds, tmp_path, findings={}, suggested=4)
    table = data["table"]
    train = table[table["split"] == "train"]["path"].tolist()
    test = table[table["split"] == "test"]["path"].tolist()
    pool = table[table["split"] == "unlabeled"]["path"].tolist()
    species = data["species"]
    label_of = dict(zip(table["path"], table["label"]))
    (birds.root / "new_photo.jpg").write_bytes((birds.root / train[0]).read_bytes())
    plan = [  # (item, queue, action, path, label, other_path, new_row)
        ("e1", "label_error", "suggested", train[0], species[3], "", False),
        ("e2", "label_error", "given", train[1], label_of[train[1]], "", False),
        ("e3", "label_error", "other", test[0], "Mystery finch", "", False),
        ("e4", "label_error", "exclude", train[2], "", "", False),
        ("t1", "twin", "keep_one", train[3], "", train[4], False),
        ("t2", "twin", "exclude", train[5], "", train[6], False),
        ("t3", "twin", "keep_both", train[7], "", train[8], False),
        ("o1", "outlier", "exclude", train[9], "", "", False),
        ("o2", "outlier", "keep", train[10], "", "", False),
        ("l1", "to_label", "label", pool[0], species[0], "", False),
        ("l2", "to_label", "new", pool[1], "Mystery finch", "", False),
        ("l3", "to_label", "not_bird", pool[2], "", "", False),
        ("l4", "to_label", "skip", pool[3], "", "", False),
        ("l5", "to_label", "label", pool[4], species[1], "", False),
        ("l5", "to_label", "label", pool[4], species[2], "", False),  # decided again: the later one counts
        ("p1", "predict", "confirm", "new_photo.jpg", species[1], "", True),
        ("p2", "predict", "label", pool[5], species[2], "", False),
    ]
    _decisions(tmp_path / "rev", plan)
    out = tmp_path / "new.csv"
    res = CliRunner().invoke(app, ["manifest", "relabel", str(data["manifest"]), "--from", str(tmp_path / "rev"),
                                   "-o", str(out)])
    assert res.exit_code == 0, res.output
    new = Manifest.load(out).table.set_index("path")
    gone = {train[2], train[3], train[5], train[6], train[9], pool[2]}
    expected = {  # path -> (label, split, label_source) for every row that stays or is added
        p: (label, split, "given") for p, label, split in zip(table["path"], table["label"], table["split"])
        if p not in gone}
    expected.update({train[0]: (species[3], "train", "reviewed"), train[1]: (label_of[train[1]], "train", "reviewed"),
                     test[0]: ("Mystery finch", "test", "reviewed"), pool[0]: (species[0], "train", "reviewed"),
                     pool[1]: ("Mystery finch", "train", "reviewed"), pool[4]: (species[2], "train", "reviewed"),
                     pool[5]: (species[2], "train", "reviewed"),
                     "new_photo.jpg": (species[1], "train", "reviewed")})
    assert set(new.index) == set(expected)
    for path, (label, split, source) in expected.items():
        assert tuple(new.loc[path, ["label", "split", "label_source"]]) == (label, split, source), path
    side = json.loads(out.with_name("new.csv.json").read_text())
    assert side["provenance"]["decisions"] == len(plan) and side["provenance"]["relabelled_from"] == "review"
    assert side["provenance"]["parent_content_hash"] == Manifest.load(data["manifest"]).content_hash
    assert Manifest.load(data["manifest"]).table.equals(data["table"])  # the original stays as it was
    res = CliRunner().invoke(app, ["manifest", "validate", str(out)])
    assert res.exit_code == 0, res.output


def test_relabel_from_a_review_of_another_manifest_is_one_line(birds, tmp_path):
    _decisions(tmp_path / "rev", [("x", "outlier", "exclude", "not/in/manifest.jpg", "", "", False)])
    res = CliRunner().invoke(app, ["manifest", "relabel", str(birds.root / "manifest.csv"), "--from",
                                   str(tmp_path / "rev"), "-o", str(tmp_path / "new.csv")])
    assert res.exit_code == 2 and "not/in/manifest.jpg was reviewed but is not in the manifest" in res.output
    res = CliRunner().invoke(app, ["manifest", "relabel", str(birds.root / "manifest.csv"), "--from",
                                   str(tmp_path / "rev"), "--accept", "1", "-o", str(tmp_path / "new.csv")])
    assert res.exit_code == 2 and "--accept" in res.output


# --- the app, in process --------------------------------------------------------------------------------

def _client(data, tmp_path, token_everywhere=False, **more):
    from fastapi.testclient import TestClient

    from finegrain.review.queues import load_review
    from finegrain.review.server import Session, create_app

    review = load_review(data["manifest"], data.get("audit"), data.get("suggest"), **more)
    session = Session(review, DecisionLog(tmp_path / "rev"), tmp_path / "rev", token_everywhere=token_everywhere)
    return TestClient(create_app(session)), session


def test_photos_only_by_row_number_never_by_path(birds, tmp_path):
    data = review_data(birds, tmp_path, findings={"label": 2}, suggested=3)
    client, session = _client(data, tmp_path)
    first = client.get("/photo/0/large")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert len(list((tmp_path / "rev" / "thumbs").glob("*.jpg"))) == 1  # cached on disk
    for url in ("/photo/../../etc/passwd", "/photo/..%2F..%2Fetc%2Fpasswd/large", "/photo/-1/large",
                f"/photo/{len(birds.table)}/large", "/photo/0/huge", "/photo/0/../../../etc/passwd",
                "/photo/%2Fetc%2Fpasswd/large", "/etc/passwd", "/static/../../etc/passwd",
                "/photo/" + str(data["table"]["path"].iloc[0]) + "/large"):
        r = client.get(url)
        assert r.status_code in (404, 422) and b"root:" not in r.content, url


def test_decisions_need_the_token_and_beyond_loopback_every_request_does(birds, tmp_path):
    data = review_data(birds, tmp_path, findings={"label": 1}, suggested=2)
    client, session = _client(data, tmp_path)
    item = data["audit_table"]["path"].iloc[0]
    body = {"item": f"label_error:{item}", "action": "given"}
    assert client.post("/api/decide", json=body).status_code == 403
    assert client.post("/api/decide", json=body, headers={"X-Review-Token": "guess"}).status_code == 403
    ok = client.post("/api/decide", json=body, headers={"X-Review-Token": session.token})
    assert ok.status_code == 200 and ok.json()["saved"] and session.log.latest()[body["item"]].action == "given"
    assert client.get("/").status_code == 200  # loopback: pages need no token

    client, session = _client(data, tmp_path / "wide", token_everywhere=True)
    for url in ("/", "/q/label_error", "/photo/0/small", "/review.js"):
        assert client.get(url).status_code == 403, url
    assert client.get("/?token=nope").status_code == 403
    assert client.get(f"/?token={session.token}").status_code == 200
    assert client.get("/photo/0/small").status_code == 200  # the cookie the tokened URL set
    client.cookies.clear()
    assert client.get("/photo/0/small").status_code == 403


def test_species_and_paths_are_shown_as_text(birds, tmp_path):
    evil = "<script>alert(1)</script>"
    table = birds.table.copy()
    table.loc[table["label"] == table["label"].iloc[0], "label"] = evil
    Manifest.from_table(table, birds.root).save(birds.root / "evil.csv")
    data = review_data(Manifest.load(birds.root / "evil.csv"), tmp_path, findings={"label": 3}, suggested=2)
    client, session = _client(data, tmp_path)
    audit = data["audit_table"]
    item = audit.loc[(audit["given_label"] == evil) | (audit["suggested_label"] == evil)]
    assert len(item)
    client.post("/api/decide", headers={"X-Review-Token": session.token},
                json={"item": f"to_label:{data['suggest_table']['path'].iloc[0]}", "action": "new",
                      "label": 'A & "B" <b>'})
    for url in (f"/q/label_error?item=label_error:{item['path'].iloc[0]}", "/q/to_label"):
        page = client.get(url).text
        assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>\"" not in client.get("/q/to_label").text and "A &amp; &#34;B&#34; &lt;b&gt;" in client.get("/q/to_label").text
    assert "script-src 'self'" in client.get("/").headers["content-security-policy"]


def test_bad_inputs_are_one_line_with_exit_2(birds, tmp_path):
    data = review_data(birds, tmp_path, findings={"label": 1}, suggested=2)
    pd.DataFrame({"path": ["x.jpg"]}).to_csv(tmp_path / "wrong.csv", index=False)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "audit.csv").write_text("rank,issue\n1,label\n")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    m, rev = str(data["manifest"]), str(tmp_path / "rev")
    cases = [([str(tmp_path / "missing.csv"), "-o", rev], "manifest file not found"),
             ([m, "-o", rev, "--audit", str(tmp_path / "nowhere")], "audit.csv not found"),
             ([m, "-o", rev, "--audit", str(tmp_path / "broken")], "not a valid audit.csv (missing column 'path')"),
             ([m, "-o", rev, "--suggest", str(tmp_path / "wrong.csv")], "x.jpg is not in the manifest"),
             ([m, "-o", rev, "--predict", str(tmp_path / "wrong.csv")], "not a valid predict CSV"),
             ([m, "-o", rev, "--port", str(busy.getsockname()[1])], "cannot listen there"),
             ([m, "-o", rev, "--port", "70000"], "--port: must be between 0 and 65535")]
    for args, message in cases:
        res = CliRunner().invoke(app, ["review", *args])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1, res.output
    busy.close()


def test_the_real_server_beyond_loopback_refuses_requests_without_the_token(birds, tmp_path):
    import urllib.error
    import urllib.request

    from review_helpers import Server

    data = review_data(birds, tmp_path, findings={"label": 1}, suggested=2)
    server = Server(str(data["manifest"]), "-o", str(tmp_path / "rev"), "--suggest", str(data["suggest"]),
                    "--host", "0.0.0.0")
    try:
        assert "?token=" in server.url
        local = server.base.replace("0.0.0.0", "127.0.0.1")
        for url in (local, local + "q/to_label", local + "photo/0/small", local + "?token=wrong"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url, timeout=10)
            assert refused.value.code == 403, url
        with urllib.request.urlopen(server.url.replace("0.0.0.0", "127.0.0.1"), timeout=10) as page:
            assert page.status == 200 and b"Photos to label" in page.read()
    finally:
        server.stop()


def test_unknown_and_unsure_predictions_are_queued_and_a_confirmed_new_photo_becomes_a_train_row(birds, tmp_path):
    data = review_data(birds, tmp_path, findings={}, suggested=2)
    table, species = data["table"], data["species"]
    (birds.root / "garden").mkdir()
    new_photo = birds.root / "garden" / "new.jpg"
    new_photo.write_bytes((birds.root / table["path"].iloc[0]).read_bytes())
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(new_photo.read_bytes())
    unsure, sure = table["path"].iloc[1], table["path"].iloc[2]
    pd.DataFrame([  # the columns `finegrain predict -o` writes with --open-set on
        {"path": str(new_photo), "pred_1": "unknown", "pred_2": species[1], "score_1": 0.4, "score_2": 0.3,
         "nearest_species": species[0], "unknown_score": 0.9, "known": False, "error": ""},
        {"path": str(birds.root / unsure), "pred_1": species[2], "pred_2": species[3], "score_1": 0.3,
         "score_2": 0.25, "nearest_species": species[2], "unknown_score": 0.1, "known": True, "error": ""},
        {"path": str(birds.root / sure), "pred_1": species[2], "pred_2": species[3], "score_1": 0.9, "score_2": 0.05,
         "nearest_species": species[2], "unknown_score": 0.1, "known": True, "error": ""},
        {"path": str(outside), "pred_1": "unknown", "pred_2": species[1], "score_1": 0.4, "score_2": 0.3,
         "nearest_species": species[0], "unknown_score": 0.9, "known": False, "error": ""},
        {"path": str(birds.root / "gone.jpg"), "error": "unreadable"},
    ]).to_csv(tmp_path / "preds.csv", index=False)
    client, session = _client({"manifest": data["manifest"]}, tmp_path, predict=tmp_path / "preds.csv")
    items = session.review.queues["predict"]
    assert [(it.path, it.new_row, it.suggested) for it in items] == [("garden/new.jpg", True, species[0]),
                                                                    (unsure, False, species[2])]
    assert [g for g, _ in items[0].guesses] == [species[0], species[1]]
    page = client.get("/q/predict").text
    assert f"confirm: {species[0]}" in page and f'data-label="{species[1]}"' in page
    photo = client.get(f"/photo/{items[0].photo}/small")  # the new photo is served by its number too
    assert photo.status_code == 200 and photo.headers["content-type"] == "image/jpeg"
    headers = {"X-Review-Token": session.token}
    assert client.post("/api/decide", headers=headers, json={"item": items[0].id, "action": "confirm"}).json()["saved"]
    assert client.post("/api/decide", headers=headers, json={"item": items[1].id, "action": "label",
                                                             "label": species[3]}).json()["saved"]
    session.log.close()
    out = tmp_path / "new.csv"
    res = CliRunner().invoke(app, ["manifest", "relabel", str(data["manifest"]), "--from", str(tmp_path / "rev"),
                                   "-o", str(out)])
    assert res.exit_code == 0, res.output
    new = Manifest.load(out).table.set_index("path")
    assert len(new) == len(table) + 1
    assert tuple(new.loc["garden/new.jpg", ["label", "split", "label_source"]]) == (species[0], "train", "reviewed")
    assert new.loc[unsure, "label"] == species[3] and new.loc[sure, "label_source"] == "given"
