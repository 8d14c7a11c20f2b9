import csv
import hashlib
import os
from collections import defaultdict

import numpy as np
from PIL import Image

from pipelines.demo_data import make_demo_data


def _digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return [r for r in csv.reader(f) if r]


def test_same_seed_same_bytes(tmp_path):
    make_demo_data(str(tmp_path / "a"), notes=60, seed=7)
    make_demo_data(str(tmp_path / "b"), notes=60, seed=7)
    make_demo_data(str(tmp_path / "c"), notes=60, seed=8)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_pair_kinds_show_in_the_right_modality(demo_dir):
    notes = {r[0]: r for name in ("notes_train.csv", "notes_test.csv")
             for r in _rows(os.path.join(demo_dir, name))}

    def words(nid):
        _, title, content, _, _ = notes[nid]
        return {w.strip(".,!#") for w in (title + " " + content).replace("[话题]", " ").split()
                if w[:1].isupper()}

    def pixels(nid):
        folder = "images" if nid.startswith("n") else "images_test"
        with Image.open(os.path.join(demo_dir, folder, notes[nid][3])) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float32)

    def image_distance(a, b):
        return float(np.abs(pixels(a) - pixels(b)).mean())

    kinds = {k: _rows(os.path.join(demo_dir, f"note_pairs_test_{k}_pairs.csv"))
             for k in ("both", "image_only", "text_only")}
    assert all(kinds.values())
    all_test = [r[0] for r in _rows(os.path.join(demo_dir, "notes_test.csv"))]
    rng = np.random.default_rng(0)
    random_dist = np.mean([image_distance(*rng.choice(all_test, 2, replace=False))
                           for _ in range(20)])
    for kind, pairs in kinds.items():
        for a, b in pairs:
            shared_words = len((words(a) & words(b)) - {"Note", "Today", "Look", "My", "Sharing",
                                                        "Finally", "Quick", "Friends", "Would",
                                                        "Totally", "Saving", "Not", "Tell"})
            close = image_distance(a, b) < 0.5 * random_dist
            assert (shared_words >= 2) == (kind in ("both", "text_only")), (kind, a, b)
            assert close == (kind in ("both", "image_only")), (kind, a, b)


def test_events_contain_the_training_pairs(demo_dir):
    events = _rows(os.path.join(demo_dir, "events.csv"))
    assert events[0] == ["user_id", "note_id", "event", "ts"]
    by_user = defaultdict(list)
    for user, note, event, ts in events[1:]:
        by_user[user].append((ts, note, event))
    view_click = set()
    for seq in by_user.values():
        seq.sort()
        for (_, n1, e1), (_, n2, e2) in zip(seq, seq[1:], strict=False):
            if e1 == "view" and e2 == "click":
                view_click.add((n1, n2))
    train = {tuple(r) for r in _rows(os.path.join(demo_dir, "note_pairs_train.csv"))}
    assert len(train & view_click) / len(train) > 0.9


def test_official_layout_files(demo_dir):
    names = set(os.listdir(demo_dir))
    assert {"notes_train.csv", "notes_test.csv", "note_pairs_train.csv", "note_pairs_val.csv",
            "note_pairs_test.csv", "images", "images_test", "events.csv"} <= names
    first = _rows(os.path.join(demo_dir, "notes_train.csv"))[0]
    assert len(first) == 5 and "[话题]#" in first[2]
    assert not os.path.splitext(first[3])[1]  # imgid without extension
    formats = set()
    for f in sorted(os.listdir(os.path.join(demo_dir, "images")))[:6]:
        with Image.open(os.path.join(demo_dir, "images", f)) as im:
            formats.add(im.format)
    assert formats == {"WEBP", "JPEG", "PNG"}
