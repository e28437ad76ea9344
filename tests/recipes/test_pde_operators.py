"""The FNO and its Monarch variant: equal at initialization, different parameters to train."""

from __future__ import annotations

import pytest
import torch

from monarch_matrices.recipes.operators import (
    NeuralOperator,
    count_parameters,
    make_transform,
    relative_l2,
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize(("dims", "n", "modes"), [(1, 32, 16), (1, 24, 5), (2, 16, 4), (2, 12, 6)])
def test_monarch_transforms_start_as_the_fft(dims, n, modes):
    fft, monarch = make_transform(dims, n, modes, "fft"), make_transform(dims, n, modes, "monarch")
    x = torch.randn(3, 2, *(n,) * dims)
    spectrum = fft(x)
    torch.testing.assert_close(monarch(x), spectrum, rtol=1e-4, atol=1e-4)
    y = torch.randn_like(spectrum)
    torch.testing.assert_close(monarch.inverse(y), fft.inverse(y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("dims", "n"), [(1, 32), (2, 16)])
def test_monarch_operator_equals_the_fno_with_the_same_weights(dims, n):
    torch.manual_seed(0)
    fno = NeuralOperator(dims, n, width=6, modes=4, layers=3, transform="fft")
    mon = NeuralOperator(dims, n, width=6, modes=4, layers=3, transform="monarch")
    result = mon.load_state_dict(fno.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert all(".transform." in k for k in result.missing_keys)  # only the Monarch factors
    x = torch.randn(4, *(n,) * dims)
    with torch.no_grad():
        assert float(relative_l2(mon(x), fno(x)).max()) < 1e-5


def test_only_the_monarch_operator_learns_its_transforms():
    fno = NeuralOperator(1, 16, width=4, modes=4, layers=2, transform="fft")
    mon = NeuralOperator(1, 16, width=4, modes=4, layers=2, transform="monarch")
    assert fno.monarch_parameters() == []
    factors = mon.monarch_parameters()
    assert len(factors) == 2 * 2 * 2  # layers x (forward, inverse) x (w1, w2)
    relative_l2(mon(torch.randn(2, 16)), torch.randn(2, 16)).mean().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in factors)
    extra = sum(p.numel() * 2 for p in factors)  # complex entries count twice
    assert count_parameters(mon) == count_parameters(fno) + extra


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dims": 1, "n": 16, "modes": 9}, r"modes=9 does not fit .* use 1 <= modes <= 8"),
        ({"dims": 2, "n": 16, "modes": 0}, "modes=0"),
        ({"dims": 3, "n": 16, "modes": 2}, "1-D or 2-D"),
        ({"dims": 1, "n": 16, "modes": 2, "transform": "dct"}, "transform='dct'"),
    ],
)
def test_bad_configurations_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuralOperator(**kwargs)


def test_wrong_input_shape_is_named():
    net = NeuralOperator(2, 8, width=2, modes=2, layers=1)
    with pytest.raises(ValueError, match=r"expected input \(B, 8, 8\), got \(2, 8\)"):
        net(torch.zeros(2, 8))


def test_monarch_dfts_drop_the_entries_that_only_touch_dropped_frequencies():
    # dft(128) is w1 (8, 16, 16), w2 (16, 8, 8); 16 kept modes need one w2 row per block
    # forward, and two w1 columns per block inverse (inputs j·8 + a < 16)
    t = make_transform(1, 128, 16, "monarch")
    assert tuple(t.fwd.w1[0].shape) == (8, 16, 16) and tuple(t.fwd.w2[0].shape) == (16, 1, 8)
    assert tuple(t.inv.w1[0].shape) == (8, 16, 2) and tuple(t.inv.w2[0].shape) == (16, 8, 8)
    # 2-D rows keep [0, m) and [n - m, n): two w2 rows per block of dft(32)
    t2 = make_transform(2, 32, 8, "monarch")
    assert tuple(t2.fwd_rows.w2[0].shape) == (8, 2, 4)
