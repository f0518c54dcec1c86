"""The painter of the synthetic HAM10000: draws one photo of one lesion.

The class is visible in each photo (a small CNN learns it above chance even at 32 px): a
skin-tone background with noise and a dermatoscope vignette, and an elliptical lesion whose
colour, size, border and pattern depend on the class. The lesion's own look (shape, colours,
pattern phase, the patient's skin tone and its uneven blotches) is drawn once per lesion and
shared by all its
images; each image adds its own framing (position, rotation, scale) and lighting, as photos
of the same lesion would. Every photo has its own random streams, keyed by the seed and the
lesion's and image's numbers, so the same job always gives the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageChops


@dataclass(frozen=True)
class ImageJob:
    """One photo to draw (and, for a planted near-duplicate, to alter)."""

    name: str            # file name inside the zip, e.g. ISIC_0024306.jpg
    code: str            # dx
    lesion_key: int      # keys of the lesion's and the image's random streams
    image_key: int
    seed: int
    width: int
    height: int
    copy_key: int = -1   # >= 0: a planted near-duplicate of the image this job draws


@dataclass(frozen=True)
class _ClassStyle:
    """How one class looks: colours (RGB in 0..1), size, border and pattern."""

    color: tuple[float, float, float]
    color2: tuple[float, float, float]    # the pattern's second colour
    radius: tuple[float, float]           # semi-major axis, fraction of half the short side
    irregularity: float                   # amplitude of the border's angular harmonics
    edge: float                           # soft border width (in lesion radii)
    pattern: str


_STYLES: dict[str, _ClassStyle] = {
    "nv": _ClassStyle((0.45, 0.28, 0.18), (0.30, 0.17, 0.10), (0.45, 0.70), 0.04, 0.10,
                      "reticular"),
    "mel": _ClassStyle((0.22, 0.13, 0.10), (0.36, 0.40, 0.52), (0.65, 1.00), 0.22, 0.20,
                       "multicolor"),
    "bkl": _ClassStyle((0.70, 0.56, 0.28), (0.90, 0.86, 0.55), (0.50, 0.80), 0.08, 0.06,
                       "dots"),
    "bcc": _ClassStyle((0.93, 0.72, 0.76), (0.72, 0.10, 0.20), (0.45, 0.70), 0.10, 0.15,
                       "lines"),
    "akiec": _ClassStyle((0.80, 0.42, 0.36), (0.96, 0.93, 0.88), (0.50, 0.75), 0.15, 0.25,
                         "scaly"),
    "df": _ClassStyle((0.55, 0.36, 0.26), (0.93, 0.88, 0.82), (0.32, 0.48), 0.05, 0.20,
                      "ring"),
    "vasc": _ClassStyle((0.62, 0.10, 0.26), (0.35, 0.05, 0.25), (0.32, 0.52), 0.06, 0.05,
                        "lobules"),
}
# Classes that look alike in real dermoscopy (the errors of real classifiers cluster in
# nv/mel/bkl, then akiec/bcc/bkl). A lesion borrows the look of one of its look-alikes with
# `_MIMIC_PROBABILITY`: part of its colours and shape, and half the time its pattern. So the
# synthetic sample is learnable but not trivially: some lesions of a class look more like
# another one, as in the real data, and no model reaches a perfect score on it.
_LOOKALIKES: dict[str, tuple[str, ...]] = {
    "nv": ("mel", "bkl", "df"), "mel": ("nv", "bkl"), "bkl": ("nv", "mel", "akiec"),
    "bcc": ("akiec", "vasc"), "akiec": ("bcc", "bkl"), "df": ("nv", "bkl"), "vasc": ("bcc",),
}
_MIMIC_PROBABILITY = 0.3
# How much of the look-alike's colours and shape a mimicking lesion takes.
_MIMIC_WEIGHT = (0.45, 0.85)
# The pattern's contrast against the lesion's base colour, per lesion: faint patterns are
# common, so the class is not always visible at a glance.
_PATTERN_CONTRAST = (0.4, 1.0)
# Patients' skin tones (RGB 0..1), light to medium.
_SKIN_TONES = np.array([
    [0.93, 0.76, 0.67], [0.88, 0.68, 0.58], [0.84, 0.62, 0.52], [0.78, 0.56, 0.45],
    [0.90, 0.72, 0.66], [0.80, 0.60, 0.50],
])


@lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates scaled so that half the short side is 1, centred."""
    half = min(h, w) / 2
    y = (np.arange(h, dtype=np.float32) - (h - 1) / 2) / half
    x = (np.arange(w, dtype=np.float32) - (w - 1) / 2) / half
    return y[:, None], x[None, :]


@lru_cache(maxsize=2)
def _grains(seed: int, width: int, height: int) -> tuple[Image.Image, ...]:
    """A few fixed full-size film grains (0..2*_GRAIN per channel); each photo takes one."""
    rng = np.random.default_rng([seed, 3])
    return tuple(
        Image.fromarray(rng.integers(0, 2 * _GRAIN + 1, size=(height, width, 3), dtype=np.uint8))
        for _ in range(_N_GRAINS)
    )


_N_GRAINS = 8
# Amplitude (grey levels) of the full-resolution grain. It gives the JPEGs about the size
# and decoding cost of the real full-quality ones (60-80 kB), so benchmarks are honest.
_GRAIN = 6


def _lesion_style(code: str, look: np.random.Generator) -> tuple[_ClassStyle, float]:
    """The look of one lesion: its class's style, or a blend with a look-alike's; and the
    contrast of its pattern."""
    style = _STYLES[code]
    contrast = float(look.uniform(*_PATTERN_CONTRAST))
    if look.random() >= _MIMIC_PROBABILITY:
        return style, contrast
    other = _STYLES[_LOOKALIKES[code][int(look.integers(len(_LOOKALIKES[code])))]]
    w = float(look.uniform(*_MIMIC_WEIGHT))

    def mix(a, b):
        return tuple(float(x) for x in (1 - w) * np.asarray(a) + w * np.asarray(b))

    pattern = other.pattern if look.random() < 0.5 else style.pattern
    return _ClassStyle(mix(style.color, other.color), mix(style.color2, other.color2),
                       mix(style.radius, other.radius),
                       (1 - w) * style.irregularity + w * other.irregularity,
                       (1 - w) * style.edge + w * other.edge, pattern), contrast


def render_image(job: ImageJob) -> Image.Image:
    """Draw one photo of one lesion as a PIL image of (job.width, job.height)."""
    # A stream of its own for the look, so the other draws of a lesion stay as they were.
    style, contrast = _lesion_style(job.code, np.random.default_rng([job.seed, 4, job.lesion_key]))
    lesion = np.random.default_rng([job.seed, 1, job.lesion_key])
    photo = np.random.default_rng([job.seed, 2, job.image_key])

    # Draw at a quarter of the size and upscale: the look is smooth at that scale, and it
    # keeps drawing cheaper than JPEG encoding (the target is >= 300 images/s on 2 cores).
    factor = max(1, min(4, min(job.width, job.height) // 64))
    w, h = max(16, job.width // factor), max(16, job.height // factor)
    y, x = _grid(h, w)

    # --- what the lesion is (shared by all photos of it)
    color = np.clip(np.array(style.color) * lesion.uniform(0.92, 1.08, 3), 0, 1)
    color2 = np.clip(np.array(style.color2) * lesion.uniform(0.94, 1.06, 3), 0, 1)
    color2 = color + contrast * (color2 - color)
    radius = lesion.uniform(*style.radius)
    aspect = lesion.uniform(0.65, 1.0)
    harmonics = np.arange(2, 6)
    amplitudes = style.irregularity * lesion.uniform(0.3, 1.0, 4) / harmonics * 2
    phases = lesion.uniform(0, 2 * np.pi, 4)
    freq = lesion.uniform(14, 22)
    pattern_phase = lesion.uniform(0, 2 * np.pi, 4).astype(np.float32)
    skin = np.clip(_SKIN_TONES[lesion.integers(len(_SKIN_TONES))]
                   * lesion.uniform(0.95, 1.05, 3), 0, 1)
    lobes = lesion.uniform(-0.5, 0.5, (5, 2)).astype(np.float32)
    # A stream of its own (added later), so the draws above keep their values.
    skin_blotches = _Skin.draw(np.random.default_rng([job.seed, 5, job.lesion_key]))

    # --- how this photo frames it
    cx, cy = photo.uniform(-0.25, 0.25, 2) * np.array([w / min(h, w) * 0.6, 0.6])
    theta = photo.uniform(0, 2 * np.pi)
    scale = photo.uniform(0.85, 1.15)
    light_dir = photo.uniform(0, 2 * np.pi)
    light = photo.uniform(0.0, 0.15)
    brightness = photo.uniform(0.92, 1.08)
    vignette = photo.uniform(0.2, 0.6)

    # The lesion's own frame (turned and zoomed with the photo), then its radius as unit.
    cos_t, sin_t = np.float32(math.cos(theta)), np.float32(math.sin(theta))
    xc, yc = x - np.float32(cx), y - np.float32(cy)
    xr = (cos_t * xc + sin_t * yc) / np.float32(scale)
    yr = (-sin_t * xc + cos_t * yc) / np.float32(scale)
    u, v = xr / np.float32(radius), yr / np.float32(radius * aspect)
    rr, alpha = _outline(u, v, amplitudes, phases, style.edge)

    lesion_rgb = _pattern(style.pattern, u, v, rr, color, color2, freq, pattern_phase,
                          lobes, photo)
    # float32 throughout: a float64 colour would silently promote every image-sized array.
    skin_rgb = skin_blotches.apply(skin.astype(np.float32), xr, yr)
    rgb = skin_rgb * (1 - alpha) + lesion_rgb * alpha

    # Light falls off across the field and towards the dermatoscope's rim.
    shade = (1 + light * (math.cos(light_dir) * x + math.sin(light_dir) * y)
             - vignette * np.clip(x * x + y * y - 1.2, 0, None))
    rgb = rgb * (shade * brightness)[..., None]
    rgb += photo.normal(0, 0.03, rgb.shape).astype(np.float32)
    return _full_size(rgb, job, factor, photo)


def _outline(u: np.ndarray, v: np.ndarray, amplitudes: np.ndarray, phases: np.ndarray,
             edge: float) -> tuple[np.ndarray, np.ndarray]:
    """The radius relative to the irregular border, and the lesion's soft mask (h, w, 1)."""
    r = np.sqrt(u * u + v * v)
    # Border: 1 + sum_k a_k cos(k*angle + p_k), from powers of the unit complex number
    # (u + iv) / r rather than arctan2 and four cosines (about 3x cheaper).
    unit = (u + 1j * v) / np.maximum(r, 1e-6)
    power = unit
    border = np.ones_like(r)
    for a, p in zip(amplitudes, phases, strict=True):  # harmonics 2..5
        power = power * unit
        border += np.float32(a) * (power * np.complex64(np.exp(1j * p))).real
    rr = r / border
    return rr, np.clip((1 - rr) / edge + 0.5, 0, 1)[..., None]


def _full_size(rgb: np.ndarray, job: ImageJob, factor: int,
               photo: np.random.Generator) -> Image.Image:
    """The drawn (h, w, 3) float picture as the photo: upscaled, with film grain."""
    # Leave room for the grain so that a plain modulo add cannot wrap (PIL's saturating
    # add costs 15x more); the offset keeps the mean level unchanged.
    low = np.clip(rgb * 255 + (0.5 - _GRAIN), 0, 255 - 2 * _GRAIN).astype(np.uint8)
    image = Image.fromarray(low, "RGB")
    if factor >= 2:
        # Bilinear to half size, then nearest 2x: the 2x2 pixel pairs vanish under the
        # grain and the JPEG, and it costs 0.6 ms instead of 1.5 ms for a bilinear 4x.
        half = ((job.width + 1) // 2, (job.height + 1) // 2)
        image = image.resize(half, Image.BILINEAR).resize((job.width, job.height),
                                                          Image.NEAREST)
    else:
        image = image.resize((job.width, job.height), Image.BILINEAR)
    grain = _grains(job.seed, job.width, job.height)[int(photo.integers(_N_GRAINS))]
    return ImageChops.add_modulo(image, grain)


@dataclass(frozen=True)
class _Skin:
    """The patient's uneven skin around one lesion: lighter and darker blotches a few lesion
    widths across, drawn once per lesion in the lesion's frame, so every photo of the lesion
    shows the same skin. Without it many naevi were plain brown ellipses on the same even
    background, and two distinct lesions could be as alike as a photo and its mirrored,
    slightly turned copy, which no near-duplicate check can tell apart. It changes the
    brightness only, not the hue, and leaves the lesion alone: the class stays as visible.
    """

    waves: np.ndarray     # (3, 4): frequency x, frequency y, phase, unused
    amplitude: float      # relative change of the skin's brightness

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Skin:
        return cls(_waves(rng, (1.5, 4.0)), float(rng.uniform(0.15, 0.30)))

    def apply(self, skin: np.ndarray, xr: np.ndarray, yr: np.ndarray) -> np.ndarray:
        """The skin colour `(3,)` at each pixel `(h, w, 3)` of the lesion's frame (xr, yr)."""
        field = _field(self.waves, xr, yr) * np.float32(self.amplitude)
        return skin * (1 + field[..., None])


def _waves(rng: np.random.Generator, frequency: tuple[float, float]) -> np.ndarray:
    """Three plane waves of random direction and phase: (3, 4) [fx, fy, phase, 0]."""
    k = rng.uniform(*frequency, 3)
    direction = rng.uniform(0, 2 * np.pi, 3)
    phase = rng.uniform(0, 2 * np.pi, 3)
    return np.stack([k * np.cos(direction), k * np.sin(direction), phase, np.zeros(3)],
                    axis=1).astype(np.float32)


def _field(waves: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smooth field the waves make at coordinates (a, b), about -1..1."""
    total = np.zeros(np.broadcast_shapes(a.shape, b.shape), np.float32)
    for fx, fy, phase, _ in waves:
        total += np.cos(fx * a + fy * b + phase)
    return total * np.float32(1 / 2.2)


def _pattern(
    pattern: str,
    u: np.ndarray,
    v: np.ndarray,
    rr: np.ndarray,
    color: np.ndarray,
    color2: np.ndarray,
    freq: float,
    phase: np.ndarray,
    lobes: np.ndarray,
    photo: np.random.Generator,
) -> np.ndarray:
    """The lesion's colour at each pixel, (h, w, 3) float32, by class pattern."""
    if pattern == "reticular":    # nv: a regular pigment network, darker in the centre
        net = 0.5 + 0.5 * np.cos(freq * u + phase[0]) * np.cos(freq * v + phase[1])
        mix = np.clip(0.6 * net + 0.4 * (1 - rr), 0, 1)
    elif pattern == "multicolor":  # mel: dark with blue-grey veils, asymmetric
        field = np.sin(2.5 * u + phase[0] + 1.5 * np.sin(3 * v + phase[1])) \
            + 0.6 * np.sin(4 * v + phase[2] + u)
        mix = np.clip(field * 0.8, 0, 1)
    elif pattern == "dots":       # bkl: waxy tan with milia-like light dots
        dots = np.cos(freq * 0.8 * u + phase[0]) * np.cos(freq * 0.8 * v + phase[1])
        mix = np.clip((dots - 0.4) * 3, 0, 1)
    elif pattern == "lines":      # bcc: pearly pink crossed by branching red vessels
        wave = np.sin(freq * 0.5 * (u + 0.5 * v) + 2 * np.sin(3 * v + phase[0]) + phase[1])
        wave2 = np.sin(freq * 0.4 * (v - 0.3 * u) + 2 * np.sin(3 * u + phase[2]) + phase[3])
        mix = np.exp(-np.minimum(wave * wave, wave2 * wave2) / 0.03)
    elif pattern == "scaly":      # akiec: red and rough, with white scale
        rough = photo.random(u.shape, dtype=np.float32)
        mix = np.clip((rough - 0.6) * 3, 0, 1) * np.clip(1.2 - rr, 0, 1)
    elif pattern == "ring":       # df: brown ring around a white scar-like centre
        mix = np.clip(1 - (rr - 0.2) / 0.3, 0, 1)
    elif pattern == "lobules":    # vasc: red-purple lobes with lighter septa
        d = np.min([(u - a) ** 2 + (v - b) ** 2 for a, b in lobes], axis=0)
        mix = np.clip(1 - d / 0.12, 0, 1)
    else:  # pragma: no cover - styles are fixed above
        raise AssertionError(pattern)
    mix = mix.astype(np.float32)[..., None]
    return color.astype(np.float32) * (1 - mix) + color2.astype(np.float32) * mix
