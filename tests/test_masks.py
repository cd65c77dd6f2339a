import torch

from loradrop.masks import derive_key, keep_mask, uniform


def test_uniform_is_uniform_and_decorrelated():
    members = torch.arange(64)
    features = torch.arange(4096)
    u = uniform(derive_key(1, 2, 3), members, features)
    assert u.shape == (64, 4096) and u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005
    assert abs(u.var().item() - 1 / 12) < 0.002
    # neighbouring members and features are not correlated
    assert abs(torch.corrcoef(torch.stack([u[0], u[1]]))[0, 1].item()) < 0.05
    assert abs(torch.corrcoef(torch.stack([u[:, 0], u[:, 1]]))[0, 1].item()) < 0.3


def test_masks_depend_only_on_the_key_and_indices():
    key = derive_key(42, 1, 10)
    full = keep_mask(key, torch.arange(8), torch.arange(100), 0.5)
    chunk = keep_mask(key, torch.arange(5, 8), torch.arange(100), 0.5)
    assert torch.equal(full[5:8], chunk)
    assert not torch.equal(full, keep_mask(derive_key(42, 1, 11), torch.arange(8), torch.arange(100), 0.5))
    assert derive_key(2**40 + 1) != derive_key(1)  # high bits of large seeds matter


def test_keep_probability_and_value():
    m = keep_mask(derive_key(0), torch.arange(16), torch.arange(10000), 0.3, keep_value=1 / 0.7)
    kept = m != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    assert torch.allclose(m[kept], torch.tensor(1 / 0.7))
