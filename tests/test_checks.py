import math

import numpy as np
import pytest
import torch

import lazyinterp as li
from lazyinterp.checks import check_int, check_number, check_positive, check_shape


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), torch.tensor(3)])
def test_every_kind_of_integer_is_an_int(value):
    assert check_int(value, "n") == 3 and type(check_int(value, "n")) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), torch.tensor(True), 3.0, np.float64(3.0), torch.tensor(3.0),
                                   "3", None, [3]])
def test_a_value_that_is_not_an_integer_is_a_type_error_naming_the_argument(value):
    with pytest.raises(TypeError, match="^count: expected an integer >= 0, got "):
        check_int(value, "count", 0)


def test_an_integer_out_of_range_is_a_value_error_with_the_bounds():
    with pytest.raises(ValueError, match="^n: expected an integer >= 2, got 1$"):
        check_int(1, "n", 2)
    with pytest.raises(ValueError, match="^depth: expected an integer from 1 to 52, got 53$"):
        check_int(53, "depth", 1, 52)
    assert check_int(52, "depth", 1, 52) == 52 and check_int(0, "count", 0) == 0


@pytest.mark.parametrize("value", [2, 2.5, np.float32(2.5), np.int64(2), torch.tensor(2.5), torch.tensor([2.5])])
def test_every_kind_of_real_number_is_a_number(value):
    assert check_number(value, "mu") == float(value) and type(check_number(value, "mu")) is float


@pytest.mark.parametrize("value", [True, "2", b"2", None, [2.0], torch.tensor([1.0, 2.0])])
def test_a_value_that_is_not_a_number_is_a_type_error_naming_the_argument(value):
    with pytest.raises(TypeError, match="^shift: expected a number, got "):
        check_number(value, "shift")


def test_a_number_that_is_not_finite_or_not_positive_is_a_value_error():
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="^mu: expected a finite number, got "):
            check_number(value, "mu")
    for value in (0, -1.5):
        with pytest.raises(ValueError, match="^shift: expected a positive finite number, got "):
            check_number(value, "shift", positive=True)
    assert check_number(-1.5, "mu") == -1.5


@pytest.mark.parametrize("value", [(2, 3), [2, 3], torch.Size([2, 3]), np.array([2, 3]), torch.tensor([2, 3]),
                                   (np.int64(2), 3)])
def test_any_sequence_of_integers_is_a_shape(value):
    assert check_shape(value, "shape") == (2, 3)


@pytest.mark.parametrize("value", [4, "23", (2, 2.5), (2, 3.0), (True, 3), (2, None), np.array([2.0, 3.0]),
                                   torch.tensor(4)])
def test_a_shape_that_is_not_a_sequence_of_integers_is_a_type_error(value):
    with pytest.raises(TypeError, match="^shape: expected the shape of one sample, a tuple of integers, got "):
        check_shape(value, "shape")


def test_a_shape_with_a_size_below_one_or_too_few_sizes_is_a_value_error():
    with pytest.raises(ValueError, match=r"^shape: expected the shape of one sample, positive sizes, got \(2, 0\)$"):
        check_shape((2, 0), "shape")
    with pytest.raises(ValueError, match=r"^shape: expected the shape of one sample, positive sizes, got \(\)$"):
        check_shape((), "shape")
    with pytest.raises(ValueError, match=r"^shape: expected \(batch, ...\), at least 2 positive sizes, got \(5,\)$"):
        check_shape((5,), "shape", min_dims=2, what="(batch, ...)")
    assert check_shape((), "sample_shape", min_dims=0) == ()


def test_positive_numbers():
    assert check_positive(2, "sigma") == 2.0 and check_positive(0.5, "sigma") == 0.5
    for value, error in ((0, ValueError), (-1.0, ValueError), (math.inf, ValueError), (math.nan, ValueError),
                         (True, TypeError), ("1", TypeError), (None, TypeError)):
        with pytest.raises(error, match="^sigma: expected a positive"):
            check_positive(value, "sigma")


@pytest.mark.parametrize("shape, error", [((5, 2.7), TypeError), ((True, 2), TypeError), ((5,), ValueError),
                                          ((5, 0), ValueError)])
def test_sample_refuses_a_batch_shape_it_would_otherwise_round(shape, error):
    """A float size was truncated (5, 2.7) -> (5, 2) and True taken as a batch of 1."""
    model = li.GaussianMixture.gaussian(torch.zeros(2), torch.tensor(1.0)).model("linear")
    with pytest.raises(error, match="^shape: expected"):
        li.sample(model, shape=shape, schedule="point-mass", diffusion="optimal", steps=2)
