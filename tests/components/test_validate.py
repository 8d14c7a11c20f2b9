import os

import pytest

from components.common.canonical import load_canonical
from components.common.config import DataConfig
from components.common.readers import read_dataset, write_canonical
from components.common.schema import DataError
from components.validate.run import check_image, run
from tests.conftest import image_bytes


def _validate(data_dir, tmp_path, cfg=DataConfig()):
    canon = str(tmp_path / "canon")
    write_canonical(read_dataset(data_dir), canon)
    return run(canon, str(tmp_path / "report"), cfg)


def test_good_data_passes(official_dir, tmp_path):
    rep = _validate(official_dir, tmp_path)
    assert not rep.errors
    assert rep.stats["images checked"] == 7
    assert os.path.exists(tmp_path / "report" / "summary.md")


def test_unknown_pair_id_is_named(official_dir, tmp_path):
    with open(os.path.join(official_dir, "note_pairs_train.csv"), "a") as f:
        f.write("\na1,nosuchnote\n")
    with pytest.raises(DataError) as e:
        _validate(official_dir, tmp_path)
    assert "note_pairs_train.csv row 3, field 'noteid2': unknown note id 'nosuchnote'" in str(e.value)


def test_test_pair_must_name_a_test_note(official_dir, tmp_path):
    with open(os.path.join(official_dir, "note_pairs_test.csv"), "a") as f:
        f.write("t3,a1\n")
    with pytest.raises(DataError, match="not in notes_test"):
        _validate(official_dir, tmp_path)


def test_duplicate_note_id_names_both_rows(official_dir, tmp_path):
    with open(os.path.join(official_dir, "notes_test.csv"), "a") as f:
        f.write("t1,again,dup,img_t1,X@\n")
    with pytest.raises(DataError) as e:
        _validate(official_dir, tmp_path)
    msg = str(e.value)
    assert "notes_test.csv row 1; notes_test.csv row 4, field 'noteid'" in msg and "'t1'" in msg


@pytest.mark.parametrize("content, problem", [
    (b"", "empty file"),
    (image_bytes(fmt="JPEG", size=(64, 64))[:300], "cannot be decoded"),
    (b"hello, I am text pretending to be an image", "not an image"),
])
def test_broken_images_are_caught(official_dir, tmp_path, content, problem):
    with open(os.path.join(official_dir, "images_test", "img_t2"), "wb") as f:
        f.write(content)
    with pytest.raises(DataError) as e:
        _validate(official_dir, tmp_path)
    msg = str(e.value)
    assert "notes_test.csv row 2, field 'imgid'" in msg and problem in msg


def test_missing_image_and_tolerance(official_dir, tmp_path):
    os.remove(os.path.join(official_dir, "images_test", "img_t3"))
    with pytest.raises(DataError, match=r"notes_test.csv row 3, field 'imgid': no image file"):
        _validate(official_dir, tmp_path)
    rep = _validate(official_dir, tmp_path / "tolerant", DataConfig(max_broken_image_share=0.5))
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
