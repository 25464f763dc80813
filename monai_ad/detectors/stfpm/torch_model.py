"""STFPM's loss: feature pyramid matching between teacher and student (the networks are shared backbones,
``monai_ad.networks.backbones.build_backbone`` and ``build_student``)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def pyramid_matching_loss(teacher_maps: Sequence[torch.Tensor], student_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over levels of ½/(h·w) · Σ over the batch and positions of ‖t̂ − ŝ‖² (features normalised over channels)."""
    loss = 0.0
    for teacher, student in zip(teacher_maps, student_maps):
        height, width = teacher.shape[-2:]
        difference = F.normalize(teacher.float(), dim=1) - F.normalize(student.float(), dim=1)
        loss = loss + 0.5 / (height * width) * difference.pow(2).sum()
    return loss
