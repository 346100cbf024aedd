"""Procedural captioned videos: the training and held-out data of the embedded reference model.

Each clip shows one to three coloured shapes that move, bounce, rotate, grow, shrink or change colour over a
textured background, optionally with a camera pan; the caption says all of it in a small fixed vocabulary.
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
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon", "pentagon", "bar")
SIZES = {"small": 0.075, "medium": 0.11, "big": 0.16}
BACKGROUNDS = ("black", "white", "gray", "sky", "grass", "sand", "checkered", "striped")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPEEDS = {"slowly": 0.3, "quickly": 0.6}
MOTIONS = ("moves", "bounces", "rotates", "stays", "turns", "grows", "shrinks")
ROUND_SHAPES = frozenset({"circle", "ring"})
HELDOUT_PAIRS = frozenset(
    (colour, SHAPES[(3 * i + 1) % len(SHAPES)]) for i, colour in enumerate(COLOURS)
)  # one per colour and one per shape: (red, square), (orange, ring), ...
PAN_DISTANCE = 0.35  # frame widths travelled by the camera over one clip
MAX_OBJECTS = 3


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    motion: str
    detail: str  # direction for "moves", "clockwise"/"counterclockwise" for "rotates", new colour for "turns"
    speed: str  # "slowly"/"quickly" for "moves", else ""
    start: tuple[float, float]  # screen position at t=0, frame units
    velocity: tuple[float, float]  # screen displacement per clip before bouncing ("bounces" only)
    angle: float

    def phrase(self) -> str:
        words = ["a", self.size, self.colour, self.shape, self.motion]
        if self.motion == "moves":
            words += [self.detail, self.speed]
        elif self.motion == "bounces":
            words.append("around")
        elif self.motion == "stays":
            words.append("still")
        elif self.motion in ("rotates", "turns"):
            words.append(self.detail)
        return " ".join(words)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str
    pan: str  # a DIRECTIONS key, or "" for a static camera
    texture: tuple[float, ...]  # background texture phases and frequencies

    def caption(self) -> str:
        camera = f"while the camera pans {self.pan}" if self.pan else "with a static camera"
        objects = " and ".join(obj.phrase() for obj in self.objects)
        return f"{objects} on a {self.background} background {camera}"


VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        "a and on background while the camera pans with static around still clockwise counterclockwise".split()
        + list(MOTIONS)
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


def _sample_object(rng: np.random.Generator, heldout_pair: tuple[str, str] | None, camera: np.ndarray) -> SceneObject:
    if heldout_pair:
        colour, shape = heldout_pair
    else:
        while (pair := (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))) in HELDOUT_PAIRS:
            pass
        colour, shape = pair
    size = str(rng.choice(list(SIZES)))
    motions = [m for m in MOTIONS if not (m == "rotates" and shape in ROUND_SHAPES)]
    motion = str(rng.choice(motions))
    detail, speed, drift = "", "", np.zeros(2)
    velocity = (0.0, 0.0)
    if motion == "moves":
        detail, speed = str(rng.choice(list(DIRECTIONS))), str(rng.choice(list(SPEEDS)))
        drift = SPEEDS[speed] * np.asarray(DIRECTIONS[detail])
    elif motion == "bounces":
        heading = rng.uniform(0, 2 * math.pi)
        velocity = (1.6 * math.cos(heading), 1.6 * math.sin(heading))
    elif motion == "rotates":
        detail = str(rng.choice(["clockwise", "counterclockwise"]))
    elif motion == "turns":
        detail = str(rng.choice([c for c in COLOURS if c != colour]))
    # Keep the whole trajectory on screen: the screen moves against the camera.
    margin = SIZES[size] * (1.4 if motion == "grows" else 1.0) + 0.02
    travel = drift - camera if motion != "bounces" else np.zeros(2)
    low = margin + np.maximum(0.0, -travel)
    high = 1.0 - margin - np.maximum(0.0, travel)
    start = tuple(float(rng.uniform(lo, max(lo, hi))) for lo, hi in zip(low, high, strict=True))
    return SceneObject(colour, shape, size, motion, detail, speed, start, velocity, float(rng.uniform(0, 2 * math.pi)))


def sample_scene(seed: int, index: int, heldout: bool = False) -> Scene:
    """The scene number `index` of a data stream; held-out scenes lead with an unseen colour-shape pair."""
    rng = np.random.default_rng([seed, index, int(heldout)])
    pan = str(rng.choice(["", *DIRECTIONS])) if rng.random() < 0.5 else ""
    camera = _camera_velocity(pan)
    count = int(rng.integers(1, 3 if heldout else MAX_OBJECTS + 1))
    pairs = sorted(HELDOUT_PAIRS)
    first = pairs[int(rng.integers(len(pairs)))] if heldout else None
    objects = tuple(_sample_object(rng, first if k == 0 else None, camera) for k in range(count))
    background = str(rng.choice(BACKGROUNDS))
    texture = tuple(float(v) for v in rng.uniform(0, 1, size=6))
    return Scene(objects, background, pan, texture)


def sample_scenes(seed: int, start: int, count: int, heldout: bool = False) -> list[Scene]:
    return [sample_scene(seed, index, heldout) for index in range(start, start + count)]


def _trajectories(scenes: Sequence[Scene], times: np.ndarray) -> dict[str, np.ndarray]:
    """Per scene, object and frame: centre, angle, radius, colour and presence, padded to MAX_OBJECTS."""
    shape = (len(scenes), MAX_OBJECTS, len(times))
    centre, angle, radius = np.zeros((*shape, 2)), np.zeros(shape), np.zeros(shape)
    colour, present = np.zeros((*shape, 3)), np.zeros(shape)
    kind = np.zeros(shape[:2], dtype=np.int64)
    ease = np.clip((times - 0.3) / 0.4, 0.0, 1.0)
    ease = ease * ease * (3 - 2 * ease)
    for b, scene in enumerate(scenes):
        camera = _camera_velocity(scene.pan)
        for k, obj in enumerate(scene.objects):
            start = np.asarray(obj.start)
            base_radius = SIZES[obj.size]
            rgb = np.asarray(COLOURS[obj.colour])
            spin = 0.0
            if obj.motion == "bounces":
                # Reflect the free path into [r, 1 - r]: a triangle wave of period 2 * span.
                span = 1.0 - 2 * base_radius
                free = start - base_radius + np.outer(times, obj.velocity)
                folded = np.mod(free, 2 * span)
                pos = base_radius + np.where(folded > span, 2 * span - folded, folded)
            else:
                drift = SPEEDS[obj.speed] * np.asarray(DIRECTIONS[obj.detail]) if obj.motion == "moves" else 0.0
                pos = start + np.outer(times, drift - camera)
            if obj.motion == "rotates":
                spin = (1.0 if obj.detail == "clockwise" else -1.0) * math.pi
            scale = {"grows": 0.6 + 0.8 * times, "shrinks": 1.4 - 0.8 * times}.get(obj.motion, np.ones_like(times))
            centre[b, k] = pos
            angle[b, k] = obj.angle + spin * times
            radius[b, k] = base_radius * scale
            if obj.motion == "turns":
                colour[b, k] = rgb + np.outer(ease, np.asarray(COLOURS[obj.detail]) - rgb)
            else:
                colour[b, k] = rgb
            present[b, k] = 1.0
            kind[b, k] = SHAPES.index(obj.shape)
    return {"centre": centre, "angle": angle, "radius": radius, "colour": colour, "present": present, "kind": kind}


def _polygon(x: torch.Tensor, y: torch.Tensor, sides: int) -> torch.Tensor:
    """Regular polygon of circumradius 1: value 1 on the boundary, below 1 inside."""
    sector = 2 * math.pi / sides
    phi = torch.remainder(torch.atan2(y, x) + math.pi / 2, sector) - sector / 2
    return torch.hypot(x, y) * torch.cos(phi) / math.cos(math.pi / sides)


def _shape_field(kind: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Implicit field of SHAPES[kind] in object units (radius 1): inside where the value is below 1."""
    name = SHAPES[kind]
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
    return torch.maximum(x.abs(), y.abs() / 0.35)  # bar


def _background(scene: Scene, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """RGB background in world coordinates (u, v move with the camera), shape (3, T, H, W)."""
    p = scene.texture
    wave = torch.sin(2 * math.pi * ((2 + 3 * p[0]) * u + p[1])) * torch.sin(2 * math.pi * ((2 + 3 * p[2]) * v + p[3]))
    fine = torch.sin(2 * math.pi * (9 * u + 7 * v + p[4])) * torch.sin(2 * math.pi * (11 * v - 5 * u + p[5]))

    def tint(rgb: tuple[float, float, float], amount: torch.Tensor) -> torch.Tensor:
        return torch.stack([c + amount for c in rgb])

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
    kinds = arrays.pop("kind")
    track = {name: torch.as_tensor(value, dtype=torch.float32, device=device) for name, value in arrays.items()}
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    t = torch.as_tensor(times, dtype=torch.float32, device=device)[:, None, None]
    videos, covered = [], []
    for b, scene in enumerate(scenes):
        camera = torch.as_tensor(_camera_velocity(scene.pan), dtype=torch.float32, device=device)
        image = _background(scene, x + camera[0] * t, y + camera[1] * t)
        uncovered = torch.ones_like(image[0])
        for k in range(len(scene.objects)):
            cx, cy = track["centre"][b, k, :, 0, None, None], track["centre"][b, k, :, 1, None, None]
            cos, sin = torch.cos(track["angle"][b, k])[:, None, None], torch.sin(track["angle"][b, k])[:, None, None]
            r = track["radius"][b, k][:, None, None]
            dx, dy = (x - cx) * width / height, y - cy  # square pixels on non-square frames
            lx, ly = (cos * dx + sin * dy) / r, (-sin * dx + cos * dy) / r
            field = _shape_field(int(kinds[b, k]), lx, ly)
            alpha = ((1.0 - field) * r * height + 0.5).clamp(0.0, 1.0)  # about one pixel of antialiasing
            rgb = track["colour"][b, k].T[:, :, None, None]
            image = image + alpha * (rgb - image)
            uncovered = uncovered * (1.0 - alpha)
        videos.append(image)
        covered.append(1.0 - uncovered)
    frames = torch.stack(videos).clamp(0.0, 1.0) * 2.0 - 1.0
    return (frames, torch.stack(covered)) if coverage else frames
