import json
import os
from dataclasses import replace

import pandas as pd
import pytest

from components.common.canonical import load_canonical
from components.common.config import DataConfig
from components.common.readers import read_dataset, write_canonical
from components.common.schema import DataError
from components.validate import engine, suites
from components.validate.images import COLUMNS as IMAGE_COLUMNS
from components.validate.images import check_image
from components.validate.run import run
from tests.conftest import image_bytes


def _validate(data_dir, tmp_path, cfg=None):
    cfg = cfg or DataConfig()
    canon = str(tmp_path / "canon")
    write_canonical(read_dataset(data_dir), canon)
    return run(canon, str(tmp_path / "report"), cfg)


def _error(data_dir, tmp_path, cfg=None) -> str:
    with pytest.raises(DataError) as e:
        _validate(data_dir, tmp_path, cfg)
    return str(e.value)


# -- the suites, one expectation at a time, on hand-made canonical tables ----------------------


def _notes(ids, file):
    n = len(ids)
    return pd.DataFrame({"note_id": ids, "title": [f"title {i}" for i in ids],
                         "content": [f"text of {i}" for i in ids],
                         "image_uri": [f"/img/{i}" for i in ids], "category": ["Pets@Daily@"] * n,
                         "_file": [file] * n, "_row": range(1, n + 1)})


def _pairs(rows, file):
    return pd.DataFrame({"query_id": [a for a, _ in rows], "target_id": [b for _, b in rows],
                         "_file": [file] * len(rows), "_row": range(1, len(rows) + 1)})


def _good():
    """notes, pairs, events, images: canonical tables that meet every expectation."""
    notes = {"train": _notes(["a1", "a2", "a3", "a4", "a5"], "notes_train.parquet"),
             "test": _notes(["t1", "t2"], "notes_test.parquet")}
    pairs = {"train": _pairs([("a1", "a2"), ("a3", "a4")], "pairs_train.parquet"),
             "test": _pairs([("t1", "t2")], "pairs_test.parquet")}
    ids = ["a1", "a2", "a3", "a4", "t1", "t2"] * 2
    events = pd.DataFrame({"user_id": [f"u{i % 3}" for i in range(12)], "note_id": ids,
                           "event": ["view", "click"] * 6,
                           "ts": [f"2024-05-01T10:{i:02d}:00Z" for i in range(12)],
                           "_file": "events.parquet", "_row": range(1, 13)})
    allnotes = pd.concat(notes.values(), ignore_index=True)
    images = pd.DataFrame({"note_id": allnotes["note_id"], "image_uri": allnotes["image_uri"],
                           "decodes": True, "problem": "", "width": 40, "height": 30,
                           "mode": "RGB", "_file": allnotes["_file"], "_row": allnotes["_row"]},
                          columns=IMAGE_COLUMNS)
    return notes, pairs, events, images


def _set(df, row, col, value):
    df.loc[row, col] = value


def _bad_share(df, col, value, n):
    for i in range(n):
        df.loc[i, col] = value


# (id, change to the good tables, config change, suite, expectation, its column (or None), fatal)
CASES = [
    ("null note id", lambda n, p, e, i: _set(n["train"], 4, "note_id", None), {},
     "notes", "expect_column_values_to_not_be_null", "note_id", True),
    ("duplicate note id", lambda n, p, e, i: _set(n["train"], 4, "note_id", "a1"), {},
     "notes", "expect_column_values_to_be_unique", "note_id", True),
    ("title too long", lambda n, p, e, i: _set(n["train"], 0, "title", "x" * 11),
     {"max_title_chars": 10}, "notes", "expect_column_value_lengths_to_be_between", "title", True),
    ("content too long", lambda n, p, e, i: _set(n["test"], 0, "content", "y" * 21),
     {"max_content_chars": 20}, "notes", "expect_column_value_lengths_to_be_between", "content",
     True),
    ("too many empty titles", lambda n, p, e, i: _bad_share(n["train"], "title", "", 4), {},
     "notes", "expect_column_value_lengths_to_be_between", "title", True),
    ("too many empty contents", lambda n, p, e, i: _bad_share(n["train"], "content", "", 2),
     {"max_empty_content_share": 0.2}, "notes", "expect_column_value_lengths_to_be_between",
     "content", True),
    ("note without image", lambda n, p, e, i: _set(n["train"], 2, "image_uri", ""), {},
     "notes", "expect_column_value_lengths_to_be_between", "image_uri", True),
    ("malformed category", lambda n, p, e, i: _set(n["train"], 3, "category", "img_a4"), {},
     "notes", "expect_column_values_to_match_regex", "category", True),
    ("image does not decode", lambda n, p, e, i: _set(i, 4, "decodes", False), {},
     "images", "expect_column_values_to_be_in_set", "decodes", True),
    ("unknown query id", lambda n, p, e, i: _set(p["train"], 0, "query_id", "zz"), {},
     "pairs_train", "expect_column_values_to_be_in_set", "query_id_split", True),
    ("unknown target id", lambda n, p, e, i: _set(p["train"], 1, "target_id", "zz"), {},
     "pairs_train", "expect_column_values_to_be_in_set", "target_id_split", True),
    ("test pair names a train note", lambda n, p, e, i: _set(p["test"], 0, "target_id", "a1"),
     {}, "pairs_test", "expect_column_values_to_be_in_set", "target_id_split", True),
    ("self-pair", lambda n, p, e, i: _set(p["train"], 1, "target_id", "a3"), {},
     "pairs_train", "expect_select_column_values_to_be_unique_within_record", None, False),
    ("duplicate pair",
     lambda n, p, e, i: p.update(train=pd.concat([p["train"]] * 2, ignore_index=True)), {},
     "pairs_train", "expect_compound_columns_to_be_unique", None, False),
    ("too few train pairs", lambda n, p, e, i: None, {"min_train_pairs": 3},
     "pairs_train", "expect_table_row_count_to_be_between", None, True),
    ("no test pairs", lambda n, p, e, i: p.pop("test"), {},
     "pairs_test", "expect_table_row_count_to_be_between", None, True),
    ("event without user", lambda n, p, e, i: _set(e, 0, "user_id", None), {},
     "events", "expect_column_values_to_not_be_null", "user_id", True),
    ("unknown event type", lambda n, p, e, i: _set(e, 3, "event", "like"), {},
     "events", "expect_column_values_to_be_in_set", "event", True),
    ("unparseable timestamp", lambda n, p, e, i: _set(e, 5, "ts", "yesterday"), {},
     "events", "expect_column_values_to_not_be_null", "ts_parsed", True),
    ("events name unknown notes", lambda n, p, e, i: _bad_share(e, "note_id", "zz", 2), {},
     "events", "expect_column_values_to_be_in_set", "note_id_split", True),
]


def _outcomes(tables_, cfg):
    todo = suites.tables(*tables_, cfg)
    results = engine.validate(todo)
    return [o for t in todo for o in engine.outcomes(t, results[t.name])]


def test_good_tables_meet_every_expectation():
    got = _outcomes(_good(), DataConfig())
    assert {o.suite for o in got} == {"notes", "images", "pairs_train", "pairs_test", "events"}
    assert all(o.success for o in got), [o.text() for o in got if not o.success]
    # every expectation is exercised by a bad table below (the pair suites share one builder)
    kinds = {(o.suite.replace("pairs_test", "pairs_train"), o.kind, o.kwargs.get("column"))
             for o in got}
    assert kinds == {(s.replace("pairs_test", "pairs_train"), k, c)
                     for _, _, _, s, k, c, _ in CASES}


@pytest.mark.parametrize("change, cfg, suite, kind, column, fatal",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_expectation_fails_on_a_bad_table(change, cfg, suite, kind, column, fatal):
    notes, pairs, events, images = _good()
    change(notes, pairs, events, images)
    got = _outcomes((notes, pairs, events, images), replace(DataConfig(), **cfg))
    failed = [o for o in got if not o.success]
    assert [(o.suite, o.kind, o.kwargs.get("column")) for o in failed] == [(suite, kind, column)]
    assert failed[0].fatal is fatal
    if kind != "expect_table_row_count_to_be_between":  # a table-level check has no rows
        assert failed[0].examples and ".parquet row " in failed[0].examples[0]


def test_suites_are_versioned():
    notes, pairs, events, images = _good()
    for t in suites.tables(notes, pairs, events, images, DataConfig()):
        assert t.suite.meta["suite_version"] == suites.SUITE_VERSION
        assert all(e.meta["problem"] for e in t.suite.expectations)


# -- the step on official-layout folders: messages, outputs, tolerance ------------------------


def test_good_data_passes_and_writes_every_output(official_dir, tmp_path):
    rep = _validate(official_dir, tmp_path)
    assert rep.success and not rep.dropped
    assert rep.stats["images_checked"] == 7 and rep.stats["notes"] == 8
    assert rep.stats["suite_notes_success"] == 1 and rep.stats["image_width_median"] == 40
    out = tmp_path / "report"
    gxres = json.loads((out / "gx_results.json").read_text())["results"]
    assert set(gxres) == {"notes", "images", "pairs_train", "pairs_val", "pairs_test",
                          "pairs_test_shortquery"} and all(r["success"] for r in gxres.values())
    assert json.loads((out / "validation.json").read_text())["success"] is True
    assert json.loads((out / "dropped_notes.json").read_text())["note_ids"] == []
    assert "**passed**" in (out / "summary.md").read_text()
    assert len(pd.read_parquet(out / "images.parquet")) == 8
    html = (out / "data_docs.html").read_text()
    # one file the KFP UI can show offline: no scripts, no external style sheets
    assert "<script" not in html and "<link" not in html and "pairs_test_shortquery" in html


def test_unknown_pair_id_names_expectation_observed_value_and_row(official_dir, tmp_path):
    with open(os.path.join(official_dir, "note_pairs_train.csv"), "a") as f:
        f.write("\na1,nosuchnote\n")
    msg = _error(official_dir, tmp_path)
    assert ("pairs_train: expect_column_values_to_be_in_set(column='target_id_split', "
            "value_set=['test', 'train']) failed; observed 1 of 3 row(s) unexpected") in msg
    assert "note_pairs_train.csv row 3, field 'noteid2': unknown note id 'nosuchnote'" in msg
    # the failing run still leaves its report, and drops nothing
    out = tmp_path / "report"
    assert "FAILED" in (out / "summary.md").read_text()
    assert "nosuchnote" in (out / "data_docs.html").read_text()
    assert not (out / "dropped_notes.json").exists()
    gxres = json.loads((out / "gx_results.json").read_text())["results"]["pairs_train"]
    failed = [r for r in gxres["results"] if not r["success"]]
    assert failed[0]["result"]["partial_unexpected_index_list"] == [
        {"target_id_split": "", "_file": "note_pairs_train.csv", "_row": 3,
         "query_id": "a1", "target_id": "nosuchnote"}]


def test_test_pair_must_name_a_test_note(official_dir, tmp_path):
    with open(os.path.join(official_dir, "note_pairs_test.csv"), "a") as f:
        f.write("t3,a1\n")
    msg = _error(official_dir, tmp_path)
    assert ("note_pairs_test.csv row 2, field 'noteid2': unknown note id 'a1' "
            "(not in notes_test)") in msg


def test_duplicate_note_id_names_both_rows(official_dir, tmp_path):
    with open(os.path.join(official_dir, "notes_test.csv"), "a") as f:
        f.write("t1,again,dup,img_t1,X@\n")
    msg = _error(official_dir, tmp_path)
    assert "expect_column_values_to_be_unique(column='note_id')" in msg
    assert "observed 2 of 9 row(s) unexpected (22.22%; allowed 0.00%)" in msg
    assert ("notes_test.csv row 1; notes_test.csv row 4, field 'noteid': note id 't1' appears "
            "more than once") in msg


def test_self_and_duplicate_pairs_are_warnings(official_dir, tmp_path):
    with open(os.path.join(official_dir, "note_pairs_train.csv"), "a") as f:
        f.write("\na1,a1\na1,a2\n")
    rep = _validate(official_dir, tmp_path)
    text = "\n".join(rep.warnings)
    assert "note_pairs_train.csv row 3, field 'noteid2': self-pair 'a1'" in text
    assert "note_pairs_train.csv row 1; note_pairs_train.csv row 4, field 'noteid2'" in text
    assert rep.stats["pairs_train_self"] == 1 and rep.stats["pairs_train_duplicates"] == 1


def test_events_are_checked(official_dir, tmp_path):
    with open(os.path.join(official_dir, "events.csv"), "w") as f:
        f.write("user_id,note_id,event,ts\nu1,a1,view,2024-05-01T10:00:00Z\n"
                "u1,gone,click,2024-05-01T10:01:00Z\n")
    msg = _error(official_dir, tmp_path)
    assert "events: expect_column_values_to_be_in_set(column='note_id_split'" in msg
    assert "events.csv row 2, field 'note_id': unknown note id 'gone'" in msg
    rep = _validate(official_dir, tmp_path / "lenient",
                    DataConfig(min_known_event_note_share=0.5))
    assert rep.stats["events"] == 2 and rep.stats["known_event_note_share"] == 0.5


@pytest.mark.parametrize("content, problem", [
    (b"", "empty file"),
    (image_bytes(fmt="JPEG", size=(64, 64))[:300], "cannot be decoded"),
    (b"hello, I am text pretending to be an image", "not an image"),
], ids=["zero-byte", "truncated-jpeg", "text-named-like-an-image"])
def test_broken_images_are_caught(official_dir, tmp_path, content, problem):
    with open(os.path.join(official_dir, "images_test", "img_t2"), "wb") as f:
        f.write(content)
    msg = _error(official_dir, tmp_path)
    assert "images: expect_column_values_to_be_in_set(column='decodes', value_set=[True])" in msg
    assert "observed 1 of 8 row(s) unexpected (12.50%; allowed 0.00%)" in msg
    assert "notes_test.csv row 2, field 'imgid': image " in msg and problem in msg


def test_broken_image_within_tolerance_is_dropped_and_listed(official_dir, tmp_path):
    with open(os.path.join(official_dir, "images_test", "img_t2"), "wb") as f:
        f.write(image_bytes(fmt="JPEG", size=(64, 64))[:300])
    rep = _validate(official_dir, tmp_path, DataConfig(max_broken_image_share=0.2))
    assert [d["note_id"] for d in rep.dropped] == ["t2"]
    assert any("within tolerance" in w and "notes_test.csv row 2" in w for w in rep.warnings)
    out = tmp_path / "report"
    dropped = json.loads((out / "dropped_notes.json").read_text())
    assert dropped["note_ids"] == ["t2"] and "cannot be decoded" in dropped["notes"][0]["problem"]
    assert "## Dropped notes (1" in (out / "summary.md").read_text()
    assert rep.stats["notes_dropped"] == 1 and rep.stats["broken_image_share"] == 0.125


def test_validated_folder_leaves_out_dropped_notes_and_their_pairs(official_dir, tmp_path):

    with open(os.path.join(official_dir, "images_test", "img_t2"), "wb") as f:
        f.write(b"")
    canon = str(tmp_path / "canon")
    write_canonical(read_dataset(official_dir), canon)
    _, pairs_before, _ = load_canonical(canon)
    run(canon, str(tmp_path / "report"), DataConfig(max_broken_image_share=0.2),
        validated_dir=str(tmp_path / "validated"))
    notes, pairs, manifest = load_canonical(str(tmp_path / "validated"))
    assert "t2" not in set(notes["test"]["note_id"]) and len(notes["test"]) == 2
    assert manifest["validation"]["dropped_notes"] == 1
    for name, df in pairs.items():
        assert not ({"t2"} & (set(df["query_id"]) | set(df["target_id"]))), name
    lost = sum(len(pairs_before[k]) - len(pairs[k]) for k in pairs)
    assert lost == sum(manifest["validation"]["dropped_pairs"].values()) > 0


def test_missing_image_and_tolerance(official_dir, tmp_path):
    os.remove(os.path.join(official_dir, "images_test", "img_t3"))
    msg = _error(official_dir, tmp_path)
    assert ("notes_test.csv row 3, field 'imgid': no image file found for note 't3' "
            "(imgid 'img_t3')") in msg
    rep = _validate(official_dir, tmp_path / "tolerant", DataConfig(max_broken_image_share=0.5))
    assert [d["note_id"] for d in rep.dropped] == ["t3"]
    assert any("within tolerance" in w for w in rep.warnings)


def test_check_image_reports_size_and_mode(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(image_bytes(size=(13, 7), fmt="PNG"))
    assert check_image(str(p)) == (None, (13, 7), "RGB")


def test_load_canonical_keeps_topics_as_lists(official_dir, tmp_path):
    canon = str(tmp_path / "c")
    write_canonical(read_dataset(official_dir), canon)
    notes, pairs, manifest = load_canonical(canon)
    assert notes["train"]["topics"].iloc[0] == ["CottonDoll", "Halloween"]
    assert manifest["slices"] == ["shortquery"]


def test_check_images_in_bounded_batches_one_row_per_note(tmp_path, monkeypatch):
    """More files than one batch (64 per worker): every distinct file is checked once, every
    note that names one gets its row, a broken file has no size (<NA>) and decodes False."""
    from components.validate import images as images_mod

    uris = []
    for i in range(70):
        p = tmp_path / f"i{i}.png"
        p.write_bytes(image_bytes(size=(5 + i, 3), fmt="PNG") if i != 33 else b"not an image")
        uris.append(str(p))
    ids = [f"n{i}" for i in range(75)]
    notes = _notes(ids, "notes_train.csv")
    notes["image_uri"] = uris + uris[:4] + [""]  # four files named twice, one note without
    seen = []
    real = images_mod.check_image
    monkeypatch.setattr(images_mod, "check_image", lambda u: seen.append(u) or real(u))
    out = images_mod.check_images(notes, workers=1)
    assert sorted(seen) == sorted(uris)  # each distinct file read once
    assert list(out.columns) == IMAGE_COLUMNS and out["note_id"].tolist() == ids[:74]
    assert out["width"].tolist()[:3] == [5, 6, 7] and out["width"].tolist()[70:] == [5, 6, 7, 8]
    broken = out[out["note_id"] == "n33"].iloc[0]
    assert not broken["decodes"] and broken["problem"].startswith("not an image")
    assert pd.isna(broken["width"]) and broken["mode"] == ""
    assert out["decodes"].sum() == 73 and out["_row"].tolist() == list(range(1, 75))
