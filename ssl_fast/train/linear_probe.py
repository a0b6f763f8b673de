"""Linear probe: a multinomial logistic-regression classifier on frozen features.

Features are standardised with the training set's per-dimension mean and std, then a linear layer
is fitted to minimise ``mean cross-entropy + (l2 / 2) ||W||^2`` by full-batch L-BFGS (strong-Wolfe
line search) from zero weights. Deterministic: no data order, no random initialisation. This is
scikit-learn's ``LogisticRegression(C=1 / (l2 * n))`` objective, the usual "linear evaluation" of
self-supervised features on small data sets.
"""
import torch
import torch.nn.functional as F


def linear_probe_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                          test_labels: torch.Tensor, num_classes: int, l2: float = 1e-4,
                          max_iter: int = 300) -> float:
    """Top-1 accuracy (%) on ``test_features`` of a linear classifier fitted on ``train_features``.

    Args:
        train_features: ``[N, D]``.
        train_labels: ``[N]`` integer labels in ``[0, num_classes)``.
        test_features: ``[M, D]``.
        test_labels: ``[M]``.
        num_classes: C.
        l2: weight of ``(1/2) ||W||^2`` (the bias is not penalised).
        max_iter: L-BFGS iterations.

    Returns:
        Accuracy in percent.

    Raises:
        ValueError: mismatched shapes, fewer than two classes, a label out of range, ``l2 < 0``.
    """
    if train_features.dim() != 2 or test_features.dim() != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train_features {tuple(train_features.shape)} and test_features "
                         f"{tuple(test_features.shape)} must be [N, D] and [M, D] with the same D")
    if train_labels.shape != (train_features.shape[0],) or test_labels.shape != (test_features.shape[0],):
        raise ValueError("train_labels/test_labels must be [N]/[M], one label per feature row")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    for name, y in (("train_labels", train_labels), ("test_labels", test_labels)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got {int(y.min())}..{int(y.max())}")
    x = train_features.detach().double().cpu()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    x = (x - mean) / std
    xt = (test_features.detach().double().cpu() - mean) / std
    y = train_labels.long().cpu()
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (xt @ w + b).argmax(1)
    return float((pred == test_labels.long().cpu()).double().mean() * 100.0)
