"""Issue 16, a new user's first hour: ``rankme-fast info`` says what is installed and what is missing,
α-ReQ says when it narrowed its range, a centred single row says why its spectrum is zero, the
several-tensors error names the CLI flag, and the README's layout matches the package."""
from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import rankme_fast as rf
from rankme_fast import _config, backends
from rankme_fast import metrics as M
from rankme_fast.cli import main
from rankme_fast.scoring import score

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "rankme_fast"


def _pyproject_extras() -> dict:
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib  # noqa: PLC0415
    except ImportError:  # Python < 3.11: the section's keys are enough
        sec = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
        return {m.group(1): None for m in re.finditer(r"^(\w[\w-]*)\s*=", sec, re.M)}
    return tomllib.loads(text)["project"]["optional-dependencies"]


def _info() -> str:
    import io  # noqa: PLC0415

    buf = io.StringIO()
    rf.show_config(file=buf)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# item 1: show_config / rankme-fast info


@pytest.mark.parametrize(("module", "line", "extra"), [("h5py", ".h5/.hdf5", "hdf5"), ("zarr", ".zarr", "zarr")],
                         ids=("h5py", "zarr"))
def test_info_says_installed_with_version(module, line, extra):
    pytest.importorskip(module)
    from importlib.metadata import version  # noqa: PLC0415

    out = _info()
    assert f"  {line}: {module} {version(module)} installed\n" in out, out
    assert "available (pip install" not in out


@pytest.mark.parametrize(("module", "line", "extra"), [("h5py", ".h5/.hdf5", "hdf5"), ("zarr", ".zarr", "zarr")],
                         ids=("h5py", "zarr"))
def test_info_says_missing_with_the_real_extra(monkeypatch, module, line, extra):
    monkeypatch.setitem(sys.modules, module, None)  # find_spec -> None: "not installed"
    out = _info()
    assert f"  {line}: missing — pip install 'rankme_fast[{extra}]'\n" in out, out
    assert extra in _pyproject_extras(), f"the extra {extra!r} named by info is not in pyproject.toml"
    assert _config.config()["file_formats"][line].startswith("missing — ")


def test_info_progress_bar_line():
    out = _config.config()["file_formats"]["progress bar"]
    assert re.fullmatch(r"tqdm \S+ installed \(shown on stderr when it is a terminal\)", out), out


def _no_gpu(monkeypatch, cuda_version):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda_version)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_info_cpu_build_of_torch(monkeypatch):
    _no_gpu(monkeypatch, None)
    out = _info()
    want = f"no CUDA device (torch {torch.__version__} is a CPU build)"
    assert f"  cuda: {want}\n" in out, out
    assert f"gpu: {want}\n" in out
    assert re.search(r"  triton: " + re.escape(want) + r"; triton (\S+ installed|missing — pip install "
                     r"'rankme_fast\[gpu\]')", out), out
    assert "cannot read cpu memory" not in out and "none visible to torch" not in out
    assert "gpu" in _pyproject_extras()


def test_info_cuda_build_without_a_device(monkeypatch):
    _no_gpu(monkeypatch, "12.8")
    out = _info()
    want = f"no CUDA device visible (torch {torch.__version__} is built for CUDA 12.8)"
    assert f"  cuda: {want}\n" in out and f"gpu: {want}\n" in out, out


def test_info_keeps_its_structure(monkeypatch):
    """Other code and tests read these keys and lines: the CPU-side lines are unchanged."""
    monkeypatch.delenv("RANKME_FAST_BACKEND", raising=False)
    cfg = _config.config()
    for key in ("rankme_fast", "torch", "build", "cpu_extension", "cuda_extension", "backends", "file_formats",
                "backend_for_cpu_tensors", "gpu_dispatch", "gpu"):
        assert key in cfg, key
    assert set(cfg["backends"]) == {"torch", "cpu", "cuda", "triton"}
    assert cfg["backends"]["torch"] == "available"
    assert cfg["backends"]["cpu"] == backends.describe()["cpu"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_info_with_a_gpu_describes_the_gpu_backends():
    cfg = _config.config()
    dev = f"cuda:{torch.cuda.current_device()}"
    for name in ("cuda", "triton"):
        assert re.match(rf"(available on {dev}|unavailable on {dev}: )", cfg["backends"][name]), cfg["backends"]
    assert cfg["gpu"] == torch.cuda.get_device_name(torch.cuda.current_device())


# ----------------------------------------------------------------------------------------------
# item 2: alpha_req narrows its range aloud


def _power_sv(k: int, batch: tuple = ()) -> torch.Tensor:
    sv = torch.arange(1, k + 1, dtype=torch.float64) ** -1.0
    return sv.expand(*batch, k).clone()


@pytest.mark.parametrize("batch", [(), (3,)], ids=("1d", "batched"))
def test_alpha_req_warns_when_it_narrows(batch):
    sv = _power_sv(16, batch)
    with pytest.warns(UserWarning, match=r"alpha_req: index_range \(5, 100\) narrowed to \(5, 16\).*K = min\(N, d\) "
                                         r"= 16") as rec:
        got = M.alpha_req(sv)
    assert len(rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = M.alpha_req(sv, (5, 16))
    assert torch.equal(got, want)
    assert torch.allclose(got, torch.full(batch, 2.0, dtype=torch.float64), rtol=1e-12)


@pytest.mark.parametrize(("k", "index_range"), [(200, (5, 100)), (100, (5, 100)), (16, (5, 16)), (16, (1, 2))],
                         ids=("K200", "K100_exact_fit", "K16_fits", "K16_head"))
def test_alpha_req_silent_when_range_fits(k, index_range):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.alpha_req(_power_sv(k), index_range)


def test_alpha_req_too_small_k_raises_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"alpha_req needs at least 2 eigenvalues .* K = 5"):
            M.alpha_req(_power_sv(5))


@pytest.mark.parametrize("route", ["metrics", "spectrum", "api"])
def test_alpha_req_warning_points_at_the_caller(route):
    z = torch.randn(300, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    call = {"metrics": lambda: M.alpha_req(torch.linalg.svdvals(z)),
            "spectrum": lambda: rf.spectrum(z, center=True).alpha_req(),
            "api": lambda: rf.alpha_req(z)}[route]
    with pytest.warns(UserWarning, match="narrowed") as rec:
        val = call()
    assert [Path(w.filename).name for w in rec] == [Path(__file__).name]
    assert np.isfinite(float(val))


def test_score_alpha_req_small_d_still_works(tmp_path):
    x = np.random.default_rng(1).standard_normal((400, 24))
    p = tmp_path / "e.npy"
    np.save(p, x)
    with pytest.warns(UserWarning, match=r"narrowed to \(5, 24\)"):
        res = score(str(p), "alpha_req", progress=False)
    xc = x - x.mean(0)
    s = np.linalg.svd(xc, compute_uv=False)
    i = np.arange(5, 25, dtype=np.float64)
    want = float(np.polyfit(-np.log(i), np.log(s[4:24] ** 2), 1)[0])
    assert abs(res.metrics["alpha_req"] - want) <= 1e-9 * abs(want)


# ----------------------------------------------------------------------------------------------
# item 3: a single centred row


ONE_ROW = r"centring a single row.*center=False"


def test_centred_single_row_says_why():
    one = torch.randn(1, 8)
    with pytest.raises(ValueError, match=r"collapse AUC is undefined for an all-zero spectrum.*" + ONE_ROW):
        rf.spectrum(one, center=True).collapse_auc()
    with pytest.raises(ValueError, match=ONE_ROW):
        rf.collapse_auc(one)  # centred by default
    with pytest.raises(ValueError, match=ONE_ROW):
        rf.rankme(one, center=True)
    assert rf.collapse_auc(one, center=False) == pytest.approx(1.0)  # the advice works


def test_centred_single_row_score_and_cli(tmp_path, capsys):
    p = tmp_path / "one.npy"
    np.save(p, np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32))
    with pytest.raises(ValueError, match=re.escape(str(p)) + r": .*" + ONE_ROW):
        score(str(p), "collapse_auc", progress=False)
    assert main(["score", str(p), "--metrics", "collapse_auc", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no-center" in err and "single row" in err, err
    assert main(["score", str(p), "--metrics", "collapse_auc", "--no-center", "--quiet"]) == 0


def test_zero_spectrum_error_is_a_value_error_and_specific():
    with pytest.raises(M.ZeroSpectrumError) as ei:
        M.rankme(torch.zeros(4, dtype=torch.float64))
    assert isinstance(ei.value, ValueError) and "single row" not in str(ei.value)  # K = 4: not one row
    assert "single row" in M.zero_spectrum_cause(1, True) and "center=False" in M.zero_spectrum_cause(1, True)
    assert "all 7 rows are equal" in M.zero_spectrum_cause(7, True)
    assert M.zero_spectrum_cause(7, False) == "the input is all zeros"
    msg = M.zero_spectrum_message("collapse AUC", 1, True)
    assert msg.startswith("collapse AUC is undefined for an all-zero spectrum") and "single row" in msg


def test_zero_spectrum_names_the_batch_item():
    sv = _power_sv(4, (3,))
    sv[1] = 0.0
    with pytest.raises(M.ZeroSpectrumError, match=r"all-zero spectrum .* at batch item 1 \(of 3\)") as ei:
        M.collapse_auc(sv)
    assert ei.value.what == "collapse AUC"
    sv = _power_sv(4, (2, 3))
    sv[1, 2] = 0.0
    with pytest.raises(ValueError, match=r"at batch index \(1, 2\) \(batch shape \(2, 3\)\)"):
        M.stable_rank(sv)
    with pytest.raises(ValueError, match=r"at batch item 0 \(of 2\).*" + ONE_ROW):  # (B, 1, d), centred
        rf.rankme(torch.randn(2, 1, 5), center=True)


# ----------------------------------------------------------------------------------------------
# item 4: several tensors in one file: key= and --key

CHOOSE = "choose one with key= (--key on the command line)"


def _two_tensor_files(tmp_path) -> list:
    a = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    files = []
    p = tmp_path / "two.pt"
    torch.save({"a": torch.from_numpy(a), "b": torch.from_numpy(a + 1)}, p)
    files.append(p)
    try:
        from safetensors.numpy import save_file  # noqa: PLC0415

        p = tmp_path / "two.safetensors"
        save_file({"a": a, "b": a + 1}, str(p))
        files.append(p)
    except ImportError:
        pass
    try:
        import h5py  # noqa: PLC0415

        p = tmp_path / "two.h5"
        with h5py.File(p, "w") as f:
            f["a"], f["b"] = a, a + 1
        files.append(p)
    except ImportError:
        pass
    return files


def test_several_tensors_name_the_cli_flag(tmp_path, capsys):
    for p in _two_tensor_files(tmp_path):
        with pytest.raises(ValueError, match=r"several 2-D [\w ]+ \['a', 'b'\]; " + re.escape(CHOOSE)):
            score(str(p), progress=False)
        assert main(["score", str(p), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(p) in err and "--key" in err, err
        assert main(["score", str(p), "--key", "b", "--quiet"]) == 0
        capsys.readouterr()


def test_no_old_key_hint_left_in_io():
    src = (PKG / "io.py").read_text()
    assert re.search(r"choose one with key=\"", src) is None  # every such message goes through one constant
    assert src.count("_CHOOSE_KEY}") >= 2


# ----------------------------------------------------------------------------------------------
# item 5: README layout and set-up

# modules the README describes that are being written alongside this change
PENDING = set()
# written by the build (CMake) into the installed package, not present in a source checkout
GENERATED = {"_build_info.py"}


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_readme_layout_matches_the_package():
    layout = _section((ROOT / "README.md").read_text(), "Layout")
    mentioned = set(re.findall(r"`([\w./]+)`", layout))
    present = ({p.name for p in PKG.glob("*.py")} | {p.name for p in PKG.iterdir()
                                                    if p.is_dir() and (p / "__init__.py").exists()}) - GENERATED
    for name in sorted(present):
        assert name in mentioned or name + "/" in mentioned, f"README layout omits {name}"
    described = {m for m in re.findall(r"`([\w.]+(?:\.py|/))`:", layout)}
    for name in sorted(described):
        assert (PKG / name.rstrip("/")).exists() or name in PENDING | GENERATED, \
            f"README layout lists {name}, which does not exist"


def test_readme_setup_keeps_its_two_commands():
    setup = _section((ROOT / "README.md").read_text(), "Set-up (two commands)")
    blocks = re.findall(r"```bash\n(.*?)```", setup, re.S)
    assert [b.strip() for b in blocks] == ['pip install torch==2.13.0 . && rankme-fast demo',
                                          'pip install torch==2.13.0 ".[test]" && pytest']
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == blocks[1].strip()
    assert "--index-url https://download.pytorch.org/whl/cpu" in setup and "pins the CPU wheel" not in setup
    assert re.search(r"\bcu\d+", setup)
