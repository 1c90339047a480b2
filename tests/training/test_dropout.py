"""The model's CPU dropout draws its keep mask from random bytes; it must still be dropout."""
import pytest
import torch

from training.model import dropout


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_keeps_one_minus_p_of_the_values_scaled_to_keep_the_mean(p):
    torch.manual_seed(0)
    x = torch.ones(200_000)
    y = dropout(x, p, training=True)
    kept = y != 0
    keep_rate = 1 - round(p * 256) / 256
    assert abs(kept.float().mean().item() - keep_rate) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / keep_rate))
    assert abs(y.mean().item() - 1.0) < 0.01


def test_masks_differ_between_calls_and_follow_the_torch_seed():
    x = torch.ones(4096)
    torch.manual_seed(1)
    first, second = dropout(x, 0.3, True), dropout(x, 0.3, True)
    torch.manual_seed(1)
    again = dropout(x, 0.3, True)
    assert not torch.equal(first, second)
    assert torch.equal(first, again)


def test_gradient_flows_through_kept_values_only():
    torch.manual_seed(0)
    x = torch.randn(64, 33, requires_grad=True)  # an element count that is not a multiple of 8
    y = dropout(x, 0.2, True)
    y.sum().backward()
    scale = 256 / (256 - round(0.2 * 256))
    assert torch.allclose(x.grad, (y.detach() != 0).float() * scale)
    assert 0.7 < (y.detach() != 0).float().mean() < 0.9


def test_identity_when_not_training_or_p_zero_and_zeros_at_p_one():
    x = torch.randn(10, 7)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    assert torch.count_nonzero(dropout(x, 1.0, training=True)) == 0
