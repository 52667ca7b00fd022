"""How much an intervention changed an image: pixel distance and, on the demo model, the attributes that changed.

This module owns
  - `pixel_effect`: mean absolute difference of two uint8 images on [0, 1] (0: identical);
  - `Effect` / `effects`: per image, its pixel effect and, on the demo model (`is_demo`), the attributes of image and
    baseline read back from pixels by shapes.score_image, and which of them changed (`attribute_changes`);
  - `has_concept`: whether scored attributes show a concept such as "colour=red".
Off the demo model there is no attribute scorer: attributes are None.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backend.models.base import DiffusionModel


def pixel_effect(baseline_HW3: np.ndarray, image_HW3: np.ndarray) -> float:
    """Mean absolute pixel difference on [0, 1] (0: identical, 1: black vs white everywhere)."""
    a = np.asarray(baseline_HW3, dtype=np.float32) / 255.0
    b = np.asarray(image_HW3, dtype=np.float32) / 255.0
    return float(np.abs(a - b).mean())


def is_demo(model: DiffusionModel) -> bool:
    return getattr(model, "family", "") == "demo"


def attribute_changes(before: dict[str, str], after: dict[str, str]) -> dict[str, list[str]]:
    """{attribute: [before, after]} for the attributes that differ."""
    return {k: [before[k], after[k]] for k in before if before[k] != after.get(k)}


@dataclass
class Effect:
    """How one image differs from its baseline."""

    effect: float
    attributes: dict[str, str] | None = None
    baseline_attributes: dict[str, str] | None = None

    @property
    def changed(self) -> dict[str, list[str]] | None:
        if self.attributes is None:
            return None
        return attribute_changes(self.baseline_attributes, self.attributes)


def effects(baseline_NHW3: np.ndarray, images_NHW3: np.ndarray, demo: bool) -> list[Effect]:
    """Per image: pixel effect and (demo) scored attributes of image and baseline."""
    from backend.demo import shapes

    out = []
    for base, img in zip(baseline_NHW3, images_NHW3, strict=True):
        attrs = (shapes.score_image(img), shapes.score_image(base)) if demo else (None, None)
        out.append(Effect(pixel_effect(base, img), *attrs))
    return out


def has_concept(attrs: dict[str, str], concept: str) -> bool:
    """The scored attributes show the concept ("colour=red": attrs["colour"] == "red")."""
    key, _, value = concept.partition("=")
    return attrs.get(key) == value
