import errno

import pytest

from lazyinterp.cli_errors import as_option_message, one_line_message


@pytest.mark.parametrize("exc, expected", [
    (ValueError("steps: expected an integer >= 1, got 0\nmore detail"), "steps: expected an integer >= 1, got 0"),
    (TypeError(), "TypeError"),
    (OSError(errno.EACCES, "Permission denied", "/root/out.npz"), "Permission denied (/root/out.npz)"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), "No such file or directory"),
    (FileNotFoundError("checkpoint model.safetensors does not exist"), "checkpoint model.safetensors does not exist"),
])
def test_one_line_message(exc, expected):
    assert one_line_message(exc) == expected


def test_as_option_message_renames_only_the_leading_argument():
    options = {"mode_scale": "--mode-scale", "grid": "--time-grid"}
    assert as_option_message(ValueError("mode_scale: expected a finite number > 0, got 0.0"), options) == \
        "--mode-scale: expected a finite number > 0, got 0.0"
    assert as_option_message(ValueError('grid_shift: applies to grid="model" only'), options) == \
        'grid_shift: applies to grid="model" only'
    assert as_option_message(ValueError("no argument named here"), options) == "no argument named here"
