"""Procedural captioned videos: the training and held-out data of the embedded reference model.

Each clip shows one to three coloured, solid or hollow shapes that move, bounce, rotate, spin, wobble, grow, shrink,
pulse, jump, fall, circle, zigzag, blink, fade or change colour over a textured background, optionally with a camera
pan or zoom; the caption says all of it in a fixed vocabulary of 92 words.
Scene parameters come from numpy's seeded generator and frames are rendered with plain float32 torch math, so a
(seed, index) pair gives the same clip on any device. Some colour-shape pairs never appear in training
(`HELDOUT_PAIRS`); held-out scenes always show one of them, which tests composition rather than memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.97, 0.90, 0.10),
    "green": (0.10, 0.72, 0.20),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.12, 0.28, 0.95),
    "purple": (0.58, 0.18, 0.85),
    "pink": (1.00, 0.50, 0.75),
    "white": (0.97, 0.97, 0.97),
    "brown": (0.50, 0.30, 0.12),
    "lime": (0.62, 0.95, 0.15),
    "navy": (0.08, 0.10, 0.45),
    "magenta": (0.90, 0.05, 0.55),
    "teal": (0.00, 0.50, 0.50),
    "gold": (0.80, 0.62, 0.18),
}
SHAPES = (
    "circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon", "pentagon", "bar",
    "heart", "crescent", "arrow", "ellipse", "octagon",
)  # fmt: skip
SIZES = {"small": 0.075, "medium": 0.11, "big": 0.16, "tiny": 0.05, "huge": 0.21}
BACKGROUNDS = (
    "black", "white", "gray", "sky", "grass", "sand", "checkered", "striped",
    "night", "water", "snow", "dotted", "brick", "sunset", "lava", "wood",
)  # fmt: skip
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPEEDS = {"slowly": 0.3, "quickly": 0.6}
MOTIONS = (
    "moves", "bounces", "rotates", "stays", "turns", "grows", "shrinks",
    "spins", "wobbles", "pulses", "jumps", "falls", "circles", "zigzags", "blinks", "fades", "appears",
)  # fmt: skip
TURNING_MOTIONS = frozenset({"rotates", "spins", "wobbles"})  # not drawn on shapes that look the same turned
ROUND_SHAPES = frozenset({"circle", "ring"})
ZOOMS = ("in", "out")
HELDOUT_PAIRS = frozenset(
    {
        ("red", "square"), ("orange", "ring"), ("yellow", "hexagon"), ("green", "circle"), ("cyan", "star"),
        ("blue", "diamond"), ("purple", "bar"), ("pink", "triangle"), ("white", "cross"), ("brown", "pentagon"),
        ("lime", "heart"), ("navy", "crescent"), ("magenta", "arrow"), ("teal", "ellipse"), ("gold", "octagon"),
    }
)  # fmt: skip  # one per colour and one per shape; the first ten are those of the 57-word generator
PAN_DISTANCE = 0.35  # frame widths travelled by the camera over one clip
ZOOM = 1.4  # scale reached (zooming in) or left (zooming out) over one clip
HOLLOW_SHARE = 0.2  # of objects drawn as outlines ("hollow"), rings excepted
HOLLOW_INNER = 0.62  # size of the cut-out against the shape
JUMP_HEIGHT, FALL_DISTANCE, CIRCLE_RADIUS = 0.22, 0.5, 0.14  # frame units
ZIGZAG_SPEED, ZIGZAG_AMPLITUDE = 0.45, 0.08
MAX_OBJECTS = 3


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    motion: str
    detail: str  # direction for "moves"/"zigzags", "clockwise"/"counterclockwise" for "rotates"/"spins",
    # new colour for "turns"
    speed: str  # "slowly"/"quickly" for "moves", else ""
    start: tuple[float, float]  # screen position at t=0 (the orbit centre for "circles"), frame units
    velocity: tuple[float, float]  # screen displacement per clip before bouncing ("bounces" only)
    angle: float  # also the orbit phase for "circles"
    hollow: bool = False  # drawn as an outline

    def phrase(self) -> str:
        words = ["a", self.size, *(["hollow"] if self.hollow else []), self.colour, self.shape, self.motion]
        if self.motion == "moves":
            words += [self.detail, self.speed]
        elif self.motion in ("bounces", "circles"):
            words.append("around")
        elif self.motion == "stays":
            words.append("still")
        elif self.motion == "fades":
            words.append("away")
        elif self.motion in ("rotates", "spins", "turns", "zigzags"):
            words.append(self.detail)
        return " ".join(words)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str
    pan: str  # a DIRECTIONS key, or "" for a camera that does not pan
    texture: tuple[float, ...]  # background texture phases and frequencies
    zoom: str = ""  # "in", "out", or "" (the camera pans or zooms, never both)

    def caption(self) -> str:
        if self.pan:
            camera = f"while the camera pans {self.pan}"
        elif self.zoom:
            camera = f"while the camera zooms {self.zoom}"
        else:
            camera = "with a static camera"
        objects = " and ".join(obj.phrase() for obj in self.objects)
        return f"{objects} on a {self.background} background {camera}"


VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        "a and on background while the camera pans with static around still clockwise counterclockwise".split()
        + list(MOTIONS)
        + ["zooms", *ZOOMS, "away", "hollow"]
        + list(COLOURS)
        + list(SHAPES)
        + list(SIZES)
        + list(BACKGROUNDS)
        + list(DIRECTIONS)
        + list(SPEEDS)
    )
)


def _camera_velocity(pan: str) -> np.ndarray:
    return PAN_DISTANCE * np.asarray(DIRECTIONS[pan]) if pan else np.zeros(2)


def _zoom_scale(zoom: str, times: np.ndarray) -> np.ndarray:
    """On-screen magnification per frame: 1 -> ZOOM zooming in, ZOOM -> 1 zooming out."""
    if zoom == "in":
        return 1 + (ZOOM - 1) * times
    if zoom == "out":
        return ZOOM - (ZOOM - 1) * times
    return np.ones_like(times)


def _drift(motion: str, detail: str, speed: str) -> np.ndarray:
    """Screen displacement of an object's own motion over the clip (before the camera's)."""
    if motion == "moves":
        return SPEEDS[speed] * np.asarray(DIRECTIONS[detail])
    if motion == "zigzags":
        return ZIGZAG_SPEED * np.asarray(DIRECTIONS[detail])
    if motion == "falls":
        return np.asarray([0.0, FALL_DISTANCE])
    return np.zeros(2)


def _sample_object(
    rng: np.random.Generator, heldout_pair: tuple[str, str] | None, camera: np.ndarray, inset: float
) -> SceneObject:
    if heldout_pair:
        colour, shape = heldout_pair
    else:
        while (pair := (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))) in HELDOUT_PAIRS:
            pass
        colour, shape = pair
    size = str(rng.choice(list(SIZES)))
    hollow = shape != "ring" and bool(rng.random() < HOLLOW_SHARE)
    motions = [m for m in MOTIONS if not (m in TURNING_MOTIONS and shape in ROUND_SHAPES)]
    motion = str(rng.choice(motions))
    detail, speed, velocity = "", "", (0.0, 0.0)
    if motion == "moves":
        detail, speed = str(rng.choice(list(DIRECTIONS))), str(rng.choice(list(SPEEDS)))
    elif motion == "zigzags":
        detail = str(rng.choice(["left", "right"]))
    elif motion == "bounces":
        heading = rng.uniform(0, 2 * math.pi)
        velocity = (1.6 * math.cos(heading), 1.6 * math.sin(heading))
    elif motion in ("rotates", "spins"):
        detail = str(rng.choice(["clockwise", "counterclockwise"]))
    elif motion == "turns":
        detail = str(rng.choice([c for c in COLOURS if c != colour]))
    # Keep the whole trajectory on screen: the screen moves against the camera, and a zoom shows less of it.
    margin = SIZES[size] * {"grows": 1.4, "pulses": 1.3}.get(motion, 1.0) + 0.02 + inset
    travel = _drift(motion, detail, speed) - camera
    if motion == "bounces":
        travel = np.zeros(2)
    reach_low, reach_high = np.maximum(0.0, -travel), np.maximum(0.0, travel)
    vertical = np.array([0.0, 1.0])
    if motion == "jumps":
        reach_low = reach_low + JUMP_HEIGHT * vertical
    elif motion == "circles":
        reach_low, reach_high = reach_low + CIRCLE_RADIUS, reach_high + CIRCLE_RADIUS
    elif motion == "zigzags":
        reach_low, reach_high = reach_low + ZIGZAG_AMPLITUDE * vertical, reach_high + ZIGZAG_AMPLITUDE * vertical
    low, high = margin + reach_low, 1.0 - margin - reach_high
    start = tuple(float(rng.uniform(lo, max(lo, hi))) for lo, hi in zip(low, high, strict=True))
    angle = float(rng.uniform(0, 2 * math.pi))
    return SceneObject(colour, shape, size, motion, detail, speed, start, velocity, angle, hollow)


def sample_scene(seed: int, index: int, heldout: bool = False) -> Scene:
    """The scene number `index` of a data stream; held-out scenes lead with an unseen colour-shape pair."""
    rng = np.random.default_rng([seed, index, int(heldout)])
    camera_move = str(rng.choice(["", *DIRECTIONS, *ZOOMS])) if rng.random() < 0.5 else ""
    pan = camera_move if camera_move in DIRECTIONS else ""
    zoom = camera_move if camera_move in ZOOMS else ""
    inset = 0.5 - 0.5 / ZOOM if zoom else 0.0  # the part of the frame that a full zoom pushes off screen
    camera = _camera_velocity(pan)
    count = int(rng.integers(1, 3 if heldout else MAX_OBJECTS + 1))
    pairs = sorted(HELDOUT_PAIRS)
    first = pairs[int(rng.integers(len(pairs)))] if heldout else None
    objects = tuple(_sample_object(rng, first if k == 0 else None, camera, inset) for k in range(count))
    background = str(rng.choice(BACKGROUNDS))
    texture = tuple(float(v) for v in rng.uniform(0, 1, size=6))
    return Scene(objects, background, pan, texture, zoom)


def sample_scenes(seed: int, start: int, count: int, heldout: bool = False) -> list[Scene]:
    return [sample_scene(seed, index, heldout) for index in range(start, start + count)]


def _trajectories(scenes: Sequence[Scene], times: np.ndarray) -> dict[str, np.ndarray]:
    """Per scene, object and frame: centre, angle, radius, colour and opacity, padded to MAX_OBJECTS; per object its
    shape index and whether it is hollow."""
    shape = (len(scenes), MAX_OBJECTS, len(times))
    centre, angle, radius = np.zeros((*shape, 2)), np.zeros(shape), np.zeros(shape)
    colour, opacity = np.zeros((*shape, 3)), np.zeros(shape)
    kind, hollow = np.zeros(shape[:2], dtype=np.int64), np.zeros(shape[:2], dtype=bool)
    ease = np.clip((times - 0.3) / 0.4, 0.0, 1.0)
    ease = ease * ease * (3 - 2 * ease)
    still = np.ones_like(times)
    for b, scene in enumerate(scenes):
        camera = _camera_velocity(scene.pan)
        for k, obj in enumerate(scene.objects):
            start = np.asarray(obj.start)
            base_radius = SIZES[obj.size]
            rgb = np.asarray(COLOURS[obj.colour])
            turn = 1.0 if obj.detail == "clockwise" else -1.0
            if obj.motion == "bounces":
                # Reflect the free path into [r, 1 - r]: a triangle wave of period 2 * span.
                span = 1.0 - 2 * base_radius
                free = start - base_radius + np.outer(times, obj.velocity)
                folded = np.mod(free, 2 * span)
                pos = base_radius + np.where(folded > span, 2 * span - folded, folded)
            else:
                pos = start + np.outer(times, _drift(obj.motion, obj.detail, obj.speed) - camera)
            if obj.motion == "falls":  # accelerating: the same end point as a steady drift, reached as t^2
                pos[:, 1] += FALL_DISTANCE * (times**2 - times)
            elif obj.motion == "jumps":  # three hops up from the start line
                pos[:, 1] -= JUMP_HEIGHT * np.abs(np.sin(3 * math.pi * times))
            elif obj.motion == "circles":  # one turn around the start point
                phase = obj.angle + 2 * math.pi * times
                pos = pos + CIRCLE_RADIUS * np.stack([np.cos(phase), np.sin(phase)], axis=1)
            elif obj.motion == "zigzags":  # three up-down strokes while drifting sideways
                pos[:, 1] += ZIGZAG_AMPLITUDE * 2 / math.pi * np.arcsin(np.sin(6 * math.pi * times))
            centre[b, k] = pos
            angle[b, k] = obj.angle + {
                "rotates": turn * math.pi * times,
                "spins": turn * 4 * math.pi * times,
                "wobbles": 0.45 * np.sin(4 * math.pi * times),
            }.get(obj.motion, 0.0)
            radius[b, k] = base_radius * {
                "grows": 0.6 + 0.8 * times,
                "shrinks": 1.4 - 0.8 * times,
                "pulses": 1 + 0.3 * np.sin(4 * math.pi * times),
            }.get(obj.motion, still)
            if obj.motion == "turns":
                colour[b, k] = rgb + np.outer(ease, np.asarray(COLOURS[obj.detail]) - rgb)
            else:
                colour[b, k] = rgb
            opacity[b, k] = {
                "fades": 1 - ease,
                "appears": ease,
                "blinks": (np.cos(4 * math.pi * times) > -0.5).astype(float),  # off a third of each of 2 periods
            }.get(obj.motion, still)
            kind[b, k] = SHAPES.index(obj.shape)
            hollow[b, k] = obj.hollow
    return {"centre": centre, "angle": angle, "radius": radius, "colour": colour, "opacity": opacity,
            "kind": kind, "hollow": hollow}  # fmt: skip


def _polygon(x: torch.Tensor, y: torch.Tensor, sides: int) -> torch.Tensor:
    """Regular polygon of circumradius 1: value 1 on the boundary, below 1 inside."""
    sector = 2 * math.pi / sides
    phi = torch.remainder(torch.atan2(y, x) + math.pi / 2, sector) - sector / 2
    return torch.hypot(x, y) * torch.cos(phi) / math.cos(math.pi / sides)


def _shape_field(kind: int, x: torch.Tensor, y: torch.Tensor, hollow: bool = False) -> torch.Tensor:
    """Implicit field of SHAPES[kind] in object units (radius 1): inside where the value is below 1.

    A hollow shape is the solid one less a copy shrunk to HOLLOW_INNER of its size (an outline of any shape).
    """
    field = _solid_field(SHAPES[kind], x, y)
    if not hollow:
        return field
    return torch.maximum(field, 2.0 - _solid_field(SHAPES[kind], x / HOLLOW_INNER, y / HOLLOW_INNER))


def _solid_field(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r = torch.hypot(x, y)
    if name == "circle":
        return r
    if name == "square":
        return torch.maximum(x.abs(), y.abs()) * 1.25
    if name == "triangle":
        return _polygon(x, y, 3)
    if name == "star":
        petals = 0.5 + 0.5 * torch.cos(5 * (torch.atan2(y, x) + math.pi / 2))
        return r / (0.42 + 0.58 * petals**1.5)
    if name == "ring":
        return (r - 0.72).abs() / 0.28
    if name == "cross":
        return torch.minimum(torch.maximum(x.abs(), y.abs() / 0.3), torch.maximum(x.abs() / 0.3, y.abs()))
    if name == "diamond":
        return x.abs() + y.abs()
    if name == "hexagon":
        return _polygon(x, y, 6)
    if name == "pentagon":
        return _polygon(x, y, 5)
    if name == "heart":  # two round lobes over a downward point (screen y grows downwards)
        lobes = torch.minimum(torch.hypot(x - 0.45, y + 0.25), torch.hypot(x + 0.45, y + 0.25)) + 0.5
        return torch.minimum(lobes, x.abs() / 0.85 + (y - 0.2).abs() / 0.7)
    if name == "crescent":  # the unit disc less a disc of radius 0.8 shifted right
        return torch.maximum(r, 1.8 - torch.hypot(x - 0.45, y))
    if name == "arrow":  # a shaft and a head pointing along +x
        shaft = torch.maximum((x + 0.35).abs() / 0.55, y.abs() / 0.2)
        head = torch.maximum(1.1 - x, y.abs() / 0.55 + (x - 0.1) / 0.85)
        return torch.minimum(shaft, head)
    if name == "ellipse":
        return torch.hypot(x, y / 0.55)
    if name == "octagon":
        return _polygon(x, y, 8)
    return torch.maximum(x.abs(), y.abs() / 0.35)  # bar


def _background(scene: Scene, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """RGB background in world coordinates (u, v move with the camera), shape (3, T, H, W)."""
    p = scene.texture
    wave = torch.sin(2 * math.pi * ((2 + 3 * p[0]) * u + p[1])) * torch.sin(2 * math.pi * ((2 + 3 * p[2]) * v + p[3]))
    fine = torch.sin(2 * math.pi * (9 * u + 7 * v + p[4])) * torch.sin(2 * math.pi * (11 * v - 5 * u + p[5]))

    def tint(rgb: tuple[float, float, float], amount: torch.Tensor) -> torch.Tensor:
        return torch.stack([c + amount for c in rgb])

    def blend(
        dark: tuple[float, float, float], light: tuple[float, float, float], amount: torch.Tensor
    ) -> torch.Tensor:
        return torch.stack([a + (b - a) * amount for a, b in zip(dark, light, strict=True)])

    name = scene.background
    if name == "black":
        return tint((0.06, 0.06, 0.08), 0.04 * wave)
    if name == "white":
        return tint((0.90, 0.90, 0.88), 0.05 * wave)
    if name == "gray":
        return tint((0.50, 0.50, 0.52), 0.06 * wave)
    if name == "sky":
        height = v.clamp(-1.0, 2.0)
        sky = torch.stack([0.35 + 0.35 * height, 0.55 + 0.25 * height, 0.95 + 0.0 * height])
        return sky + 0.12 * (wave > 0.5).float()
    if name == "grass":
        return tint((0.22, 0.50, 0.16), 0.06 * wave + 0.05 * fine)
    if name == "sand":
        return tint((0.82, 0.72, 0.50), 0.05 * wave + 0.04 * fine)
    if name == "checkered":
        cells = (torch.floor(6 * u) + torch.floor(6 * v)) % 2
        return tint((0.35, 0.35, 0.38), 0.3 * cells)
    if name == "night":  # dark blue with scattered stars
        return blend((0.04, 0.05, 0.16), (0.95, 0.95, 0.80), (fine > 0.9).float())
    if name == "water":
        return blend((0.08, 0.30, 0.60), (0.30, 0.60, 0.85), 0.5 + 0.5 * torch.sin(2 * math.pi * (6 * v + 0.4 * wave)))
    if name == "snow":  # pale blue-white with grey flakes
        return blend((0.88, 0.92, 0.97), (0.60, 0.65, 0.75), (fine > 0.85).float())
    if name == "dotted":
        du, dv = torch.remainder(6 * u, 1.0) - 0.5, torch.remainder(6 * v, 1.0) - 0.5
        return blend((0.20, 0.35, 0.35), (0.85, 0.85, 0.60), (torch.hypot(du, dv) < 0.22).float())
    if name == "brick":
        row = torch.floor(8 * v)
        course = 4 * u + 0.5 * torch.remainder(row, 2)
        mortar = (torch.remainder(8 * v, 1.0) < 0.15) | (torch.remainder(course, 1.0) < 0.07)
        return blend((0.62, 0.25, 0.15), (0.80, 0.78, 0.72), mortar.float())
    if name == "sunset":  # orange at the top to purple at the bottom (follows the camera's tilt like the sky)
        return blend((0.98, 0.55, 0.25), (0.40, 0.18, 0.50), v.clamp(0.0, 1.0)) + 0.04 * wave
    if name == "lava":  # dark rock with glowing veins
        return blend((0.25, 0.05, 0.03), (1.00, 0.50, 0.05), (wave.abs() < 0.15).float())
    if name == "wood":  # brown with wavy grain
        return blend((0.45, 0.28, 0.14), (0.66, 0.46, 0.26), 0.5 + 0.5 * torch.sin(2 * math.pi * (14 * v + 1.5 * wave)))
    stripes = (torch.floor(8 * (u + v) + 0.5) % 2).float()  # striped
    return tint((0.30, 0.25, 0.45), 0.25 * stripes)


def render(
    scenes: Sequence[Scene],
    num_frames: int,
    height: int,
    width: int,
    device: torch.device | str = "cpu",
    coverage: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Frames of the scenes as a (B, 3, num_frames, height, width) float32 tensor in [-1, 1] (Wan VAE input).

    With coverage=True also the share of each pixel covered by objects, (B, num_frames, height, width) in [0, 1]:
    where the caption's object words apply (a training loss can weight them up).
    """
    times = np.linspace(0.0, 1.0, num_frames)
    arrays = _trajectories(scenes, times)
    kinds, hollow = arrays.pop("kind"), arrays.pop("hollow")
    track = {name: torch.as_tensor(value, dtype=torch.float32, device=device) for name, value in arrays.items()}
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    t = torch.as_tensor(times, dtype=torch.float32, device=device)[:, None, None]
    videos, covered = [], []
    for b, scene in enumerate(scenes):
        camera = torch.as_tensor(_camera_velocity(scene.pan), dtype=torch.float32, device=device)
        zoom = torch.as_tensor(_zoom_scale(scene.zoom, times), dtype=torch.float32, device=device)[:, None, None]
        sx, sy = 0.5 + (x - 0.5) / zoom, 0.5 + (y - 0.5) / zoom  # the unzoomed screen point each pixel shows
        image = _background(scene, sx + camera[0] * t, sy + camera[1] * t)
        uncovered = torch.ones_like(image[0])
        for k in range(len(scene.objects)):
            cx, cy = track["centre"][b, k, :, 0, None, None], track["centre"][b, k, :, 1, None, None]
            cos, sin = torch.cos(track["angle"][b, k])[:, None, None], torch.sin(track["angle"][b, k])[:, None, None]
            r = track["radius"][b, k][:, None, None]
            dx, dy = (sx - cx) * width / height, sy - cy  # square pixels on non-square frames
            lx, ly = (cos * dx + sin * dy) / r, (-sin * dx + cos * dy) / r
            field = _shape_field(int(kinds[b, k]), lx, ly, bool(hollow[b, k]))
            edge = ((1.0 - field) * r * zoom * height + 0.5).clamp(0.0, 1.0)  # about one pixel of antialiasing
            alpha = edge * track["opacity"][b, k][:, None, None]
            rgb = track["colour"][b, k].T[:, :, None, None]
            image = image + alpha * (rgb - image)
            uncovered = uncovered * (1.0 - alpha)
        videos.append(image)
        covered.append(1.0 - uncovered)
    frames = torch.stack(videos).clamp(0.0, 1.0) * 2.0 - 1.0
    return (frames, torch.stack(covered)) if coverage else frames
