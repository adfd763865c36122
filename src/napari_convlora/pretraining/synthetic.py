"""Procedurally generated scenes to pretrain a small SAM with SAM's promptable objective, and shifted scenes for a
domain-shift benchmark (issue 11). Pure numpy, scipy and scikit-image; nothing is downloaded.

A scene is a set of overlapping objects of many shape families (``shapes.SHAPE_CLASSES``) with their own
textures (``textures.TEXTURE_FAMILIES``), over a background with a gradient and a faint texture, then blurred and
made noisy. Objects are painted in order, so later objects cover earlier ones; the instance map records what is
left visible of each, objects with fewer than ``MIN_AREA`` visible pixels are dropped and the rest renumbered.

Polarity convention (what makes "inverted" a shift): in every pretraining scene each object is brighter than the
background beneath it (fluorescence-like; darker-than-surroundings edges still occur where a dim object covers a
bright one, and inside objects as dark spots), and the background level is at most ``BACKGROUND_LEVEL_RANGE[1]``.
The "inverted" shift turns intensities upside down (brightfield-like), so objects are darker than the background.

Every range below is a pretraining range (``random_scene``) unless its name starts with ``SHIFT_``; each
``SHIFT_`` range lies outside its pretraining counterpart, so a shifted scene shows what pretraining never does.
Intensities are fractions of the uint8 range (1.0 is 255); lengths are pixels at ``REFERENCE_SIZE`` and scale
with the scene's size. Given the generator's state, a scene is fully determined, and ``shifted_scene`` with a
generator in the same state as ``random_scene``'s draws the same layout (the same instance map), so clean and
shifted scenes can be compared pair by pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
from scipy import ndimage

from .shapes import SHAPE_CLASSES, SHAPE_FAMILIES, draw_shape
from .textures import TEXTURE_FAMILIES, smooth_noise, texture

TRAIN_TEXTURES: tuple[str, ...] = ("flat", "gradient", "dome", "speckle", "stripes", "spots", "mottled")
HELD_OUT_TEXTURE: str = "voronoi"  # cobblestone cells with dark borders; never drawn by random_scene's defaults
SHIFTS = ("blur", "noise", "low_contrast", "inverted", "new_texture")
MIN_AREA = 12  # visible pixels an object needs to be kept

REFERENCE_SIZE = 256
DENSITY_PROBABILITIES = {"sparse": 0.25, "medium": 0.35, "dense": 0.40}
OBJECT_COUNT_RANGES = {"sparse": (1, 5), "medium": (6, 29), "dense": (30, 80)}  # objects drawn (before occlusion)
SPARSE_RADIUS_RANGE = (12.0, 42.0)  # a sparse scene's typical object radius
COVERAGE_RANGES = {"medium": (0.08, 0.35), "dense": (0.3, 0.9)}  # the typical radius of a crowd is set so that
RADIUS_LIMITS = (3.5, 30.0)  # count * pi * radius**2 covers this fraction of the image, then clipped to these limits
COLOUR_PROBABILITY = 0.35  # otherwise grey, replicated to 3 channels

BACKGROUND_LEVEL_RANGE = (0.0, 0.35)
GRADIENT_RANGE = (0.0, 0.15)  # peak-to-peak of a slow ramp or illumination field over the image
BACKGROUND_TEXTURE_RANGE = (0.0, 0.4)  # amplitude of the background's texture, as a fraction of the contrast
CONTRAST_RANGE = (0.15, 0.8)  # each object's peak step above the background beneath it (always positive)
TEXTURE_DEPTH_RANGE = (0.0, 0.6)  # how far an object's texture dips below its peak step, as a fraction of it
BLUR_SIGMA_RANGE = (0.0, 1.5)  # Gaussian blur of the whole image (below 0.3: none)
NOISE_STD_RANGE = (0.0, 0.06)  # Gaussian, Poisson (std at the image's mean level) or both
MIN_SNR = CONTRAST_RANGE[0] / NOISE_STD_RANGE[1]  # 2.5: the lowest contrast-to-noise ratio pretraining shows
SALT_PEPPER_PROBABILITY = 0.15
SALT_PEPPER_RANGE = (0.0005, 0.003)  # fraction of pixels set to 0 or 1

SHIFT_BLUR_SIGMA_RANGE = (3.0, 5.0)
SHIFT_NOISE_CONTRAST_RANGE = (0.15, 0.3)  # the noise shift's object contrasts (within CONTRAST_RANGE)
SHIFT_SNR_RANGE = (0.8, 1.2)  # noise std = SHIFT_NOISE_CONTRAST_RANGE[1] / this, so every object's contrast-to-noise
# ratio lies in [0.4, 1.2], far below MIN_SNR (noise std 0.25-0.375)
SHIFT_LOW_CONTRAST_RANGE = (0.02, 0.06)  # below CONTRAST_RANGE; noise scaled down with it (the same SNR)
# "inverted": intensity -> 1 - intensity, so the background's base level lies in [0.65, 1] and every object is darker
# than the background beneath it.
SHIFT_TEXTURE_DEPTH_RANGE = (0.35, 0.6)  # "new_texture": objects and background use HELD_OUT_TEXTURE only, drawn
SHIFT_BACKGROUND_TEXTURE_RANGE = (0.25, 0.4)  # from the upper part of the pretraining ranges so that it shows


@dataclass
class Scene:
    """One synthetic image and its objects.

    image: Y x X x 3 uint8 (grey scenes have three equal channels). instances: Y x X int32, 0 background and
    1..N the visible part of each object, numbered without gaps. classes: N int32, the shape class of object i at
    index i - 1 (1 round, 2 elongated, 3 other; ``shapes.CLASS_NAMES``). shape_families and object_textures: N
    names, per object; background_texture: the background's texture family.
    """

    image: np.ndarray
    instances: np.ndarray
    classes: np.ndarray
    shape_families: tuple[str, ...] = field(default=())
    object_textures: tuple[str, ...] = field(default=())
    background_texture: str = ""


@dataclass(frozen=True)
class _Look:
    """Scene-wide appearance, drawn once per scene; a shift replaces some of it."""

    colour: bool  # False: grey, replicated to three channels
    palette: np.ndarray  # K x 3 float32 object colours, max channel 1 (grey: one row of ones)
    tint: np.ndarray  # 3 float32 background colour (grey: ones)
    background_level: float
    gradient: float
    contrast: float
    contrast_range: tuple[float, float]
    blur_sigma: float
    noise_std: float
    noise_model: str  # "gaussian", "poisson" or "mixed"
    salt_pepper: float
    inverted: bool = False
    texture_depth_range: tuple[float, float] = TEXTURE_DEPTH_RANGE
    background_texture_range: tuple[float, float] = BACKGROUND_TEXTURE_RANGE


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _hues(rng: np.random.Generator, count: int, saturation: tuple[float, float]) -> np.ndarray:
    """``count`` x 3 float32 RGB colours of random hue, the brightest channel 1."""
    hue = rng.uniform(0, 1, (count, 1))
    pure = np.clip(np.abs((hue * 6 + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1)
    s = rng.uniform(*saturation, (count, 1))
    return (1 - s * (1 - pure)).astype(np.float32)


def _draw_look(rng: np.random.Generator, scale: float) -> _Look:
    colour = rng.random() < COLOUR_PROBABILITY
    palette = _hues(rng, int(rng.integers(1, 5)), (0.4, 1.0)) if colour else np.ones((1, 3), np.float32)
    tint = _hues(rng, 1, (0.0, 0.6))[0] if colour else np.ones(3, np.float32)
    blur = rng.uniform(*BLUR_SIGMA_RANGE)
    salt_pepper = rng.uniform(*SALT_PEPPER_RANGE) if rng.random() < SALT_PEPPER_PROBABILITY else 0.0
    return _Look(colour=colour, palette=palette, tint=tint, background_level=rng.uniform(*BACKGROUND_LEVEL_RANGE),
                 gradient=rng.uniform(*GRADIENT_RANGE), contrast=_loguniform(rng, *CONTRAST_RANGE),
                 contrast_range=CONTRAST_RANGE, blur_sigma=blur * scale if blur >= 0.3 else 0.0,
                 noise_std=rng.uniform(*NOISE_STD_RANGE), noise_model=str(rng.choice(["gaussian", "poisson", "mixed"])),
                 salt_pepper=salt_pepper)


def _shift_look(look: _Look, shift: str, rng: np.random.Generator, scale: float) -> _Look:
    """``look`` with the parameters that ``shift`` changes redrawn from its SHIFT_ range."""
    if shift == "blur":
        return replace(look, blur_sigma=rng.uniform(*SHIFT_BLUR_SIGMA_RANGE) * scale)
    if shift == "noise":
        return replace(look, contrast=rng.uniform(*SHIFT_NOISE_CONTRAST_RANGE),
                       contrast_range=SHIFT_NOISE_CONTRAST_RANGE,
                       noise_std=SHIFT_NOISE_CONTRAST_RANGE[1] / rng.uniform(*SHIFT_SNR_RANGE))
    if shift == "low_contrast":
        contrast = rng.uniform(*SHIFT_LOW_CONTRAST_RANGE)
        return replace(look, contrast=contrast, contrast_range=SHIFT_LOW_CONTRAST_RANGE,
                       noise_std=look.noise_std * contrast / look.contrast)
    if shift == "inverted":
        return replace(look, inverted=True)
    # "new_texture": the held-out textures replace the usual ones; keep them visible (the upper part of the
    # pretraining ranges of texture depth and background texture amplitude).
    return replace(look, texture_depth_range=SHIFT_TEXTURE_DEPTH_RANGE,
                   background_texture_range=SHIFT_BACKGROUND_TEXTURE_RANGE)


def _positions(rng: np.random.Generator, count: int, size: int, radius: float, density: str) -> np.ndarray:
    """``count`` x 2 object centres (rows, columns): spread uniformly, in a few clusters, or packed in a jittered
    hexagonal grid so that neighbours touch."""
    mode = "uniform" if density == "sparse" else str(rng.choice(["uniform", "clustered", "packed"]))
    if mode == "clustered":
        clusters = rng.uniform(0.15 * size, 0.85 * size, (int(rng.integers(1, 5)), 2))
        spread = radius * rng.uniform(1.0, 2.0) * np.sqrt(count / len(clusters))
        points = clusters[rng.integers(0, len(clusters), count)] + rng.normal(0, spread, (count, 2))
        return np.clip(points, 0, size - 1)
    if mode == "packed":
        step = radius * rng.uniform(1.5, 2.1)
        rows = np.arange(step / 2, size, step * np.sqrt(3) / 2)
        grid = np.array([(r, c + (i % 2) * step / 2) for i, r in enumerate(rows) for c in np.arange(0, size, step)])
        grid = grid[rng.permutation(len(grid))[:count]] + rng.normal(0, 0.15 * step, (min(count, len(grid)), 2))
        extra = rng.uniform(0, size, (count - len(grid), 2))
        return np.clip(np.concatenate([grid, extra]), 0, size - 1)
    return rng.uniform(0, size, (count, 2))


def _draw_layout(rng: np.random.Generator, size: int) -> list[tuple[str, float, np.ndarray, int, int]]:
    """The objects of one scene, in painting order: (family, radius, mask crop, crop top row, crop left column)."""
    scale = size / REFERENCE_SIZE
    density = str(rng.choice(list(DENSITY_PROBABILITIES), p=list(DENSITY_PROBABILITIES.values())))
    count = int(rng.integers(OBJECT_COUNT_RANGES[density][0], OBJECT_COUNT_RANGES[density][1] + 1))
    if density == "sparse":
        radius = _loguniform(rng, *SPARSE_RADIUS_RANGE) * scale
    else:
        coverage = rng.uniform(*COVERAGE_RANGES[density]) * REFERENCE_SIZE**2
        radius = float(np.clip(np.sqrt(coverage / (count * np.pi)), *RADIUS_LIMITS)) * scale
    balance = np.array([1 / sum(c == SHAPE_CLASSES[f] for c in SHAPE_CLASSES.values()) for f in SHAPE_FAMILIES])
    weights = rng.dirichlet(np.full(len(SHAPE_FAMILIES), 0.6)) * balance  # some scenes favour a few families
    families = rng.choice(SHAPE_FAMILIES, count, p=weights / weights.sum())
    radii = radius * np.exp(rng.normal(0, 0.25, count))
    objects = []
    for family, r, (cy, cx) in zip(families, radii, _positions(rng, count, size, radius, density)):
        mask, anchor_y, anchor_x = draw_shape(str(family), rng, max(r, 2.5))
        objects.append((str(family), float(r), mask, int(cy) - anchor_y, int(cx) - anchor_x))
    return objects


def _background(rng: np.random.Generator, size: int, look: _Look, name: str) -> np.ndarray:
    """The background's level, slow gradient and faint texture: size x size float32."""
    y = np.linspace(-0.5, 0.5, size, dtype=np.float32)[:, None]
    x = np.linspace(-0.5, 0.5, size, dtype=np.float32)[None, :]
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        slow = np.float32(np.cos(angle)) * x + np.float32(np.sin(angle)) * y + 0.5
    else:
        field_ = smooth_noise(rng, (size, size), size * rng.uniform(0.3, 0.6))
        slow = (field_ - field_.min()) / max(float(np.ptp(field_)), 1e-6)
    large = name in ("dome", "gradient")  # a vignette or a ramp spans the image; other textures are fine
    feature = size * rng.uniform(0.4, 0.8) if large else rng.uniform(6, 40) * size / REFERENCE_SIZE
    amplitude = rng.uniform(*look.background_texture_range) * look.contrast
    pattern = texture(name, rng, (size, size), feature) if name != "flat" else 0.0
    return look.background_level + look.gradient * slow + np.float32(amplitude) * pattern


def _paint(rng: np.random.Generator, size: int, look: _Look, objects: list, textures: Sequence[str]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Paint objects in order. Returns the raw instance map (size x size int32, 1..len(objects), later objects on
    top), each pixel's step above the background (float32), the colour of each object (len + 1 x 3, row 0 zero)
    and each object's texture name."""
    count = len(objects)
    ratios = np.exp(rng.normal(0, 0.25, count))
    depths = rng.uniform(*look.texture_depth_range, count)
    colours = np.concatenate([np.zeros((1, 3), np.float32), look.palette[rng.integers(0, len(look.palette), count)]])
    subset = rng.choice(len(textures), int(rng.integers(1, min(3, len(textures)) + 1)), replace=False)
    names = [textures[subset[i]] for i in rng.integers(0, len(subset), count)]
    steps = np.clip(look.contrast * ratios, *look.contrast_range)
    raw = np.zeros((size, size), np.int32)
    step_map = np.zeros((size, size), np.float32)
    for i, ((_, radius, mask, top, left), name) in enumerate(zip(objects, names), start=1):
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + mask.shape[0], size), min(left + mask.shape[1], size)
        if y1 <= y0 or x1 <= x0:
            continue
        crop = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
        inside = mask[crop]
        pattern = texture(name, rng, mask.shape, radius)[crop] if name != "flat" else 1.0
        level = np.float32(steps[i - 1]) * (1 - np.float32(depths[i - 1]) * (1 - pattern))
        raw[y0:y1, x0:x1][inside] = i
        step_map[y0:y1, x0:x1][inside] = (level[inside] if np.ndim(level) else level)
    return raw, step_map, colours, names


def _degrade(image: np.ndarray, look: _Look, rng: np.random.Generator) -> np.ndarray:
    """Blur, noise and salt-and-pepper on a float32 image (Y x X or Y x X x 3); returns Y x X x 3 uint8."""
    if look.inverted:
        image = 1 - image
    if look.blur_sigma > 0:
        image = ndimage.gaussian_filter(image, (look.blur_sigma, look.blur_sigma, 0)[:image.ndim], truncate=3.0)
    sigma = look.noise_std
    if sigma > 0:
        gaussian = {"gaussian": sigma, "poisson": 0.0, "mixed": sigma / np.sqrt(2)}[look.noise_model]
        shot = np.sqrt(max(sigma**2 - gaussian**2, 0.0))
        if shot > 0:  # Poisson noise whose std at the image's mean level is `shot`
            photons = max(float(image.mean()), 0.02) / shot**2
            signal = np.clip(image, 0, None)
            if float(image.mean()) * photons < 30:  # few photons: draw them
                image = rng.poisson(signal * photons).astype(np.float32) / np.float32(photons)
            else:  # many: the Gaussian limit, with the same signal-dependent variance, is much faster
                image = image + np.sqrt(signal / np.float32(photons)) * rng.standard_normal(image.shape, np.float32)
        if gaussian > 0:
            image = image + np.float32(gaussian) * rng.standard_normal(image.shape, np.float32)
    if look.salt_pepper > 0:
        hit = rng.random(image.shape[:2]) < look.salt_pepper
        values = rng.integers(0, 2, int(hit.sum())).astype(np.float32)
        image[hit] = values[:, None] if image.ndim == 3 else values
    out = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
    return out if out.ndim == 3 else np.repeat(out[:, :, None], 3, axis=2)


def finish(image: np.ndarray, rng: np.random.Generator, weakest_contrast: float) -> np.ndarray:
    """Blur, noise and salt-and-pepper drawn from the pretraining ranges (``BLUR_SIGMA_RANGE``, ``NOISE_STD_RANGE``)
    on a float32 image in [0, 1] (Y x X or Y x X x 3) -> Y x X x 3 uint8, for scenes drawn elsewhere than here
    (``imaging_cells``, ``imaging_tissue``). ``weakest_contrast``: the smallest step between an object and what
    surrounds it; the noise is kept at or below ``weakest_contrast / MIN_SNR``, so no pretraining scene reaches the
    contrast-to-noise ratios of the "noise" shift."""
    look = _draw_look(rng, image.shape[0] / REFERENCE_SIZE)
    look = replace(look, colour=image.ndim == 3, noise_std=min(look.noise_std, weakest_contrast / MIN_SNR))
    return _degrade(image.astype(np.float32), look, rng)


def _scene(rng: np.random.Generator, size: int, textures: tuple[str, ...], shift: str | None) -> Scene:
    """Draw a scene; a layout that leaves no object visible (rare) is redrawn. Separate generators for the
    layout, the look, the textures, the noise and the shift keep a shifted scene's layout equal to the clean one's."""
    unknown = [t for t in textures if t not in TEXTURE_FAMILIES]
    if unknown or not textures:
        raise ValueError(f"unknown or no textures {unknown}; choose from {', '.join(TEXTURE_FAMILIES)}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    while True:
        layout_rng, look_rng, texture_rng, noise_rng, shift_rng = (
            np.random.default_rng(seed) for seed in rng.integers(0, 2**63, 5))
        objects = _draw_layout(layout_rng, size)
        look = _draw_look(look_rng, size / REFERENCE_SIZE)
        if shift is not None:
            look = _shift_look(look, shift, shift_rng, size / REFERENCE_SIZE)
        raw, step_map, colours, names = _paint(texture_rng, size, look, objects, textures)
        areas = np.bincount(raw.ravel(), minlength=len(objects) + 1)
        keep = np.flatnonzero(areas[1:] >= MIN_AREA) + 1  # depends on the layout alone
        if keep.size:
            break
    background_name = textures[int(texture_rng.integers(0, len(textures)))]
    background = _background(texture_rng, size, look, background_name)
    if look.colour:
        image = background[:, :, None] * look.tint + step_map[:, :, None] * colours[raw]
    else:
        image = background + step_map
    renumber = np.zeros(len(objects) + 1, np.int32)
    renumber[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    return Scene(image=_degrade(image.astype(np.float32), look, noise_rng), instances=renumber[raw],
                 classes=np.array([SHAPE_CLASSES[objects[i - 1][0]] for i in keep], np.int32),
                 shape_families=tuple(objects[i - 1][0] for i in keep),
                 object_textures=tuple(names[i - 1] for i in keep), background_texture=background_name)


def random_scene(rng: np.random.Generator, size: int = 256, textures: Sequence[str] = TRAIN_TEXTURES) -> Scene:
    """A pretraining scene of size x size pixels (at least 16) with at least one object, its objects and background
    textured with families from ``textures`` (``textures.TEXTURE_FAMILIES``; unknown names raise ValueError)."""
    return _scene(rng, size, tuple(textures), None)


def shifted_scene(rng: np.random.Generator, shift: str, size: int = 256) -> Scene:
    """A scene drawn like ``random_scene`` (the same layout for a generator in the same state), then shifted as
    pretraining never shows (see the ``SHIFT_`` ranges): one of ``SHIFTS``."""
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; choose from {', '.join(SHIFTS)}")
    textures = (HELD_OUT_TEXTURE,) if shift == "new_texture" else TRAIN_TEXTURES
    return _scene(rng, size, textures, shift)


def class_labels(scene: Scene) -> np.ndarray:
    """Semantic map of ``scene``: Y x X uint8, 0 background, else the class of the object there."""
    lookup = np.concatenate([[0], scene.classes]).astype(np.uint8)
    return lookup[scene.instances]
