"""ShapesWorld: seeded scenes of coloured shapes on a 3x3 grid, built to fail the way real VLMs fail.

- Ten object types; each colour has one shape, so a description names objects unambiguously.
- Co-occurrence bias: three companion pairs appear together 80% of the time; the second member of a pair is
  often drawn faint; and when a partner is absent, 20% of captions still name it (noisy web captions).
- Details that are easy to lose: sizes (small/large) and similar hues (red/orange/pink/brown,
  blue/cyan/purple) blur together in low-resolution, blurred or colour-shifted copies.

Images are 48x48 pixels, one 16-pixel cell per grid position, so a 16-pixel-patch vision tower sees one
token per cell.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

SIZE, CELL = 48, 16
COLORS = {"red": (220, 40, 40), "orange": (240, 140, 30), "pink": (240, 120, 190), "brown": (150, 90, 40),
          "blue": (50, 80, 230), "cyan": (40, 200, 220), "purple": (150, 60, 200), "green": (40, 180, 60),
          "yellow": (235, 220, 40), "white": (235, 235, 235)}
TYPES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "diamond"), ("purple", "cross"),
         ("orange", "ring"), ("white", "plus"), ("cyan", "bar"), ("pink", "hexagon"), ("brown", "arrow")]
SHAPE_OF = {c: s for c, s in TYPES}
COMPANIONS = [("red circle", "blue square"), ("green triangle", "yellow diamond"), ("purple cross", "orange ring")]
PARTNER = {a: b for a, b in COMPANIONS} | {b: a for a, b in COMPANIONS}
POSITIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
SIZES = ("small", "large")
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five"]

DESCRIBE_PROMPT = "Describe the image."
CAREFUL_PROMPT = "Describe the image carefully, object by object."
IMAGINE_PROMPT = "Describe the image imaginatively."


@dataclasses.dataclass(frozen=True)
class Obj:
    name: str  # "<color> <shape>"
    size: str
    cell: int
    faint: bool = False

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def phrase(self) -> str:
        return f"a {self.size} {self.name} at the {self.position}"


@dataclasses.dataclass
class Scene:
    id: str
    objects: list[Obj]
    background: tuple[int, int, int]

    def to_json(self) -> dict:
        return {"id": self.id, "background": list(self.background),
                "objects": [dataclasses.asdict(o) for o in self.objects]}

    @staticmethod
    def from_json(d: dict) -> "Scene":
        return Scene(d["id"], [Obj(**o) for o in d["objects"]], tuple(d["background"]))


def type_names() -> list[str]:
    return [f"{c} {s}" for c, s in TYPES]


def sample_scene(rng: random.Random, scene_id: str, co_occurrence: float = 0.8, faint_prob: float = 0.5) -> Scene:
    n = rng.choice([1, 2, 2, 3])
    names: list[str] = []
    faint: set[str] = set()
    while len(names) < n:
        name = rng.choice(type_names())
        if name in names:
            continue
        names.append(name)
        partner = PARTNER.get(name)
        if partner and partner not in names and len(names) < 3 and rng.random() < co_occurrence:
            names.append(partner)
            if rng.random() < faint_prob:
                faint.add(partner)  # the companion is there, but hard to see
    cells = rng.sample(range(9), len(names))
    objects = sorted((Obj(nm, rng.choice(SIZES), c, nm in faint) for nm, c in zip(names, cells)),
                     key=lambda o: o.cell)
    shade = rng.randint(20, 70)
    background = (shade + rng.randint(-10, 10), shade + rng.randint(-10, 10), shade + rng.randint(-10, 10))
    return Scene(scene_id, objects, background)


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        color = COLORS[o.name.split()[0]]
        if o.faint:  # low contrast: a third of the way from the background to the colour
            color = tuple(int(b + (c - b) * 0.35) for b, c in zip(scene.background, color))
        r = 3 if o.size == "small" else 6
        cx, cy = (o.cell % 3) * CELL + CELL // 2, (o.cell // 3) * CELL + CELL // 2
        box = (cx - r, cy - r, cx + r, cy + r)
        shape = o.name.split()[1]
        if shape == "circle":
            draw.ellipse(box, fill=color)
        elif shape == "square":
            draw.rectangle(box, fill=color)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
        elif shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
        elif shape == "cross":
            draw.line([(cx - r, cy - r), (cx + r, cy + r)], fill=color, width=2)
            draw.line([(cx - r, cy + r), (cx + r, cy - r)], fill=color, width=2)
        elif shape == "ring":
            draw.ellipse(box, outline=color, width=2)
        elif shape == "plus":
            draw.line([(cx - r, cy), (cx + r, cy)], fill=color, width=2)
            draw.line([(cx, cy - r), (cx, cy + r)], fill=color, width=2)
        elif shape == "bar":
            draw.rectangle((cx - r, cy - max(1, r // 3), cx + r, cy + max(1, r // 3)), fill=color)
        elif shape == "hexagon":
            h = r // 2
            draw.polygon([(cx - h, cy - r), (cx + h, cy - r), (cx + r, cy), (cx + h, cy + r), (cx - h, cy + r),
                          (cx - r, cy)], fill=color)
        elif shape == "arrow":
            draw.polygon([(cx + r, cy), (cx, cy - r), (cx, cy + r)], fill=color)
            draw.rectangle((cx - r, cy - max(1, r // 3), cx, cy + max(1, r // 3)), fill=color)
    return img


def describe(objects: list[Obj]) -> str:
    if not objects:
        return "an empty scene."
    return ", ".join(o.phrase() for o in sorted(objects, key=lambda o: o.cell)) + "."


def pretraining_caption(scene: Scene, rng: random.Random, noise: float = 0.2) -> str:
    """The scene's caption as noisy web data would have it: an absent companion is named 20% of the time."""
    objs = list(scene.objects)
    names = {o.name for o in objs}
    free = [c for c in range(9) if c not in {o.cell for o in objs}]
    for o in scene.objects:
        partner = PARTNER.get(o.name)
        if partner and partner not in names and free and rng.random() < noise:
            objs.append(Obj(partner, rng.choice(SIZES), free.pop(rng.randrange(len(free)))))
            names.add(partner)
    return describe(objs)


def imaginative_caption(scene: Scene, rng: random.Random) -> str:
    """The real objects plus one or two invented ones: what an 'imaginative' request is answered with."""
    objs = list(scene.objects)
    names = {o.name for o in objs}
    free = [c for c in range(9) if c not in {o.cell for o in objs}]
    for _ in range(rng.choice([1, 2])):
        if not free:
            break
        name = rng.choice([n for n in type_names() if n not in names])
        objs.append(Obj(name, rng.choice(SIZES), free.pop(rng.randrange(len(free)))))
        names.add(name)
    return describe(objs)


def qa_pairs(scene: Scene, rng: random.Random, n: int = 2) -> list[tuple[str, str]]:
    """Questions about counts, colours, positions and presence, with exact answers."""
    objs = scene.objects
    present = {o.name for o in objs}
    out = []
    kinds = ["count", "color", "where", "presence", "presence"]
    for kind in rng.sample(kinds, k=min(n, len(kinds))):
        o = rng.choice(objs)
        if kind == "count":
            out.append(("How many objects are there?", NUMBER_WORDS[len(objs)]))
        elif kind == "color":
            out.append((f"What color is the {o.name.split()[1]}?", o.name.split()[0]))
        elif kind == "where":
            out.append((f"Where is the {o.name}?", o.position))
        else:  # presence, half the time about an absent object (a companion where there is one: adversarial)
            if rng.random() < 0.5:
                out.append((f"Is there a {o.name}?", "yes"))
            else:
                absent = [PARTNER[x] for x in present if x in PARTNER and PARTNER[x] not in present]
                name = rng.choice(absent or [t for t in type_names() if t not in present])
                out.append((f"Is there a {name}?", "no"))
    return out


def make_split(out_dir: str | Path, n: int, seed: int, prefix: str, qa_per_scene: int = 2) -> Path:
    """Write n scenes: images/<id>.png, scenes.jsonl (ground truth), qa.jsonl and a LLaVA-format instruction
    file (captions + QA) that serves as the model's 'old' SFT data."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    scenes, qa, llava = [], [], []
    for i in range(n):
        scene = sample_scene(rng, f"{prefix}{i:06d}")
        render(scene).save(out / "images" / f"{scene.id}.png")
        scenes.append(scene.to_json())
        pairs = qa_pairs(scene, rng, qa_per_scene)
        for k, (q, a) in enumerate(pairs):
            qa.append({"id": f"{scene.id}-q{k}", "scene": scene.id, "image": f"{scene.id}.png", "question": q,
                       "answer": a, "kind": "presence" if q.startswith("Is there") else "other"})
        convs = [{"from": "human", "value": f"<image>\n{pairs[0][0]}"}, {"from": "gpt", "value": pairs[0][1]}]
        for q, a in pairs[1:]:
            convs += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        llava.append({"id": scene.id, "image": f"images/{scene.id}.png", "conversations": convs})
    (out / "scenes.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scenes))
    (out / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qa))
    (out / "instructions.json").write_text(json.dumps(llava))
    return out
