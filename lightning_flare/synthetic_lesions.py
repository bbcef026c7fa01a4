"""Lesions and lesion mimics of the synthetic CT (``lightning_flare.synthetic``): ellipsoids centred in a host
organ, clear of each other, and their intensity against the host. Arrays are (x, y, z); lengths in mm."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.ndimage import distance_transform_edt

AIR, FAT, SOFT, LIVER, SPLEEN, KIDNEY, BONE, CORTEX, LUNG, AORTA = range(10)  # tissue ids
LESION_HOSTS, HOST_WEIGHTS = (LIVER, SOFT, SPLEEN, KIDNEY), (0.4, 0.3, 0.15, 0.15)
PARENCHYMA = (SOFT, LIVER, SPLEEN, KIDNEY)  # a lesion's HU keeps >= MIN_CONTRAST_HU from each of these
MIN_CONTRAST_HU = 40.0
RADIUS_MM, MIN_RADIUS_MM = (8.0, 25.0), 4.0
HALO = 1.3  # lesion, out to HALO x its radii, must lie in host or soft tissue
MIMIC_CONTRAST_HU = (25.0, 40.0)  # |mimic - host| HU, up to a lesion's lowest (lesions: 40-100 and >= 40 HU from
# every organ; mimics need not be): the weak-contrast end is ambiguous, as cysts and bowel are on real CT


@dataclass
class Lesion:
    centre_vox: tuple[float, float, float]  # (x, y, z) voxel index of the centre
    radii_mm: tuple[float, float, float]
    host: int  # tissue id of the host
    contrast_hu: float  # lesion HU minus host HU


def ellipsoid_box(axes, c, r, k: float = 1.0) -> tuple[slice, ...]:
    """Index box covering the ellipsoid (centre c, radii r, both mm) scaled by k."""
    return tuple(slice(int(np.searchsorted(a, ci - k * ri)), int(np.searchsorted(a, ci + k * ri, "right")))
                 for a, ci, ri in zip(axes, c, r))


def ellipsoid_q2(axes, c, r, box) -> np.ndarray:
    """Squared normalised ellipsoid radius over `box` of the grid (<= 1 inside); r may be inf."""
    a = [((ax[s] - ci) / ri) ** 2 for ax, s, ci, ri in zip(axes, box, c, r)]
    return a[0][:, None, None] + a[1][None, :, None] + a[2][None, None, :]


def lesion_contrast(rng: np.random.Generator, host_hu: float, organ_hus: Sequence[float]) -> float:
    """Lesion-minus-host HU: -90..-40 or +40..+100, with the lesion >= MIN_CONTRAST_HU away from every
    parenchymal organ of the case too (a soft-tissue lesion at the liver's HU would be a liver-coloured blob
    that no intensity tells apart from the liver's edge). Always satisfiable: organs span 25-70 HU."""
    while True:
        c = rng.uniform(40, 100) if rng.random() < 0.5 else -rng.uniform(40, 90)
        if all(abs(host_hu + c - h) >= MIN_CONTRAST_HU for h in organ_hus):
            return float(c)


def mimic_contrast(rng: np.random.Generator, host_hu: float, organ_hus: Sequence[float]) -> float:
    """Mimic-minus-host HU: +-MIMIC_CONTRAST_HU, either sign."""
    return float(rng.uniform(*MIMIC_CONTRAST_HU) * (1 if rng.random() < 0.5 else -1))


def place_lesion(rng, tissue, label, axes, spacing, hu, contrast=lesion_contrast) -> Lesion | None:
    """Ellipsoid centred in a host voxel, its halo in host/soft tissue and clear of other lesions (``label``'s
    ones, which it marks); ``contrast(rng, host_hu, organ_hus)`` draws its HU against the host."""
    host = int(rng.choice(LESION_HOSTS, p=HOST_WEIGHTS))
    radii = np.clip(rng.uniform(10.0, 25.0) * rng.uniform(0.8, 1.2, 3), *RADIUS_MM)
    st = max(1, round(3.0 / spacing[0]))  # distance map on a ~3 mm in-plane grid (fast)
    sub = (slice(None, None, st), slice(None, None, st))
    free = np.pad(np.isin(tissue[sub], (host, SOFT)) & (label[sub] == 0), 1)  # pad: stay inside
    dist = distance_transform_edt(free, sampling=spacing * [st, st, 1])[1:-1, 1:-1, 1:-1]
    dist[tissue[sub] != host] = 0
    for attempt in range(40):
        cand = np.flatnonzero(dist >= HALO * np.exp(np.log(radii).mean()))
        if cand.size:
            centre = np.array(np.unravel_index(rng.choice(cand), dist.shape), float) * [st, st, 1]
            c = centre * spacing
            box = ellipsoid_box(axes, c, radii, HALO)
            q2 = ellipsoid_q2(axes, c, radii, box)
            halo = q2 <= HALO ** 2
            if (all(c - HALO * radii >= 0) and all(c + HALO * radii <= [a[-1] for a in axes])
                    and np.isin(tissue[box][halo], (host, SOFT)).all() and not label[box][halo].any()):
                label[box][q2 <= 1] = 1
                return Lesion(tuple(map(float, centre)), tuple(map(float, radii)), host,
                              contrast(rng, hu[host], [hu[t] for t in PARENCHYMA]))
        if not cand.size or attempt % 4 == 3:  # shrink when nothing fits or on repeated misses
            if radii.max() <= MIN_RADIUS_MM:
                return None
            radii = np.maximum(radii * 0.9, MIN_RADIUS_MM)
    return None
