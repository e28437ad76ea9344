"""MonarchProduct: the module contract (shapes, init, training, state_dict, device/dtype)."""

from __future__ import annotations

import io

import pytest
import torch

from monarch_matrices.nn import MonarchProduct
from monarch_matrices.ops import ProductFactors, product_to_dense

F64, C128 = torch.float64, torch.complex128


@pytest.mark.parametrize(
    ("in_f", "out_f", "degree", "nblocks"),
    [(16, None, 2, 4), (10, 10, 3, 4), (12, 20, 2, 3), (20, 7, 1, 2), (5, 5, 4, 5)],
)
def test_forward_matches_dense_for_any_sizes(in_f, out_f, degree, nblocks):
    layer = MonarchProduct(in_f, out_f, degree=degree, nblocks=nblocks, dtype=F64)
    out_f = in_f if out_f is None else out_f
    assert (layer.in_features, layer.out_features, layer.degree) == (in_f, out_f, degree)
    x = torch.randn(2, 3, in_f, dtype=F64)
    y = layer(x)
    assert y.shape == (2, 3, out_f)
    torch.testing.assert_close(y, x @ layer.to_dense().T)
    assert layer(torch.randn(in_f, dtype=F64)).shape == (out_f,)


def test_padding_uses_index_maps_only_when_needed():
    assert MonarchProduct(16, nblocks=4).in_index is None
    layer = MonarchProduct(10, 6, nblocks=4)
    assert layer.in_index is not None and layer.out_index is not None
    assert "in_index" in layer.state_dict() and "out_index" in layer.state_dict()


def test_init_keeps_the_second_moment():
    torch.manual_seed(0)
    layer = MonarchProduct(256, degree=6, nblocks=16, dtype=F64)
    x = torch.randn(512, 256, dtype=F64)
    with torch.no_grad():
        ratio = float(layer(x).pow(2).mean() / x.pow(2).mean())
    assert 0.5 < ratio < 2.0


def test_complex_module_and_real_input():
    layer = MonarchProduct(9, degree=2, nblocks=3, dtype=C128)
    x = torch.randn(4, 9, dtype=F64)
    y = layer(x)
    assert y.dtype == C128
    torch.testing.assert_close(y, x.to(C128) @ layer.to_dense().T)


def test_parameters_are_trainable():
    torch.manual_seed(0)
    target = torch.randn(16, 16)
    layer = MonarchProduct(16, degree=2, nblocks=4)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(64, 16)
    losses = []
    for _ in range(30):
        loss = (layer(x) - x @ target.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert len(list(layer.parameters())) == 4


def test_state_dict_round_trip():
    layer = MonarchProduct(10, 11, degree=3, nblocks=4, dtype=F64)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    other = MonarchProduct(10, 11, degree=3, nblocks=4, dtype=F64)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    x = torch.randn(3, 10, dtype=F64)
    torch.testing.assert_close(other(x), layer(x))
    assert sorted(layer.state_dict()) == sorted(
        ["w1.0", "w1.1", "w1.2", "w2.0", "w2.1", "w2.2", "in_index", "out_index"]
    )


def test_from_factors_copies_and_keeps_index_maps():
    w = [(torch.randn(2, 3, 3, dtype=C128), torch.randn(3, 2, 2, dtype=C128))]
    in_index = torch.tensor([1, 0, 2, -1, 3, 4])
    pf = ProductFactors(w, in_index, torch.tensor([5, 0]))
    module = MonarchProduct.from_factors(pf)
    torch.testing.assert_close(module.to_dense().detach(), pf.to_dense())
    assert module.w1[0].data_ptr() != w[0][0].data_ptr()  # a copy, not an alias
    plain = MonarchProduct.from_factors(w, in_index=in_index, in_features=7)
    assert plain.in_features == 7 and plain.out_features == 6
    with pytest.raises(ValueError, match="not both"):
        MonarchProduct.from_factors(pf, in_index=in_index)
    back = module.to_factors()
    torch.testing.assert_close(
        product_to_dense(back.factors, back.in_index, back.out_index), pf.to_dense()
    )


def test_device_dtype_and_meta_construction():
    layer = MonarchProduct(8, degree=2, nblocks=2, device="meta", dtype=torch.float16)
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in layer.parameters())
    layer = MonarchProduct(8, degree=2, nblocks=2).to(F64)
    assert layer(torch.randn(8, dtype=F64)).dtype == F64


def test_extra_repr_and_counts():
    layer = MonarchProduct(10, nblocks=4, degree=2)
    text = repr(layer)
    assert "in_features=10, out_features=10, degree=2" in text and "in_index=True" in text
    assert layer.num_params == sum(p.numel() for p in layer.parameters())


def test_errors_name_the_problem():
    layer = MonarchProduct(8, nblocks=2)
    with pytest.raises(ValueError, match=r"expects input \(\*, 8\)"):
        layer(torch.randn(3, 9))
    with pytest.raises(ValueError, match="degree=0"):
        MonarchProduct(8, degree=0)
    with pytest.raises(ValueError, match="nblocks=9"):
        MonarchProduct(8, nblocks=9)
