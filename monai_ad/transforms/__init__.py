"""The volumetric pipeline: array transforms, their dictionary twins, and the shared pre-processing."""

from monai_ad.transforms.array import (
    ABDOMEN_WINDOW,
    BMAD_WINDOW,
    CheckCTVolume,
    CheckSameGeometry,
    CropROI,
    FillOutsideROI,
    HistogramEqualize,
    HUWindow,
    MaskOutsideROI,
    NormalizeLiverHU,
    PadToSquare,
    SelectROI,
    axial_slices,
    stack_axial_slices,
)
from monai_ad.transforms.dictionary import (
    CheckCTVolumed,
    CheckSameGeometryd,
    CropROId,
    FillOutsideROId,
    HistogramEqualized,
    HUWindowd,
    MaskOutsideROId,
    NormalizeLiverHUd,
    PadToSquared,
    SelectROId,
)
from monai_ad.transforms.pipeline import (
    IMAGE,
    ROI,
    ROI_SOURCE,
    LoadVolumed,
    PreprocessConfig,
    build_labelling,
    build_loading,
    build_postprocessing,
    build_preprocessing,
    build_reassembly,
    require_roi,
    run_pipeline,
)
