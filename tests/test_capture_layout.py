"""Batch layouts (fisherext.layout): inferred from two batch sizes and a swapped pair, then applied to
split tensors per sample. Every case is built from tensors whose rows carry their sample's id, so a wrong
axis, a wrong row count or a wrong order shows as a wrong id."""
import pytest
import torch

from fisherext.capture.layout import NO_BATCH, Layout, from_sizes, ordering, to_samples


@pytest.mark.parametrize("shape1,shape2,expected", [
    ((2, 5, 3), (3, 5, 3), Layout(0)),                 # [N, T, D]
    ((5, 2, 3), (5, 3, 3), Layout(1)),                 # sequence-first [T, N, D]
    ((10, 3), (15, 3), Layout(0, 5)),                  # [N*T, D] rows merged
    ((4, 6, 3), (4, 9, 3), Layout(1, 3)),              # batch merged with heads on axis 1
    ((5, 3), (5, 3), NO_BATCH),                        # a buffer: no batch axis
    ((2, 2, 3), (3, 3, 3), None),                      # two axes change: unknown
    ((7, 3), (9, 3), None),                            # not a multiple of the batch sizes
    ((2, 3), (3, 3, 1), None),                         # rank changes
])
def test_from_sizes(shape1, shape2, expected):   # CPU only: shape arithmetic, no tensor to place
    assert from_sizes(shape1, 2, shape2, 3) == expected


def test_ordering_sample_major_and_minor(device):
    m = 3
    # sample-major: rows n*m + j; the j-th row of a sample has the same content whatever the batch order
    content = {s: torch.randn(m, 4, dtype=torch.float64).to(device) for s in (0, 1)}
    major = torch.cat([content[0], content[1]])
    major_swapped = torch.cat([content[1], content[0]])
    assert ordering(Layout(0, m), major, major_swapped) == Layout(0, m, True)
    minor = torch.stack([content[0], content[1]], 1).reshape(2 * m, 4)          # rows j*2 + n
    minor_swapped = torch.stack([content[1], content[0]], 1).reshape(2 * m, 4)
    assert ordering(Layout(0, m), minor, minor_swapped) == Layout(0, m, False)


def test_ordering_is_unknown_when_the_values_do_not_tell(device):
    same = torch.randn(6, 4, dtype=torch.float64).to(device)
    assert ordering(Layout(0, 3), same, same) is None                 # identical samples: both explain it
    assert ordering(Layout(0, 3), same, torch.randn(6, 4, dtype=torch.float64).to(device)) is None   # neither
    assert ordering(Layout(0, 1), same, same) == Layout(0, 1)         # one row per sample: nothing to settle


@pytest.mark.parametrize("layout,build", [
    (Layout(0), lambda ids, T: ids[:, None, None].expand(-1, T, 2)),                           # [N, T, D]
    (Layout(1), lambda ids, T: ids[None, :, None].expand(T, -1, 2)),                           # [T, N, D]
    (Layout(0, 4, True), lambda ids, T: ids.repeat_interleave(4)[:, None].expand(-1, 2)),      # [N*4, D]
    (Layout(0, 4, False), lambda ids, T: ids.repeat(4)[:, None].expand(-1, 2)),                # [4*N, D]
    (Layout(1, 2, False), lambda ids, T: ids.repeat(2)[None, :, None].expand(T, -1, 2)),       # [T, 2*N, D]
])
@pytest.mark.parametrize("lead", [0, 1])
def test_to_samples_puts_every_row_with_its_sample(layout, build, lead, device):
    n, T = 5, 3
    ids = torch.arange(n, dtype=torch.float64, device=device)
    t = build(ids, T).contiguous()
    if lead:
        t = torch.stack([t, 10 + t])                                  # a cotangent axis in front
    out = to_samples(t, layout, n, features=1, lead=lead)
    assert out.shape[lead] == n and out.shape[-1] == 2
    for k in range(t.shape[0] if lead else 1):
        block = out[k] if lead else out
        expected = ids[:, None, None].expand_as(block) + 10 * k
        assert torch.equal(block, expected)


def test_to_samples_without_batch_axis_is_one_sample(device):
    t = torch.randn(4, 3).to(device)
    assert torch.equal(to_samples(t, NO_BATCH, 1), t[None])
    with pytest.raises(AssertionError):
        to_samples(t, NO_BATCH, 2)
