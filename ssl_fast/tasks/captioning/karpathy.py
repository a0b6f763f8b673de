"""Karpathy-split caption data: ``dataset_coco.json``, ``dataset_flickr8k.json``, ``dataset_flickr30k.json``.

The JSON (Karpathy and Fei-Fei's split files) holds ``{"dataset": ..., "images": [...]}``; each
image has ``filename``, ``split`` (``train``, ``restval``, ``val`` or ``test``), ``sentences``
(each with ``tokens``, lower-case words) and, for COCO, ``filepath`` (``train2014``/``val2014``).
An image's file is ``<image folder>/<filepath>/<filename>`` (``<image folder>/<filename>`` without
``filepath``). As in the reference preprocessing (sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning,
``utils.create_input_files``), ``restval`` joins ``train``, sentences longer than ``max_len``
tokens are dropped, and the vocabulary comes from the training sentences only.
"""
import json
import os
from typing import Dict, List, Tuple

from ssl_fast.tasks.captioning.data import CaptionSet

SPLIT_OF = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def parse_spec(spec: str) -> Tuple[str, str]:
    """``karpathy:<json>:<image folder>`` -> ``(json path, image folder)``.

    Raises:
        ValueError: the text is not of that form (the message quotes it).
    """
    if not spec.startswith("karpathy:"):
        raise ValueError(f"expected 'karpathy:<json>:<image folder>', got {spec!r}")
    rest = spec[len("karpathy:"):]
    # the json path ends in .json; split there so that folders may hold ':'
    cut = rest.find(".json:")
    if cut < 0:
        raise ValueError(f"expected 'karpathy:<json>:<image folder>' with a .json file, got {spec!r}")
    path, folder = rest[:cut + len(".json")], rest[cut + len(".json:"):]
    if not path or not folder:
        raise ValueError(f"expected 'karpathy:<json>:<image folder>', got {spec!r}")
    return path, folder


def load_karpathy(json_path: str, image_folder: str, image_size: int = 224, max_len: int = 100,
                  check_files: bool = True) -> Dict[str, CaptionSet]:
    """Read a Karpathy split file into ``{"train", "val", "test"}`` caption sets.

    Args:
        json_path: ``dataset_*.json``.
        image_folder: the folder the images' ``filepath/filename`` are relative to.
        image_size: side the images are resized to when read.
        max_len: sentences with more tokens are dropped (images left without any are dropped).
        check_files: refuse a data set whose image files are missing (checked up front, the
            first few are named).

    Returns:
        One :class:`CaptionSet` per split, images read on demand; a split may be empty.

    Raises:
        FileNotFoundError: the JSON, the folder or (``check_files``) image files are missing.
        ValueError: the JSON is not in the Karpathy layout (the message names what is wrong).
    """
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"Karpathy split file {json_path!r} does not exist")
    if not os.path.isdir(image_folder):
        raise FileNotFoundError(f"image folder {image_folder!r} does not exist")
    if image_size < 1 or max_len < 1:
        raise ValueError(f"image_size and max_len must be >= 1, got {image_size}, {max_len}")
    try:
        with open(json_path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path} is not a Karpathy split file: it needs a top-level 'images' list")
    splits: Dict[str, Tuple[List[str], List[List[List[str]]]]] = {s: ([], []) for s in ("train", "val", "test")}
    missing: List[str] = []
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "filename" not in im or "split" not in im or "sentences" not in im:
            raise ValueError(f"{json_path}: images[{k}] needs 'filename', 'split' and 'sentences'")
        split = SPLIT_OF.get(im["split"])
        if split is None:
            raise ValueError(f"{json_path}: images[{k}] has split {im['split']!r}; expected one of {sorted(SPLIT_OF)}")
        refs = []
        for j, s in enumerate(im["sentences"]):
            toks = s.get("tokens") if isinstance(s, dict) else None
            if not isinstance(toks, list) or not all(isinstance(t, str) for t in toks):
                raise ValueError(f"{json_path}: images[{k}].sentences[{j}] needs a 'tokens' list of words")
            if 0 < len(toks) <= max_len:
                refs.append([t.lower() for t in toks])
        if not refs:
            continue
        path = os.path.join(image_folder, im.get("filepath", ""), im["filename"])
        if check_files and not os.path.isfile(path):
            missing.append(path)
        splits[split][0].append(path)
        splits[split][1].append(refs)
    if missing:
        raise FileNotFoundError(f"{len(missing)} image file(s) named in {json_path} are missing, e.g. "
                                f"{', '.join(repr(m) for m in missing[:3])}")
    name = data.get("dataset", os.path.basename(json_path))
    return {s: CaptionSet(references=refs, paths=paths, image_size=image_size,
                          name=f"{name}-{s} ({len(paths)} images, {sum(len(r) for r in refs)} sentences)")
            for s, (paths, refs) in splits.items()}
