"""The strategy registry (issue 12): every strategy declared and runnable, costs that rank sensibly, the
auto choice from the estimates, no import cycle anywhere in the package, and the honest-approximation
rules (convergence flags, intervals, cost warnings, one set of options on every metric function)."""
from __future__ import annotations

import ast
import math
import warnings
from pathlib import Path

import pytest
import torch

import rankme_fast as rf
from rankme_fast import strategies
from rankme_fast.spectrum import ApproxSpectrum, Spectrum
from tests.conftest import np_rankme, ref_sv

PKG = Path(rf.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict:
    """{module: {package modules it imports}}, lazy (function-level) imports included."""
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    root = base[: len(base) - node.level + 1]
                    stem = ".".join(root + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                subs = [f"{stem}.{a.name}" for a in node.names if f"{stem}.{a.name}" in mods]
                # `from pkg import submodule` imports the submodule; `from pkg import name` the package
                targets = subs if len(subs) == len(node.names) else [stem] + subs
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args \
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                targets = [node.args[0].value]
            for t in targets:
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict):
    state: dict = {}
    stack: list = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                c = visit(n)
                if c:
                    return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            c = visit(m)
            if c:
                return c
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert "rankme_fast.strategies.gram" in graph and "rankme_fast.spectrum" in graph
    # a package's __init__ importing its own submodules is the package, not a cycle between modules:
    # drop edges from a submodule back to its own package's __init__ only when the package re-exports it
    cycle = find_cycle({m: {n for n in e if not m.startswith(n + ".")} for m, e in graph.items()})
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_value_types_import_no_strategy():
    graph = import_graph()
    assert not {m for m in graph["rankme_fast.spectrum"] if m.startswith("rankme_fast.strategies")}
    # plot: Spectrum.plot's lazy import of the matplotlib leaf module (itself importing only metrics)
    assert graph["rankme_fast.spectrum"] <= {"rankme_fast.metrics", "rankme_fast.plot"}
    assert graph["rankme_fast.plot"] <= {"rankme_fast.metrics"}


def test_registry_declares_every_strategy():
    reg = strategies.registry()
    assert list(reg) == ["svd", "gram", "gram-fast", "randomized", "lanczos", "slq"]
    assert {n for n, s in reg.items() if s.exact} == {"svd", "gram"}
    assert reg["svd"].batched and reg["gram"].path and not reg["slq"].batched
    for s in reg.values():
        c = s.cost(100_000, 2048, 4, "cpu", {})
        assert c.flops > 0 and c.bytes_read >= 100_000 * 2048 * 4 and c.extra_bytes > 0 and c.passes >= 1
    with pytest.raises(ValueError, match="unknown strategy 'qr'"):
        strategies.get("qr")


def test_costs_rank_as_the_algorithms_do():
    n, d = 1_000_000, 256
    g, s = strategies.estimate("gram", n, d), strategies.estimate("svd", n, d)
    assert s.flops > 3 * g.flops and s.extra_bytes >= 8 * n * d  # the float64 copy
    assert g.extra_bytes < 8 * n * d / 20  # d² doubles + a chunk
    # SLQ's one-pass-per-step cost grows with its settings; at large d it undercuts the d³ Gram
    big = (100_000, 16_384)
    assert strategies.estimate("slq", *big).seconds() < strategies.estimate("gram", *big).seconds()
    small = strategies.estimate("slq", 20_000, 2048)
    assert strategies.estimate("slq", 20_000, 2048, probes=8, steps=20, deflate_steps=10).flops < small.flops


def test_auto_choice_from_estimates():
    assert strategies.choose(1000, 64)[0] == "gram"
    assert strategies.choose(1000, 64, rtol=0.05)[0] == "gram"  # exact is cheap here
    assert strategies.choose(100_000, 16_384, rtol=0.05)[0] == "slq"
    assert strategies.choose(100_000, 16_384, rtol=1e-3)[0] == "gram"  # tighter than SLQ's design
    assert strategies.choose(50, 30, ndim=3)[0] == "svd"
    assert strategies.choose(1000, 64, precision="fast")[0] == "gram-fast"


def test_every_strategy_through_spectrum(matrices):
    x = matrices.get("power1", (600, 48), torch.float32)
    ref = np_rankme(ref_sv(x).numpy())
    for name in ("svd", "gram", "randomized", "lanczos", "slq"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # small input: exact is cheaper, said so
            s = rf.spectrum(x, method=name)
        got = s.rankme()
        if name in ("svd", "gram"):
            assert isinstance(s, Spectrum) and abs(got - ref) / ref < 1e-6, name
        else:  # approximate: the interval holds the exact value (a top-32 head of 48 is a wide one)
            lo, hi = s.rankme_interval()
            assert isinstance(s, ApproxSpectrum) and lo <= ref <= hi, name
            if name == "slq":
                assert abs(got - ref) / ref < 0.01
    s = rf.spectrum(x, precision="fast")
    assert isinstance(s, Spectrum) and not s.exact and abs(s.rankme() - ref) / ref < 1e-2


def test_metric_functions_take_spectrum_options(matrices):
    x = matrices.get("power1", (600, 48), torch.float32)
    exact = rf.rankme(x)
    # rtol and the approximate settings go through every metric function
    assert rf.rankme(x, method="auto", rtol=1e-2) == pytest.approx(exact, rel=1e-12)
    with pytest.warns(RuntimeWarning, match="wider than rtol"):  # cheap settings, wide interval: said so
        v = rf.rankme(x, method="slq", probes=4, steps=20, deflate_steps=10, seed=1)
    assert abs(v - exact) / exact < 0.1
    assert rf.stable_rank(x, method="lanczos", k=8) == pytest.approx(rf.stable_rank(x), rel=1e-6)
    assert rf.collapse_auc(x, method="gram", backend="torch") == pytest.approx(rf.collapse_auc(x), rel=1e-9)
    with pytest.raises(ValueError, match="apply to approximate methods"):
        rf.nesum(x, method="gram", probes=4)


def test_return_interval_and_wide_interval_warning(matrices):
    x = matrices.get("power1", (600, 48), torch.float32)
    exact = rf.rankme(x)
    # a top-8 head says little about RankMe on a slowly decaying spectrum: the interval is wide
    s = rf.spectrum(x, method="lanczos", k=4)
    with pytest.warns(RuntimeWarning, match=r"known only to lie in \["):
        v = rf.rankme(s)
    v2, (lo, hi) = rf.rankme(s, return_interval=True)
    assert v2 == v and lo <= exact <= hi and (hi - lo) > 0.02 * v
    # exact spectra: the documented bound, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e, (elo, ehi) = rf.rankme(x, return_interval=True)
    assert e == exact and elo == pytest.approx(exact * (1 - 1e-4)) and ehi == pytest.approx(exact * (1 + 1e-4))


def test_default_settings_costlier_than_exact_warn_with_both_estimates(matrices):
    x = matrices.get("power1", (2000, 64), torch.float32)
    with pytest.warns(RuntimeWarning, match=r"default settings is estimated at .* flops .* for the exact Gram"):
        rf.spectrum(x, method="slq")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # settings given: the caller chose them
        rf.spectrum(x, method="slq", probes=4, steps=10, deflate_steps=5)


def test_randomized_converged_means_residuals_met():
    """A slowly decaying spectrum: two power iterations leave θ_1 visibly off, and the flag says so."""
    g = torch.Generator().manual_seed(0)
    n, d = 3000, 400
    sv = 1.0 / torch.arange(1, d + 1, dtype=torch.float64) ** 0.3
    q = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64)).Q
    w = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    x = ((q * sv) @ w.T).float()
    s = rf.spectrum(x, method="randomized", k=16, power_iters=1)
    assert isinstance(s, ApproxSpectrum)
    res_ok = bool((s.residuals <= 1e-6 * float(s.singular_values[0]) ** 2).all())
    assert s.converged == res_ok and not s.converged
    s2 = rf.spectrum(x, method="lanczos", k=4, tol=1e-8)
    assert s2.converged and bool((s2.residuals <= 1e-8 * float(s2.singular_values[0]) ** 2 * (1 + 1e-9)).all())
    assert math.isclose(float(s2.singular_values[0]), float(sv[0]), rel_tol=1e-6)


@pytest.mark.parametrize("shape", [(40, 300), (300, 1), (1, 30)], ids=["N<d", "d=1", "N=1"])
@pytest.mark.parametrize("kind", ["rank1", "power1"])
def test_every_strategy_on_odd_shapes(matrices, shape, kind):
    x = matrices.get(kind, shape, torch.float32)
    ref_s = ref_sv(x)
    ref = np_rankme(ref_s.numpy())
    for name in ("svd", "gram", "randomized", "lanczos", "slq"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            s = rf.spectrum(x, method=name)
        if name in ("svd", "gram"):
            assert float((s.singular_values - ref_s).abs().max() / ref_s[0]) < 1e-6, name
            assert abs(s.rankme() - ref) / ref < 1e-4, name
        else:
            lo, hi = s.rankme_interval()
            assert lo * (1 - 1e-9) <= ref <= hi * (1 + 1e-9), (name, lo, ref, hi)
    fast = rf.spectrum(x, precision="fast")
    assert abs(fast.rankme() - ref) / ref < 1e-2
