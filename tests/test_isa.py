"""Issue 17: RANKME_FAST_ISA=generic|avx2|avx512 forces the native kernels (an error when the CPU or build
lacks the ISA; ``show_config()`` says which runs), and the native test grid passes on every ISA this CPU
can run — each in a fresh process, since the choice is made once per process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import rankme_fast
from rankme_fast.backends import cpu

ROOT = Path(__file__).resolve().parents[1]
needs_native = pytest.mark.skipif(cpu.load() is None, reason="the native CPU extension is not built")


def _env(isa):
    env = dict(os.environ)
    pkg = str(Path(rankme_fast.__file__).resolve().parents[1])
    env["PYTHONPATH"] = pkg + os.pathsep + str(ROOT)  # the installed package (with its .so) first
    env.pop("RANKME_FAST_DISABLE_AVX512", None)
    if isa is None:
        env.pop("RANKME_FAST_ISA", None)
    else:
        env["RANKME_FAST_ISA"] = isa
    return env


def _py(code, isa, timeout=600, cwd=None):
    """``python -c code`` with RANKME_FAST_ISA=isa; outside the checkout by default, so that ``import
    rankme_fast`` finds the installed package (with its extension) before the source tree."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return subprocess.run([sys.executable, "-c", code], env=_env(isa), cwd=str(cwd or tmp), capture_output=True,
                              text=True, timeout=timeout)


def _supported():
    mod = cpu.load()
    return [i for i in cpu.ISAS if mod.isa_supported(i)]


@needs_native
@pytest.mark.parametrize("isa", cpu.ISAS)
def test_forced_isa_runs_or_is_refused(isa):
    r = _py("import rankme_fast, torch; from rankme_fast.backends import cpu; m = cpu.load(); "
            "print('isa', m.gram_isa()); import io, contextlib; s = io.StringIO()\n"
            "with contextlib.redirect_stdout(s): rankme_fast.show_config()\n"
            "print('cfg', [ln for ln in s.getvalue().splitlines() if 'kernel isa' in ln][0]); "
            "x = torch.randn(300, 40, dtype=torch.float64); print('rel', abs(rankme_fast.rankme(x) - "
            "float(torch.exp(-(lambda p: (p * p.log()).sum())(torch.linalg.svdvals(x) / torch.linalg.svdvals(x).sum() + 1e-7)))))",
            isa)
    if isa in _supported():
        assert r.returncode == 0, r.stderr
        assert f"isa {isa}" in r.stdout
        assert f"kernel isa={isa} (forced by RANKME_FAST_ISA)" in r.stdout
        rel = float(r.stdout.split("rel")[1].split()[0])
        assert rel < 1e-9 * 40
    else:
        assert r.returncode != 0 and f"RANKME_FAST_ISA={isa}: this CPU" in r.stderr


def test_bad_isa_value_is_refused():
    r = _py("from rankme_fast.backends import cpu; cpu.load()", "sse9")
    assert r.returncode != 0 and "RANKME_FAST_ISA must be one of generic, avx2, avx512" in r.stderr


@needs_native
@pytest.mark.parametrize("isa", [i for i in cpu.ISAS if i != "avx512"])
def test_native_grid_under_forced_isa(isa):
    """The streaming-Gram and row-Gram test files, whole, with the kernels of ``isa`` (the automatic choice on
    this CPU is tested by the rest of the suite)."""
    if isa not in _supported():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    r = _py("import sys, pytest; sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', "
            "'tests/test_native.py', 'tests/test_rowgram.py', '-k', 'not avx2_variant']))", isa, timeout=1200,
            cwd=ROOT)  # tests/conftest.py prefers the installed package
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and " failed" not in r.stdout, tail


SELFTEST = ROOT / "benchmarks" / "native_selftest.cpp"
KERNEL_SRC = [ROOT / "csrc" / "cpu" / f for f in ("gram.cpp", "normal.cpp", "rowgram.cpp", "gram_isa_generic.cpp")]


def _build_selftest(cxx, out):
    import shutil

    if shutil.which(cxx) is None:
        pytest.skip(f"{cxx} is not installed")
    cmd = [cxx, "-std=c++17", "-O2", "-pthread", "-Wno-psabi", f"-I{ROOT / 'csrc' / 'include'}",
           f"-I{ROOT / 'csrc' / 'cpu'}", str(SELFTEST), *map(str, KERNEL_SRC), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_generic_kernels_build_alone_and_pass_the_selftest(tmp_path):
    """The generic (vector-extension) kernels compiled without the x86 variants, as on any other CPU, and the
    C++ self-test against a naive double reference (streaming Gram of 4 dtypes on 1 and 3 threads, the
    batched row Gram's two kernels)."""
    exe = tmp_path / "selftest"
    _build_selftest("g++", exe)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout
    assert "kernel isa: generic" in r.stdout


def test_aarch64_cross_build_under_emulation(tmp_path):
    """The kernels cross-compiled for aarch64 (Debian's g++-aarch64-linux-gnu) and the self-test run under
    qemu-user; skipped where either is not installed (apt install g++-aarch64-linux-gnu qemu-user)."""
    import shutil

    if shutil.which("qemu-aarch64") is None:
        pytest.skip("qemu-aarch64 is not installed (apt install qemu-user)")
    exe = tmp_path / "selftest_arm64"
    _build_selftest("aarch64-linux-gnu-g++", exe)
    r = subprocess.run(["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", str(exe)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
