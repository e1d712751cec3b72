"""What a new user coming from PyTorch, d2l or cs231n trips over gets a clear answer."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn

# --- eps given where d2l puts num_dims ---------------------------------------------------------


@pytest.mark.parametrize("num_dims", [1, 2, 4, np.int64(4)])
def test_positional_int_eps_is_d2ls_num_dims_and_refused(num_dims: int) -> None:
    with pytest.raises(TypeError, match="eps was given positionally") as info:
        bn.BatchNorm(6, num_dims)
    assert "no num_dims is needed" in str(info.value)
    assert "BatchNorm(C)" in str(info.value)


def test_positional_float_eps_is_pytorchs_and_accepted() -> None:
    assert bn.BatchNorm(6, 1e-3).eps == 1e-3
    assert bn.BatchNorm(6, 1.0).eps == 1.0
    assert bn.BatchNorm(6, 1e-3, 0.5).momentum == 0.5


def test_int_eps_by_keyword_means_what_it_says() -> None:
    layer = bn.BatchNorm(6, eps=4)
    assert layer.eps == 4.0
    assert type(layer.eps) is float
