"""Secondary Capture writers: the RGB overlay and the grey counterfactual path.

Both use :class:`highdicom.sc.SCImage` (``from_ref_dataset``, which copies the
patient and study attributes of the source) and then add what highdicom leaves
to the caller: medxplain's marker, orientation/laterality, SourceImageSequence,
DerivationDescription, ImageComments and BurnedInAnnotation.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.output import (
    OutputContext,
    check_context,
    check_probability,
    check_series_number,
    check_source,
    check_text,
    check_unit_image,
    contributing_equipment,
    finalize_output,
    series_description,
    source_image_item,
    source_label,
    source_pixel_spacing,
)
from dicom_io.overlay import NOT_FOR_DIAGNOSTIC_USE, render_overlay
from dicom_io.patient_study import writer_reference
from dicom_io.source import SourceImage
from dicom_io.uids import instance_uid, series_uid

__all__ = ["overlay_sc", "counterfactual_sc", "OVERLAY_KIND", "COUNTERFACTUAL_KIND"]

OVERLAY_KIND = "overlay"
COUNTERFACTUAL_KIND = "counterfactual"

#: 16-bit grey levels for display values in [0, 1].
_U16_MAX = 65535

# Placeholder handed to highdicom, which insists on a patient orientation for
# the PATIENT coordinate system; finalize_output() then writes the *source's*
# orientation (or an empty Type 2 value), never this placeholder.
_ORIENTATION_PLACEHOLDER = ("L", "F")


def _check_instance_number(value: object, name: str = "instance_number") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31 - 1:
        raise ValueError(f'Argument "{name}" must be a positive integer, got {value!r}.')
    return value


def _sc(
    *,
    source: SourceImage,
    pixel_array: np.ndarray,
    photometric_interpretation: str,
    bits_allocated: int,
    context: OutputContext,
    kind: str,
    method: str,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int,
    pixel_spacing: tuple[float, float] | None,
    contribution: str,
) -> Dataset:
    import highdicom as hd

    ref = writer_reference(source)
    with warnings.catch_warnings():
        # highdicom warns about single-component person names copied verbatim
        # from the source (e.g. a pseudonymised PatientName); not ours to fix.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=pixel_array,
            photometric_interpretation=photometric_interpretation,
            bits_allocated=bits_allocated,
            coordinate_system="PATIENT",
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=context.manufacturer,
            pixel_spacing=pixel_spacing,
            patient_orientation=_ORIENTATION_PLACEHOLDER,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[contributing_equipment(context, description=contribution)],
            series_description=series_description(kind, method),
            manufacturer_model_name="medxplain",
            software_versions=context.software_version,
        )
        # from_ref_dataset() copies only the attributes its constructor takes;
        # copy the whole Patient and Study modules (StudyDescription, ...) as
        # SEG and SR do, so that all objects of the study agree (dcentvfy).
        try:
            sc.copy_patient_and_study_information(ref)
        except KeyError:  # source SOP class unknown to highdicom's IOD tables
            pass
    # Made by software on a workstation, not a digitised film or video frame.
    sc.ConversionType = "WSD"
    sc.ImageType = ["DERIVED", "SECONDARY", kind.upper()]
    finalize_output(sc, source=source.dataset, context=context, kind=kind, method=method)
    return sc


def overlay_sc(
    *,
    source: SourceImage,
    saliency: np.ndarray,
    method: str,
    probability: float,
    decision: str,
    counterfactual_probability: float | None = None,
    flipped: bool | None = None,
    context: OutputContext,
    series_number: int,
    instance_number: int = 1,
    positive_label: str,
    threshold: float = 0.2,
    cautions: tuple[str, ...] = (),
) -> Dataset:
    """RGB Secondary Capture: source in grey, saliency in colour, legend and text burned in.

    Parameters
    ----------
    source:
        the decoded source radiograph (its ``display`` is the grey background).
    saliency:
        float array (rows, cols) in [0, 1] on the source pixel grid; values up
        to ``threshold`` are transparent.
    method:
        explainer name, printed on the picture and in SeriesDescription.
    probability, decision:
        classifier probability of ``positive_label`` and the decision it led to.
    counterfactual_probability, flipped:
        the classifier on the counterfactual, and whether its decision flipped;
        "did not flip" is printed in orange when ``flipped`` is False.
    cautions:
        plain-language warnings ("out of domain ...", "low confidence (near
        threshold)"), printed in orange in the bottom band and kept in ImageComments.
    context, series_number, instance_number:
        who writes it and where it goes in the new series.

    The picture has a text band added above and a warning band added below the
    image (see :mod:`dicom_io.overlay`), so it is taller than the source and
    no text lies on anatomy; PixelSpacing is copied when the source has a valid
    one (distances stay right, positions are shifted by the top band).
    ``instance_number`` is the source's position in the run (the pipeline puts
    the overlays of all images of a run into one series per explainer).
    """
    check_source(source)
    context = check_context(context)
    method = check_text("method", method)
    sal = check_unit_image("saliency", saliency, (source.rows, source.columns))
    probability = check_probability("probability", probability)
    decision = check_text("decision", decision)
    counterfactual_probability = check_probability(
        "counterfactual_probability", counterfactual_probability, optional=True
    )
    if flipped is not None and not isinstance(flipped, (bool, np.bool_)):
        raise ValueError(f'Argument "flipped" must be True, False or None, got {flipped!r}.')
    series_number = check_series_number(series_number)
    instance_number = _check_instance_number(instance_number)
    positive_label = check_text("positive_label", positive_label)
    if not 0.0 <= float(threshold) < 1.0:
        raise ValueError(f'Argument "threshold" must lie in [0, 1), got {threshold!r}.')

    display = check_unit_image("source.display", source.display, (source.rows, source.columns))
    rgb = render_overlay(
        display=display,
        saliency=sal,
        method=method,
        positive_label=positive_label,
        probability=probability,
        decision=decision,
        counterfactual_probability=counterfactual_probability,
        flipped=None if flipped is None else bool(flipped),
        threshold=float(threshold),
        cautions=tuple(check_text("cautions", c, max_len=1024) for c in cautions),
    )

    ds = source.dataset
    sc = _sc(
        source=source,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        context=context,
        kind=OVERLAY_KIND,
        method=method,
        series_instance_uid=series_uid(
            source_study_instance_uid=ds.StudyInstanceUID,
            settings_key=context.settings_key,
            kind=OVERLAY_KIND,
        ),
        series_number=series_number,
        sop_instance_uid=instance_uid(
            source_sop_instance_uid=ds.SOPInstanceUID,
            bundle_sha256=context.bundle_sha256,
            settings_key=context.settings_key,
            kind=OVERLAY_KIND,
        ),
        instance_number=instance_number,
        pixel_spacing=source_pixel_spacing(ds),
        contribution=f"saliency overlay ({method})",
    )
    summary = f"P({positive_label})={probability:.3f} -> {decision}"
    if counterfactual_probability is not None:
        summary += f"; counterfactual P={counterfactual_probability:.3f}"
    if flipped is not None:
        summary += "; counterfactual flipped the decision" if flipped else "; counterfactual did not flip"
    for caution in cautions:
        summary += f"; {caution}"
    sc.BurnedInAnnotation = "YES"
    sc.SourceImageSequence = [source_image_item(ds)]
    of_source = source_label(ds)
    sc.DerivationDescription = (
        f"medxplain {context.software_version} {method} saliency overlay on {of_source} "
        f"(colour = saliency, transparent below {threshold:.2f}); {summary}; "
        f"bundle {context.bundle_description}; {NOT_FOR_DIAGNOSTIC_USE}"
    )[:1024]
    sc.ImageComments = f"{method} saliency overlay of {of_source}; {summary}; {NOT_FOR_DIAGNOSTIC_USE}"[:10240]
    return sc


def counterfactual_sc(
    *,
    source: SourceImage,
    images: Sequence[np.ndarray],
    path_probability: Sequence[float] | None = None,
    method: str,
    context: OutputContext,
    series_number: int,
    positive_label: str,
    first_instance_number: int = 1,
) -> list[Dataset]:
    """Grey (MONOCHROME2, 16-bit) Secondary Captures, one per step of a counterfactual path.

    Parameters
    ----------
    images:
        the path, each a float array (rows, cols) in [0, 1] at the source
        resolution in display (MONOCHROME2) sense; the last one is the full
        counterfactual. Stored as ``round(value * 65535)``, exactly: no text is
        burned in (BurnedInAnnotation NO), so that the stored pixels are the
        counterfactual a later step re-classifies. That the image is synthetic
        is said in SeriesDescription ("SYNTHETIC"), ImageComments,
        DerivationDescription, ImageType (DERIVED/SECONDARY/COUNTERFACTUAL) and
        on the overlay SC of the same explainer.
    path_probability:
        classifier probability of ``positive_label`` at each step (same length
        as ``images``), or None.
    first_instance_number:
        InstanceNumber of step 1; step k gets ``first_instance_number + k - 1``.
        The pipeline writes the paths of all images of a run into one series
        (one series per explainer and object kind, PS3.3 C.7.3), numbering
        image p's T steps ``(p - 1) * T + 1 ... p * T`` in source order.

    Display: WindowCenter 32768 / WindowWidth 65536 (the full stored range),
    which shows the steps exactly as ``source.display``, i.e. as the source's
    own viewer window showed the source. No VOI LUT Function is written: its
    absence means LINEAR (PS3.3 C.11.2.1.3), and OHIF 3.13's loader rejects an
    explicit ``LINEAR`` ("Invalid VOI LUT function"), leaving the image white.
    """
    check_source(source)
    context = check_context(context)
    method = check_text("method", method)
    series_number = check_series_number(series_number)
    positive_label = check_text("positive_label", positive_label)
    first_instance_number = _check_instance_number(first_instance_number, "first_instance_number")
    if isinstance(images, np.ndarray) or not isinstance(images, Sequence):
        raise ValueError('Argument "images" must be a list of 2-D arrays (one per path step).')
    if len(images) == 0:
        raise ValueError('Argument "images" must contain at least one image.')
    shape = (source.rows, source.columns)
    checked = [check_unit_image(f"images[{i}]", img, shape) for i, img in enumerate(images)]
    probs: list[float] | None = None
    if path_probability is not None:
        if isinstance(path_probability, (str, bytes)) or len(path_probability) != len(images):
            raise ValueError(
                f'Argument "path_probability" must have one value per image ({len(images)}).'
            )
        probs = [
            check_probability(f"path_probability[{i}]", p) for i, p in enumerate(path_probability)
        ]

    ds = source.dataset
    series = series_uid(
        source_study_instance_uid=ds.StudyInstanceUID,
        settings_key=context.settings_key,
        kind=COUNTERFACTUAL_KIND,
    )
    spacing = source_pixel_spacing(ds)
    total = len(checked)
    of_source = source_label(ds)
    out: list[Dataset] = []
    for i, image in enumerate(checked):
        step = i + 1
        pixels = np.round(image * _U16_MAX).astype(np.uint16)
        sc = _sc(
            source=source,
            pixel_array=pixels,
            photometric_interpretation="MONOCHROME2",
            bits_allocated=16,
            context=context,
            kind=COUNTERFACTUAL_KIND,
            method=method,
            series_instance_uid=series,
            series_number=series_number,
            sop_instance_uid=instance_uid(
                source_sop_instance_uid=ds.SOPInstanceUID,
                bundle_sha256=context.bundle_sha256,
                settings_key=context.settings_key,
                kind=COUNTERFACTUAL_KIND,
                index=step,
            ),
            instance_number=first_instance_number + i,
            pixel_spacing=spacing,
            contribution=f"counterfactual path step {step}/{total} ({method})",
        )
        comment = f"counterfactual step {step}/{total}"
        if probs is not None:
            comment += f", P={probs[i]:.2f}"
        sc.WindowCenter = 32768
        sc.WindowWidth = 65536
        sc.WindowCenterWidthExplanation = "full range (display of the source)"
        sc.BurnedInAnnotation = "NO"
        sc.SourceImageSequence = [source_image_item(ds, spatial_locations_preserved="YES")]
        sc.ImageComments = (
            f"{comment} ({method}) of {of_source}; SYNTHETIC image generated by medxplain; "
            f"{NOT_FOR_DIAGNOSTIC_USE}"
        )
        description = (
            f"medxplain {context.software_version} {method}: synthetic counterfactual of {of_source}, "
            f"step {step} of {total} of the path from the source towards the opposite "
            f"classifier decision (last = full counterfactual)"
        )
        if probs is not None:
            description += f"; P({positive_label})={probs[i]:.3f}"
        description += f"; bundle {context.bundle_description}; {NOT_FOR_DIAGNOSTIC_USE}"
        sc.DerivationDescription = description[:1024]
        out.append(sc)
    return out
