import json
import os

import pandas as pd
import pytest

from components.common.readers import detect_layout, read_dataset, write_canonical
from components.common.schema import DataError, split_topics


def test_official_layout_is_read(official_dir):
    ds = read_dataset(official_dir)
    assert ds.layout == "official"
    train, test = ds.notes["train"], ds.notes["test"]
    assert train["note_id"].tolist() == ["a1", "a2", "a3", "a4", "a5"]
    a1 = train.iloc[0]
    assert a1["topics"] == ["CottonDoll", "Halloween"]
    assert "[话题]" not in a1["content"] and "three photos" in a1["content"]
    # images found by imgid without extension, with extension, and in images_test/
    assert a1["image_uri"] == os.path.join(official_dir, "images", "img_a1")
    assert train.iloc[2]["image_uri"].endswith("images/img_a3.png")
    assert test.iloc[0]["image_uri"] == os.path.join(official_dir, "images_test", "img_t1")
    # the row with an unquoted comma keeps its id, image and category; the warning says so
    a5 = train.iloc[4]
    assert (a5["title"], a5["content"], a5["category"]) == (
        "Keep working", "free shipping, for $100!", "Hobbies@Toys@")
    assert any("more than 5 fields" in w for w in ds.warnings)
    assert set(ds.pairs) == {"train", "val", "test", "test_shortquery"}
    assert ds.slices == ["shortquery"]
    assert ds.pairs["val"][["query_id", "target_id"]].values.tolist() == [["a3", "a1"]]
    assert train["_row"].tolist() == [1, 2, 3, 4, 5]


def test_canonical_round_trip(official_dir, tmp_path):
    ds = read_dataset(official_dir)
    out = str(tmp_path / "canon")
    manifest = write_canonical(ds, out)
    assert manifest["notes"] == {"train": 5, "test": 3}
    assert detect_layout(out) == "canonical"
    back = read_dataset(out)
    for split in ("train", "test"):
        a, b = ds.notes[split], back.notes[split]
        assert a["note_id"].tolist() == b["note_id"].tolist()
        assert a["topics"].tolist() == b["topics"].tolist()
        assert a["image_uri"].tolist() == b["image_uri"].tolist()
    assert back.pairs["train"]["query_id"].tolist() == ["a1", "a3"]


def test_canonical_jsonl_with_relative_images(tmp_path):
    root = tmp_path / "jsonl"
    root.mkdir()
    notes = [{"note_id": 1, "title": "x", "content": "y #Tag[话题]#", "image_uri": "img/1.png",
              "topics": ["Given"], "category": "A@B@"}]
    (root / "notes_train.jsonl").write_text("\n".join(json.dumps(n) for n in notes))
    (root / "pairs_train.jsonl").write_text(json.dumps({"query_id": 1, "target_id": 1}))
    ds = read_dataset(str(root))
    n = ds.notes["train"].iloc[0]
    assert n["note_id"] == "1" and n["topics"] == ["Given", "Tag"]
    assert n["image_uri"] == os.path.join(str(root), "img/1.png")


def test_missing_column_names_file_row_and_field(official_dir):
    with open(os.path.join(official_dir, "notes_test.csv"), "a") as f:
        f.write("t4,only three,fields\n")
    with pytest.raises(DataError) as e:
        read_dataset(official_dir)
    msg = str(e.value)
    assert "notes_test.csv row 4" in msg and "'imgid'" in msg and "got 3" in msg


def test_parquet_missing_column(tmp_path):
    root = tmp_path / "pq"
    root.mkdir()
    pd.DataFrame({"note_id": ["a"], "title": ["t"]}).to_parquet(root / "notes_train.parquet")
    with pytest.raises(DataError, match=r"notes_train.parquet: missing column\(s\) 'content', "
                                        r"'image_uri'"):
        read_dataset(str(root))


def test_empty_pair_id_and_unknown_folder(official_dir, tmp_path):
    with open(os.path.join(official_dir, "note_pairs_test.csv"), "a") as f:
        f.write("t2,\n")
    with pytest.raises(DataError, match=r"note_pairs_test.csv row 2, field 'noteid2'"):
        read_dataset(official_dir)
    with pytest.raises(DataError, match="no notes file found"):
        detect_layout(str(tmp_path))


def test_split_topics():
    content, topics = split_topics("a #X[话题]# b #Y[话题]##X[话题]#\nc")
    assert topics == ["X", "Y"] and content == "a b\nc"


# -- bounded memory (issue 17): streamed, chunked reads give the same tables -------------------


def _frames(ds):
    return ([("notes", k, v) for k, v in ds.notes.items()]
            + [("pairs", k, v) for k, v in ds.pairs.items()] + [("events", "", ds.events)])


def _with_events(root: str, n: int = 7) -> str:
    with open(os.path.join(root, "events.csv"), "w", newline="") as f:
        f.write("user_id,note_id,event,ts\n")
        for i in range(n):
            f.write(f" u{i % 3} ,a{1 + i % 4},{'click' if i % 2 else 'view'},"
                    f"2024-05-0{1 + i % 9}T10:00:0{i % 10}{'Z' if i % 2 else '+02:00'}\n")
    return root


def test_chunked_reads_equal_one_chunk(official_dir, monkeypatch):
    """Rows move into Arrow every _CHUNK_ROWS rows and events are parsed _CSV_CHUNK at a time:
    chunks of 2 and 3 rows (multi-line records, topics, an unquoted comma, timestamps of two
    offsets across chunk ends) give exactly the tables of one chunk."""
    from components.common import readers

    _with_events(official_dir)
    whole = read_dataset(official_dir)
    monkeypatch.setattr(readers, "_CHUNK_ROWS", 2)
    monkeypatch.setattr(readers, "_CSV_CHUNK", 3)
    chunked = read_dataset(official_dir)
    for (kind, name, a), (_, _, b) in zip(_frames(whole), _frames(chunked), strict=True):
        pd.testing.assert_frame_equal(a, b, obj=f"{kind} {name}")
    assert whole.notes["train"]["topics"].iloc[0] == ["CottonDoll", "Halloween"]
    assert whole.events["user_id"].iloc[0] == "u0" and len(whole.events) == 7
    assert str(whole.events["ts"].dtype).startswith("datetime64")
    assert whole.warnings == chunked.warnings


def test_csv_files_are_streamed_not_read_whole(official_dir, monkeypatch):
    """A CSV file is decoded block by block: read_bytes (a whole file in memory) is used only
    to word the error about an undecodable byte, never on a good file."""
    from components.common import storage

    _with_events(official_dir)

    def whole_file(uri):
        raise AssertionError(f"{uri} read whole")

    monkeypatch.setattr(storage, "read_bytes", whole_file)
    ds = read_dataset(official_dir)
    assert len(ds.notes["train"]) == 5 and len(ds.events) == 7


def test_reading_holds_a_chunk_of_python_strings_not_the_file(tmp_path, monkeypatch):
    """Python memory while reading ~3 MB of notes stays under the file's size (about half of it
    in chunks of 100 rows; bytes, text and row dicts of the whole file came to ~7x): the Arrow
    columns are compact and not counted by tracemalloc, the topic lists, one per note, are."""
    import tracemalloc

    from components.common import readers

    root = tmp_path / "big"
    root.mkdir()
    filler = "长文本 long text " * 20
    with open(root / "notes_train.csv", "w", newline="", encoding="utf-8") as f:
        for i in range(6000):
            f.write(f'n{i},title {i},"{filler} {i}\nline two #T{i % 9}[话题]#",img{i},A@B@\n')
    size = os.path.getsize(root / "notes_train.csv")
    monkeypatch.setattr(readers, "_CHUNK_ROWS", 100)
    tracemalloc.start()
    try:
        ds = read_dataset(str(root))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(ds.notes["train"]) == 6000 and ds.notes["train"]["topics"].iloc[5] == ["T5"]
    assert size > 2_500_000 and peak < size, (size, peak)
