"""Weighted k-nearest-neighbour classification on L2-normalised features (DINO's k-NN protocol)."""
import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Predict test labels by votes of the ``k`` most similar training samples.

    Features are L2-normalised; similarity is the cosine ``s``; each neighbour votes for its class
    with weight ``exp(s / temperature)``; the class with the largest total wins.

    Args:
        train_features: ``[N, D]``.
        train_labels: ``[N]`` int64 in ``[0, num_classes)``.
        test_features: ``[M, D]``.
        num_classes: C.
        k: neighbours (clamped to N).
        temperature: vote temperature T.
        chunk: test rows per similarity block (bounds memory at ``chunk x N``).

    Returns:
        ``[M]`` int64 predicted labels.
    """
    if train_features.dim() != 2 or test_features.dim() != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D], got {tuple(train_features.shape)} and "
                         f"{tuple(test_features.shape)}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_labels must be [{train_features.shape[0]}], got {tuple(train_labels.shape)}")
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    labels = train_labels.to(train.device)
    k = min(k, train.shape[0])
    preds = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start:start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=torch.float32)
        votes.scatter_add_(1, labels[top_idx], torch.exp(top_sim / temperature))
        preds.append(votes.argmax(1))
    return torch.cat(preds)


@torch.no_grad()
def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy in percent of :func:`knn_predict` on ``test_labels``."""
    pred = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    return 100.0 * (pred.cpu() == test_labels.cpu()).double().mean().item()
