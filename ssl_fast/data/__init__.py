"""Datasets held in memory and batched tensor augmentation."""
from ssl_fast.data.augment import MultiCrop, ViewSpec, apply_view, draw_view_params
from ssl_fast.data.cluttered_digits import NO_CLUTTER, STRONG_CLUTTER, Clutter, load_cluttered_digits, render_cluttered
from ssl_fast.data.datasets import (BAD_IMAGE_POLICIES, BadImageWarning, ImageLoadError, ImageSet, load_cifar10,
                                    load_dataset, load_digits, load_image_folder, stratified_split)
from ssl_fast.data.finegrained import load_aircraft, load_cars, load_cub, load_finegrained
from ssl_fast.data.saliency import SOURCES as SALIENCY_SOURCES
from ssl_fast.data.saliency import SaliencyLookup, box_saliency, compute_saliency, dino_saliency, spectral_residual
from ssl_fast.data.saliency_swap import SaliencySwap, SwapView, best_boxes, byol_photometric, summed_area_table

__all__ = ["BAD_IMAGE_POLICIES", "BadImageWarning", "Clutter", "ImageLoadError", "ImageSet", "MultiCrop", "NO_CLUTTER",
           "SALIENCY_SOURCES", "STRONG_CLUTTER", "SaliencyLookup", "SaliencySwap", "SwapView", "ViewSpec",
           "apply_view", "best_boxes", "box_saliency", "byol_photometric", "compute_saliency", "dino_saliency",
           "draw_view_params", "load_aircraft", "load_cars", "load_cifar10", "load_cluttered_digits", "load_cub",
           "load_dataset", "load_digits", "load_finegrained", "load_image_folder", "render_cluttered",
           "spectral_residual", "stratified_split", "summed_area_table"]
