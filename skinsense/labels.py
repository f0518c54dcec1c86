"""The seven HAM10000 diagnosis classes, in the order every model of SkinSense uses."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LesionClass:
    """One HAM10000 diagnosis class."""

    code: str
    name: str
    description: str
    malignant: bool


CLASSES: tuple[LesionClass, ...] = (
    LesionClass(
        "akiec",
        "Actinic keratoses and intraepithelial carcinoma",
        "Rough, scaly sun-damage lesions; an early, non-invasive form of skin cancer.",
        True,
    ),
    LesionClass(
        "bcc",
        "Basal cell carcinoma",
        "The most common skin cancer; grows slowly and rarely spreads, but needs treatment.",
        True,
    ),
    LesionClass(
        "bkl",
        "Benign keratosis-like lesions",
        "Seborrhoeic keratoses, solar lentigines and lichen-planus-like keratoses; benign.",
        False,
    ),
    LesionClass(
        "df",
        "Dermatofibroma",
        "A firm, benign nodule of the skin's fibrous tissue.",
        False,
    ),
    LesionClass(
        "mel",
        "Melanoma",
        "A cancer of the pigment cells; can spread and must be seen by a dermatologist.",
        True,
    ),
    LesionClass(
        "nv",
        "Melanocytic nevi",
        "Common moles; benign growths of pigment cells.",
        False,
    ),
    LesionClass(
        "vasc",
        "Vascular lesions",
        "Angiomas, angiokeratomas, pyogenic granulomas and haemorrhage; usually benign.",
        False,
    ),
)

CLASS_CODES: tuple[str, ...] = tuple(c.code for c in CLASSES)
CODE_TO_INDEX: dict[str, int] = {code: i for i, code in enumerate(CLASS_CODES)}
BY_CODE: dict[str, LesionClass] = {c.code: c for c in CLASSES}
MALIGNANT_CODES: frozenset[str] = frozenset(c.code for c in CLASSES if c.malignant)
NUM_CLASSES = len(CLASSES)
