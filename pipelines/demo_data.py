"""A synthetic multimodal note collection whose relations are only partly visible in the text.

Every related pair is of one kind:

* ``both`` — the second note's picture is a perturbed copy of the first's (same scene, shapes
  moved, resized and recoloured a little, noise) *and* its text reuses the first's distinctive
  words and topic tag;
* ``image_only`` — same underlying picture, unrelated texts;
* ``text_only`` — shared wording, unrelated pictures.

Default proportions are 40 % / 30 % / 30 % (``KINDS``). A text-only model can find at most the
``both`` and ``text_only`` partners, so ``slice/image_only_pairs/R@K`` shows whether a model uses
the images. About 10 % of the notes are unpaired distractors.

Written in the official NoteLLM layout (headerless CSV, inline ``#topic[话题]#`` tags, images
named by ``imgid`` without extension in WebP, JPEG or PNG) plus ``events.csv``: view → click
sessions from which the training pairs can be mined, with noise. Deterministic per seed.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
from PIL import Image, ImageDraw

KINDS = (("both", 0.4), ("image_only", 0.3), ("text_only", 0.3))
IMAGE_SIZE = 96
FORMATS = ("WEBP", "JPEG", "PNG")

THEMES = {
    "Food": (["noodles", "dumplings", "cake", "coffee", "hotpot", "bread", "tea", "salad"],
             ["spicy", "sweet", "crispy", "homemade", "fresh", "warm"], "Food@Recipes@"),
    "Travel": (["beach", "mountain", "old town", "lake", "temple", "island", "market"],
               ["quiet", "sunny", "hidden", "famous", "misty", "wild"], "Travel@Trips@"),
    "Pets": (["kitten", "puppy", "bunny", "parrot", "hamster", "goldfish"],
             ["fluffy", "sleepy", "naughty", "tiny", "clever", "shy"], "Pets@Daily@"),
    "Fashion": (["jacket", "dress", "sneakers", "scarf", "handbag", "hat"],
                ["vintage", "minimal", "cozy", "bright", "classic", "oversized"], "Fashion@Outfits@"),
    "Home": (["living room", "balcony", "desk", "kitchen", "bookshelf", "lamp"],
             ["tidy", "small", "bright", "wooden", "green", "soft"], "Home@Decor@"),
    "Fitness": (["run", "yoga", "workout", "hike", "swim", "stretch"],
                ["morning", "easy", "hard", "daily", "short", "long"], "Sports@Fitness@"),
}
OPENERS = ["Today I tried", "Sharing my", "Look at this", "Finally found a", "My favourite",
           "Quick note on a"]
FILLERS = ["Totally worth it.", "Would do it again.", "Saving this for later.",
           "Friends loved it too.", "Not bad at all.", "Tell me what you think!"]
SYLLABLES = ["ka", "lo", "mi", "ren", "su", "ta", "vo", "zen", "ri", "po", "lan", "qi", "mu",
             "xi", "da", "fen", "ho", "ju", "ne", "wu"]
SHAPES = ("circle", "square", "triangle", "bar", "ring")


@dataclass
class Scene:
    background: tuple[int, int, int]
    shapes: list[tuple[str, tuple[int, int, int], float, float, float]] = field(
        default_factory=list)  # (kind, rgb, cx, cy, size) with positions/sizes in [0, 1]


@dataclass
class Text:
    theme: str
    keywords: list[str]  # distinctive invented names; shared by text-related notes
    tag: str  # distinctive topic tag
    title: str
    content: str
    topics: list[str]


def _rgb(rng) -> tuple[int, int, int]:
    return tuple(int(x) for x in rng.integers(0, 256, 3))


def random_scene(rng) -> Scene:
    scene = Scene(background=_rgb(rng))
    for _ in range(int(rng.integers(2, 5))):
        scene.shapes.append((SHAPES[int(rng.integers(len(SHAPES)))], _rgb(rng),
                             float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8)),
                             float(rng.uniform(0.18, 0.4))))
    return scene


def perturb_scene(scene: Scene, rng) -> Scene:
    """The same picture taken again: shapes nudged and resized, colours shifted slightly."""

    def shift(c):
        return tuple(int(np.clip(v + rng.integers(-18, 19), 0, 255)) for v in c)

    return Scene(background=shift(scene.background), shapes=[
        (k, shift(c), float(np.clip(x + rng.normal(0, 0.04), 0.1, 0.9)),
         float(np.clip(y + rng.normal(0, 0.04), 0.1, 0.9)), s * float(rng.uniform(0.9, 1.1)))
        for k, c, x, y, s in scene.shapes])


def render(scene: Scene, rng, size: int = IMAGE_SIZE) -> Image.Image:
    im = Image.new("RGB", (size, size), scene.background)
    d = ImageDraw.Draw(im)
    for kind, color, cx, cy, s in scene.shapes:
        x, y, r = cx * size, cy * size, s * size / 2
        box = [x - r, y - r, x + r, y + r]
        if kind == "circle":
            d.ellipse(box, fill=color)
        elif kind == "square":
            d.rectangle(box, fill=color)
        elif kind == "triangle":
            d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color)
        elif kind == "bar":
            d.rectangle([x - r, y - r / 3, x + r, y + r / 3], fill=color)
        else:
            d.ellipse(box, outline=color, width=max(2, int(r / 3)))
    noise = rng.normal(0, 6, (size, size, 3))
    arr = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _name(rng) -> str:
    return "".join(SYLLABLES[int(i)] for i in rng.integers(0, len(SYLLABLES), 3)).capitalize()


def random_text(rng, keywords: list[str] | None = None, tag: str | None = None,
                theme: str | None = None) -> Text:
    theme = theme or list(THEMES)[int(rng.integers(len(THEMES)))]
    nouns, adjs, _ = THEMES[theme]
    keywords = keywords or [_name(rng), _name(rng)]
    tag = tag or _name(rng)
    noun, adj = nouns[int(rng.integers(len(nouns)))], adjs[int(rng.integers(len(adjs)))]
    # the distinctive name first: titles are cut at 20 characters by the prompt (paper recipe)
    title = f"{keywords[0]} {noun}"
    content = (f"{OPENERS[int(rng.integers(len(OPENERS)))]} {adj} {noun} near {keywords[1]}. "
               f"{FILLERS[int(rng.integers(len(FILLERS)))]}")
    topics = [theme, tag]
    return Text(theme, keywords, tag, title, content, topics)


def related_text(text: Text, rng) -> Text:
    """Shared wording: the same distinctive names and tag, other everyday words."""
    return random_text(rng, keywords=list(reversed(text.keywords)), tag=text.tag, theme=text.theme)


def _content_with_tags(text: Text) -> str:
    return text.content + " " + " ".join(f"#{t}[话题]#" for t in text.topics)


def parse_kinds(spec: str) -> tuple[tuple[str, float], ...]:
    """``"both=0.4,image_only=0.3,text_only=0.3"`` -> the ``kinds`` of :func:`make_demo_data`."""
    known = {k for k, _ in KINDS}
    kinds = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        name, _, share = item.partition("=")
        if name not in known:
            raise ValueError(f"unknown pair kind {name!r} in --kinds; known: {', '.join(sorted(known))}")
        try:
            kinds.append((name, float(share)))
        except ValueError:
            raise ValueError(f"--kinds: the share of {name!r} is not a number: {share!r}") from None
    if not kinds or any(v < 0 for _, v in kinds) or sum(v for _, v in kinds) <= 0:
        raise ValueError(f"--kinds needs non-negative shares that add up to more than 0: {spec!r}")
    total = sum(v for _, v in kinds)
    return tuple((k, v / total) for k, v in kinds)


def make_demo_data(out: str, notes: int = 1200, seed: int = 0, test_share: float = 0.35,
                   val_share: float = 0.1, distractor_share: float = 0.1,
                   image_size: int = IMAGE_SIZE, kinds: tuple[tuple[str, float], ...] = KINDS,
                   one_modality_distractors: bool = False) -> dict[str, int]:
    """Write the demo collection to ``out``; returns counts.

    ``kinds``: the share of each pair kind. ``one_modality_distractors``: every pair's first
    note also gets two look-alikes in its split that match it in one modality only (a new shot
    of its picture under unrelated words, its wording under an unrelated picture), so that the
    partner is the only note matching it in both: a test of whether a vector adds up the
    evidence of the two modalities (with ``kinds=(("both", 1.0),)``). They are ``notes`` on
    top of ``notes``."""
    if notes < 8:
        raise ValueError("--notes must be at least 8")
    rng = np.random.default_rng(seed)
    n_pairs = int(notes * (1 - distractor_share)) // 2
    n_distract = notes - 2 * n_pairs
    n_test_pairs = max(1, round(n_pairs * test_share))
    shares = kinds
    kinds = []
    for name, share in shares:
        kinds += [name] * round(n_pairs * share)
    kinds = (kinds + [shares[0][0]] * n_pairs)[:n_pairs]
    kinds = [kinds[i] for i in rng.permutation(n_pairs)]

    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "images_test"), exist_ok=True)
    rows = {"train": [], "test": []}
    pairs: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    kind_pairs: dict[str, list[tuple[str, str]]] = {k: [] for k, _ in shares}
    look_alikes = 0
    counter = {"train": 0, "test": 0}

    def add_note(split: str, scene: Scene, text: Text) -> str:
        i = counter[split]
        counter[split] += 1
        prefix = "n" if split == "train" else "t"
        note_id, imgid = f"{prefix}{i:06d}", f"{prefix}img{i:06d}"
        fmt = FORMATS[(i + (split == "test")) % len(FORMATS)]
        folder = "images" if split == "train" else "images_test"
        buf = io.BytesIO()
        render(scene, rng, image_size).save(buf, format=fmt, quality=90)
        with open(os.path.join(out, folder, imgid), "wb") as f:
            f.write(buf.getvalue())
        l1, l2 = THEMES[text.theme][2].split("@")[:2]
        rows[split].append([note_id, text.title, _content_with_tags(text), imgid, f"{l1}@{l2}@"])
        return note_id

    for p, kind in enumerate(kinds):
        split = "test" if p >= n_pairs - n_test_pairs else "train"
        scene_a, text_a = random_scene(rng), random_text(rng)
        scene_b = perturb_scene(scene_a, rng) if kind in ("both", "image_only") else random_scene(rng)
        text_b = related_text(text_a, rng) if kind in ("both", "text_only") else random_text(rng)
        a = add_note(split, scene_a, text_a)
        b = add_note(split, scene_b, text_b)
        pairs[split].append((a, b))
        if split == "test":
            kind_pairs[kind].append((a, b))
        if one_modality_distractors:
            add_note(split, perturb_scene(scene_a, rng), random_text(rng))
            add_note(split, random_scene(rng), related_text(text_a, rng))
            look_alikes += 2
    for j in range(n_distract):
        add_note("test" if j % 2 else "train", random_scene(rng), random_text(rng))

    def write_csv(name: str, data: list[list[str]] | list[tuple[str, str]]) -> None:
        with open(os.path.join(out, name), "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(data)

    write_csv("notes_train.csv", rows["train"])
    write_csv("notes_test.csv", rows["test"])
    n_val = int(len(pairs["train"]) * val_share)
    write_csv("note_pairs_train.csv", pairs["train"][n_val:])
    write_csv("note_pairs_val.csv", pairs["train"][:n_val])
    write_csv("note_pairs_test.csv", pairs["test"])
    for kind, kp in kind_pairs.items():
        write_csv(f"note_pairs_test_{kind}_pairs.csv", kp)
    n_events = _write_events(out, pairs, rows, rng)
    return {"notes_train": len(rows["train"]), "notes_test": len(rows["test"]),
            "pairs_train": len(pairs["train"]) - n_val, "pairs_val": n_val,
            "pairs_test": len(pairs["test"]), "events": n_events,
            **({"one_modality_look_alikes": look_alikes} if one_modality_distractors else {}),
            **{f"pairs_test_{k}": len(v) for k, v in kind_pairs.items()}}


def _write_events(out: str, pairs, rows, rng) -> int:
    """Sessions: a user views A, then clicks its partner B within minutes; plus random noise.
    Test pairs happen after every train pair, so a time cut-off separates them."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    events = []
    all_ids = [r[0] for r in rows["train"]] + [r[0] for r in rows["test"]]
    t = start
    n_users = max(20, len(all_ids) // 4)
    for split in ("train", "test"):
        for a, b in pairs[split]:
            for _ in range(int(rng.integers(2, 5))):
                user = f"u{int(rng.integers(n_users)):05d}"
                t += timedelta(seconds=int(rng.integers(30, 600)))
                events.append((user, a, "view", t))
                events.append((user, b, "click", t + timedelta(seconds=int(rng.integers(5, 120)))))
                if rng.random() < 0.3:  # noise inside the session
                    other = all_ids[int(rng.integers(len(all_ids)))]
                    events.append((user, other, "view",
                                   t + timedelta(seconds=int(rng.integers(5, 120)))))
    events.sort(key=lambda e: e[3])
    with open(os.path.join(out, "events.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "note_id", "event", "ts"])
        w.writerows((u, n, e, ts.isoformat()) for u, n, e, ts in events)
    return len(events)
