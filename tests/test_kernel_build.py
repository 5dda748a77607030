"""The optim_cpu C++ kernel builds once per CPU, sources and torch, saying so while it compiles,
and a built kernel loads without a compiler run; `offload doctor` says which it is."""

from __future__ import annotations

import types

import pytest

from offload.tools import doctor
from optim_cpu import native


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """A build directory of its own and a compiler that only writes the file; the real kernel
    is loaded again by the next test that needs it."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    compiled = []

    def compile_(path):
        compiled.append(path)
        path.write_bytes(b"")
        return types.ModuleType(path.stem)

    monkeypatch.setattr(native, "_compile", compile_)
    monkeypatch.setattr(native, "_import", lambda path: types.ModuleType(path.stem))
    native.forget_kernel()
    yield compiled
    native.forget_kernel()


def test_the_first_build_says_so_and_how_long_it_took(fake_build, capfd):
    assert not native.is_built()
    assert native.load_kernel() is not None
    err = capfd.readouterr().err
    assert "Building the optim_cpu C++ kernel" in err and "built in" in err
    assert native.is_built() and len(fake_build) == 1


def test_a_built_kernel_loads_quietly_without_compiling(fake_build, capfd):
    native.load_kernel()
    capfd.readouterr()
    native.forget_kernel()
    assert native.load_kernel() is not None
    assert capfd.readouterr().err == ""
    assert len(fake_build) == 1


def test_the_build_is_named_by_its_sources_so_two_checkouts_share_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    first = native.kernel_path()
    monkeypatch.setattr(native, "_CFLAGS", (*native._CFLAGS, "-DCHANGED"))
    assert native.kernel_path() != first
    assert first.parent.parent == tmp_path / "tiered_offload"


def test_doctor_says_whether_the_kernel_is_built(fake_build):
    path = native.kernel_path()
    assert "not built yet" in doctor.check_kernel(path.is_file(), path, "c++").finding
    native.load_kernel()
    result = doctor.check_kernel(path.is_file(), path, "c++")
    assert result.status == "ok" and "built: " in result.finding
    assert [r.check for r in doctor.run_checks()][-1] == "cpu kernel"
