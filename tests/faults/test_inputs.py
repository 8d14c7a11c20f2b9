"""Bad inputs (issue 15, items 7 and 8): the official CSV reader and the images.

Every refusal names the file, the row (as the reader counts rows), the field and, for text, the
line; nothing is silently replaced, swallowed or picked. The corpus in ``corpus.py`` is run
through the reader and the validate step at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings

import pandas as pd
import pytest
from PIL import Image

from components.common.config import DataConfig
from components.common.readers import read_dataset, write_canonical
from components.common.schema import DataError
from components.validate.run import run
from tests.conftest import image_bytes, write_official
from tests.faults.corpus import CASES, EXPECT, LAYER, bomb_png, read_rows, write_rows

# as in production (components.common.notes makes Pillow's warning an error; pytest resets the
# warning filters around each test)
pytestmark = [pytest.mark.faults,
              pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")]


def _notes(root, rows, name="notes_train.csv", encoding="utf-8"):
    write_rows(os.path.join(root, name), rows, encoding)


def _refused(root, cfg=None) -> str:
    with pytest.raises(DataError) as e:
        read_dataset(root, cfg) if cfg else read_dataset(root)
    return str(e.value)


# -- 7a: encodings -----------------------------------------------------------------------------


def _gbk_rows():
    return [["a1", "Pumpkin doll", "text", "img_a1", "Hobbies@Toys@"],
            ["a2", "Well-behaved", "more", "img_a2", "Hobbies@Toys@"],
            ["a3", "兔子 bunny", "没有腮红也很可爱", "img_a3.png", "Pets@Daily@"],
            ["a4", "Free shipping", "take it all", "img_a4", ""]]


def test_gbk_file_is_refused_naming_row_line_field_and_byte(official_dir):
    _notes(official_dir, _gbk_rows(), encoding="gbk")
    msg = _refused(official_dir)
    start = len("a1,Pumpkin doll,text,img_a1,Hobbies@Toys@\na2,Well-behaved,more,img_a2,"
                "Hobbies@Toys@\na3,")
    assert f"notes_train.csv row 3, field 'title' (line 3, byte {start}): " in msg, msg
    assert "not valid utf-8" in msg and "data.encoding" in msg and "gb18030" in msg


def test_gbk_file_reads_with_data_encoding(official_dir):
    _notes(official_dir, _gbk_rows(), encoding="gbk")
    ds = read_dataset(official_dir, DataConfig(encoding="gb18030"))
    a3 = ds.notes["train"].iloc[2]
    assert (a3["title"], a3["content"]) == ("兔子 bunny", "没有腮红也很可爱")
    assert any("gb18030" in w and "data.encoding" in w for w in ds.warnings), ds.warnings
    # the default stays silent about encodings
    assert not any("data.encoding" in w for w in read_dataset(write_official(
        os.path.join(official_dir, "again"))).warnings)


def test_undecodable_byte_in_a_later_field_and_multiline_record(official_dir):
    rows = [["a1", "t", "first line\nsecond, with comma", "img_a1", "A@"],
            ["a2", "t", "ok", "img_a2", "Caf\u00e9@"]]
    _notes(official_dir, rows, encoding="latin-1")
    msg = _refused(official_dir)
    assert "notes_train.csv row 2, field 'category' (line 3, byte" in msg, msg


def test_latin1_pairs_and_events_are_refused(official_dir):
    with open(os.path.join(official_dir, "note_pairs_test.csv"), "ab") as f:
        f.write(b"t1,t\xe9\n")
    assert "note_pairs_test.csv row 2, field 'noteid2' (line 2, byte 10)" in _refused(official_dir)
    write_official(official_dir)
    with open(os.path.join(official_dir, "events.csv"), "wb") as f:
        f.write(b"user_id,note_id,event,ts\nu1,a1,view,2024-01-01T00:00:00Z\n"
                b"u\xe9,a2,view,2024-01-01T00:00:01Z\n")
    msg = _refused(official_dir)
    assert "events.csv row 2, field 'user_id' (line 3, byte" in msg, msg


def test_bom_and_header_are_still_accepted(official_dir):
    path = os.path.join(official_dir, "notes_test.csv")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(b"\xef\xbb\xbfnoteid,title,content,imgid,category\n" + data)
    ds = read_dataset(official_dir)
    assert ds.notes["test"]["note_id"].tolist() == ["t1", "t2", "t3"]


# -- 7b: a stray opening quote -----------------------------------------------------------------


def _raw(root, text, name="notes_train.csv"):
    with open(os.path.join(root, name), "w", encoding="utf-8", newline="") as f:
        f.write(text)


def test_stray_quote_swallowing_following_notes_is_refused(official_dir):
    # a2's title opens a quote; the csv module reads on to a3's quoted content and hands a2
    # the image of a3 - unless the reader notices
    _raw(official_dir, 'a1,Doll,text,img_a1,Hobbies@Toys@\n'
                       'a2,"Well-behaved,more,img_a2,Hobbies@Toys@\n'
                       'a3,Bunny,"two\nlines, with a comma",img_a3.png,Pets@Daily@\n'
                       'a4,Free,take it all,img_a4,\n')
    msg = _refused(official_dir)
    assert "notes_train.csv row 2, field 'title' (line 2): a quote opened" in msg, msg
    assert "line 3" in msg and "a3,Bunny" in msg


def test_stray_quote_running_to_the_end_is_refused(official_dir):
    _raw(official_dir, 'a1,Doll,text,img_a1,Hobbies@Toys@\n'
                       'a2,Well,"more, and more,img_a2,Hobbies@Toys@\n')
    msg = _refused(official_dir)
    assert "notes_train.csv row 2, field 'content' (line 2): a quote opened" in msg, msg
    assert "never closed" in msg


def test_stray_quote_in_pairs_is_refused(official_dir):
    _raw(official_dir, 'a1,a2\n"a3,a4\na1,a4\n', "note_pairs_train.csv")
    msg = _refused(official_dir)
    assert "note_pairs_train.csv row 2, field 'noteid1' (line 2): a quote opened" in msg, msg


def test_multiline_content_with_commas_is_still_accepted(official_dir):
    content = ("Ingredients: flour, sugar, eggs, butter, milk\nstep1,step2,step3,step4,step5\n"
               "a, b, c, d, e\nx9,not,an,id,line")
    _notes(official_dir, [["a1", "Cake", content, "img_a1", "Food@Baking@"],
                          ["a2", '5" screen "quoted"', "ok", "img_a2", "A@"]])
    train = read_dataset(official_dir).notes["train"]
    assert train["note_id"].tolist() == ["a1", "a2"]
    assert train.iloc[0]["content"] == content and train.iloc[1]["title"] == '5" screen "quoted"'


# -- 7c: field size ----------------------------------------------------------------------------


def test_field_over_the_csv_limit_is_a_data_error(official_dir):
    rows = read_rows(os.path.join(official_dir, "notes_train.csv"))
    rows[1][2] = "x" * 200_000
    _notes(official_dir, rows)
    msg = _refused(official_dir)
    assert re.search(r"notes_train\.csv row 2 \(record from line \d+\): .*field longer than "
                     r"131072 characters", msg), msg
    assert "data.max_content_chars" in msg
    # a limit raised in the settings raises the reader's too (validate then judges the length)
    ds = read_dataset(official_dir, DataConfig(max_content_chars=300_000))
    assert len(ds.notes["train"].iloc[1]["content"]) == 200_000


# -- 7d: a split given twice -------------------------------------------------------------------


def test_split_as_csv_and_parquet_is_refused(official_dir):
    pd.DataFrame({"note_id": ["z"], "title": ["t"], "content": ["c"], "image_uri": [""]}
                 ).to_parquet(os.path.join(official_dir, "notes_train.parquet"))
    msg = _refused(official_dir)
    assert "notes_train.csv and notes_train.parquet" in msg, msg


def test_pairs_as_csv_and_parquet_are_refused(official_dir):
    pd.DataFrame({"query_id": ["t1"], "target_id": ["t2"]}).to_parquet(
        os.path.join(official_dir, "pairs_test.parquet"))
    msg = _refused(official_dir)
    assert "note_pairs_test.csv and pairs_test.parquet" in msg, msg


# -- 8a/8b: decompression bombs and oversize files ---------------------------------------------


def test_pillow_limit_is_lowered_where_images_are_decoded():
    import components.common.notes  # noqa: F401 - the import applies the limit

    assert DataConfig().max_image_pixels == Image.MAX_IMAGE_PIXELS


def _claims(png: bytes, width: int, height: int) -> bytes:
    """The PNG with its header claiming another size (the pixel data is not read)."""
    import struct
    import zlib

    ihdr = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF) + png[33:]


def test_decompression_bomb_is_a_broken_image_not_a_decode(tmp_path):
    from components.common.notes import load_image
    from components.validate.images import check_image

    p = tmp_path / "bomb.png"
    p.write_bytes(bomb_png(10_000, 7_000))  # 70 M pixels: under Pillow's default 89 M
    assert p.stat().st_size < 200_000
    problem, size, _ = check_image(str(p))
    assert problem == ("over data.max_image_pixels=64000000: 70000000 pixels (a decompression "
                       "bomb; refused undecoded)") and size is None, problem
    with pytest.raises(DataError, match="decompression bomb"):
        load_image(str(p))
    with warnings.catch_warnings():  # with Pillow's warning ignored: the explicit check
        warnings.simplefilter("ignore")
        assert check_image(str(p))[0] == ("over data.max_image_pixels=64000000: 70000000 "
                                          "pixels (10000x7000, a decompression bomb; refused "
                                          "undecoded)")
    # far over Pillow's own limit too: the same refusal, not Pillow's exception
    p.write_bytes(_claims(bomb_png(10, 10), 20_000, 20_000))
    assert check_image(str(p))[0].startswith("over data.max_image_pixels=64000000: ")


def test_image_limits_follow_the_settings(tmp_path):
    from components.common import notes
    from components.validate.images import check_image

    p = tmp_path / "x.png"
    p.write_bytes(image_bytes(size=(40, 30), fmt="PNG"))
    try:
        notes.configure_images(DataConfig(max_image_pixels=1000, max_image_bytes=10_000_000))
        assert Image.MAX_IMAGE_PIXELS == 1000
        assert "1200 pixels" in check_image(str(p))[0]
        notes.configure_images(DataConfig(max_image_bytes=50))
        assert "data.max_image_bytes=50" in check_image(str(p))[0]
    finally:
        notes.configure_images(DataConfig())
    assert check_image(str(p))[0] is None


def test_oversize_file_is_refused_without_reading_it(tmp_path):
    from components.common.notes import load_image
    from components.validate.images import check_image

    p = tmp_path / "big.jpg"
    with open(p, "wb") as f:
        f.write(image_bytes(fmt="JPEG"))
        f.truncate(33 * 1024 * 1024)  # a valid JPEG with 33 MiB of trailing zeros (sparse)
    problem = check_image(str(p))[0]
    assert problem == (f"over data.max_image_bytes={32 * 1024 * 1024}: {33 * 1024 * 1024} bytes "
                       "(refused unread)"), problem
    with pytest.raises(DataError, match="max_image_bytes"):
        load_image(str(p))


def test_bomb_counts_against_the_broken_image_tolerance(official_dir, tmp_path):
    with open(os.path.join(official_dir, "images_test", "img_t3"), "wb") as f:
        f.write(_claims(bomb_png(10, 10), 9_000, 8_000))
    canon = str(tmp_path / "canon")
    write_canonical(read_dataset(official_dir), canon)
    # (refused without the tolerance: the corpus case bomb_image)
    rep = run(canon, str(tmp_path / "r2"), DataConfig(max_broken_image_share=0.2))
    assert [d["note_id"] for d in rep.dropped] == ["t3"]
    assert "max_image_pixels" in rep.dropped[0]["problem"]


# -- 8c: image_uri of the canonical layout -----------------------------------------------------


def _canonical(root, uris):
    os.makedirs(root, exist_ok=True)
    pd.DataFrame({"note_id": [f"n{i}" for i in range(len(uris))], "title": "t", "content": "c",
                  "image_uri": uris}).to_parquet(os.path.join(root, "notes_train.parquet"))
    return str(root)


@pytest.mark.parametrize("uri,says", [
    ("../outside.png", "'..'"),
    ("images/../../outside.png", "'..'"),
    ("images\\..\\..\\outside.png", "'..'"),
    ("/etc/passwd", "outside the data folder"),
    ("http://169.254.169.254/x.jpg", "outside the data folder"),
    ("file:///etc/passwd", "outside the data folder"),
    ("gs://other-bucket/images/x.jpg", "outside the data folder"),
])
def test_image_uri_outside_the_folder_is_refused(tmp_path, uri, says):
    root = _canonical(tmp_path / "data", ["images/ok.png", uri])
    msg = _refused(root)
    assert msg.startswith("notes_train.parquet row 2, field 'image_uri': ") and says in msg, msg


def test_image_uri_inside_the_folder_is_accepted(tmp_path):
    root = str(tmp_path / "data")
    inside = os.path.join(root, "images", "b.png")
    ds = read_dataset(_canonical(root, ["images/a.png", inside, "./images/c.png", ""]))
    assert ds.notes["train"]["image_uri"].tolist() == [
        os.path.join(root, "images/a.png"), inside, os.path.join(root, "images/c.png"), ""]


def test_canonical_folder_written_by_ingest_is_accepted(official_dir, tmp_path):
    # its image_uri are absolute paths into the folder it was read from (its manifest's source)
    canon = str(tmp_path / "canon")
    write_canonical(read_dataset(official_dir), canon)
    back = read_dataset(canon)
    assert back.notes["train"]["image_uri"].iloc[0] == os.path.join(official_dir, "images",
                                                                     "img_a1")


# -- the corpus --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_official(tmp_path_factory) -> str:
    return write_official(str(tmp_path_factory.mktemp("valid") / "official"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_corpus_case_is_refused_by_its_layer(name, valid_official, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(valid_official, root)
    CASES[name](root)
    if LAYER[name] == "reader":
        msg = _refused(root)
    else:
        canon = str(tmp_path / "canon")
        write_canonical(read_dataset(root), canon)
        with pytest.raises(DataError) as e:
            run(canon, str(tmp_path / "report"), DataConfig())
        msg = str(e.value)
    assert re.search(EXPECT[name], msg, re.S), msg


def test_corpus_builders_leave_a_readable_folder_when_not_applied(valid_official, tmp_path):
    # the untouched copy is valid: each case's refusal is its own corruption
    root = str(tmp_path / "data")
    shutil.copytree(valid_official, root)
    ds = read_dataset(root)
    assert len(ds.notes["train"]) == 5
