"""MonarchLowRankLinear: forward against its dense weight, gradients, from_dense, conventions."""

from __future__ import annotations

import pytest
import torch

from monarch_matrices.nn import MonarchLinear, MonarchLowRankLinear

F64 = torch.float64


def test_forward_matches_its_dense_weight_on_awkward_shapes():
    torch.manual_seed(0)
    layer = MonarchLowRankLinear(22, 30, nblocks=4, lowrank=3, dtype=F64)
    with torch.no_grad():
        layer.lowrank_b.normal_()  # a nonzero term (it starts at zero)
    x = torch.randn(2, 5, 22, dtype=F64)
    ref = x @ layer.to_dense().T + layer.bias
    assert torch.allclose(layer(x), ref, atol=1e-12)
    assert torch.allclose(layer.to_dense() - layer.monarch_dense(),
                          layer.lowrank_b @ layer.lowrank_a)


def test_fresh_layer_is_its_monarch_part_and_params_count_the_term():
    layer = MonarchLowRankLinear(384, 1536, nblocks=4, lowrank=8)
    plain = MonarchLinear(384, 1536, nblocks=4)
    assert torch.equal(layer.lowrank_b, torch.zeros(1536, 8))
    assert layer.num_structured_params == plain.num_structured_params + 8 * (384 + 1536)
    assert "lowrank=8" in repr(layer)


def test_gradcheck():
    torch.manual_seed(1)
    layer = MonarchLowRankLinear(10, 14, nblocks=2, lowrank=2, dtype=F64)
    x = torch.randn(3, 10, dtype=F64, requires_grad=True)
    names = ("w1", "w2", "lowrank_a", "lowrank_b", "bias")

    def f(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    inputs = (x, *(getattr(layer, n).detach().clone().requires_grad_(True) for n in names))
    assert torch.autograd.gradcheck(f, inputs)


def test_from_dense_adds_the_best_term_to_the_projection():
    torch.manual_seed(2)
    W, b = torch.randn(40, 24, dtype=F64), torch.randn(40, dtype=F64)
    plain = MonarchLinear.from_dense(W, b, nblocks=4)
    layer = MonarchLowRankLinear.from_dense(W, b, nblocks=4, lowrank=6)
    assert torch.allclose(layer.monarch_dense(), plain.to_dense())
    s = torch.linalg.svdvals(W - plain.to_dense())
    err = (W - layer.to_dense().detach()).norm()
    assert torch.isclose(err, s[6:].norm(), rtol=1e-9)
    assert layer.projection_error == pytest.approx(float(err / W.norm()))
    assert layer.projection_error < plain.projection_error
    assert torch.equal(layer.bias, b)
    linear = torch.nn.Linear(24, 40, dtype=F64)
    from_linear = MonarchLowRankLinear.from_linear(linear, nblocks=4)
    assert isinstance(from_linear, MonarchLowRankLinear) and from_linear.lowrank == 8


def test_state_dict_round_trip_dtype_and_reset():
    a = MonarchLowRankLinear(20, 12, nblocks=4, lowrank=2, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in a.parameters())
    b = MonarchLowRankLinear(20, 12, nblocks=4, lowrank=2, dtype=torch.bfloat16)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 20, dtype=torch.bfloat16)
    assert torch.equal(a(x), b(x))
    with torch.no_grad():
        a.lowrank_b.fill_(1.0)
    a.reset_parameters()
    assert torch.equal(a.lowrank_b, torch.zeros_like(a.lowrank_b))


@pytest.mark.parametrize("lowrank, match", [(0, "must be an int >= 1"), (13, "at most|<= 12"),
                                             (True, "must be an int")])
def test_bad_lowrank(lowrank, match):
    with pytest.raises(ValueError, match=match):
        MonarchLowRankLinear(20, 12, nblocks=4, lowrank=lowrank)
