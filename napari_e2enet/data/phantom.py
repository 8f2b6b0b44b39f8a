"""A procedural abdominal CT phantom with AMOS-style organ labels (tests, benchmarks, demo).

This module draws volumes only; ``data.dataset.phantom_dataset`` makes a Dataset of them (so the
dataset module depends on the phantom, never the reverse).

``make_phantom(seed)`` draws one case: a body outline with skin/subcutaneous fat, abdominal wall and
back muscles, visceral fat with bowel loops (some with gas), spine (vertebral bodies, discs, arches,
spinal canal), ribs and iliac bones (bone is not labelled), and the organs below, with plausible
portal-venous-phase HU, per-case jitter of position/size/rotation/contrast, a smooth random
deformation, partial-volume blur and Gaussian noise.

Geometry: the anatomy is laid out in normalised body coordinates spanning the field of view
(r: + = patient right, a: + = anterior, s: + = superior), so any shape/spacing shows the whole
abdomen (at the defaults, a small body). The affine is a proper RAS+ one stored in the usual
radiological LPS voxel order: ``affine = diag(-sx, -sy, sz)`` + a centring offset, i.e. voxel i grows
towards the patient's left (the right kidney sits at small i, on the image's left) and j grows
towards posterior; nibabel reports the axis codes ("L", "P", "S").

Label ids follow AMOS: 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus,
6 liver, 7 stomach, 8 aorta, 9 postcava (IVC), 10 pancreas, 11 right adrenal gland, 12 left adrenal
gland, 13 duodenum, 14 bladder, 15 prostate/uterus. All fifteen are rendered (the adrenals are small
and, like real ones, sometimes only a few voxels thick).
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage as ndi

from ..labels import AMOS
from .volume import Volume

__all__ = ["AMOS_LABELS", "make_phantom", "phantom_affine"]

AMOS_LABELS: dict[int, str] = dict(AMOS.names)  # the AMOS preset, background included

_BONE = -1  # painted with label 0


def phantom_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """RAS+ affine of the phantom grid: LPS voxel order, centred on the origin."""
    nx, ny, nz = shape
    sx, sy, sz = spacing
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [sx * (nx - 1) / 2, sy * (ny - 1) / 2, -sz * (nz - 1) / 2]
    return affine


class _Canvas:
    """Deformed normalised coordinates plus the HU and label volumes being painted."""

    def __init__(self, shape: tuple[int, int, int], rng: np.random.Generator, amplitude: float) -> None:
        self.shape = shape
        nx, ny, nz = shape
        # voxel index → normalised coordinate; r, a decrease with i, j (LPS voxel order).
        self.r1 = np.linspace(1.0, -1.0, nx, dtype=np.float32) * (nx - 1) / nx
        self.a1 = np.linspace(1.0, -1.0, ny, dtype=np.float32) * (ny - 1) / ny
        self.s1 = np.linspace(-1.0, 1.0, nz, dtype=np.float32) * (nz - 1) / nz
        r, a, s = self.r1[:, None, None], self.a1[None, :, None], self.s1[None, None, :]
        # Smooth random deformation: a few separable low-frequency cosine products per component.
        fields = []
        for _ in range(3):
            d = np.zeros(shape, np.float32)
            for _ in range(3):
                f = rng.uniform(0.6, 2.2, 3).astype(np.float32)
                p = rng.uniform(0, 2 * np.pi, 3).astype(np.float32)
                amp = np.float32(amplitude * rng.uniform(0.3, 1.0))
                d += amp * np.cos(f[0] * r + p[0]) * np.cos(f[1] * a + p[1]) * np.cos(f[2] * s + p[2])
            fields.append(d)
        self.margin = 3 * amplitude
        self.R = r + fields[0]
        self.A = a + fields[1]
        self.S = s + fields[2] * 0.5
        self.hu = np.full(shape, -1000.0, np.float32)
        self.label = np.zeros(shape, np.uint8)

    def box(self, lo: tuple[float, float, float], hi: tuple[float, float, float]) -> tuple[slice, ...] | None:
        """Voxel slices covering the normalised box [lo, hi] (plus the deformation margin)."""
        out = []
        for axis, grid in enumerate((self.r1, self.a1, self.s1)):
            inside = np.nonzero((grid >= lo[axis] - self.margin) & (grid <= hi[axis] + self.margin))[0]
            if inside.size == 0:
                return None
            out.append(slice(int(inside[0]), int(inside[-1]) + 1))
        return tuple(out)

    def ellipsoid(
        self, center: tuple[float, float, float], semi: tuple[float, float, float], angle: float = 0.0
    ) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """Mask of an ellipsoid (semi-axes in normalised units, rotated by ``angle`` in the axial plane)."""
        ext = max(semi[0], semi[1])
        sl = self.box(
            (center[0] - ext, center[1] - ext, center[2] - semi[2]),
            (center[0] + ext, center[1] + ext, center[2] + semi[2]),
        )
        if sl is None:
            return None
        dr, da, ds = self.R[sl] - center[0], self.A[sl] - center[1], self.S[sl] - center[2]
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        u = (dr * c + da * s) / semi[0]
        v = (-dr * s + da * c) / semi[1]
        w = ds / semi[2]
        return sl, (u * u + v * v + w * w) <= 1.0

    def capsule(
        self, p0: tuple[float, float, float], p1: tuple[float, float, float], radius: float
    ) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """Mask of the points within ``radius`` of the segment p0–p1 (a tube with round ends)."""
        lo = tuple(min(p0[k], p1[k]) - radius for k in range(3))
        hi = tuple(max(p0[k], p1[k]) + radius for k in range(3))
        sl = self.box(lo, hi)  # type: ignore[arg-type]
        if sl is None:
            return None
        d = np.asarray(p1, np.float32) - np.asarray(p0, np.float32)
        length2 = float(d @ d) or 1e-9
        pr, pa, ps = self.R[sl] - p0[0], self.A[sl] - p0[1], self.S[sl] - p0[2]
        t = np.clip((pr * d[0] + pa * d[1] + ps * d[2]) / length2, 0.0, 1.0)
        qr, qa, qs = pr - t * d[0], pa - t * d[1], ps - t * d[2]
        return sl, (qr * qr + qa * qa + qs * qs) <= radius * radius

    def cylinder(
        self, center: tuple[float, float], semi: tuple[float, float], s_lo: float, s_hi: float
    ) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """Vertical elliptic cylinder between s_lo and s_hi."""
        sl = self.box(
            (center[0] - semi[0], center[1] - semi[1], s_lo), (center[0] + semi[0], center[1] + semi[1], s_hi)
        )
        if sl is None:
            return None
        u = (self.R[sl] - center[0]) / semi[0]
        v = (self.A[sl] - center[1]) / semi[1]
        s = self.S[sl]
        return sl, (u * u + v * v <= 1.0) & (s >= s_lo) & (s <= s_hi)

    def paint(self, shape: tuple[tuple[slice, ...], np.ndarray] | None, hu: float, label: int | None) -> None:
        """Set HU (and the label unless ``label`` is None; ``_BONE`` clears it) where the mask is set."""
        if shape is None:
            return
        sl, mask = shape
        self.hu[sl][mask] = hu
        if label is not None:
            self.label[sl][mask] = 0 if label == _BONE else label

    def paint_where(
        self, shape: tuple[tuple[slice, ...], np.ndarray] | None, hu: float, within_label: int
    ) -> None:
        """Set HU only inside ``shape`` where the label already equals ``within_label`` (texture)."""
        if shape is None:
            return
        sl, mask = shape
        self.hu[sl][mask & (self.label[sl] == within_label)] = hu


class _Draws:
    """The phantom's random draws, in one fixed order (the anatomy is a function of the seed)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.u = rng.uniform

    def jit(self, x: float, amount: float = 0.04) -> float:
        return float(x + self.u(-amount, amount))

    def size(self, x: float, lo: float = 0.85, hi: float = 1.15) -> float:
        return float(x * self.u(lo, hi))


_BIG = 10.0  # beyond the volume: cylinders along the whole S axis


def make_phantom(
    seed: int | np.random.SeedSequence = 0,
    shape: tuple[int, int, int] = (96, 96, 64),
    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0),
) -> tuple[Volume, Volume]:
    """One phantom case: (image Volume (X, Y, Z) float32 HU, label Volume (X, Y, Z) uint8 AMOS ids).

    Deterministic for a given seed; different seeds give different anatomy, contrast and noise.
    """
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    if min(shape) < 8:
        raise ValueError(f"make_phantom: shape {shape} is too small (at least 8 voxels per axis)")
    rng = np.random.default_rng(seed)
    d = _Draws(rng)
    cv = _Canvas(shape, rng, amplitude=float(d.u(0.02, 0.05)))
    body_c, body_r, body_a, inner = _paint_body(cv, d)
    _paint_bowel(cv, d)
    _paint_bones(cv, d, body_c, inner)
    st_c = _paint_upper_abdomen(cv, d)
    _paint_retroperitoneum(cv, d)
    _paint_vessels(cv, d, st_c)
    _paint_pelvis(cv, d)
    _paint_spine(cv, d)
    # keep everything inside the body outline
    body = cv.cylinder(body_c, (body_r, body_a), -_BIG, _BIG)
    outside = np.ones(shape, bool)
    if body is not None:
        outside[body[0]] = ~body[1]
    cv.label[outside] = 0
    cv.hu[outside] = -1000.0
    hu = _scanner(cv.hu, d, spacing)
    affine = phantom_affine(shape, spacing)
    name = f"phantom_{seed}" if isinstance(seed, int | np.integer) else "phantom"
    return Volume(hu, affine, None, name), Volume(cv.label, affine.copy(), None, name)


def _paint_body(cv: _Canvas, d: _Draws) -> tuple[tuple[float, float], float, float, tuple[float, float]]:
    """Skin and subcutaneous fat, abdominal wall muscle, visceral fat, back muscles and psoas."""
    u, jit, size, big = d.u, d.jit, d.size, _BIG
    body_r, body_a = size(0.88, 0.92, 1.04), size(0.64, 0.9, 1.08)
    body_c = (0.0, jit(0.02, 0.03))
    fat = u(0.05, 0.13)
    wall = u(0.04, 0.06)
    cv.paint(cv.cylinder(body_c, (body_r, body_a), -big, big), u(-110, -90), 0)
    cv.paint(cv.cylinder(body_c, (body_r * (1 - fat), body_a * (1 - fat * 1.2)), -big, big), u(40, 60), 0)
    inner = (body_r * (1 - fat - wall), body_a * (1 - (fat + wall) * 1.2))
    cv.paint(cv.cylinder(body_c, inner, -big, big), u(-100, -70), 0)
    # back muscles (erector spinae) and psoas
    for side in (1, -1):
        cv.paint(cv.ellipsoid((side * 0.17, -0.52, 0.0), (0.13, 0.11, big)), u(45, 60), 0)
        cv.paint(cv.ellipsoid((side * 0.17, -0.3, -0.45), (0.07, 0.08, 0.75)), u(45, 60), 0)
    return body_c, body_r, body_a, inner


def _paint_bowel(cv: _Canvas, d: _Draws) -> None:
    """Bowel loops (unlabelled clutter) in the mid and lower abdomen."""
    u, rng = d.u, d.rng
    for _ in range(int(rng.integers(10, 18))):
        c = (u(-0.55, 0.55), u(-0.05, 0.45), u(-0.65, 0.1))
        semi = (u(0.05, 0.11), u(0.05, 0.11), u(0.06, 0.16))
        gas = rng.random() < 0.25
        cv.paint(cv.ellipsoid(c, semi, u(0, np.pi)), u(-900, -700) if gas else u(15, 45), 0)


def _paint_bones(cv: _Canvas, d: _Draws, body_c: tuple[float, float], inner: tuple[float, float]) -> None:
    """Bones (not labelled): ribs, and the iliac wings as a cortical shell around marrow."""
    u = d.u
    rib_phase = u(0, 1)
    for k in range(8):
        s_c = 0.95 - (k + rib_phase) * 0.16
        if s_c < 0.05:
            break
        shell = cv.ellipsoid((0.0, body_c[1], s_c), (inner[0] * 0.98, inner[1] * 0.98, 0.035))
        if shell is None:
            continue
        sl, mask = shell
        core = cv.ellipsoid((0.0, body_c[1], s_c), (inner[0] * 0.9, inner[1] * 0.9, 0.05))
        ring = mask & (np.abs(cv.R[sl]) > 0.15) & (cv.A[sl] < 0.35)
        if core is not None:
            ring &= ~_on(core, sl)
        cv.paint((sl, ring), u(350, 600), _BONE)
    for side in (1, -1):  # iliac wings: cortical shell around marrow
        il_c, il_semi, il_angle = (side * 0.52, -0.2, -0.75), (0.07, 0.28, 0.22), side * 0.6
        cv.paint(cv.ellipsoid(il_c, il_semi, il_angle), u(450, 700), _BONE)
        cv.paint(cv.ellipsoid(il_c, (0.04, 0.25, 0.2), il_angle), u(150, 280), _BONE)


def _paint_upper_abdomen(cv: _Canvas, d: _Draws) -> tuple[float, float, float]:
    """Liver with hepatic vessels, gallbladder, spleen, and the stomach (wall, contents, air); returns the stomach centre."""
    u, jit, size, rng = d.u, d.jit, d.size, d.rng
    liver_hu = u(90, 120)
    cv.paint(
        cv.ellipsoid((jit(0.38), jit(0.02), jit(0.5)), (size(0.42), size(0.45), size(0.4)), u(-0.2, 0.2)),
        liver_hu,
        6,
    )
    cv.paint(
        cv.ellipsoid((jit(0.0), jit(0.28), jit(0.62)), (size(0.3), size(0.16), size(0.2)), u(-0.2, 0.2)),
        liver_hu,
        6,
    )
    for _ in range(int(rng.integers(3, 7))):  # hepatic vessels: slightly different HU inside the liver
        c = (u(0.1, 0.6), u(-0.2, 0.3), u(0.3, 0.8))
        cv.paint_where(cv.ellipsoid(c, (0.03, 0.03, u(0.1, 0.25)), u(0, np.pi)), liver_hu + u(20, 50), 6)
    cv.paint(
        cv.ellipsoid((jit(0.3), jit(0.42), jit(0.18)), (size(0.08), size(0.1), size(0.12)), u(0.3, 0.7)),
        u(0, 20),
        4,
    )
    cv.paint(
        cv.ellipsoid(
            (jit(-0.55), jit(-0.22), jit(0.55)), (size(0.13), size(0.22), size(0.22)), u(-0.8, -0.4)
        ),
        u(100, 125),
        1,
    )

    # stomach: wall, contents, and an anterior (non-dependent) air pocket
    st_c = (jit(-0.3), jit(0.22), jit(0.55))
    st_semi = (size(0.24), size(0.2), size(0.28))
    st_angle = u(0.1, 0.5)
    cv.paint(cv.ellipsoid(st_c, st_semi, st_angle), u(35, 50), 7)
    inner_st = cv.ellipsoid(st_c, tuple(x * 0.8 for x in st_semi), st_angle)  # type: ignore[arg-type]
    cv.paint(inner_st, u(5, 30), 7)
    if inner_st is not None:
        sl, mask = inner_st
        level = st_c[1] + st_semi[1] * u(-0.1, 0.6)
        cv.paint((sl, mask & (cv.A[sl] > level)), u(-1000, -950), 7)
    return st_c


def _paint_retroperitoneum(cv: _Canvas, d: _Draws) -> None:
    """Kidneys (cortex, medulla; the left a little higher) with adrenals, the duodenal C-loop and the pancreas."""
    u, jit, size = d.u, d.jit, d.size
    for side, label, adrenal in ((1, 2, 11), (-1, 3, 12)):
        kc = (side * jit(0.38, 0.03), jit(-0.3, 0.03), jit(0.0 if side > 0 else 0.08, 0.06))
        ks = (size(0.14), size(0.11), size(0.28))
        ka = side * u(0.3, 0.6)
        cv.paint(cv.ellipsoid(kc, ks, ka), u(160, 200), label)
        cv.paint(cv.ellipsoid(kc, (ks[0] * 0.6, ks[1] * 0.55, ks[2] * 0.75), ka), u(100, 130), label)
        ad_c = (kc[0] - side * 0.1, kc[1] + 0.06, kc[2] + ks[2] * 1.1)
        cv.paint(
            cv.ellipsoid(ad_c, (size(0.035), size(0.08), size(0.09)), side * u(0.5, 0.9)), u(30, 50), adrenal
        )

    # duodenum: a C-loop around the pancreatic head
    d_hu = u(30, 45)
    pts = [(0.1, 0.25, 0.32), (0.28, 0.1, 0.22), (0.26, 0.02, 0.04), (0.04, 0.03, -0.02)]
    pts = [(jit(p[0], 0.03), jit(p[1], 0.03), jit(p[2], 0.03)) for p in pts]
    radius = size(0.05)
    for p0, p1 in itertools.pairwise(pts):
        cv.paint(cv.capsule(p0, p1, radius), d_hu, 13)

    # pancreas: head, body, tail
    p_hu = u(80, 110)
    head = (jit(0.12, 0.03), jit(0.07, 0.03), jit(0.17, 0.03))
    body = (jit(-0.08, 0.03), jit(0.1, 0.03), jit(0.24, 0.03))
    tail = (jit(-0.36, 0.03), jit(-0.02, 0.03), jit(0.3, 0.03))
    cv.paint(cv.ellipsoid(head, (size(0.09), size(0.08), size(0.1))), p_hu, 10)
    thick = size(0.05)
    cv.paint(cv.capsule(head, body, thick), p_hu, 10)
    cv.paint(cv.capsule(body, tail, thick * 0.9), p_hu, 10)


def _paint_vessels(cv: _Canvas, d: _Draws, st_c: tuple[float, float, float]) -> None:
    """Esophagus to the cardia, aorta (and unlabelled iliac arteries), IVC."""
    u, jit, size, big = d.u, d.jit, d.size, _BIG
    cv.paint(
        cv.capsule(
            (jit(-0.05, 0.02), -0.2, 1.1), (jit(-0.2, 0.03), jit(0.08, 0.03), st_c[2] + 0.15), size(0.045)
        ),
        u(35, 50),
        5,
    )
    ao_hu = u(150, 250)
    ao_c = (jit(-0.06, 0.02), jit(-0.23, 0.02))
    ao_r = size(0.06, 0.9, 1.1)
    bif = u(-0.5, -0.35)
    cv.paint(cv.cylinder(ao_c, (ao_r, ao_r), bif, big), ao_hu, 8)
    for side in (1, -1):
        cv.paint(cv.capsule((ao_c[0], ao_c[1], bif), (side * 0.22, -0.12, -0.95), ao_r * 0.7), ao_hu, 0)
    ivc_c = (jit(0.13, 0.02), jit(-0.19, 0.02))
    cv.paint(cv.cylinder(ivc_c, (size(0.075), size(0.055)), bif - 0.05, big), u(110, 160), 9)


def _paint_pelvis(cv: _Canvas, d: _Draws) -> None:
    """Bladder, then prostate (below) or uterus (behind and above)."""
    u, jit, size, rng = d.u, d.jit, d.size, d.rng
    bl_c = (jit(0.0, 0.04), jit(0.3, 0.04), jit(-0.76, 0.05))
    bl_semi = (size(0.22, 0.7, 1.2), size(0.17, 0.7, 1.2), size(0.16, 0.7, 1.2))
    cv.paint(cv.ellipsoid(bl_c, bl_semi), u(0, 20), 14)
    if rng.random() < 0.5:  # prostate
        cv.paint(
            cv.ellipsoid(
                (bl_c[0], bl_c[1] - 0.12, bl_c[2] - bl_semi[2] - 0.05), (size(0.08), size(0.07), size(0.07))
            ),
            u(35, 55),
            15,
        )
    else:  # uterus
        cv.paint(
            cv.ellipsoid(
                (bl_c[0], bl_c[1] - bl_semi[1] - 0.05, bl_c[2] + 0.08),
                (size(0.12), size(0.08), size(0.12)),
                u(-0.3, 0.3),
            ),
            u(60, 90),
            15,
        )


def _paint_spine(cv: _Canvas, d: _Draws) -> None:
    """Vertebral bodies (cortical shell, cancellous core) and discs, arch, spinal canal."""
    u, jit, size, big = d.u, d.jit, d.size, _BIG
    period = u(0.22, 0.3)
    phase = u(0, period)
    vb_c, vb_semi = (0.0, jit(-0.38, 0.02)), (size(0.1, 0.9, 1.1), size(0.09, 0.9, 1.1))
    arch = cv.cylinder((0.0, vb_c[1] - 0.13), (0.09, 0.08), -big, big)
    cv.paint(arch, u(400, 700), _BONE)
    cv.paint(cv.ellipsoid((0.0, vb_c[1] - 0.24, 0.0), (0.03, 0.09, big)), u(400, 700), _BONE)
    cv.paint(cv.cylinder((0.0, vb_c[1] - 0.13), (0.05, 0.045), -big, big), u(0, 20), 0)
    cv.paint(cv.cylinder(vb_c, vb_semi, -big, big), u(500, 800), _BONE)
    core = cv.cylinder(vb_c, (vb_semi[0] - 0.02, vb_semi[1] - 0.02), -big, big)
    cv.paint(core, u(180, 280), _BONE)
    disc = cv.cylinder(vb_c, vb_semi, -big, big)
    if disc is not None:
        sl, mask = disc
        in_disc = np.mod(cv.S[sl] - phase, period) < period * 0.2
        cv.paint((sl, mask & in_disc), u(70, 100), _BONE)


def _scanner(hu: np.ndarray, d: _Draws, spacing: tuple[float, float, float]) -> np.ndarray:
    """Partial-volume blur, noise, scanner range: float32 HU."""
    u, rng = d.u, d.rng
    sigma = np.array(
        [u(0.5, 0.9) * 1.5 / spacing[0], u(0.5, 0.9) * 1.5 / spacing[1], u(0.3, 0.6) * 3.0 / spacing[2]]
    )
    hu = ndi.gaussian_filter(hu, sigma=np.clip(sigma, 0.3, 1.5), mode="nearest", truncate=3.0)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(u(8, 25))
    np.clip(hu, -1024, 3071, out=hu)
    return hu.astype(np.float32, copy=False)



def _on(shape: tuple[tuple[slice, ...], np.ndarray], sl: tuple[slice, ...]) -> np.ndarray:
    """``shape``'s mask re-cut to the slices ``sl`` (False outside ``shape``'s own box)."""
    own_sl, mask = shape
    out = np.zeros(tuple(s.stop - s.start for s in sl), bool)
    lo = [max(a.start, b.start) for a, b in zip(own_sl, sl, strict=True)]
    hi = [min(a.stop, b.stop) for a, b in zip(own_sl, sl, strict=True)]
    if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
        return out
    dst = tuple(slice(lo_ - s.start, h - s.start) for lo_, h, s in zip(lo, hi, sl, strict=True))
    src = tuple(slice(lo_ - s.start, h - s.start) for lo_, h, s in zip(lo, hi, own_sl, strict=True))
    out[dst] = mask[src]
    return out
