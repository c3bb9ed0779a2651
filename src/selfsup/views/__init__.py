"""Views: batched, on-device augmentation with per-sample parameters drawn from an explicit generator.

``augment`` holds geometry (random resized crop + flip, rotations), blur and the declarative
``ViewConfig``/``make_view`` layer with the SimCLR presets; ``color`` holds the photometric ops;
``patches`` the 3×3 patch geometry of the patch-based tasks (Relative Patch Location, Jigsaw, PIRL);
``permutations`` the maximal-Hamming jigsaw permutation sets. Import those two from their modules.
"""

from .augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_CROP_FLIP,
    INCEPTION_ROTATION,
    PRESETS,
    SIMCLR,
    SIMCLR_CIFAR,
    ViewConfig,
    blur,
    blur_kernel_size,
    gaussian_blur,
    gaussian_kernel1d,
    hflip,
    make_view,
    normalize,
    random_resized_crop,
    resized_crop,
    rotate90,
    sample_crop_boxes,
    simclr_jitter,
    to_float,
)
from .color import (
    JitterParams,
    adjust_hue,
    apply_color_jitter,
    color_jitter,
    hsv_to_rgb,
    random_grayscale,
    rgb_to_grayscale,
    rgb_to_hsv,
    sample_color_jitter_params,
    solarize,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INCEPTION_CROP_FLIP",
    "INCEPTION_ROTATION",
    "PRESETS",
    "SIMCLR",
    "SIMCLR_CIFAR",
    "JitterParams",
    "ViewConfig",
    "adjust_hue",
    "apply_color_jitter",
    "blur",
    "blur_kernel_size",
    "color_jitter",
    "gaussian_blur",
    "gaussian_kernel1d",
    "hflip",
    "hsv_to_rgb",
    "make_view",
    "normalize",
    "random_grayscale",
    "random_resized_crop",
    "resized_crop",
    "rgb_to_grayscale",
    "rgb_to_hsv",
    "rotate90",
    "sample_color_jitter_params",
    "sample_crop_boxes",
    "simclr_jitter",
    "solarize",
    "to_float",
]
