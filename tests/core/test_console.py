"""brainmri.core.console against the pinned Ray: the one private Ray function it wraps (the
driver's printer of Ray's error channel) is there with the signature the wrapper expects, the
wrapper drops only the worker-pool warning, and without the function the console goes on with
one line that says what is missing."""

from __future__ import annotations

import inspect

import pytest
import ray._private.worker as w

from brainmri.core import console

POOL_LINE = "(raylet) 6 PYTHON worker processes have been started on node: 3f2a with address: 10.0.0.2"
OOM_LINE = "(raylet) Task was killed due to the node running low on memory."


@pytest.fixture
def ray_printer(monkeypatch):
    """Ray's own print_to_stdstream, put back after the test whatever it wrapped."""
    monkeypatch.setattr(w, "print_to_stdstream", inspect.unwrap(w.print_to_stdstream))
    monkeypatch.setattr(console, "_missing_said", set())
    return w.print_to_stdstream


def test_the_wrapped_ray_printer_is_as_pinned(ray_printer):
    """An upgrade that renames it, changes its arguments, or stops looking it up by name on
    each message (so that the wrap would no longer apply) fails here, not in a run."""
    assert list(inspect.signature(ray_printer).parameters) == ["data", "ignore_prefix"]
    assert "print_to_stdstream" in w.listen_error_messages.__code__.co_names


def test_only_the_pool_warning_is_dropped_from_rays_error_channel(ray_printer, capsys):
    console._drop_pool_warning()
    console._drop_pool_warning()  # once only: a second ray.init does not wrap the wrapper
    assert w.print_to_stdstream is not ray_printer and inspect.unwrap(w.print_to_stdstream) is ray_printer
    w.print_to_stdstream({"lines": [POOL_LINE, OOM_LINE], "pid": "raylet", "is_err": False},
                         ignore_prefix=False)
    w.print_to_stdstream({"lines": [POOL_LINE], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr().out  # Ray's printer itself wrote it (with its colour codes)
    assert out.count("Task was killed due to the node running low on memory") == 1
    assert "worker processes have been started" not in out


def test_without_the_ray_printer_the_console_goes_on_with_one_line(ray_printer, monkeypatch, capsys):
    monkeypatch.delattr(w, "print_to_stdstream")
    console._drop_pool_warning()
    console._drop_pool_warning()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("brainmri: Ray ")
    assert "ray._private.worker.print_to_stdstream (AttributeError" in err
    assert not hasattr(w, "print_to_stdstream")  # nothing put in its place


def test_the_authentication_logger_name_is_rays():
    """The logger silenced for ray.init's token notice is the parent of the one that writes it."""
    from ray._private.authentication import authentication_token_setup

    assert authentication_token_setup.logger.name.startswith(console.AUTH_LOGGER + ".")
