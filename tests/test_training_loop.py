"""The one training loop every trained detector runs (monai_ad.components.training_loop)."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from monai_ad.components.training_loop import TrainingLoop, gather_slices, index_stream
from monai_ad.errors import InputError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import replace_section  # noqa: E402


def test_loop_reports_window_means_and_leaves_the_module_in_eval_mode():
    module = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    seen = []

    def step(index):
        seen.append(module.training)
        return torch.tensor(float(index))

    with TrainingLoop("toy", module, 5, progress=False) as loop:
        means = loop.run(5, step, window=2)
    assert means == [0.5, 2.5, 4.0]  # the last window is shorter
    assert all(seen) and not module.training


def test_loop_names_the_detector_and_the_place_when_the_loss_diverges():
    module = nn.Linear(2, 2)
    values = iter([1.0, float("nan")])
    with pytest.raises(RuntimeError, match=r"toy: the training loss diverged at resolution 64; lower"):
        with TrainingLoop("toy", module, 2, progress=False) as loop:
            loop.run(2, lambda _: torch.tensor(next(values)), window=2, where="at resolution 64")
    assert not module.training


@pytest.mark.parametrize("drop_last", [True, False])
def test_index_stream_visits_every_slice_once_per_pass(drop_last):
    stream = index_stream(10, 4, torch.Generator().manual_seed(0), drop_last=drop_last)
    batches = [next(stream) for _ in range(4)]
    assert all(len(b) == 4 for b in batches)
    if drop_last:  # two batches per pass of 10, the last 2 indices of each pass dropped
        for first, second in (batches[:2], batches[2:]):
            assert len(set(first.tolist()) | set(second.tolist())) == 8
    else:  # 16 indices: one full pass of 10 and the start of the next
        assert sorted(torch.cat(batches)[:10].tolist()) == list(range(10))


def test_gather_slices_checks_each_batch_and_refuses_none():
    checked = []
    images, rois = gather_slices(
        "toy", [{"image": torch.ones(2, 1, 4, 4)}, {"image": torch.zeros(1, 1, 4, 4), "roi": torch.zeros(1, 1, 4, 4)}],
        torch.device("cpu"), checked.append, lambda x: x * 2,
    )  # fmt: skip
    assert len(checked) == 2 and images.shape == (3, 1, 4, 4) and images.dtype == torch.float16
    assert float(images[0].max()) == 2.0 and rois[:2].all() and not rois[2].any()
    with pytest.raises(InputError, match="toy: no training slices"):
        gather_slices("toy", [], torch.device("cpu"), checked.append)


def test_a_results_section_is_rewritten_in_place_and_others_kept():
    text = "# Results\n\n## A\n\nold A\n\n## B\n\nB\n"
    text = replace_section(text, "## A", "## A\n\nnew A\n")
    assert text == "# Results\n\n## A\n\nnew A\n\n## B\n\nB\n"
    text = replace_section(text, "## C", "## C\n\nC\n")
    assert text.endswith("## B\n\nB\n\n## C\n\nC\n") and text.count("## A") == 1
    assert replace_section(text, "## C", "## C\n\nC2\n").endswith("## C\n\nC2\n")
