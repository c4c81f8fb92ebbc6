"""The built-in perception task: coloured shapes on a plain background, questions that need the image.

Every row is a small PNG with one or more coloured shapes and a question about it whose answer is
one word (a colour, a shape or a digit). Without looking at the image a model can only guess, so the
task measures (and rewards) perception; it is small enough for a tiny model to learn part of it on CPU.

    python -m mtrl.utils.shapes_task --out outputs/shapes --train 2000 --val 200 --seed 0 \
        [--difficulty easy|medium|hard] [--image-size 56]

writes (SPEC section 7 format, image paths relative to the output folder, which is the image_dir)::

    DIR/train.jsonl   {"prompt": "<image>What colour is the circle? Answer with one word.",
                       "answer": "red", "images": ["images/train_00000.png"], "question_type": "colour"}
    DIR/val.jsonl
    DIR/images/train_00000.png ...
    DIR/task.json     how it was made (difficulty, seed, sizes, counts)

Difficulties (`DIFFICULTIES`; every knob is a field of `Difficulty`):

* ``easy``: one shape (circle / square / triangle) in red / green / blue, 56x56, one question type
  ("What colour is the <shape>?"). Chance accuracy 1/3.
* ``medium``: one to three shapes of four kinds in five colours, 84x84, questions about colour,
  shape ("What shape is the <colour> one?") and counting ("How many <shape>s are there?").
* ``hard``: two to five shapes of six kinds in seven colours, 112x112, all of the above plus
  "Which is further left, the <shape> or the <shape>?".

Determinism: row ``i`` of split ``s`` is drawn from its own RNG seeded with ``(seed, s, i)``, so the
same arguments give byte-identical files (same Pillow version), and row ``i`` does not depend on how
many rows are generated. Shapes sit in distinct cells of a grid, so they never overlap and "left of"
is only asked about shapes in different columns.

Public API: `DIFFICULTIES`, `Difficulty`, `generate_task`, `ensure_task`, `task_corpus`,
`answer_vocabulary`, `render_example`, `main` (the CLI).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw

__all__ = ["DIFFICULTIES", "Difficulty", "Scene", "generate_task", "ensure_task", "task_corpus",
           "answer_vocabulary", "render_example", "main"]

#: Bumped when the generator's output changes, recorded in task.json.
TASK_VERSION = 1

#: RGB of every colour a difficulty may use (saturated, far apart, none close to the white background).
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
    "black": (20, 20, 20),
}

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "hexagon")

QUESTION_TYPES: Tuple[str, ...] = ("colour", "shape", "count", "left_of")

#: Appended to every question: answers are always a single word.
INSTRUCTION = "Answer with one word."

_DIGITS = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class Difficulty:
    """Every knob of the task. `image_size` is the default; `generate_task(image_size=...)` overrides it."""

    name: str
    image_size: int
    min_shapes: int
    max_shapes: int
    shapes: Tuple[str, ...]
    colours: Tuple[str, ...]
    question_types: Tuple[str, ...]
    grid: Tuple[int, int]  # (columns, rows) of placement cells; at least max_shapes cells
    background: Tuple[int, int, int] = (255, 255, 255)

    def validate(self) -> None:
        if not 1 <= self.min_shapes <= self.max_shapes <= self.grid[0] * self.grid[1]:
            raise ValueError(f"difficulty {self.name!r}: need 1 <= min_shapes <= max_shapes <= grid cells")
        unknown = (set(self.shapes) - set(SHAPES)) | (set(self.colours) - set(COLOURS)) | (
            set(self.question_types) - set(QUESTION_TYPES))
        if unknown:
            raise ValueError(f"difficulty {self.name!r}: unknown shapes/colours/question types {sorted(unknown)}")
        if "left_of" in self.question_types and (self.max_shapes < 2 or self.grid[0] < 2):
            raise ValueError(f"difficulty {self.name!r}: left_of questions need 2+ shapes and 2+ grid columns")


DIFFICULTIES: Dict[str, Difficulty] = {
    "easy": Difficulty("easy", image_size=56, min_shapes=1, max_shapes=1, shapes=("circle", "square", "triangle"),
                       colours=("red", "green", "blue"), question_types=("colour",), grid=(1, 1)),
    "medium": Difficulty("medium", image_size=84, min_shapes=1, max_shapes=3,
                         shapes=("circle", "square", "triangle", "diamond"),
                         colours=("red", "green", "blue", "yellow", "purple"),
                         question_types=("colour", "shape", "count"), grid=(2, 2)),
    "hard": Difficulty("hard", image_size=112, min_shapes=2, max_shapes=5, shapes=SHAPES,
                       colours=tuple(COLOURS), question_types=QUESTION_TYPES, grid=(3, 2)),
}


def get_difficulty(difficulty) -> Difficulty:
    if isinstance(difficulty, Difficulty):
        difficulty.validate()
        return difficulty
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; choose one of {sorted(DIFFICULTIES)}")
    return DIFFICULTIES[difficulty]


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class ShapeSpec:
    kind: str
    colour: str
    cx: float  # centre and radius, as fractions of the image size (resolution independent)
    cy: float
    r: float
    column: int
    rotation: float = 0.0


@dataclass(frozen=True)
class Scene:
    shapes: Tuple[ShapeSpec, ...]


def _sample_scene(rng: random.Random, d: Difficulty) -> Scene:
    """Shapes in distinct grid cells, each centred with some jitter and a random size inside its cell."""
    cols, rows = d.grid
    n = rng.randint(d.min_shapes, d.max_shapes)
    cells = rng.sample(range(cols * rows), n)
    shapes = []
    for cell in cells:
        col, row = cell % cols, cell // cols
        cw, ch = 1.0 / cols, 1.0 / rows
        r = rng.uniform(0.30, 0.42) * min(cw, ch)  # radius; the margin keeps shapes inside their cell
        slack_x, slack_y = cw / 2 - r, ch / 2 - r
        cx = (col + 0.5) * cw + rng.uniform(-slack_x, slack_x) * 0.8
        cy = (row + 0.5) * ch + rng.uniform(-slack_y, slack_y) * 0.8
        shapes.append(ShapeSpec(rng.choice(d.shapes), rng.choice(d.colours), cx, cy, r, col,
                                rotation=rng.uniform(-15.0, 15.0)))
    return Scene(tuple(shapes))


def _plural(kind: str) -> str:
    return kind + "s"


def _unique(values: Sequence[str]) -> List[str]:
    """Values that occur exactly once, in first-seen order."""
    return [v for v in dict.fromkeys(values) if values.count(v) == 1]


def _question(rng: random.Random, scene: Scene, d: Difficulty, qtype: str) -> Optional[Tuple[str, str]]:
    """(question, answer) of type `qtype` that is well defined for `scene`, or None if there is none."""
    kinds = [s.kind for s in scene.shapes]
    colours = [s.colour for s in scene.shapes]
    if qtype == "colour":  # the named shape kind must be unique in the picture
        options = _unique(kinds)
        if not options:
            return None
        kind = rng.choice(options)
        return f"What colour is the {kind}?", colours[kinds.index(kind)]
    if qtype == "shape":  # the named colour must be unique in the picture
        options = _unique(colours)
        if not options:
            return None
        colour = rng.choice(options)
        return f"What shape is the {colour} one?", kinds[colours.index(colour)]
    if qtype == "count":  # mostly a kind that is present (else "0" would dominate), sometimes any kind
        kind = rng.choice(kinds) if rng.random() < 0.75 else rng.choice(d.shapes)
        return f"How many {_plural(kind)} are there?", str(kinds.count(kind))
    if qtype == "left_of":  # two uniquely named shapes in different grid columns
        unique = set(_unique(kinds))
        pairs = [(a, b) for a in scene.shapes for b in scene.shapes
                 if a.kind in unique and b.kind in unique and a.column < b.column]
        if not pairs:
            return None
        left, right = rng.choice(pairs)
        first, second = (left, right) if rng.random() < 0.5 else (right, left)
        return f"Which is further left, the {first.kind} or the {second.kind}?", left.kind
    raise ValueError(f"unknown question type {qtype!r}")


def sample_example(rng: random.Random, d: Difficulty) -> Tuple[Scene, str, str, str]:
    """(scene, question type, question, answer), resampling the scene until the question is defined."""
    qtype = rng.choice(d.question_types)
    for _ in range(1000):
        scene = _sample_scene(rng, d)
        qa = _question(rng, scene, d, qtype)
        if qa is not None:
            return scene, qtype, qa[0], qa[1]
    raise RuntimeError(f"difficulty {d.name!r} cannot pose {qtype!r} questions (no valid scene in 1000 tries)")


# ----------------------------------------------------------------------------- drawing


def _regular_polygon(cx: float, cy: float, r: float, sides: int, rotation_deg: float) -> List[Tuple[float, float]]:
    start = math.radians(rotation_deg) - math.pi / 2  # first vertex points up
    return [(cx + r * math.cos(start + 2 * math.pi * k / sides), cy + r * math.sin(start + 2 * math.pi * k / sides))
            for k in range(sides)]


def _star(cx: float, cy: float, r: float, rotation_deg: float) -> List[Tuple[float, float]]:
    start = math.radians(rotation_deg) - math.pi / 2
    return [(cx + rr * math.cos(start + math.pi * k / 5), cy + rr * math.sin(start + math.pi * k / 5))
            for k, rr in zip(range(10), [r, r * 0.45] * 5)]


def _draw_shape(draw: ImageDraw.ImageDraw, s: ShapeSpec, size: int) -> None:
    cx, cy, r = s.cx * size, s.cy * size, s.r * size
    fill = COLOURS[s.colour]
    if s.kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif s.kind == "square":  # axis-aligned, so it never looks like a diamond
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif s.kind == "triangle":
        draw.polygon(_regular_polygon(cx, cy + r * 0.15, r, 3, s.rotation), fill=fill)
    elif s.kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=fill)
    elif s.kind == "star":
        draw.polygon(_star(cx, cy, r, s.rotation), fill=fill)
    elif s.kind == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, 30.0), fill=fill)
    else:
        raise ValueError(f"unknown shape {s.kind!r}")


def render_scene(scene: Scene, size: int, background: Tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        _draw_shape(draw, s, size)
    return image


def render_example(seed: int, split: str, index: int, difficulty="easy",
                   image_size: Optional[int] = None) -> Tuple[Image.Image, Dict[str, str]]:
    """Row `index` of `split`: (image, {"prompt", "answer", "question_type"}). Pure function of its arguments."""
    d = get_difficulty(difficulty)
    rng = random.Random(f"mtrl-shapes:{seed}:{split}:{index}")  # str seeds hash deterministically (sha512)
    scene, qtype, question, answer = sample_example(rng, d)
    image = render_scene(scene, image_size or d.image_size, d.background)
    return image, {"prompt": f"<image>{question} {INSTRUCTION}", "answer": answer, "question_type": qtype}


# ----------------------------------------------------------------------------- writing


def _write_split(out_dir: str, split: str, n: int, seed: int, d: Difficulty, image_size: int) -> None:
    width = max(5, len(str(max(n - 1, 0))))
    with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as f:
        for i in range(n):
            image, row = render_example(seed, split, i, d, image_size)
            rel = f"images/{split}_{i:0{width}d}.png"
            image.save(os.path.join(out_dir, rel), format="PNG")  # no metadata: same bytes every time
            f.write(json.dumps({"prompt": row["prompt"], "answer": row["answer"], "images": [rel],
                                "question_type": row["question_type"]}) + "\n")


def _write_task(out_dir: str, n_train: int, n_val: int, seed: int, d: Difficulty, image_size: int) -> None:
    """Everything into the (existing, empty) folder `out_dir`."""
    os.makedirs(os.path.join(out_dir, "images"))
    _write_split(out_dir, "train", n_train, seed, d, image_size)
    _write_split(out_dir, "val", n_val, seed, d, image_size)
    info = {"task": "shapes", "version": TASK_VERSION, "seed": seed, "n_train": n_train, "n_val": n_val,
            "image_size": image_size, "difficulty": asdict(d)}
    with open(os.path.join(out_dir, "task.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)


_TASK_FILES = ("images", "task.json", "val.jsonl", "train.jsonl")  # move order: train.jsonl (the marker) last


def is_complete(out_dir: str) -> bool:
    return all(os.path.exists(os.path.join(out_dir, name)) for name in _TASK_FILES)


def _publish(tmp: str, out_dir: str) -> None:
    """Move the finished task from `tmp` to `out_dir` so readers never see a half-written task.

    A missing or empty `out_dir` is replaced with one rename. Into a folder that already holds other
    things (an older task, a run directory) the task's entries are moved one by one, replacing older
    ones, `train.jsonl` last since `is_complete` looks for it.
    """
    try:
        os.rename(tmp, out_dir)  # atomic; works when out_dir is missing or an empty folder
        return
    except OSError:
        if not os.path.isdir(out_dir):
            raise
    for name in _TASK_FILES:
        target = os.path.join(out_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(tmp, name), target)
    shutil.rmtree(tmp, ignore_errors=True)


def generate_task(out_dir: str, n_train: int = 2000, n_val: int = 200, seed: int = 0, difficulty="easy",
                  image_size: Optional[int] = None) -> str:
    """Write the task into `out_dir` (replacing an existing one there); returns `out_dir`.

    Built in a temporary sibling folder, then moved into place (see `_publish`).
    """
    d = get_difficulty(difficulty)
    image_size = int(image_size or d.image_size)
    if n_train < 0 or n_val < 0 or image_size < 8:
        raise ValueError(f"need n_train, n_val >= 0 and image_size >= 8 (got {n_train}, {n_val}, {image_size})")
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        _write_task(tmp, n_train, n_val, seed, d, image_size)
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_task(out_dir: str, n_train: int = 2000, n_val: int = 200, seed: int = 0, difficulty="easy",
                image_size: Optional[int] = None) -> str:
    """Generate the task into `out_dir` unless a complete one is already there; returns `out_dir`.

    An existing task is kept as is even if it was made with other arguments (its `task.json` says how).
    Safe against interruption: a half-built task only ever exists in a temporary folder.
    """
    if is_complete(out_dir):
        return out_dir
    return generate_task(out_dir, n_train=n_train, n_val=n_val, seed=seed, difficulty=difficulty,
                         image_size=image_size)


# ----------------------------------------------------------------------------- vocabulary


def _difficulties(difficulty) -> List[Difficulty]:
    return list(DIFFICULTIES.values()) if difficulty is None else [get_difficulty(difficulty)]


def answer_vocabulary(difficulty=None) -> List[str]:
    """Every possible answer (all difficulties when None), sorted."""
    answers = set()
    for d in _difficulties(difficulty):
        if "colour" in d.question_types:
            answers.update(d.colours)
        if {"shape", "left_of"} & set(d.question_types):
            answers.update(d.shapes)
        if "count" in d.question_types:
            answers.update(_DIGITS[:d.max_shapes + 1])
    return sorted(answers)


def task_corpus(difficulty=None) -> List[str]:
    """Every question, answer and instruction string the task can produce (all difficulties when None).

    Meant for training the tiny model's BPE tokenizer, so the task's words become single tokens.
    Deterministic order.
    """
    lines: List[str] = [INSTRUCTION, "<image>"]
    for d in _difficulties(difficulty):
        for qtype in d.question_types:
            if qtype == "colour":
                lines += [f"What colour is the {k}? {INSTRUCTION}" for k in d.shapes]
            elif qtype == "shape":
                lines += [f"What shape is the {c} one? {INSTRUCTION}" for c in d.colours]
            elif qtype == "count":
                lines += [f"How many {_plural(k)} are there? {INSTRUCTION}" for k in d.shapes]
            elif qtype == "left_of":
                lines += [f"Which is further left, the {a} or the {b}? {INSTRUCTION}"
                          for a in d.shapes for b in d.shapes if a != b]
        lines += answer_vocabulary(d)
    return list(dict.fromkeys(lines))


# ----------------------------------------------------------------------------- preference pairs


def wrong_answers(row: Dict[str, str], difficulty) -> List[str]:
    """Plausible wrong answers to a task row: the other colours / shapes / counts, or the other shape of a
    left_of question."""
    d = get_difficulty(difficulty)
    qtype, answer = row.get("question_type", "colour"), str(row["answer"])
    if qtype == "colour":
        options = list(d.colours)
    elif qtype == "shape":
        options = list(d.shapes)
    elif qtype == "count":
        options = list(_DIGITS[:d.max_shapes + 1])
    else:
        options = [k for k in d.shapes if f"the {k} " in row["prompt"] or f"the {k}?" in row["prompt"]]
    return [o for o in options if o != answer]


def write_preference_pairs(task_dir: str, split: str = "train", out_path: Optional[str] = None,
                           seed: int = 0) -> str:
    """`{split}_pairs.jsonl` beside the task: one pair per row of `{split}.jsonl`, chosen = the right answer,
    rejected = a wrong one drawn with a generator seeded by (seed, row): reward-model / DPO data whose
    preference needs the image."""
    with open(os.path.join(task_dir, "task.json"), encoding="utf-8") as f:
        info = json.load(f)
    d = Difficulty(**{**info["difficulty"], **{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in info["difficulty"].items()}})
    out_path = out_path or os.path.join(task_dir, f"{split}_pairs.jsonl")
    tmp = out_path + ".tmp"
    with open(os.path.join(task_dir, f"{split}.jsonl"), encoding="utf-8") as src, \
            open(tmp, "w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            row = json.loads(line)
            wrong = wrong_answers(row, d)
            if not wrong:
                continue
            rejected = random.Random(f"{seed}:{split}:{i}").choice(wrong)
            dst.write(json.dumps({"prompt": row["prompt"], "chosen": row["answer"], "rejected": rejected,
                                  "images": row["images"], "question_type": row.get("question_type")}) + "\n")
    os.replace(tmp, out_path)
    return out_path


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mtrl.utils.shapes_task", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (also the image_dir of the rows)")
    p.add_argument("--train", type=int, default=2000, help="number of training rows")
    p.add_argument("--val", type=int, default=200, help="number of validation rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", choices=sorted(DIFFICULTIES), default="easy")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: per difficulty)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    out = generate_task(args.out, n_train=args.train, n_val=args.val, seed=args.seed, difficulty=args.difficulty,
                        image_size=args.image_size)
    print(f"wrote {args.train} train + {args.val} val rows ({args.difficulty}) to {out} "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
