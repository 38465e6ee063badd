import errno

import pytest

from lazyinterp.cli_errors import UserError, as_option_message, friendly_errors, one_line_message, one_line_warning


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


@pytest.mark.parametrize("exc, expected", [
    (ValueError("sigma: expected a positive finite number, got -1.0"), "sigma: expected a positive finite number"),
    (PermissionError(errno.EACCES, "Permission denied", "/out.npz"), "Permission denied (/out.npz)"),
    (MemoryError(), "out of memory; ask for fewer samples (-n) or a smaller --batch-size"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 8000000000008 bytes"), "out of memory; ask for fewer samples (-n)"),
])
def test_friendly_errors_turn_library_failures_into_one_line(exc, expected):
    def command():
        raise exc

    with pytest.raises(UserError) as caught:
        friendly_errors(command)()
    assert caught.value.format_message().startswith(expected)


def test_a_command_without_n_names_its_own_remedy_for_a_failed_allocation():
    @friendly_errors(out_of_memory_line="out of memory; use a smaller --batch-size")
    def command():
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8000000000008 bytes")

    with pytest.raises(UserError) as caught:
        command()
    assert caught.value.format_message() == "out of memory; use a smaller --batch-size"


@pytest.mark.parametrize("exc", [KeyError("a bug, not a user's mistake"), RuntimeError("a kernel failed")])
def test_friendly_errors_leave_programming_errors_alone(exc):
    def command():
        raise exc

    with pytest.raises(type(exc)):
        friendly_errors(command)()


def test_a_warning_during_a_command_is_one_line_and_the_command_goes_on():
    """The library's warnings (a σ estimate it could not confirm, say) print as ``warning: <message>``, one line
    whatever the message's own line breaks, without Python's file, line and source; the command then finishes."""
    import warnings

    import click
    from click.testing import CliRunner

    import lazyinterp as li
    from lazyinterp.cli import OneLineErrorGroup

    @click.group(cls=OneLineErrorGroup)
    def group() -> None:
        pass

    @group.command()
    def run() -> None:
        warnings.warn("sigma: read at SNR 0.1\n  and not confirmed", li.LowestSNRWarning, stacklevel=1)
        click.echo("done")

    result = CliRunner().invoke(group, ["run"])
    assert result.exit_code == 0
    assert result.output == "warning: sigma: read at SNR 0.1 and not confirmed\ndone\n"
    assert warnings.showwarning is not one_line_warning  # restored after the command
