"""Gradients reach the query and the projection, never the keys; they equal an autograd oracle."""

import torch

from distmem import LocalMemory, MemoryConfig, MemoryLayer

from conftest import unit


def filled_memory(size=64, dim=8, k=6, classes=5, seed=0) -> LocalMemory:
    mem = LocalMemory(MemoryConfig(size=size, key_dim=dim, k=k, age_noise=0.0), device="cpu")
    g = torch.Generator().manual_seed(seed)
    mem.load_state({"keys": unit(size, dim, seed=seed), "values": torch.randint(0, classes, (size,), generator=g),
                    "ages": torch.zeros(size, dtype=torch.int64)})
    return mem


def test_loss_and_confidence_gradients_match_dense_autograd_oracle():
    mem = filled_memory()
    q = unit(10, 8, seed=3).requires_grad_()
    labels = torch.arange(10) % 5
    r = mem.read(q, labels)
    (r.loss + r.confidence.sum()).backward()

    # oracle: gather every candidate key and let autograd differentiate the formulas directly
    q2 = q.detach().clone().requires_grad_()
    keys = mem.keys[r.ids]  # (B, k, d)
    sims = torch.einsum("bd,bkd->bk", q2, keys)
    conf = torch.softmax(mem.config.inverse_temperature * sims, dim=1)[:, 0]
    pos = torch.where(r.positive >= 0, (q2 * mem.keys[r.positive.clamp(min=0)]).sum(1), torch.zeros(10))
    neg = (q2 * mem.keys[r.negative.clamp(min=0)]).sum(1)
    loss = torch.where(r.negative >= 0, torch.relu(neg - pos + mem.config.alpha), torch.zeros(10)).mean()
    (loss + conf.sum()).backward()
    assert torch.allclose(r.confidence.detach(), conf.detach(), atol=1e-6)
    assert torch.allclose(r.loss.detach(), loss.detach(), atol=1e-6)
    assert q.grad.abs().sum() > 0
    assert torch.allclose(q.grad, q2.grad, atol=1e-5)


def test_gradients_reach_projection_but_never_keys():
    mem = filled_memory()
    layer = MemoryLayer(mem.config.key_dim)
    x = torch.randn(10, 8, requires_grad=True)
    r = layer(x, mem, torch.arange(10) % 5)
    (r.loss + r.confidence.sum()).backward()
    assert layer.query_proj.weight.grad is not None and layer.query_proj.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not mem.keys.requires_grad and mem.keys.grad is None
    assert r.sims.grad_fn is None and r.ids.grad_fn is None  # the selection carries no gradient


def test_memory_layer_init_and_state_dict():
    cfg = MemoryConfig(size=16, key_dim=256, k=4)
    torch.manual_seed(0)
    layer = MemoryLayer(cfg.key_dim)
    assert list(layer.state_dict()) == ["query_proj.weight"]  # the memory is not inside
    w = layer.query_proj.weight
    assert w.shape == (256, 256) and layer.query_proj.bias is None
    assert abs(w.std().item() - 0.01) < 0.0005
    out = layer.query(torch.randn(3, 256))
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-6)


def test_training_loop_step_learns_to_hit():
    """A toy: features of 4 classes, the projection trained through the memory loss; after a few
    steps the memory predicts the class of a fresh example."""
    torch.manual_seed(0)
    cfg = MemoryConfig(size=128, key_dim=16, k=8, age_noise=0.0)
    mem, layer = LocalMemory(cfg, device="cpu"), MemoryLayer(cfg.key_dim)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    centers = torch.randn(4, 16) * 3
    for _ in range(60):
        y = torch.randint(0, 4, (16,))
        r = layer(centers[y] + torch.randn(16, 16), mem, y)
        opt.zero_grad()
        r.loss.backward()
        opt.step()
        mem.write(r)
    y = torch.arange(4).repeat(8)
    acc = (layer(centers[y] + torch.randn(32, 16), mem).prediction == y).float().mean()
    assert acc > 0.9
