"""Generated target domains where a pixel classifier and the plugin are expected to differ (issue 22): pure numpy,
scipy and scikit-image, one image per seed (the same seed gives the same arrays).

- :func:`anatomy_image`: a body (a warped ellipse, class 0 outside it) cut into large smooth adjacent organs by a
  warped Voronoi partition, five organ classes (1-5; each present in every image). The organs' textures are alike:
  means 0.42-0.58 (0.03 apart between neighbours, jittered by 0.01 per image) under texture 0.06 and noise 0.05,
  band-pass noise that differs in scale (1.2-3.5 px) and orientation (classes 1 and 2 mostly in orientation, which
  rotation-invariant filters do not see); then an illumination field (0.02), a 1 px blur and noise. Labels: 0..5.
- :func:`lesion_image`: a textured organ on a darker background, with small lesions (warped discs of radius 3.5-8 px
  at 512 px), each a little brighter or darker than the organ (contrast 0.13-0.2 of the range, under noise 0.04 and
  an organ texture of about 0.07; the faint variant 0.07-0.12), covering 0.15-0.4 % of the image in total (or
  none). Labels: 0 / 1 lesion.
- :func:`thin_image`: smooth random curves 1-3 px wide (a random walk whose turning rate is smoothed noise), darker
  than a textured background that also holds unlabelled dark round spots (vesicles, 3-6 px radius) a pixel
  classifier must tell from the curves; then noise. Labels: 0 / 1 curve.
- :func:`crowded_cells_image` (issue 23): a fluorescence-like field of many bright cells (nuclei) on a dark smooth
  background, 256 px: warped ellipses of mean radius 6-12 px and aspect 1-1.7 (random orientation, outline wobble
  of up to 3 x 6 %). Clumps of 2-5 touching cells (30 % of the clumps) and single cells are scattered at random,
  apart from each other, until no more fit (70-100 cells covering 24-32 % of the image), so that about half the
  cells touch another (mean 56 %, 40-70 % in most images, over seeds 0-39). Where ellipses overlap, each pixel goes
  to the cell it lies deeper in, so touching cells meet along a line; the cells' pixels on that line are dimmed by
  0-15 % (drawn per image: a slight dip, or none). Each cell has its own brightness (0.4-0.9) falling towards its
  rim by 5-25 %, and a fine texture (0.04); the background (0.08) varies slowly (0.04); then a 1 px blur and noise
  0.03. Labels: 0 / 1 cell; instances: one id per cell (int32).

Images are Y x X uint8 (intensities below are fractions of 255); lengths are pixels at each generator's default
size and scale with ``size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.draw import line

ANATOMY_SIZE = 320
LESION_SIZE = 512
THIN_SIZE = 256
ANATOMY_CLASSES = 6  # background + 5 organs
ANATOMY_REGIONS = 9  # Voronoi cells inside the body (organs of one class may touch and merge)
#: Per class (0 = outside the body): mean intensity, texture scale (px), orientation (degrees), anisotropy.
ANATOMY_LOOKS = ((0.30, 1.5, 0.0, 1.0), (0.47, 2.0, 0.0, 2.5), (0.53, 2.0, 90.0, 2.5), (0.50, 3.5, 45.0, 1.5),
                 (0.58, 2.5, 0.0, 1.0), (0.42, 1.2, 135.0, 2.0))
ANATOMY_TEXTURE = 0.06
ANATOMY_NOISE = 0.05
ANATOMY_BIAS = 0.02  # std of the slow illumination field
LESION_SHARE = (0.0015, 0.004)  # total lesion area, fraction of the image
LESION_RADIUS = (3.5, 8.0)
#: Lesion contrast (fraction of the range) of ``tiny_lesions``: chosen so that the random forest finds them about as
#: well as it found the real CT lesion of issue 22 (Dice 0.33 here on seed 0, 0.37 there), before the plugin was run
#: on it. ``tiny_lesions_faint`` keeps the first version's contrast, at which lesions are no brighter than the organ's
#: own texture blobs of their size (forest Dice 0.085).
LESION_CONTRAST = (0.13, 0.20)
LESION_CONTRAST_FAINT = (0.07, 0.12)
LESION_NOISE = 0.04
THIN_CURVES = (6, 12)
THIN_CONTRAST = (0.2, 0.35)
THIN_NOISE = 0.06
THIN_WIDTHS = (1, 2, 3)
CROWDED_SIZE = 256
CROWDED_RADIUS = (6.0, 12.0)  # mean radius of a cell
CROWDED_ASPECT = (1.0, 1.7)  # long over short axis
CROWDED_WOBBLE = 0.06  # amplitude of each of the outline's 2nd, 3rd and 5th harmonics, at most
CROWDED_WARP = 1.0  # px, a smooth displacement of the whole field
CROWDED_SINGLE = 0.7  # chance that a clump is a single cell
CROWDED_CLUMP = 5  # cells in a clump, at most
CROWDED_SPACING = 0.75  # centres of cells of one clump at least this times (r_i + r_j) apart
CROWDED_APART = 1.4  # the same for cells of different clumps (they do not touch)
CROWDED_MIN_AREA = 20  # px; smaller pieces (cut by the border or a neighbour) are dropped
CROWDED_LEVELS = (0.4, 0.9)
CROWDED_FALLOFF = (0.05, 0.25)  # dimmer at the rim than at the centre by this share
CROWDED_SEAM = (0.0, 0.15)
CROWDED_BACKGROUND = 0.08
CROWDED_BLUR = 1.0
CROWDED_NOISE = 0.03


@dataclass
class GeneratedImage:
    """image: Y x X uint8. labels: Y x X uint8 class per pixel (0 background). instances: Y x X int32, the
    connected objects (organs, lesions, curves; 0 none), for the zero-shot box prompts; crowded cells: one id per
    cell, touching cells distinct."""

    image: np.ndarray
    labels: np.ndarray
    instances: np.ndarray


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise, zero mean and unit std (float64, ``shape``)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field - field.mean()) / max(field.std(), 1e-12)


def oriented_texture(rng: np.random.Generator, shape: tuple[int, int], scale: float, angle: float,
                     anisotropy: float) -> np.ndarray:
    """White noise low-passed by an anisotropic Gaussian (std ``scale`` px across ``angle`` degrees, ``anisotropy``
    times longer along it) in the Fourier domain, zero mean and unit std (float64, ``shape``)."""
    ky, kx = np.meshgrid(np.fft.fftfreq(shape[0]), np.fft.fftfreq(shape[1]), indexing="ij")
    theta = np.deg2rad(angle)
    along, across = kx * np.cos(theta) + ky * np.sin(theta), -kx * np.sin(theta) + ky * np.cos(theta)
    gain = np.exp(-2 * np.pi**2 * ((along * scale * anisotropy) ** 2 + (across * scale) ** 2))
    field = np.fft.ifft2(np.fft.fft2(rng.standard_normal(shape)) * gain).real
    return (field - field.mean()) / max(field.std(), 1e-12)


def _warped_grid(rng: np.random.Generator, size: int, amplitude: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (rows, columns; size x size float64) displaced by a smooth random field."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    shape = (size, size)
    return yy + amplitude * smooth_field(rng, shape, sigma), xx + amplitude * smooth_field(rng, shape, sigma)


def _warped_ellipse(rng: np.random.Generator, size: int, centre: np.ndarray, radii: np.ndarray,
                    wobble: float) -> np.ndarray:
    """size x size bool: an axis-aligned ellipse whose outline is displaced by up to about ``wobble`` px."""
    yy, xx = _warped_grid(rng, size, wobble, max(radii.min() / 2, 2.0))
    return ((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2 <= 1.0


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _components(labels: np.ndarray) -> np.ndarray:
    """Connected regions of every non-zero class, numbered 1.. (int32, labels' shape)."""
    instances, count = np.zeros(labels.shape, np.int32), 0
    for value in np.unique(labels[labels > 0]):
        parts, n = ndimage.label(labels == value)
        instances[parts > 0] = parts[parts > 0] + count
        count += n
    return instances


def anatomy_image(seed: int, size: int = ANATOMY_SIZE) -> GeneratedImage:
    """A body of five organ classes on background (labels 0..5, every class present); see the module docstring."""
    rng = np.random.default_rng(seed)
    scale = size / ANATOMY_SIZE
    centre = size / 2 + rng.uniform(-0.05, 0.05, 2) * size
    body = _warped_ellipse(rng, size, centre, rng.uniform(0.38, 0.46, 2) * size, 12 * scale)
    inside = np.argwhere(body)
    seeds = inside[rng.choice(len(inside), ANATOMY_REGIONS, replace=False)].astype(np.float64)
    yy, xx = _warped_grid(rng, size, 14 * scale, 24 * scale)
    nearest = np.argmin([(yy - y) ** 2 + (xx - x) ** 2 for y, x in seeds], axis=0)
    region_class = np.concatenate([rng.permutation(np.arange(1, ANATOMY_CLASSES)),
                                   rng.integers(1, ANATOMY_CLASSES, ANATOMY_REGIONS - ANATOMY_CLASSES + 1)])
    labels = np.where(body, region_class[nearest], 0).astype(np.uint8)
    for value in set(range(1, ANATOMY_CLASSES)) - set(np.unique(labels).tolist()):  # a region lost to the warp
        labels[(nearest == np.flatnonzero(region_class == value)[0]) & body] = value
    image = np.zeros((size, size))
    for value, (mean, texture_scale, angle, anisotropy) in enumerate(ANATOMY_LOOKS):
        texture = oriented_texture(rng, (size, size), texture_scale * scale, angle + rng.uniform(-10, 10), anisotropy)
        level = mean + rng.uniform(-0.01, 0.01)
        image = np.where(labels == value, level + ANATOMY_TEXTURE * texture, image)
    image += ANATOMY_BIAS * smooth_field(rng, (size, size), size / 3)
    image = ndimage.gaussian_filter(image, 1.0) + ANATOMY_NOISE * rng.standard_normal((size, size))
    return GeneratedImage(_to_uint8(image), labels, _components(labels))


def lesion_image(seed: int, size: int = LESION_SIZE, lesions: bool = True,
                 contrast: tuple[float, float] = LESION_CONTRAST) -> GeneratedImage:
    """A textured organ with small lesions (labels 0 / 1; none when ``lesions`` is False) of a contrast drawn from
    ``contrast``; see the module docstring. The same seed gives the same organ and lesions at any contrast."""
    rng = np.random.default_rng(seed)
    scale = size / LESION_SIZE
    organ = _warped_ellipse(rng, size, size / 2 + rng.uniform(-0.04, 0.04, 2) * size,
                            rng.uniform(0.36, 0.44, 2) * size, 16 * scale)
    shape = (size, size)
    tissue = 0.05 * oriented_texture(rng, shape, 3.0 * scale, rng.uniform(0, 180), 1.0) \
        + 0.03 * oriented_texture(rng, shape, 1.2 * scale, rng.uniform(0, 180), 1.5)
    image = np.where(organ, 0.5, 0.2) + np.where(organ, tissue, 0.4 * tissue)
    image += 0.05 * smooth_field(rng, shape, size / 4)
    instances = np.zeros(shape, np.int32)
    if lesions:
        room = ndimage.distance_transform_edt(organ) > 2 * LESION_RADIUS[1] * scale
        target = rng.uniform(*LESION_SHARE) * size * size
        while (instances > 0).sum() < target:
            radius = max(rng.uniform(*LESION_RADIUS) * scale, 2.0)
            y, x = np.argwhere(room & (instances == 0))[rng.integers(0, int((room & (instances == 0)).sum()))]
            radii = radius * np.array([1.0, rng.uniform(0.7, 1.0)])[rng.permutation(2)]
            disc = _warped_ellipse(rng, size, np.array([y, x], float), radii, radius / 4) & (instances == 0)
            if (instances > 0).sum() + disc.sum() > LESION_SHARE[1] * 1.25 * size * size or not disc.any():
                break  # never past 0.5 % of the image
            instances[disc] = instances.max() + 1
            sign = rng.choice([-1.0, 1.0])
            image += sign * rng.uniform(*contrast) * ndimage.gaussian_filter(disc.astype(float), 1.0)
    image = image + LESION_NOISE * rng.standard_normal(shape)
    return GeneratedImage(_to_uint8(image), (instances > 0).astype(np.uint8), instances)


def _curve(rng: np.random.Generator, size: int, length: int) -> np.ndarray:
    """size x size bool: the 1 px, 8-connected path of a random walk with a smoothly varying heading."""
    turn = ndimage.gaussian_filter1d(rng.standard_normal(length), 15) * 0.25
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(turn)
    points = rng.uniform(0, size, 2) + np.cumsum(np.stack([np.sin(heading), np.cos(heading)], 1), axis=0)
    points = np.round(points).astype(int)
    mask = np.zeros((size, size), bool)
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
        rr, cc = line(y0, x0, y1, x1)
        keep = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
        mask[rr[keep], cc[keep]] = True
    return mask


def thin_image(seed: int, size: int = THIN_SIZE) -> GeneratedImage:
    """Thin dark curves on a textured background with dark spots (labels 0 / 1); see the module docstring."""
    rng = np.random.default_rng(seed)
    scale = size / THIN_SIZE
    shape = (size, size)
    image = 0.55 + 0.05 * oriented_texture(rng, shape, 4.0 * scale, 0.0, 1.0) \
        + 0.03 * oriented_texture(rng, shape, 1.0, rng.uniform(0, 180), 2.0) + 0.05 * smooth_field(rng, shape, size / 3)
    spots = np.zeros(shape)
    for _ in range(rng.integers(8, 16)):
        radius = rng.uniform(3, 6) * scale
        disc = _warped_ellipse(rng, size, rng.uniform(0, size, 2), np.array([radius, radius]), 1.0)
        spots = np.maximum(spots, rng.uniform(0.1, 0.25) * disc)
    image -= ndimage.gaussian_filter(spots, 1.0)
    instances = np.zeros(shape, np.int32)
    count = int(round(rng.integers(THIN_CURVES[0], THIN_CURVES[1] + 1) * scale))
    for index in range(1, max(count, 1) + 1):
        curve = _curve(rng, size, int(rng.uniform(0.4, 1.2) * size))
        width = int(rng.choice(THIN_WIDTHS))
        if width > 1:
            footprint = np.ones((2, 2), bool) if width == 2 else ndimage.generate_binary_structure(2, 1)
            curve = ndimage.binary_dilation(curve, footprint)
        instances[curve] = index
        image -= rng.uniform(*THIN_CONTRAST) * ndimage.gaussian_filter(curve.astype(float), 0.5)
    image += THIN_NOISE * rng.standard_normal(shape)
    return GeneratedImage(_to_uint8(image), (instances > 0).astype(np.uint8), instances)


def _place_cells(rng: np.random.Generator, size: int, scale: float) -> list[tuple[np.ndarray, float, float, float]]:
    """Cell outlines of :func:`crowded_cells_image`: (centre (2,) float, mean radius px, aspect, angle radians) each.

    Clumps are drawn one by one until 50 in a row found no room (the field is full): a clump is one cell with chance
    :data:`CROWDED_SINGLE`, else 2 to :data:`CROWDED_CLUMP` cells. Its first cell lies anywhere at least
    :data:`CROWDED_APART` x (r_i + r_j) from every cell; each further one against a random cell of its clump
    (centres (r_i + r_j) x 0.8-1.0 apart, so their ellipses meet), at least :data:`CROWDED_SPACING` x (r_i + r_j)
    from the clump's cells and :data:`CROWDED_APART` x (r_i + r_j) from the others' (10 tries)."""
    cells: list[tuple[np.ndarray, float, float, float]] = []
    misses = 0

    def fits(centre: np.ndarray, radius: float, clump: int) -> bool:
        return bool(0 <= centre[0] < size and 0 <= centre[1] < size) and all(
            np.hypot(*(centre - c)) >= (CROWDED_SPACING if i >= clump else CROWDED_APART) * (radius + r)
            for i, (c, r, _, _) in enumerate(cells))

    while misses < 50:
        members = 1 if rng.random() < CROWDED_SINGLE else int(rng.integers(2, CROWDED_CLUMP + 1))
        clump = len(cells)
        for member in range(members):
            for _ in range(10 if member else 1):
                radius = rng.uniform(*CROWDED_RADIUS) * scale
                if member:
                    other_centre, other_radius = cells[rng.integers(clump, len(cells))][:2]
                    heading = rng.uniform(0, 2 * np.pi)
                    centre = other_centre + rng.uniform(0.8, 1.0) * (radius + other_radius) * np.array(
                        [np.sin(heading), np.cos(heading)])
                else:
                    centre = rng.uniform(0, size, 2)
                if fits(centre, radius, clump):
                    cells.append((centre, radius, rng.uniform(*CROWDED_ASPECT), rng.uniform(0, np.pi)))
                    break
            if len(cells) == clump:  # no room for the clump's first cell
                break
        misses = misses + 1 if len(cells) == clump else 0
    return cells


def crowded_cells_image(seed: int, size: int = CROWDED_SIZE) -> GeneratedImage:
    """Many touching, roundish-to-elongated bright cells on a dark background (labels 0 / 1, instances 1..n); see
    the module docstring."""
    rng = np.random.default_rng(seed)
    scale = size / CROWDED_SIZE
    shape = (size, size)
    yy, xx = _warped_grid(rng, size, CROWDED_WARP * scale, 4.0 * scale)
    # Every pixel goes to the cell of smallest normalised elliptical distance q (its outline at q = 1), so cells
    # whose ellipses overlap meet along a line instead of overlapping.
    nearest, owner = np.full(shape, np.inf), np.zeros(shape, np.int32)
    profiles = []
    for index, (centre, radius, aspect, angle) in enumerate(_place_cells(rng, size, scale), start=1):
        dy, dx = yy - centre[0], xx - centre[1]
        along, across = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
        theta = np.arctan2(across, along)
        wobble = 1 + sum(rng.uniform(0, CROWDED_WOBBLE) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
                         for k in (2, 3, 5))
        q = np.hypot(along / (radius * np.sqrt(aspect)), across * np.sqrt(aspect) / radius) / wobble
        closer = (q <= 1.0) & (q < nearest)
        nearest[closer], owner[closer] = q[closer], index
        profiles.append((rng.uniform(*CROWDED_LEVELS), rng.uniform(*CROWDED_FALLOFF)))
    image = CROWDED_BACKGROUND + 0.04 * smooth_field(rng, shape, size / 3)
    texture = 0.04 * smooth_field(rng, shape, 1.5 * scale)
    instances = np.zeros(shape, np.int32)
    for index, (level, falloff) in enumerate(profiles, start=1):  # a cell keeps its largest piece (>= min area)
        parts, count = ndimage.label(owner == index)
        if count:
            cell = parts == 1 + int(np.argmax(np.bincount(parts.ravel())[1:]))
            if cell.sum() >= CROWDED_MIN_AREA * scale**2:
                instances[cell] = instances.max() + 1
                image[cell] = level * (1 - falloff * nearest[cell] ** 2) + texture[cell]
    # The seam: cell pixels with a 4-neighbour in another cell, dimmed by a share drawn per image (maybe none).
    cross = ndimage.generate_binary_structure(2, 1)
    highest = ndimage.grey_dilation(instances, footprint=cross)
    lowest = ndimage.grey_erosion(np.where(instances > 0, instances, np.iinfo(np.int32).max), footprint=cross)
    seam = (instances > 0) & ((highest != instances) | (lowest != instances))
    image[seam] *= 1 - rng.uniform(*CROWDED_SEAM)
    image = ndimage.gaussian_filter(image, CROWDED_BLUR * scale) + CROWDED_NOISE * rng.standard_normal(shape)
    return GeneratedImage(_to_uint8(image), (instances > 0).astype(np.uint8), instances)
