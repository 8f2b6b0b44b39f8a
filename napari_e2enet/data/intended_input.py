"""What a model expects to be given, and a cheap look at whether a scan is that.

A model file carries its intended input (:class:`IntendedInput`: modality, skull-stripped or not,
intensity unit, voxel-size range, body region). :func:`input_warnings` compares a scan with it using
statistics that cost a fraction of a second even on a 300×512×512 CT (:func:`scan_statistics` looks
at a strided copy of at most ~2 M voxels) and returns one-line warnings that say what to do. They are
warnings, not refusals: a user may know better (a CT-like MR sequence, a cropped head).

Heuristics, measured on the bundled sample (skull-stripped MNI152 T1), the CT phantom and the sample
with a bright 8 mm shell around the brain (a scalp):

- **CT or not**: air. A CT in Hounsfield units has ≥ 1 % of its voxels at or below −500 (air outside
  the body, lungs, bowel gas); an MR image has none (phantom: 56 %, sample: 0 %).
- **A CT stored with an intensity offset** (raw scanner values, the rescale intercept −1024 not
  applied: air near 0 and water near 1024; common after NIfTI/NRRD conversions) has no air in HU but
  all of: (1) air: ≥ 5 % of the voxels within [−50, +100] of the low end (the 0.1st percentile);
  (2) soft tissue: of the voxels more than 500 above the air peak (the median of the voxels in
  (low end, low end + 100]), the most common value (20-wide bins) lies 800–1250 above the air peak
  (−200 to +250 HU) and ≥ 55 % lie within ±150 of it; (3) bone: the brightest voxel lies at least
  1.5× as far above the air peak as that mode (about +400 to +600 HU and up). The offset is the air peak +
  1000 (air is −1000 HU), taken as 1000, 1024 or 2048 when within 50 of one. Measured (air-plateau
  share / tissue mode / share within ±150 / brightest ÷ mode): the CT phantom + 1024 (96×96×64),
  seeds 0–5: 53–56 % / 910–930 / 0.78–0.81 / 1.72–1.83, offset 1024 (air peak 24.4–26.9); at
  48×48×32: 0.75–0.79 / 1.62–1.68; at 40×32×20 the bones blur to 1.50–1.58 (the edge of the test);
  seed 0 + 1024 as uint16 with a 12-voxel zero margin: 79 %, offset 1024; with a 40-voxel margin
  (87 % of the voxels padding): 94 %, 1024; + 1000: offset 1000 (air peak 0.6); + 2048: 2048; a
  synthetic head CT + 1024 (25 % of it skull): 61 % / 1030 / 0.64 / 2.16. Not a CT: the sample (×1)
  has no voxel 500 above its background; the sample scaled by 0.1–30 (steps of 0.05), with and
  without a noisy background or a bright scalp shell, and a T1-like abdomen drawn from the phantom
  (fat brightest) never pass: where their mode lies 800–1250 above the background, the brightest
  voxel is at most 1.48× the mode (the sample ×6.1, whose share within ±150 is then 0.51) and the
  share within ±150 at most 0.64 (0.94 for the T1 abdomen, whose brightest voxel is 1.08× its mode).
- **Background touching the border**: in a skull-stripped image the volume border is the constant
  background; a head with its skull (or any MRI with a noisy background) has signal there
  (sample: 0.05 % of the border voxels, phantom: 100 %).
- **A bright rim**: the outer 4 mm of a skull-stripped brain is CSF and grey matter, darker than the
  inside (rim / inside median 0.63 on the sample); scalp fat around a brain makes the rim brighter
  (1.51 with the synthetic shell).
- **Voxel size** outside the range the model was trained on by more than a factor of two.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .io import float32_voxels
from .preprocess import Plan, foreground_mask
from .volume import Volume

__all__ = ["IntendedInput", "IntensityOffset", "ScanStatistics", "apply_intensity_offset", "ct_offset_warning",
           "input_warnings", "looks_like_ct", "modality_fits", "scan_statistics", "stored_ct_offset"]

_MAX_VOXELS = 2_000_000
_AIR_HU = -500.0
_CT_AIR_SHARE = 0.01
_BORDER_SIGNAL_SHARE = 0.2
_RIM_MM = 4.0
_RIM_BRIGHTNESS = 1.1
_SPACING_FACTOR = 2.0
SKULL_STRIP_TOOLS = "e.g. SynthStrip or HD-BET"
# A CT stored with an intensity offset (module docstring): thresholds in stored units above the air peak
_AIR_TRUE_HU = -1000.0  # what air reads in HU (scanners clip at -1024 below it)
_OFFSET_AIR_WINDOW = (-50.0, 100.0)  # around the low end: the air plateau (and padding at the low end)
_OFFSET_AIR_SHARE = 0.05
_OFFSET_BODY_ABOVE_AIR = 500.0  # above this the voxels are body (> -500 HU once corrected)
_OFFSET_TISSUE_MODE = (800.0, 1250.0)  # -200 .. +250 HU: fat, muscle, organs, blood
_OFFSET_TISSUE_BIN = 20.0
_OFFSET_TISSUE_PEAK = 150.0
_OFFSET_TISSUE_PEAK_SHARE = 0.55
_OFFSET_BONE_RATIO = 1.5
_USUAL_CT_OFFSETS = (1000.0, 1024.0, 2048.0)
_USUAL_OFFSET_TOLERANCE = 50.0
CT_OFFSET_OPTION = "--intensity-offset"
CT_OFFSET_WIDGET = "'CT offset'"  # the Segment widget's checkbox (napari_e2enet._napari.segment_widget)


@dataclass(frozen=True)
class IntendedInput:
    """The input a model was made for (stored in the model file's metadata as ``intended_input``).

    Attributes:
        modality: "CT", "MR" or another imaging modality name.
        skull_stripped: True when the model was trained on images whose background (everything that
            is not the organ, e.g. skull and scalp) was removed and set to one constant.
        intensity: the unit of the voxel values, e.g. "HU" or "arbitrary MR units".
        spacing_mm: (finest, coarsest) voxel size in mm of the training images.
        body_region: e.g. "brain", "abdomen"; "" when not known.
        description: one line for people (model card, README).
    """

    modality: str
    skull_stripped: bool = False
    intensity: str = ""
    spacing_mm: tuple[float, float] | None = None
    body_region: str = ""
    description: str = ""

    @property
    def is_ct(self) -> bool:
        return self.modality.upper() == "CT"

    def summary(self) -> str:
        """e.g. "a skull-stripped MR image of the brain (1–2 mm voxels)" (``description`` when set)."""
        if self.description:
            return self.description
        if self.is_ct:
            what = "a CT in HU"
        elif self.skull_stripped:
            what = f"a skull-stripped {self.modality} image"
        else:  # "an MR image", "an X-ray image": the letter's name starts with a vowel sound
            what = f"{'an' if self.modality[:1].upper() in 'AEFHILMNORSX' else 'a'} {self.modality} image"
        region = f" of the {self.body_region}" if self.body_region else ""
        spacing = ""
        if self.spacing_mm is not None:
            lo, hi = self.spacing_mm
            spacing = f" ({lo:g} mm voxels)" if math.isclose(lo, hi) else f" ({lo:g}–{hi:g} mm voxels)"
        return f"{what}{region}{spacing}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["spacing_mm"] = None if self.spacing_mm is None else [float(v) for v in self.spacing_mm]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> IntendedInput:
        """Inverse of ``to_dict``; ValueError on a malformed mapping."""
        if not isinstance(data, dict) or not isinstance(data.get("modality"), str):
            raise ValueError("intended_input must be a mapping with a modality")
        spacing = data.get("spacing_mm")
        if spacing is not None:
            lo, hi = (float(v) for v in spacing)
            if not (0 < lo <= hi and math.isfinite(hi)):
                raise ValueError(f"intended_input spacing_mm {spacing} is not 0 < finest <= coarsest")
            spacing = (lo, hi)
        return cls(str(data["modality"]), bool(data.get("skull_stripped", False)), str(data.get("intensity", "")),
                   spacing, str(data.get("body_region", "")), str(data.get("description", "")))

    @classmethod
    def from_plan(cls, plan: Plan, spacings: list[tuple[float, float, float]] | None = None,
                  body_region: str = "") -> IntendedInput:
        """What a model trained with ``plan`` (and images of these voxel sizes) expects.

        Model files written before ``intended_input`` existed get this from their plan alone: the
        voxel-size range is then the plan's target spacing.
        """
        modality = "CT" if plan.uses_ct_normalisation else ("MR" if plan.modality.upper() in ("MR", "MRI") else plan.modality)
        values = [v for sp in spacings for v in sp] if spacings else list(plan.target_spacing)
        return cls(modality, bool(plan.norm_nonzero and modality != "CT"),
                   "HU" if modality == "CT" else "arbitrary (z-scored per image)",
                   (round(min(values), 3), round(max(values), 3)), body_region)


@dataclass(frozen=True)
class ScanStatistics:
    """Cheap facts about a scan (from a strided copy of at most ~2 M voxels of the first channel).

    Attributes:
        air_share: share of voxels at or below −500 (air in HU).
        border_signal_share: share of the volume-border voxels that are not the background value.
        rim_brightness: median intensity of the foreground's outer 4 mm over the median inside it
            (NaN when the foreground is too thin to have an inside).
        empty: every voxel is the background value.
        spacing: (sx, sy, sz) voxel size in mm.
        ct_offset: the offset of a CT stored without its rescale intercept (HU = value − ct_offset;
            1024 for most scanners; :func:`stored_ct_offset`); 0.0 when the scan does not look like
            one (a CT in HU included).
    """

    air_share: float
    border_signal_share: float
    rim_brightness: float
    empty: bool
    spacing: tuple[float, float, float]
    ct_offset: float = 0.0


def scan_statistics(volume: Volume) -> ScanStatistics:
    """The statistics :func:`input_warnings` needs (see the module docstring)."""
    channel = volume.channels()[0]
    step = max(1, math.ceil((channel.size / _MAX_VOXELS) ** (1 / 3)))
    small = np.asarray(channel[::step, ::step, ::step], dtype=np.float32)
    spacing = volume.spacing
    mask = foreground_mask(small[None])
    faces = [mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]]
    border = float(np.mean(np.concatenate([f.ravel() for f in faces])))
    rim_brightness = float("nan")
    if mask.any():
        depth = max(1, round(_RIM_MM / (min(spacing) * step)))
        inside = ndi.binary_erosion(mask, iterations=depth)
        rim = mask & ~inside
        if inside.any() and rim.any():
            inner = float(np.median(small[inside]))
            if inner > 0:
                rim_brightness = float(np.median(small[rim])) / inner
    air_share = float(np.mean(small <= _AIR_HU))
    ct_offset = stored_ct_offset(small) if air_share < _CT_AIR_SHARE else 0.0  # (a CT in HU has none)
    return ScanStatistics(air_share, border, rim_brightness, not mask.any(), spacing, ct_offset)


def stored_ct_offset(values: np.ndarray) -> float:
    """The offset of a CT whose voxels were stored without the rescale intercept (HU = value − offset),
    e.g. 1024 for raw scanner values with air near 0 instead of −1000 HU; 0.0 when ``values`` do not
    look like such a CT. The three tests and their measurements are in the module docstring."""
    flat = np.asarray(values, dtype=np.float32).ravel()
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return 0.0
    low = float(np.percentile(flat, 0.1))
    near_low = (flat >= low + _OFFSET_AIR_WINDOW[0]) & (flat <= low + _OFFSET_AIR_WINDOW[1])
    if np.mean(near_low) < _OFFSET_AIR_SHARE:
        return 0.0  # no air around the body
    # the air peak leaves out the low end itself: zero padding and the scanner's clipping sit there
    plateau = flat[(flat > low) & (flat <= low + _OFFSET_AIR_WINDOW[1])]
    air = float(np.median(plateau)) if plateau.size else low
    body = flat[flat > air + _OFFSET_BODY_ABOVE_AIR] - np.float32(air)
    if body.size < 100:
        return 0.0
    mode = _tissue_mode(body)
    if not _OFFSET_TISSUE_MODE[0] <= mode <= _OFFSET_TISSUE_MODE[1]:
        return 0.0  # the body's most common value is not soft tissue at 0 +- 200 HU
    if np.mean(np.abs(body - np.float32(mode)) <= _OFFSET_TISSUE_PEAK) < _OFFSET_TISSUE_PEAK_SHARE:
        return 0.0  # CT soft tissue is one narrow peak in HU; MR tissue spreads with its scale
    if float(body.max()) < _OFFSET_BONE_RATIO * mode:
        return 0.0  # no bone (or contrast) above the tissue, as an MR image would look
    estimate = air - _AIR_TRUE_HU
    usual = min(_USUAL_CT_OFFSETS, key=lambda offset: abs(offset - estimate))
    return usual if abs(usual - estimate) <= _USUAL_OFFSET_TOLERANCE else float(round(estimate))


def _tissue_mode(body: np.ndarray) -> float:
    """The most common value of ``body`` (values above the air peak, > 500), in bins of 20; values
    beyond 10 000 bins share the last one (its centre is then far outside the soft-tissue window)."""
    top = min(float(body.max()), _OFFSET_BODY_ABOVE_AIR + _OFFSET_TISSUE_BIN * 10_000)
    edges = np.arange(_OFFSET_BODY_ABOVE_AIR, top + _OFFSET_TISSUE_BIN, _OFFSET_TISSUE_BIN)
    counts, _ = np.histogram(np.minimum(body, np.float32(edges[-1])), bins=edges)
    k = int(np.argmax(counts))
    return float(edges[k] + _OFFSET_TISSUE_BIN / 2)


def looks_like_ct(stats: ScanStatistics) -> bool:
    """True when the scan has air in HU (>= 1 % of its voxels at or below -500), or looks like a CT
    stored with an intensity offset (``stats.ct_offset``): a CT."""
    return stats.air_share >= _CT_AIR_SHARE or stats.ct_offset != 0.0


def ct_offset_warning(stats: ScanStatistics) -> str:
    """What is off with a CT stored with an offset and how to correct it (CLI option, napari)."""
    offset = stats.ct_offset
    return (f"this scan looks like a CT stored with a {offset:+g} offset (air at ~{offset + _AIR_TRUE_HU:g} instead "
            f"of {_AIR_TRUE_HU:g} HU: the rescale intercept {-offset:g} was not applied): pass "
            f"{CT_OFFSET_OPTION} {-offset:g} (or auto) to predict; in napari, tick {CT_OFFSET_WIDGET} in the "
            "Segment widget")


def modality_fits(intended: IntendedInput, stats: ScanStatistics) -> bool:
    """CT model and a scan that looks like a CT, or a non-CT model and a scan that does not."""
    return intended.is_ct == looks_like_ct(stats)


def input_warnings(intended: IntendedInput, stats: ScanStatistics) -> list[str]:
    """One-line warnings (what is off, and what to do) when the scan is not what the model expects."""
    expects = f"this model expects {intended.summary()}"
    if stats.empty:
        return ["the image holds only its background value: nothing to segment (all labels are background)"]
    out: list[str] = []
    looks_ct = looks_like_ct(stats)
    if intended.is_ct and stats.ct_offset:
        out.append(f"{expects}, but {ct_offset_warning(stats)}")
    elif intended.is_ct and not looks_ct:
        out.append(f"{expects}, but this scan has no air (no voxel at or below {_AIR_HU:g}): it does not look like "
                   "a CT in HU; use a model trained on this modality")
    elif not intended.is_ct and looks_ct:
        why = (f"stored with a {stats.ct_offset:+g} offset, air at ~{stats.ct_offset + _AIR_TRUE_HU:g}"
               if stats.ct_offset else f"{stats.air_share:.0%} of the voxels at or below {_AIR_HU:g}, air in HU")
        out.append(f"{expects}, but this scan looks like a CT ({why}): use a model trained on CT")
    elif intended.skull_stripped:
        if stats.border_signal_share >= _BORDER_SIGNAL_SHARE:
            out.append(f"{expects}; {stats.border_signal_share:.0%} of the volume border holds signal (skull, scalp "
                       f"or a noisy background): strip the skull first ({SKULL_STRIP_TOOLS})")
        elif stats.rim_brightness >= _RIM_BRIGHTNESS:
            out.append(f"{expects}; the outer {_RIM_MM:g} mm of the foreground is {stats.rim_brightness:.1f}x as "
                       f"bright as its inside (scalp or skull?): strip the skull first ({SKULL_STRIP_TOOLS})")
    if intended.spacing_mm is not None:
        lo, hi = intended.spacing_mm
        finest, coarsest = min(stats.spacing), max(stats.spacing)
        if coarsest > hi * _SPACING_FACTOR or finest < lo / _SPACING_FACTOR:
            size = "x".join(f"{s:.3g}" for s in stats.spacing)
            out.append(f"voxels of {size} mm are far from the {lo:g}–{hi:g} mm the model was trained on: the scan "
                       "is resampled, but expect coarser or less accurate borders")
    return out


IntensityOffset = float | str | None  # added to the voxel values; "auto": the detected CT offset; None: nothing


def apply_intensity_offset(volume: Volume, intended: IntendedInput, intensity_offset: IntensityOffset = None
                           ) -> tuple[Volume, float, list[str]]:
    """``volume`` with ``intensity_offset`` added to every voxel (float32; the same Volume when the
    offset is None, 0 or an "auto" that found nothing or is meant for a model that is not a CT one),
    the offset added, and one-line notes: what "auto" did, or that a number was added to a CT model's
    scan that already reads in HU. Used by prediction and fine-tuning alike.

    Raises:
        ValueError: ``intensity_offset`` is not a finite number, "auto" or None.
    """
    if intensity_offset is None:
        return volume, 0.0, []
    notes: list[str] = []
    if isinstance(intensity_offset, str):
        if intensity_offset != "auto":
            raise ValueError(f"intensity_offset must be a number, 'auto' or None, got {intensity_offset!r}")
        detected = scan_statistics(volume).ct_offset if intended.is_ct else 0.0
        offset = -detected
        if detected:
            notes.append(f"intensity offset auto: added {offset:g} to the voxel values (this scan looks like a "
                         f"CT stored with a {detected:+g} offset; air now reads ~-1000 HU)")
    else:
        offset = float(intensity_offset)
        if not math.isfinite(offset):
            raise ValueError(f"intensity_offset must be a finite number, got {intensity_offset!r}")
        if offset and intended.is_ct:
            stats = scan_statistics(volume)
            if looks_like_ct(stats) and not stats.ct_offset:
                notes.append(f"intensity offset {offset:g} was added to a scan that already reads in HU "
                             f"({stats.air_share:.0%} of the voxels at or below -500, air): it is no longer "
                             "in HU; leave the offset out")
    if not offset:
        return volume, 0.0, notes
    shifted = float32_voxels(volume.array, volume.name or None) + np.float32(offset)
    return volume.with_array(shifted), offset, notes
