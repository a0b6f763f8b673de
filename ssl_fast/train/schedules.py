"""Per-iteration schedules (DINO's cosine scheduler with a linear warm-up)."""
import numpy as np


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int,
                    warmup_epochs: float = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Values for every iteration: linear ``warmup_start -> base`` over the warm-up, then cosine ``base -> final``.

    Returns:
        ``[epochs * steps_per_epoch]`` float64 array.
    """
    total = epochs * steps_per_epoch
    warm = min(int(round(warmup_epochs * steps_per_epoch)), total)
    warmup = np.linspace(warmup_start, base, warm, endpoint=False) if warm > 0 else np.zeros(0)
    rest = total - warm
    it = np.arange(rest)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * it / max(rest, 1)))
    return np.concatenate([warmup, cos])
