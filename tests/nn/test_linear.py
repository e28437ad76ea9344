"""MonarchLinear and BlockdiagLinear: the nn.Linear contract, conversions, init, round-trips."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monarch_matrices import BlockdiagLinear, MonarchLinear, project
from monarch_matrices.ops import monarch_to_dense

F64 = torch.float64
LAYERS = [MonarchLinear, BlockdiagLinear]
# (in, out, nblocks): divisible, rectangular both ways, padded both ways, √n
SHAPES = [(16, 16, 4), (12, 20, 4), (20, 12, 4), (7, 13, 3), (13, 7, 3), (36, 36, 6), (5, 9, 1)]


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize(("in_f", "out_f", "nblocks"), SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_linear_with_dense_weight(cls, in_f, out_f, nblocks, bias):
    layer = cls(in_f, out_f, bias=bias, nblocks=nblocks, dtype=F64)
    for batch in [(), (3,), (2, 0, 4), (2, 5)]:
        x = torch.randn(*batch, in_f, dtype=F64)
        y = layer(x)
        assert y.shape == (*batch, out_f)
        torch.testing.assert_close(y, F.linear(x, layer.to_dense(), layer.bias))


@pytest.mark.parametrize("cls", LAYERS)
def test_to_linear_is_exact(cls):
    layer = cls(13, 7, nblocks=3, dtype=F64)
    linear = layer.to_linear()
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (7, 13)
    x = torch.randn(4, 13, dtype=F64)
    torch.testing.assert_close(linear(x), layer(x))
    torch.testing.assert_close(linear.bias, layer.bias)


@pytest.mark.parametrize(("in_f", "out_f", "nblocks"), SHAPES)
def test_from_linear_then_to_linear_reproduces_the_projection(in_f, out_f, nblocks):
    linear = nn.Linear(in_f, out_f, dtype=F64)
    layer = MonarchLinear.from_linear(linear, nblocks=nblocks)
    expected = project(linear.weight.detach(), nblocks)
    dense = monarch_to_dense(expected.w1, expected.w2)[:out_f, :in_f]
    back = layer.to_linear()
    torch.testing.assert_close(back.weight, dense)
    torch.testing.assert_close(back.bias, linear.bias)
    assert layer.projection_error == pytest.approx(float(expected.relative_error))


def test_from_dense_recovers_monarch_layer_and_keeps_device_dtype():
    source = MonarchLinear(24, 40, nblocks=4, dtype=F64)
    layer = MonarchLinear.from_dense(source.to_dense().detach(), source.bias.detach(), nblocks=4)
    assert layer.w1.dtype == F64 and layer.w1.device == source.w1.device
    torch.testing.assert_close(layer.to_dense(), source.to_dense())
    assert layer.projection_error < 1e-10


def test_from_dense_with_rank():
    W = torch.randn(16, 16)
    layer = MonarchLinear.from_dense(W, nblocks=4, rank=1)
    assert layer.w1.shape == (4, 4, 4) and layer.rank == 1
    assert "rank=1" in repr(layer)


def test_blockdiag_from_linear_keeps_blocks():
    linear = nn.Linear(8, 8, dtype=F64)
    layer = BlockdiagLinear.from_linear(linear, nblocks=2)
    mask = torch.block_diag(torch.ones(4, 4), torch.ones(4, 4)).bool()
    torch.testing.assert_close(layer.to_dense(), linear.weight.detach() * mask)


@pytest.mark.parametrize(
    ("in_f", "out_f", "nblocks", "rank"),
    [(64, 96, 4, None), (96, 64, 4, None), (64, 64, 8, 1), (50, 70, 4, None), (48, 48, 4, 3)],
)
def test_init_matches_linear_variance(in_f, out_f, nblocks, rank):
    """Per-entry variance of the composed matrix is nn.Linear's 1/(3·in), within sampling error."""
    target = 1 / (3 * in_f)
    draws = []
    for _ in range(60):
        layer = MonarchLinear(in_f, out_f, nblocks=nblocks, rank=rank, dtype=F64)
        draws.append(float(layer.to_dense().detach().square().mean()))
    draws = torch.tensor(draws, dtype=F64)
    stderr = float(draws.std()) / math.sqrt(len(draws))
    assert abs(float(draws.mean()) - target) < 4 * stderr + 1e-3 * target
    # the test has teeth: the spread is small enough to detect a 10% error
    assert 4 * stderr < 0.1 * target
    # and the reference it copies really is nn.Linear's
    linear_var = nn.Linear(in_f, out_f, dtype=F64).weight.detach().var()
    assert float(linear_var) == pytest.approx(target, rel=0.1)


def test_init_output_variance_of_blockdiag_matches_linear():
    x = torch.randn(4096, 64, dtype=F64)
    with torch.no_grad():
        blocks = [BlockdiagLinear(64, 64, bias=False, nblocks=4, dtype=F64) for _ in range(8)]
        y_block = torch.cat([layer(x) for layer in blocks])
        y_dense = torch.cat([nn.Linear(64, 64, bias=False, dtype=F64)(x) for _ in range(8)])
    assert float(y_block.var()) == pytest.approx(float(y_dense.var()), rel=0.1)


@pytest.mark.parametrize("cls", LAYERS)
def test_state_dict_deepcopy_and_pickle_round_trip(cls):
    layer = cls(20, 12, nblocks=4)
    x = torch.randn(3, 20)
    fresh = cls(20, 12, nblocks=4)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), layer(x))
    torch.testing.assert_close(copy.deepcopy(layer)(x), layer(x))
    torch.testing.assert_close(pickle.loads(pickle.dumps(layer))(x), layer(x))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(fresh(x), layer(x))


@pytest.mark.parametrize("cls", LAYERS)
def test_meta_device_and_dtype_kwargs(cls):
    meta = cls(768, 3072, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    assert all(torch.isfinite(p).all() for p in meta.parameters())
    half = cls(32, 32, dtype=torch.bfloat16)
    assert half(torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_repr_and_parameter_accounting():
    layer = MonarchLinear(768, 3072, nblocks=4)
    assert repr(layer) == "MonarchLinear(in_features=768, out_features=3072, nblocks=4, bias=True)"
    assert layer.num_structured_params == 4 * 192 * 192 + 4 * 768 * 192
    assert layer.param_ratio == pytest.approx(0.3125)
    assert layer.ideal_speedup == pytest.approx(3.2)
    block = BlockdiagLinear(768, 3072, nblocks=4, bias=False)
    assert (
        repr(block) == "BlockdiagLinear(in_features=768, out_features=3072, nblocks=4, bias=False)"
    )
    assert block.param_ratio == pytest.approx(0.25)
    square = MonarchLinear(1024, 1024, nblocks=32, rank=1)
    assert square.param_ratio == pytest.approx(2 / 32)


@pytest.mark.parametrize("cls", LAYERS)
def test_gradcheck_through_layer(cls):
    layer = cls(7, 5, nblocks=2, dtype=F64)
    x = torch.randn(3, 7, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_trains_like_a_linear_layer():
    torch.manual_seed(1)
    target = MonarchLinear(32, 32, nblocks=4)
    layer = MonarchLinear(32, 32, nblocks=4)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(256, 32)
    with torch.no_grad():
        y = target(x)
    first = None
    for _ in range(300):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.01 * first


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize(
    ("build", "exc", "match"),
    [
        (lambda c: c(8, 8, nblocks=0), ValueError, "nblocks=0"),
        (lambda c: c(3, 8, nblocks=5), ValueError, "nblocks=5 does not fit in_features=3"),
        (lambda c: c(8, 2, nblocks=4), ValueError, "does not fit out_features=2"),
        (lambda c: c(8, 8, nblocks=4)(torch.randn(2, 9)), ValueError, r"expects input \(\*, 8\)"),
        (lambda c: c(8, 8, nblocks=4)(torch.tensor(1.0)), ValueError, "expects input"),
        (lambda c: c.from_dense(torch.randn(8)), ValueError, "2-D"),
        (lambda c: c.from_dense(torch.full((8, 8), float("nan"))), ValueError, "NaN"),
        (lambda c: c.from_dense(torch.randn(8, 8), torch.randn(3)), ValueError, "bias"),
        (lambda c: c.from_linear(nn.Conv1d(2, 2, 1)), TypeError, "nn.Linear"),
        (lambda c: c(8.0, 8), TypeError, "in_features must be an int"),
    ],
)
def test_bad_input(cls, build, exc, match):
    with pytest.raises(exc, match=match):
        build(cls)


def test_rank_too_large():
    with pytest.raises(ValueError, match="rank=5"):
        MonarchLinear(8, 8, nblocks=2, rank=5)
