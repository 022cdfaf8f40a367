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
import hashlib
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from stic.config import from_dict, to_dict
from stic.errors import SticError

SIZES = ("small", "large")
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five"]  # the toy model's vocabulary: a count beyond is unsayable

DEFAULT_WORLD_FILE = Path(__file__).resolve().parents[2] / "recipes" / "shapesworld" / "world.yaml"


# ---------------------------------------------------------------------------------------------------------
# The world file: every parameter of a world, parsed strictly (unknown keys and wrong types are refused)


@dataclasses.dataclass
class ImageSpec:
    size: int = 48
    cell: int = 16


@dataclasses.dataclass
class SceneSpec:
    objects_per_scene: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 2, 3])
    max_objects: int = 3
    co_occurrence: float = 0.8
    faint_prob: float = 0.5
    faint_contrast: float = 0.35
    radius: dict[str, int] = dataclasses.field(default_factory=lambda: {"small": 3, "large": 6})
    background_shade: list[int] = dataclasses.field(default_factory=lambda: [20, 70])
    background_jitter: int = 10


@dataclasses.dataclass
class PromptSpec:
    describe: str = "Describe the image."
    careful: str = "Describe the image carefully, object by object."
    imagine: str = "Describe the image imaginatively."


@dataclasses.dataclass
class CaptionSource:
    share: float = 0.55
    absent_companion_rate: float = 0.2


@dataclasses.dataclass
class CarefulSource:
    share: float = 0.10
    exact: bool = False  # true: annotation-derived exact descriptions; false: the noisy captions
    absent_companion_rate: float = 0.2


@dataclasses.dataclass
class ImaginativeSource:
    share: float = 0.15
    invented: list[int] = dataclasses.field(default_factory=lambda: [1, 2])


@dataclasses.dataclass
class QASource:
    share: float = 0.20
    # how often a training question about a missing companion is answered "yes": presence labels derived from
    # noisy captions inherit their errors. Training data only: the evaluation's answers are always exact.
    absent_companion_rate: float = 0.0


@dataclasses.dataclass
class Sources:
    captions: CaptionSource = dataclasses.field(default_factory=CaptionSource)
    careful: CarefulSource = dataclasses.field(default_factory=CarefulSource)
    imaginative: ImaginativeSource = dataclasses.field(default_factory=ImaginativeSource)
    qa: QASource = dataclasses.field(default_factory=QASource)


@dataclasses.dataclass
class QASpec:
    kinds: list[str] = dataclasses.field(default_factory=lambda: ["count", "color", "where", "presence", "presence"])
    presence_yes: float = 0.5
    absent_companion_share: float = 1.0
    per_scene: int = 2


@dataclasses.dataclass
class PretrainSpec:
    steps: int = 2000
    batch_size: int = 64
    # 1e-3: at 3e-3 half the pretraining runs of round 2 never learned their scenes (calibration.md, round 3);
    # v1's file still says 3e-3, as its committed base was trained
    lr: float = 1e-3
    seed: int = 0
    # how the batch loss weighs examples: "token" (the mean over all answer tokens: a one-word QA answer weighs
    # ~1/25 of a caption) or "example" (each example's mean first, so the mixture's shares are gradient shares)
    loss: str = "token"


@dataclasses.dataclass
class World:
    version: int = 1
    name: str = "shapesworld"
    image: ImageSpec = dataclasses.field(default_factory=ImageSpec)
    colors: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    types: dict[str, str] = dataclasses.field(default_factory=dict)  # colour -> shape
    companions: list[list[str]] = dataclasses.field(default_factory=list)
    scenes: SceneSpec = dataclasses.field(default_factory=SceneSpec)
    prompts: PromptSpec = dataclasses.field(default_factory=PromptSpec)
    sources: Sources = dataclasses.field(default_factory=Sources)
    qa: QASpec = dataclasses.field(default_factory=QASpec)
    pretrain: PretrainSpec = dataclasses.field(default_factory=PretrainSpec)

    def __post_init__(self):
        shapes = {"circle", "square", "triangle", "diamond", "cross", "ring", "plus", "bar", "hexagon", "arrow"}
        if set(self.types) - set(self.colors):
            raise ValueError(f"types name colours without an RGB value: {sorted(set(self.types) - set(self.colors))}")
        if set(self.types.values()) - shapes:
            raise ValueError(f"unknown shapes {sorted(set(self.types.values()) - shapes)}; known: {sorted(shapes)}")
        names = set(self.type_names())
        for pair in self.companions:
            if len(pair) != 2 or not set(pair) <= names:
                raise ValueError(f"companions: {pair} is not a pair of object types ({', '.join(sorted(names))})")
        s = self.sources
        total = s.captions.share + s.careful.share + s.imaginative.share + s.qa.share
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"sources: the shares sum to {total}, not 1")
        if self.image.size != 3 * self.image.cell:
            raise ValueError("image.size must be 3 x image.cell (a 3x3 grid)")
        if self.pretrain.loss not in ("token", "example"):
            raise ValueError(f"pretrain.loss must be 'token' or 'example', not {self.pretrain.loss!r}")
        if set(self.qa.kinds) - {"count", "color", "where", "presence"}:
            raise ValueError(f"qa.kinds: unknown kinds {sorted(set(self.qa.kinds) - {'count', 'color', 'where', 'presence'})}")
        self._check_drawable()

    def _check_drawable(self) -> None:
        """Every value within what the world can draw: sample_scene loops forever on an object count it cannot
        fill, and other values fail mid-run or draw nonsense. Valid worlds are unchanged (no value is rewritten)."""
        if not self.types:
            raise ValueError("types: a world needs at least one object type")
        for colour, rgb in self.colors.items():
            if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise ValueError(f"colors.{colour}: an RGB colour is three values in [0, 255], got {rgb}")
        if self.image.cell < 1:
            raise ValueError(f"image.cell must be at least 1, got {self.image.cell}")
        sc = self.scenes
        # a scene holds distinct types in distinct cells of the 3x3 grid, and the count question names the number
        most = min(len(self.types), 9, len(NUMBER_WORDS) - 1)
        if not 1 <= sc.max_objects <= most:
            raise ValueError(f"scenes.max_objects must lie in [1, {most}] (types: {len(self.types)}, grid cells: 9, "
                             f"count words up to {NUMBER_WORDS[-1]}), got {sc.max_objects}")
        if not sc.objects_per_scene:
            raise ValueError("scenes.objects_per_scene is empty: give at least one object count")
        bad = [n for n in sc.objects_per_scene if not 1 <= n <= sc.max_objects]
        if bad:
            raise ValueError(f"scenes.objects_per_scene: {bad} outside [1, scenes.max_objects={sc.max_objects}]")
        for key in ("co_occurrence", "faint_prob", "faint_contrast"):
            _probability(f"scenes.{key}", getattr(sc, key))
        if set(sc.radius) != set(SIZES):
            raise ValueError(f"scenes.radius needs exactly the keys {', '.join(SIZES)}, got {sorted(sc.radius)}")
        for size, r in sc.radius.items():
            if not 1 <= r <= self.image.cell // 2:
                raise ValueError(f"scenes.radius.{size} must lie in [1, {self.image.cell // 2}] (half of "
                                 f"image.cell {self.image.cell}), got {r}")
        shade, j = sc.background_shade, sc.background_jitter
        if j < 0:
            raise ValueError(f"scenes.background_jitter must be at least 0, got {j}")
        if len(shade) != 2 or not j <= shade[0] <= shade[1] <= 255 - j:
            raise ValueError(f"scenes.background_shade must be [low, high] with {j} <= low <= high <= {255 - j} "
                             f"(scenes.background_jitter {j} either side stays in [0, 255]), got {shade}")
        for name in ("captions", "careful", "imaginative", "qa"):
            src = getattr(self.sources, name)
            _probability(f"sources.{name}.share", src.share)
            if hasattr(src, "absent_companion_rate"):
                _probability(f"sources.{name}.absent_companion_rate", src.absent_companion_rate)
        invented = self.sources.imaginative.invented
        if not invented or min(invented) < 0:
            raise ValueError(f"sources.imaginative.invented: give counts of at least 0, got {invented}")
        if not self.qa.kinds:
            raise ValueError("qa.kinds is empty: give at least one of count, color, where, presence")
        if self.qa.per_scene < 1:
            raise ValueError(f"qa.per_scene must be at least 1, got {self.qa.per_scene}")
        _probability("qa.presence_yes", self.qa.presence_yes)
        _probability("qa.absent_companion_share", self.qa.absent_companion_share)
        p = self.pretrain
        if p.steps < 1 or p.batch_size < 1 or p.lr <= 0:
            raise ValueError(f"pretrain: steps and batch_size must be at least 1 and lr positive, got steps "
                             f"{p.steps}, batch_size {p.batch_size}, lr {p.lr}")

    def type_names(self) -> list[str]:
        return [f"{c} {s}" for c, s in self.types.items()]

    @property
    def partner(self) -> dict[str, str]:
        return {a: b for a, b in self.companions} | {b: a for a, b in self.companions}

    def digest(self) -> str:
        """A short hash of the parsed world: equal for files that describe the same world."""
        data = to_dict(self)
        # defaults from before the keys existed are dropped, so recorded digests stay valid
        if data["pretrain"]["loss"] == "token":
            del data["pretrain"]["loss"]
        if data["sources"]["qa"]["absent_companion_rate"] == 0.0:
            del data["sources"]["qa"]["absent_companion_rate"]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _probability(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{key} must lie in [0, 1], got {value}")


class WorldFileError(SticError, ValueError):
    """A world file that cannot be used; the message names the key."""


def load_world(path: str | Path | None = None) -> World:
    """The world of a YAML file (default: recipes/shapesworld/world.yaml)."""
    import yaml

    from stic.config import RecipeError

    p = Path(path) if path else DEFAULT_WORLD_FILE
    if not p.is_file():
        raise WorldFileError(f"world file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
        return from_dict(World, data, "world")
    except (yaml.YAMLError, RecipeError) as err:
        raise WorldFileError(f"world file {p}: {err}") from None


def save_world(world: World, path: str | Path) -> Path:
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(world), sort_keys=False))
    return Path(path)


DEFAULT = load_world()

# The default world's names, for code that reads them directly
SIZE, CELL = DEFAULT.image.size, DEFAULT.image.cell
COLORS = {c: tuple(v) for c, v in DEFAULT.colors.items()}
TYPES = list(DEFAULT.types.items())
SHAPE_OF = dict(DEFAULT.types)
COMPANIONS = [tuple(p) for p in DEFAULT.companions]
PARTNER = DEFAULT.partner
POSITIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]

DESCRIBE_PROMPT = DEFAULT.prompts.describe
CAREFUL_PROMPT = DEFAULT.prompts.careful
IMAGINE_PROMPT = DEFAULT.prompts.imagine


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


def type_names(world: World | None = None) -> list[str]:
    return (world or DEFAULT).type_names()


def sample_scene(rng: random.Random, scene_id: str, co_occurrence: float | None = None,
                 faint_prob: float | None = None, world: World | None = None) -> Scene:
    w = world or DEFAULT
    co_occurrence = w.scenes.co_occurrence if co_occurrence is None else co_occurrence
    faint_prob = w.scenes.faint_prob if faint_prob is None else faint_prob
    partner, all_names = w.partner, w.type_names()
    n = rng.choice(w.scenes.objects_per_scene)
    names: list[str] = []
    faint: set[str] = set()
    while len(names) < n:
        name = rng.choice(all_names)
        if name in names:
            continue
        names.append(name)
        other = partner.get(name)
        if other and other not in names and len(names) < w.scenes.max_objects and rng.random() < co_occurrence:
            names.append(other)
            if rng.random() < faint_prob:
                faint.add(other)  # the companion is there, but hard to see
    cells = rng.sample(range(9), len(names))
    objects = sorted((Obj(nm, rng.choice(SIZES), c, nm in faint) for nm, c in zip(names, cells)),
                     key=lambda o: o.cell)
    lo, hi = w.scenes.background_shade
    j = w.scenes.background_jitter
    shade = rng.randint(lo, hi)
    background = (shade + rng.randint(-j, j), shade + rng.randint(-j, j), shade + rng.randint(-j, j))
    return Scene(scene_id, objects, background)


def render(scene: Scene, world: World | None = None) -> Image.Image:
    w = world or DEFAULT
    cell = w.image.cell
    img = Image.new("RGB", (w.image.size, w.image.size), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        color = tuple(w.colors[o.name.split()[0]])
        if o.faint:  # low contrast: part of the way from the background to the colour
            color = tuple(int(b + (c - b) * w.scenes.faint_contrast) for b, c in zip(scene.background, color))
        r = w.scenes.radius[o.size]
        cx, cy = (o.cell % 3) * cell + cell // 2, (o.cell // 3) * cell + cell // 2
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
    """The exact description: every object, faint ones included (annotation-derived)."""
    if not objects:
        return "an empty scene."
    return ", ".join(o.phrase() for o in sorted(objects, key=lambda o: o.cell)) + "."


def pretraining_caption(scene: Scene, rng: random.Random, noise: float | None = None,
                        world: World | None = None) -> str:
    """The scene's caption as noisy web data would have it: a missing companion is named at rate `noise`."""
    w = world or DEFAULT
    noise = w.sources.captions.absent_companion_rate if noise is None else noise
    partner = w.partner
    objs = list(scene.objects)
    names = {o.name for o in objs}
    free = [c for c in range(9) if c not in {o.cell for o in objs}]
    for o in scene.objects:
        other = partner.get(o.name)
        if other and other not in names and free and rng.random() < noise:
            objs.append(Obj(other, rng.choice(SIZES), free.pop(rng.randrange(len(free)))))
            names.add(other)
    return describe(objs)


def careful_description(scene: Scene, rng: random.Random, world: World | None = None) -> str:
    """What the careful prompt is answered with in pretraining: exact descriptions (annotation-derived, as
    LLaVA's detailed descriptions were written from COCO annotations) or, in worlds where `careful.exact` is
    false, the same noisy captions as the normal prompt."""
    w = world or DEFAULT
    if w.sources.careful.exact:
        return describe(scene.objects)
    return pretraining_caption(scene, rng, w.sources.careful.absent_companion_rate, w)


def imaginative_caption(scene: Scene, rng: random.Random, world: World | None = None) -> str:
    """The real objects plus invented ones: what an 'imaginative' request is answered with."""
    w = world or DEFAULT
    objs = list(scene.objects)
    names = {o.name for o in objs}
    free = [c for c in range(9) if c not in {o.cell for o in objs}]
    for _ in range(rng.choice(w.sources.imaginative.invented)):
        unused = [n for n in w.type_names() if n not in names]
        if not free or not unused:  # every cell or every type taken
            break
        name = rng.choice(unused)
        objs.append(Obj(name, rng.choice(SIZES), free.pop(rng.randrange(len(free)))))
        names.add(name)
    return describe(objs)


def qa_items(scene: Scene, rng: random.Random, n: int = 2, world: World | None = None) -> list[dict]:
    """Questions about counts, colours, positions and presence, with exact answers. Presence questions carry
    their kind: `present`, `absent_companion` (a missing partner of an object that is there: adversarial) or
    `absent_random`."""
    w = world or DEFAULT
    partner = w.partner
    objs = scene.objects
    present = {o.name for o in objs}
    out = []
    kinds = list(w.qa.kinds)
    for kind in rng.sample(kinds, k=min(n, len(kinds))):
        o = rng.choice(objs)
        if kind == "count":
            out.append({"question": "How many objects are there?", "answer": NUMBER_WORDS[len(objs)],
                        "kind": "count"})
        elif kind == "color":
            out.append({"question": f"What color is the {o.name.split()[1]}?", "answer": o.name.split()[0],
                        "kind": "color"})
        elif kind == "where":
            out.append({"question": f"Where is the {o.name}?", "answer": o.position, "kind": "where"})
        elif rng.random() < w.qa.presence_yes:
            out.append({"question": f"Is there a {o.name}?", "answer": "yes", "kind": "present"})
        else:  # about an absent object: a missing companion (adversarial) or any absent type
            # in scene order: a set's order changes with the process's hash seed, and the split must not
            absent = list(dict.fromkeys(partner[o.name] for o in objs
                                        if o.name in partner and partner[o.name] not in present))
            share = w.qa.absent_companion_share
            use_companion = bool(absent) and (share >= 1.0 or rng.random() < share)
            pool = absent if use_companion else [t for t in w.type_names() if t not in present]
            out.append({"question": f"Is there a {rng.choice(pool)}?", "answer": "no",
                        "kind": "absent_companion" if use_companion else "absent_random"})
    return out


def training_answer(item: dict, rng: random.Random, world: World | None = None) -> str:
    """The answer the QA source teaches: exact, except that a question about a missing companion is answered
    "yes" at the source's `absent_companion_rate` (the random stream is untouched when the rate is 0)."""
    rate = (world or DEFAULT).sources.qa.absent_companion_rate
    if item["kind"] == "absent_companion" and rate > 0 and rng.random() < rate:
        return "yes"
    return item["answer"]


def qa_pairs(scene: Scene, rng: random.Random, n: int = 2, world: World | None = None) -> list[tuple[str, str]]:
    """Training QA pairs, with the QA source's noise."""
    return [(q["question"], training_answer(q, rng, world)) for q in qa_items(scene, rng, n, world)]


def make_split(out_dir: str | Path, n: int, seed: int, prefix: str, qa_per_scene: int | None = None,
               world: World | None = None) -> Path:
    """Write n scenes: images/<id>.png, scenes.jsonl (ground truth), qa.jsonl (exact answers), a LLaVA-format
    instruction file (QA, with the QA source's noise, as the model was trained) that serves as the model's 'old'
    SFT data, and world.yaml (the world they come from)."""
    w = world or DEFAULT
    qa_per_scene = w.qa.per_scene if qa_per_scene is None else qa_per_scene
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    scenes, qa, llava = [], [], []
    for i in range(n):
        scene = sample_scene(rng, f"{prefix}{i:06d}", world=w)
        render(scene, w).save(out / "images" / f"{scene.id}.png")
        scenes.append(scene.to_json())
        items = qa_items(scene, rng, qa_per_scene, w)
        for k, item in enumerate(items):
            presence = item["kind"] in ("present", "absent_companion", "absent_random")
            qa.append({"id": f"{scene.id}-q{k}", "scene": scene.id, "image": f"{scene.id}.png",
                       "question": item["question"], "answer": item["answer"],
                       "kind": "presence" if presence else "other", "presence_kind": item["kind"] if presence
                       else None})
        taught = [training_answer(item, rng, w) for item in items]
        convs = [{"from": "human", "value": f"<image>\n{items[0]['question']}"}, {"from": "gpt", "value": taught[0]}]
        for item, answer in zip(items[1:], taught[1:]):
            convs += [{"from": "human", "value": item["question"]}, {"from": "gpt", "value": answer}]
        llava.append({"id": scene.id, "image": f"images/{scene.id}.png", "conversations": convs})
    (out / "scenes.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scenes))
    (out / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qa))
    (out / "instructions.json").write_text(json.dumps(llava))
    save_world(w, out / "world.yaml")
    return out
