"""Which synthetic cases are healthy or partially labelled, and what a partial label keeps (``synthetic``)."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from scipy.ndimage import label as connected_components


def is_healthy(k: int, fraction: float) -> bool:
    """Case k healthy? Spread evenly, independent of the case count, >= 1 in any first 3 if fraction > 0."""
    f = Fraction(fraction).limit_denominator(1000)
    c = max(Fraction(0), 1 - 3 * f)  # phase: first healthy case at k <= 2
    return math.floor((k + 1) * f + c) > math.floor(k * f + c)


def is_partial(k: int, healthy_fraction: float, partial_fraction: float) -> bool:
    """Training case k partially labelled? ``partial_fraction`` of the lesion cases, spread as ``is_healthy`` spreads
    healthy cases over the lesion cases' order (healthy cases have no lesion to leave out)."""
    if partial_fraction <= 0 or is_healthy(k, healthy_fraction):
        return False
    return is_healthy(sum(not is_healthy(i, healthy_fraction) for i in range(k)), partial_fraction)


def largest_lesion(label: np.ndarray) -> np.ndarray:
    """The label with only its largest connected lesion (a partial annotation: the primary lesion marked)."""
    components, count = connected_components(label > 0)
    if count <= 1:
        return label.copy()
    largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
    return np.where(components == largest, label, 0).astype(label.dtype)
