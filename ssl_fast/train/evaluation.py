"""Evaluation of frozen features, the same for every method: k-NN and a linear probe on the
method's :meth:`~ssl_fast.methods.SSLMethod.features`, and the baselines no learned feature may
fall below (the same evaluations at random initialisation and on the raw pixels)."""
import contextlib
from typing import Callable, List, Tuple

import torch

from ssl_fast.data.datasets import ImageSet
from ssl_fast.train.knn import knn_accuracy
from ssl_fast.train.linear_probe import linear_probe_accuracy


@torch.no_grad()
def extract_features(features: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, device: torch.device,
                     autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     chunk: int = 256) -> torch.Tensor:
    """``features`` of ``images [N, 3, H, W]`` in chunks on ``device``, as float32 ``[N, D]`` there."""
    out = []
    for i in range(0, images.shape[0], chunk):
        with autocast():
            out.append(features(images[i:i + chunk].to(device)).float())
    return torch.cat(out)


def num_classes(*sets: ImageSet) -> int:
    """Number of classes of the data (its class names, else the largest label + 1)."""
    named = max(len(s.classes) for s in sets)
    return named or max(int(s.labels.max()) for s in sets) + 1


def knn_top1(train_features: torch.Tensor, train_set: ImageSet, test_features: torch.Tensor, test_set: ImageSet,
             k: int, temperature: float) -> float:
    """Weighted k-NN top-1 (%) of ``test_features`` against ``train_features`` (cosine, exp(sim/T) votes)."""
    return knn_accuracy(train_features, train_set.labels, test_features, test_set.labels,
                        num_classes=num_classes(train_set, test_set), k=k, temperature=temperature)


def linear_top1(train_features: torch.Tensor, train_set: ImageSet, test_features: torch.Tensor,
                test_set: ImageSet) -> float:
    """Linear-probe top-1 (%) (:func:`~ssl_fast.train.linear_probe.linear_probe_accuracy`)."""
    return linear_probe_accuracy(train_features, train_set.labels, test_features, test_set.labels,
                                 num_classes=num_classes(train_set, test_set))


def raw_pixels(images: torch.Tensor) -> torch.Tensor:
    """The flattened images ``[N, 3*H*W]``: the raw-pixel baseline's features."""
    return images.flatten(1).float()


def one_per_class(test_set: ImageSet, n: int) -> Tuple[torch.Tensor, List[str]]:
    """The first held-out image of each of the first ``n`` classes met, and their class names."""
    seen, idx = set(), []
    for i, y in enumerate(test_set.labels.tolist()):
        if y not in seen:
            seen.add(y)
            idx.append(i)
        if len(idx) == n:
            break
    names = [test_set.classes[test_set.labels[i]] if test_set.classes else str(int(test_set.labels[i])) for i in idx]
    return test_set.images[idx], names
