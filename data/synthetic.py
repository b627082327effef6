"""Synthetic Cityscapes: procedural street scenes written in the exact Cityscapes layout and file formats.

Each image is a list of labelled polygons (sky, buildings, road, sidewalk, ..., cars, people, ego vehicle) drawn in
order, later on top, as in cityscapesscripts' `gtFine_polygons.json`. The label images (`labelIds`, `color`,
`instanceIds`) are rendered from that JSON by cityscapesscripts itself, so they agree with the polygons by
construction. The photo is rendered from the same polygons: a per-class colour, jittered per image and per object,
plus a per-class texture (windows, stripes, blotches, gradients) and pixel noise, so a model can learn the classes
from local colour and texture but not trivially. `labelTrainIds` is not written: that is the preparation step's job.

All 19 training classes occur in every split: each image holds the common classes, and the rare vehicles (truck,
bus, train, motorcycle and bicycle with riders) are dealt out over the images of a split, then more are added at
random. Ignored (trainId 255) pixels always occur (ego vehicle, unlabeled, static, dynamic, parking, ...).
Everything is drawn from a numpy Generator seeded by (seed, split, index): the same seed gives identical files.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from cityscapesscripts.preparation.json2labelImg import createLabelImage
from PIL import Image, ImageDraw

SPLITS = ("train", "val", "test")
# Real Cityscapes city names of each split; image i of a split goes to city i % 3.
CITIES = {
    "train": ("aachen", "bochum", "bremen"),
    "val": ("frankfurt", "lindau", "munster"),
    "test": ("berlin", "bielefeld", "bonn"),
}
FRAME = 19  # the annotated frame of every real Cityscapes snippet is its 20th, e.g. aachen_000000_000019
MIN_SIZE = 32  # below this the thin classes (poles, signs) vanish

# Rare vehicles, dealt out over the images of a split so that every split holds all of them.
RARE_GROUPS = ("truck", "bus", "train", "motorcycle", "bicycle")

# Photo appearance of each label: base RGB, texture kind, texture amplitude. Related classes get related colours
# (road/sidewalk/parking, building/wall/pole, vegetation/terrain) so the task is not a colour lookup.
APPEARANCE = {
    "unlabeled": ((25, 25, 30), "blotch", 20),
    "ego vehicle": ((35, 35, 45), "vgrad", 15),
    "static": ((95, 85, 70), "hstripes", 15),
    "dynamic": ((185, 160, 70), "none", 0),
    "ground": ((125, 110, 95), "blotch", 15),
    "parking": ((150, 125, 140), "tiles", 15),
    "guard rail": ((185, 185, 195), "hstripes", 20),
    "caravan": ((200, 195, 180), "none", 0),
    "trailer": ((110, 110, 90), "vstripes", 15),
    "road": ((112, 102, 118), "blotch", 10),
    "sidewalk": ((170, 150, 165), "tiles", 20),
    "building": ((118, 104, 96), "windows", 35),
    "wall": ((172, 162, 138), "hstripes", 14),
    "fence": ((140, 116, 92), "vstripes", 30),
    "pole": ((132, 134, 140), "none", 0),
    "traffic light": ((58, 52, 28), "hstripes", 30),
    "traffic sign": ((214, 198, 46), "none", 0),
    "vegetation": ((72, 118, 42), "blotch", 35),
    "terrain": ((150, 168, 96), "blotch", 20),
    "sky": ((150, 188, 228), "vgrad", 25),
    "person": ((188, 62, 82), "none", 0),
    "rider": ((205, 98, 44), "none", 0),
    "car": ((62, 72, 150), "none", 0),
    "truck": ((128, 128, 62), "hstripes", 12),
    "bus": ((42, 128, 138), "windows", 25),
    "train": ((158, 160, 178), "hstripes", 20),
    "motorcycle": ((45, 42, 66), "none", 0),
    "bicycle": ((122, 34, 118), "vstripes", 20),
    "license plate": ((228, 228, 222), "none", 0),
}
THINGS = {"person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle", "caravan", "trailer"}

# Silhouettes in a unit box (x right, y down), scaled to each object's box.
RECT = ((0, 0), (1, 0), (1, 1), (0, 1))
OCTAGON = ((0.3, 0), (0.7, 0), (1, 0.3), (1, 0.7), (0.7, 1), (0.3, 1), (0, 0.7), (0, 0.3))
TRIANGLE = ((0.5, 0), (1, 1), (0, 1))
CAR = ((0, 0.55), (0.05, 0.4), (0.22, 0.35), (0.32, 0.05), (0.72, 0.05), (0.85, 0.35), (1, 0.45), (1, 0.9),
       (0.85, 1), (0.7, 0.9), (0.3, 0.9), (0.15, 1), (0, 0.9))
TRUCK = ((0, 0), (0.7, 0), (0.7, 0.25), (0.9, 0.3), (1, 0.55), (1, 0.92), (0.85, 1), (0.7, 0.92), (0.3, 0.92),
         (0.15, 1), (0, 0.92))
BUS = ((0, 0.05), (0.03, 0), (0.97, 0), (1, 0.05), (1, 0.92), (0.85, 1), (0.75, 0.92), (0.25, 0.92), (0.15, 1),
       (0, 0.92))
TRAIN = ((0, 0.15), (0.04, 0), (0.96, 0), (1, 0.15), (1, 1), (0, 1))
PERSON = ((0.4, 0), (0.6, 0), (0.65, 0.12), (0.6, 0.18), (0.9, 0.22), (0.95, 0.55), (0.8, 0.55), (0.75, 0.35),
          (0.72, 1), (0.55, 1), (0.5, 0.6), (0.45, 1), (0.28, 1), (0.25, 0.35), (0.2, 0.55), (0.05, 0.55),
          (0.1, 0.22), (0.4, 0.18), (0.35, 0.12))
BIKE = ((0, 0.6), (0.1, 0.4), (0.3, 0.35), (0.45, 0.1), (0.6, 0.1), (0.7, 0.35), (0.9, 0.4), (1, 0.6), (0.9, 0.85),
        (0.78, 1), (0.62, 0.9), (0.38, 0.9), (0.22, 1), (0.1, 0.85))

# Things: silhouette, height in metres, width/height aspect range, depth range (0 = horizon, 1 = just above the
# ego vehicle). Big vehicles stay far so they do not fill the frame.
THING_SPECS = {
    "car": (CAR, 1.5, (1.4, 2.6), (0.2, 1.0)),
    "person": (PERSON, 1.75, (0.35, 0.45), (0.2, 0.9)),
    "truck": (TRUCK, 3.3, (1.6, 2.2), (0.15, 0.5)),
    "bus": (BUS, 3.2, (2.4, 3.2), (0.15, 0.45)),
    "train": (TRAIN, 3.8, (4.0, 6.0), (0.08, 0.25)),
    "motorcycle": (BIKE, 1.1, (1.5, 1.8), (0.2, 0.9)),
    "bicycle": (BIKE, 1.0, (1.6, 1.9), (0.2, 0.9)),
    "caravan": (BUS, 2.6, (2.0, 2.6), (0.15, 0.6)),
    "trailer": (RECT, 2.2, (1.5, 2.5), (0.15, 0.6)),
}
CAMERA_HEIGHT = 1.5  # metres: an object this tall reaches the horizon


# ------------------------------------------------------------------------------------------------------- polygons
def _place(shape, x0: float, y0: float, w: float, h: float) -> list[tuple[float, float]]:
    return [(x0 + u * w, y0 + v * h) for u, v in shape]


def _blob(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float, n: int = 12) -> list:
    """A jagged ellipse (tree crowns, dirt patches)."""
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi / n)
    radius = rng.uniform(0.7, 1.0, n)
    return list(zip(cx + rx * radius * np.cos(angles), cy + ry * radius * np.sin(angles), strict=True))


def _clip(polygon: list, width: int, height: int) -> list[list[int]]:
    """Clip to the image (Sutherland-Hodgman; fine for non-convex polygons against a rectangle), round to ints."""
    edges = ((0, 0.0, 1), (0, width - 1.0, -1), (1, 0.0, 1), (1, height - 1.0, -1))  # (axis, bound, inside sign)
    points = [tuple(map(float, p)) for p in polygon]
    for axis, bound, sign in edges:
        if not points:
            break
        clipped = []
        for i, cur in enumerate(points):
            prev = points[i - 1]
            cur_in, prev_in = sign * (cur[axis] - bound) >= 0, sign * (prev[axis] - bound) >= 0
            if cur_in != prev_in:
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                clipped.append((prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])))
            if cur_in:
                clipped.append(cur)
        points = clipped
    out = []
    for x, y in points:
        point = [int(round(x)), int(round(y))]
        if not out or point != out[-1]:
            out.append(point)
    if len(out) > 1 and out[0] == out[-1]:
        out.pop()
    return out if len({tuple(p) for p in out}) >= 3 else []


def _rare_groups(index: int, count: int, rng: np.random.Generator) -> list[str]:
    """Rare vehicles of image `index` of `count`: group k goes to image k % count, plus random extras."""
    return [g for k, g in enumerate(RARE_GROUPS) if k % count == index % count or rng.random() < 0.3]


def street_scene(rng: np.random.Generator, height: int, width: int, rare: list[str]) -> list[tuple[str, list]]:
    """One procedural street scene: [(cityscapes label name, polygon [[x, y], ...]), ...] in drawing order."""
    H, W = float(height), float(width)
    objects = []

    def add(label, polygon):
        polygon = _clip(polygon, width, height)
        if polygon:
            objects.append((label, polygon))

    def rect(label, x0, y0, x1, y1):
        # at least 2 pixels wide and tall after rounding, so thin things survive small images
        add(label, _place(RECT, x0, y0, max(x1 - x0, 1.0), max(y1 - y0, 1.0)))

    horizon = H * rng.uniform(0.38, 0.48)
    ego_top = H * (1 - rng.uniform(0.07, 0.1))
    ground_bottom = ego_top - 0.02 * H  # things stand above the ego vehicle's bonnet

    # stuff, back to front
    rect("sky", 0, 0, W, horizon + 0.05 * H)
    x = rng.uniform(-0.1, 0) * W
    while x < W:
        w = rng.uniform(0.08, 0.2) * W
        if x < 0 or rng.random() > 0.15:  # gaps between buildings show the sky
            rect("building", x, rng.uniform(0.03, 0.3) * H, x + w, horizon + 0.03 * H)
        x += w
    if rng.random() < 0.5:
        add("unlabeled", _blob(rng, rng.uniform(0.2, 0.8) * W, horizon - 0.1 * H, 0.03 * W, 0.04 * H))
    for _ in range(rng.integers(2, 5)):
        add("vegetation", _blob(rng, rng.uniform(0, W), horizon - rng.uniform(0.05, 0.2) * H,
                                rng.uniform(0.04, 0.1) * W, rng.uniform(0.08, 0.15) * H))
    rect("sidewalk", 0, horizon, W, H)
    left = rng.random() < 0.5  # wall and terrain on one side, fence on the other
    for label, on_left in (("wall", left), ("fence", not left)):
        w = rng.uniform(0.25, 0.45) * W
        x0 = rng.uniform(0, 0.05) * W if on_left else W - w - rng.uniform(0, 0.05) * W
        rect(label, x0, horizon - rng.uniform(0.05, 0.09) * H, x0 + w, horizon + rng.uniform(0.01, 0.04) * H)
    for on_left in (left, not left) if rng.random() < 0.5 else (left,):  # grass verges in front of them
        terrain = [(0, horizon + 0.02 * H), (rng.uniform(0.25, 0.4) * W, horizon + 0.02 * H),
                   (0, horizon + rng.uniform(0.2, 0.3) * H)]
        add("terrain", terrain if on_left else [(W - 1 - px, py) for px, py in terrain])
    if rng.random() < 0.4:
        add("ground", _blob(rng, (0.08 if left else 0.92) * W, horizon + 0.3 * H, 0.05 * W, 0.03 * H))
    vx, top = W * rng.uniform(0.4, 0.6), W * rng.uniform(0.05, 0.1)  # vanishing point, half-width at the horizon
    spread = W * rng.uniform(0.8, 1.0)
    add("road", [(vx - top, horizon), (vx + top, horizon), (vx + spread, H), (vx - spread, H)])
    if rng.random() < 0.5:  # a parking strip along one road edge
        t0, t1 = rng.uniform(0.2, 0.4), rng.uniform(0.5, 0.7)
        side = -1 if rng.random() < 0.5 else 1

        def edge(t, inset):
            return vx + side * (top + t * (spread - top)) * inset, horizon + t * (H - horizon)

        add("parking", [edge(t0, 1.0), edge(t1, 1.0), edge(t1, 0.8), edge(t0, 0.85)])
    if rng.random() < 0.3:
        rect("guard rail", vx + top, horizon + 0.01 * H, vx + top + 0.3 * W, horizon + 0.03 * H)
    for label in ("static", "dynamic"):
        bx, by = rng.uniform(0.02, 0.95) * W, horizon + rng.uniform(0.02, 0.3) * H
        bw = rng.uniform(0.01, 0.03) * W
        rect(label, bx, by - 1.5 * bw, bx + bw, by)

    # things: each gets its own slot across the width and is at most 1.6 slots wide, so no other thing ever covers
    # the middle 40% of a thing (only its rider, thin poles or the ego vehicle can); drawn far to near.
    names = ["car"] * int(rng.integers(2, 5)) + ["person"] * int(rng.integers(1, 4)) + list(rare)
    names += [name for name in ("caravan", "trailer") if rng.random() < 0.15]
    slot = 0.96 * W / len(names)
    depths = [rng.uniform(*THING_SPECS[name][3]) for name in names]
    slots = rng.permutation(len(names))
    for k in np.argsort(depths, kind="stable"):
        name = names[k]
        shape, metres, aspect_range, _ = THING_SPECS[name]
        bottom = horizon + depths[k] * (ground_bottom - horizon)
        h = metres / CAMERA_HEIGHT * (bottom - horizon)
        w = h * rng.uniform(*aspect_range)
        if w > 1.6 * slot:
            w, h = 1.6 * slot, h * 1.6 * slot / w
        cx = 0.02 * W + (slots[k] + 0.5) * slot + rng.uniform(-0.1, 0.1) * slot
        add(name, _place(shape, cx - w / 2, bottom - h, w, h))
        if name == "car" and rng.random() < 0.5:  # plates are in the JSON but not in labelIds (id -1)
            rect("license plate", cx - 0.09 * w, bottom - 0.3 * h, cx + 0.09 * w, bottom - 0.22 * h)
        if name in ("motorcycle", "bicycle"):  # the rider sits on the bike, legs over its middle
            rh = 1.6 / CAMERA_HEIGHT * (bottom - horizon)
            add("rider", _place(PERSON, cx - 0.2 * rh, bottom - 0.35 * h - rh, 0.4 * rh, rh))

    # poles with signs and lights stand on the sidewalks in front, near the image sides
    for k in range(int(rng.integers(2, 4))):
        on_left = k % 2 == 0
        px = (rng.uniform(0.02, 0.12) if on_left else rng.uniform(0.86, 0.96)) * W
        pw, ptop = max(0.006 * W, 1.0), rng.uniform(0.1, 0.25) * H
        rect("pole", px, ptop, px + pw, horizon + rng.uniform(0.05, 0.2) * H)
        size = max(rng.uniform(0.03, 0.05) * H, 3.0)
        if k == 0 or rng.random() < 0.3:
            shape = (OCTAGON, TRIANGLE, RECT)[int(rng.integers(3))]
            add("traffic sign", _place(shape, px + pw / 2 - size / 2, ptop + 0.02 * H, size, size))
        if k == 1 or rng.random() < 0.3:
            rect("traffic light", px + pw / 2 - size / 3, ptop - size * 1.3, px + pw / 2 + size / 3, ptop)

    # the ego vehicle's bonnet at the bottom, a shallow arc
    xs = np.linspace(0, W - 1, 9)
    arc = ego_top + (H - ego_top) * 0.4 * ((xs / (W - 1)) * 2 - 1) ** 2
    add("ego vehicle", [(0, H), *zip(xs, arc, strict=True), (W, H)])
    return objects


def polygons_json(objects: list[tuple[str, list]], height: int, width: int) -> str:
    """cityscapesscripts' gtFine_polygons.json text; one object per line keeps it readable and byte-stable."""
    lines = [json.dumps({"label": label, "polygon": polygon}) for label, polygon in objects]
    return (f'{{\n    "imgHeight": {height},\n    "imgWidth": {width},\n    "objects": [\n        '
            + ",\n        ".join(lines) + "\n    ]\n}\n")


# ---------------------------------------------------------------------------------------------------------- photo
def _texture(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """An HxW pattern in about [-1, 1]; periods follow the image size so they survive rescaling."""
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    if kind == "windows":
        py, px = max(2.0, height / rng.uniform(20, 30)), max(2.0, width / rng.uniform(40, 60))
        pattern = np.where(((y // py) % 2 == 1) & ((x // px) % 2 == 1), -1.0, 0.4)
    elif kind == "hstripes":
        pattern = np.sign(np.sin(2 * np.pi * y / max(3.0, height / rng.uniform(30, 50)) + rng.uniform(0, 6.3)))
    elif kind == "vstripes":
        pattern = np.sign(np.sin(2 * np.pi * x / max(3.0, width / rng.uniform(100, 160)) + rng.uniform(0, 6.3)))
    elif kind == "tiles":
        p = max(3.0, height / rng.uniform(25, 40))
        pattern = np.where(((y % p) < 1) | ((x % (2 * p)) < 1), -1.0, 0.3)
    elif kind == "blotch":  # smooth random field: coarse noise upsampled bilinearly
        coarse = rng.standard_normal((max(2, height // 16), max(2, width // 16))).astype(np.float32)
        pattern = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
    elif kind == "vgrad":
        pattern = 2 * y / height - 1
    else:
        pattern = np.zeros((1, 1))
    return np.broadcast_to(pattern.astype(np.float32), (height, width))


def render_photo(objects: list[tuple[str, list]], height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """HxWx3 uint8 RGB photo of the scene: per-object colour + per-class texture + pixel noise."""
    # object index map, drawn with the same PIL polygon fill as cityscapesscripts (0 = nothing = unlabeled)
    index_img = Image.new("I", (width, height), 0)
    draw = ImageDraw.Draw(index_img)
    for k, (_, polygon) in enumerate(objects, start=1):
        draw.polygon([tuple(p) for p in polygon], fill=k)
    index = np.asarray(index_img, dtype=np.int32)

    # per-object colour: class colour, shifted per image (per class) and per object (more for things), then the
    # image's exposure and colour cast; all folded into the small per-object tables before touching pixels
    names = ["unlabeled"] + [label for label, _ in objects]
    class_shift = {name: rng.normal(0, 8, 3) for name in sorted(set(names))}
    base = np.array([np.array(APPEARANCE[name][0]) + class_shift[name]
                     + rng.normal(0, 18 if name in THINGS else 5, 3) for name in names])
    gain = rng.normal(1.0, 0.08)
    base = base * gain + rng.normal(0, 5, 3)
    amps = np.array([APPEARANCE[name][2] for name in names], dtype=np.float32) * gain

    kinds = sorted({APPEARANCE[name][1] for name in names} - {"none"})
    kind_of = np.array([kinds.index(APPEARANCE[name][1]) + 1 if APPEARANCE[name][1] != "none" else 0
                        for name in names], dtype=np.uint8)[index]
    texture = np.zeros((height, width), dtype=np.float32)
    for k, kind in enumerate(kinds, start=1):
        np.copyto(texture, _texture(kind, height, width, rng), where=kind_of == k)
    texture *= amps[index]

    photo = np.take(np.round(base).astype(np.int16), index, axis=0)
    photo += np.round(texture).astype(np.int16)[..., None]
    # sensor noise (sd ~14) in blocks of ~1/512 of the height: the same look at every size, and large photos
    # stay cheap to PNG-encode (per-pixel noise at 1024x2048 takes ~0.7 s to compress, 2x2 blocks ~0.15 s)
    block = max(1, round(height / 512))
    noise = rng.integers(-24, 25, (-(-height // block), -(-width // block), 3), dtype=np.int16)
    photo += np.repeat(np.repeat(noise, block, axis=0), block, axis=1)[:height, :width]
    return np.clip(photo, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- the dataset
def _check_args(num_train, num_val, num_test, height, width, seed) -> None:
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1), ("num_test", num_test, 0),
                             ("height", height, MIN_SIZE), ("width", width, MIN_SIZE), ("seed", seed, 0)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def write_image(root: Path, split: str, city: str, stem: str, objects: list, height: int, width: int,
                rng: np.random.Generator) -> None:
    """Writes one image and its gtFine files; the label images are rendered from the JSON on disk."""
    gt_dir, img_dir = root / "gtFine" / split / city, root / "leftImg8bit" / split / city
    gt_dir.mkdir(parents=True, exist_ok=True)
    img_dir.mkdir(parents=True, exist_ok=True)
    json_path = gt_dir / f"{stem}_gtFine_polygons.json"
    json_path.write_text(polygons_json(objects, height, width))
    annotation = Annotation()
    annotation.fromJsonFile(str(json_path))
    createLabelImage(annotation, "ids").save(gt_dir / f"{stem}_gtFine_labelIds.png")
    createLabelImage(annotation, "color").save(gt_dir / f"{stem}_gtFine_color.png", compress_level=1)  # RGBA, as real
    # 16-bit like the real files (class id * 1000 + instance); recent Pillow cannot write mode "I" PNGs itself
    instance_ids = np.asarray(createInstanceImage(annotation, "ids"), dtype=np.uint16)
    Image.fromarray(instance_ids).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
    # noisy photos compress badly: level 1 is ~5x faster than the default and only ~10% bigger
    Image.fromarray(render_photo(objects, height, width, rng)).save(
        img_dir / f"{stem}_leftImg8bit.png", compress_level=1)


def generate_cityscapes(out_dir, num_train: int = 8, num_val: int = 4, num_test: int = 2, height: int = 256,
                        width: int = 512, seed: int = 0) -> Path:
    """Writes a synthetic dataset in the Cityscapes layout under out_dir (which must not hold one yet).

    leftImg8bit/<split>/<city>/<city>_<seq:06d>_<frame:06d>_leftImg8bit.png and
    gtFine/<split>/<city>/<same>_gtFine_{polygons.json,labelIds.png,color.png,instanceIds.png}. num_test may be 0.
    Returns the dataset root.
    """
    _check_args(num_train, num_val, num_test, height, width, seed)
    root = Path(out_dir)
    for sub in ("leftImg8bit", "gtFine"):
        if (root / sub).exists():
            raise FileExistsError(f"{root / sub} already exists: choose a new output directory or delete it")
    for split_index, (split, count) in enumerate(zip(SPLITS, (num_train, num_val, num_test), strict=True)):
        cities = CITIES[split]
        for i in range(count):
            rng = np.random.default_rng([seed, split_index, i])
            city = cities[i % len(cities)]
            stem = f"{city}_{i // len(cities):06d}_{FRAME:06d}"
            objects = street_scene(rng, height, width, _rare_groups(i, count, rng))
            write_image(root, split, city, stem, objects, height, width, rng)
    return root


def generate_cityscapes_atomically(root, **kwargs) -> Path:
    """generate_cityscapes into a temporary folder beside `root`, then rename it to `root`: a crash never leaves a
    half-written dataset. If another process made `root` meanwhile (the same deterministic set), ours is dropped."""
    root = Path(root)
    tmp = root.with_name(f".tmp-{root.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    generate_cityscapes(tmp, **kwargs)
    try:
        tmp.rename(root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not root.exists():
            raise
    return root
