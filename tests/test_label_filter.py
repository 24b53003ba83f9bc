"""Label-aware filter: prototypes, the nearest-prototype check, bounded seeded redraws."""

from __future__ import annotations

import pytest
import torch

from rcg_augment import PrototypeFilter, RCGPipeline, reconstruct_with_labels


def test_prototypes_are_class_means_and_nearest_is_cosine():
    reps = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    f = PrototypeFilter.from_representations(reps, torch.tensor([0, 0, 2, 2]), num_classes=3)
    assert torch.allclose(f.prototypes[0], torch.tensor([2.0, 0.0]))
    assert torch.isnan(f.prototypes[1]).all() and f.present.tolist() == [True, False, True]
    assert f.nearest(torch.tensor([[5.0, 1.0], [0.1, 9.0], [1.0, 1.01]])).tolist() == [0, 2, 2]
    with pytest.raises(ValueError, match="at least 2 classes"):
        PrototypeFilter.from_representations(reps, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        PrototypeFilter.from_representations(reps, torch.tensor([0, 1]))


class FakePipe:
    """encode = mean pixel as a 2-d representation; reconstruct = a seeded random brightness."""

    def __init__(self):
        self.calls = []

    def encode(self, images):
        m = images.flatten(1).mean(1)
        return torch.stack([m, 1 - m], 1)

    def reconstruct(self, images, noise_level, *, generator=None, **settings):
        self.calls.append(images.shape[0])
        v = torch.rand(images.shape[0], generator=generator)
        return v.view(-1, 1, 1, 1).expand_as(images).clone()


def test_redraws_only_rejected_rows_within_the_bound():
    pipe = FakePipe()
    # class 0: dark (rep ~ [0, 1]); class 1: bright (rep ~ [1, 0])
    f = PrototypeFilter(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    x = torch.zeros(6, 1, 2, 2)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    out, ok, attempts = reconstruct_with_labels(pipe, x, labels, 0.3, label_filter=f, max_attempts=5,
                                                generator=torch.Generator().manual_seed(0))
    assert pipe.calls[0] == 6 and all(a >= b for a, b in zip(pipe.calls, pipe.calls[1:], strict=False))
    assert sum(pipe.calls) == int(attempts.sum())
    assert len(pipe.calls) <= 5 and attempts.max() <= 5
    assert torch.equal(f.nearest(pipe.encode(out))[ok], labels[ok])
    assert (attempts[~ok] == 5).all()
    again = reconstruct_with_labels(FakePipe(), x, labels, 0.3, label_filter=f, max_attempts=5,
                                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], out) and torch.equal(again[1], ok)
    one = reconstruct_with_labels(FakePipe(), x, labels, 0.3, label_filter=f, max_attempts=1,
                                  generator=torch.Generator().manual_seed(0))
    assert (one[2] == 1).all()
    with pytest.raises(ValueError, match="max_attempts"):
        reconstruct_with_labels(pipe, x, labels, 0.3, label_filter=f, max_attempts=0)
    with pytest.raises(ValueError, match="labels"):
        f.accepts(pipe, x[:2], torch.tensor([0, 2]))


def test_with_a_real_pipeline_is_seeded():
    torch.manual_seed(0)
    pipe = RCGPipeline.from_preset("tiny", in_channels=1)
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 1, 1])
    f = PrototypeFilter.from_images(pipe, x, labels)
    run = lambda: reconstruct_with_labels(pipe, x, labels, 0.3, label_filter=f, max_attempts=2,  # noqa: E731
                                          generator=torch.Generator().manual_seed(3), num_iter=2, rdm_steps=2,
                                          repaint_fraction=0.5)
    a, b = run(), run()
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=False))
    assert a[0].shape == x.shape
