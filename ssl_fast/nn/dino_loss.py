"""Drop-in DINO loss module: the official ``DINOLoss`` interface on the fused op."""
import numpy as np
import torch
from torch import nn

from ssl_fast._checks import check_int, check_real
from ssl_fast.ops.dino_loss import dino_loss, update_center_


class DINOLoss(nn.Module):
    """DINO's loss with centering and a warmed-up teacher temperature; replaces the official class.

    Same constructor, ``forward(student_output, teacher_output, epoch)`` and state (the buffer
    ``center [1, out_dim]``, attributes ``ncrops``, ``student_temp``, ``center_momentum``,
    ``teacher_temp_schedule``) as the class in the official DINO training script, so that
    script runs unchanged. Per call, with ``tau_t = teacher_temp_schedule[epoch]``::

        loss = ssl_fast.ops.dino_loss(student_output, teacher_output, center, ncrops=ncrops,
                                      n_global=teacher rows / B, student_temp, tau_t)
        center <- center_momentum * center + (1 - center_momentum) * mean(teacher rows, all ranks)

    The loss is computed with the center from before this call's update. The schedule rises
    linearly from ``warmup_teacher_temp`` to ``teacher_temp`` over the first
    ``warmup_teacher_temp_epochs`` epochs (both ends included) and stays at ``teacher_temp``
    until ``nepochs``.

    Args:
        out_dim: K, the number of prototypes (the head's output width).
        ncrops: crops per image in ``student_output`` (global + local).
        warmup_teacher_temp: teacher temperature at epoch 0.
        teacher_temp: teacher temperature after the warm-up.
        warmup_teacher_temp_epochs: length of the warm-up in epochs.
        nepochs: number of epochs (length of the schedule).
        student_temp: student temperature.
        center_momentum: momentum of the center's EMA.

    Shapes:
        student_output ``[ncrops * B, out_dim]``, crop-major; teacher_output
        ``[n_global * B, out_dim]`` (DINO: ``n_global = 2``); returns a 0-d loss.
    """

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        out_dim = check_int("out_dim", out_dim, low=1)
        self.ncrops = check_int("ncrops", ncrops, low=2)
        warmup_epochs = check_int("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs, low=0)
        nepochs = check_int("nepochs", nepochs, low=0)
        if warmup_epochs > nepochs:
            raise ValueError(f"warmup_teacher_temp_epochs ({warmup_epochs}) must be <= nepochs ({nepochs})")
        warmup_teacher_temp = check_real("warmup_teacher_temp", warmup_teacher_temp, low=0.0, low_open=True)
        teacher_temp = check_real("teacher_temp", teacher_temp, low=0.0, low_open=True)
        self.student_temp = check_real("student_temp", student_temp, low=0.0, low_open=True)
        self.center_momentum = check_real("center_momentum", center_momentum, low=0.0, high=1.0)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
            np.ones(nepochs - warmup_epochs) * teacher_temp,
        ))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """Loss of this batch (teacher temperature of ``epoch``), then the center update.

        Args:
            student_output: ``[ncrops * B, out_dim]`` student logits, crop-major.
            teacher_output: ``[n_global * B, out_dim]`` teacher logits, ``n_global`` 1 or 2
                (inferred from the rows).
            epoch: index into ``teacher_temp_schedule``, ``0 <= epoch < nepochs``.

        Returns:
            0-d loss (see :func:`ssl_fast.ops.dino_loss`).

        Raises:
            ValueError: ``epoch`` outside the schedule; teacher rows that are neither ``B`` nor
                ``2 B`` (the message gives both row counts, ``ncrops`` and ``B``); the shape
                errors of :func:`ssl_fast.ops.dino_loss`. Nothing is updated then.
        """
        epoch = check_int("epoch", epoch, low=0)
        if epoch >= len(self.teacher_temp_schedule):
            raise ValueError(f"epoch must be < nepochs ({len(self.teacher_temp_schedule)}), got {epoch}")
        teacher_temp = float(self.teacher_temp_schedule[epoch])
        n_global = 2  # DINO; inferred below from the rows when the shapes allow it
        if (isinstance(student_output, torch.Tensor) and isinstance(teacher_output, torch.Tensor)
                and student_output.dim() == 2 and teacher_output.dim() == 2):
            rows, t_rows = student_output.shape[0], teacher_output.shape[0]
            if rows > 0 and rows % self.ncrops == 0:  # else dino_loss names the student's rows
                batch = rows // self.ncrops
                allowed = [g * batch for g in (1, 2) if g <= self.ncrops]
                if t_rows not in allowed:
                    views = " or ".join(f"{g * batch} ({g} x B)" for g in (1, 2) if g <= self.ncrops)
                    raise ValueError(
                        f"teacher_output has {t_rows} rows, but student_output has {rows} rows = "
                        f"ncrops ({self.ncrops}) x B ({batch}), so teacher_output needs n_global x B "
                        f"rows for n_global = 1 or 2 global views: {views}")
                n_global = t_rows // batch
        loss = dino_loss(student_output, teacher_output, self.center, ncrops=self.ncrops,
                         n_global=n_global, student_temp=self.student_temp, teacher_temp=teacher_temp)
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher's batch mean (all-reduced over ranks when distributed is initialised)."""
        update_center_(self.center, teacher_output, self.center_momentum)

    def extra_repr(self) -> str:
        return (f"out_dim={self.center.shape[1]}, ncrops={self.ncrops}, student_temp={self.student_temp}, "
                f"center_momentum={self.center_momentum}")
