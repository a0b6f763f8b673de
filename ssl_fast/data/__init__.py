"""Datasets held in memory and batched tensor augmentation."""
from ssl_fast.data.augment import MultiCrop, ViewSpec, apply_view, draw_view_params
from ssl_fast.data.datasets import (BAD_IMAGE_POLICIES, BadImageWarning, ImageLoadError, ImageSet, load_cifar10,
                                    load_dataset, load_digits, load_image_folder, stratified_split)

__all__ = ["BAD_IMAGE_POLICIES", "BadImageWarning", "ImageLoadError", "ImageSet", "MultiCrop", "ViewSpec", "apply_view",
           "draw_view_params", "load_cifar10", "load_dataset", "load_digits", "load_image_folder", "stratified_split"]
