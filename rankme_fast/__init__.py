"""rankme_fast: exact, fast singular-value spectra of embedding matrices and the metrics built on them.

>>> import torch, rankme_fast as rf
>>> z = torch.randn(10_000, 256)
>>> rf.rankme(z)                      # Garrido et al. 2023, float64-exact
>>> s = rf.spectrum(z, center=True)   # one decomposition, every metric
>>> s.collapse_auc(), s.alpha_req()
>>> rf.score("shards/", metrics="rankme,collapse_auc")   # files larger than RAM, streamed
>>> rf.compare(["ckpt_10.npy", "ckpt_20.npy"], labels={"ckpt_10.npy": 71.2, "ckpt_20.npy": 74.0})
>>> acc = rf.GramAccumulator(); acc.update(batch); acc.all_reduce(); acc.rankme()

Importing loads no native code; the C++ kernel is loaded on first use (see ``show_config()``).
"""
import sys as _sys


def _run_as_cli() -> bool:
    """Whether this import is the start of the ``rankme-fast`` command (console script or -m rankme_fast)."""
    argv = getattr(_sys, "orig_argv", None) or _sys.argv
    name = _sys.argv[0].replace("\\", "/").rsplit("/", 1)[-1] if _sys.argv else ""
    return name in ("rankme-fast", "rankme-fast.exe") or any(
        a == "-m" and b.split(".")[0] == "rankme_fast" for a, b in zip(argv, argv[1:]))


try:  # torch and the modules load here; a Ctrl-C meanwhile, in the CLI, exits 130 quietly like the rest of it
    from ._config import show_config
    from .gram import GramAccumulator
    from .scoring import ScoreResult, score
    from .spectrum import ApproxSpectrum, Spectrum
    from .api import alpha_req, collapse_auc, effective_rank, nesum, participation_ratio, rankme, spectrum, stable_rank
    from .structured import lidar
    from .llm import alpha_entropy, diff_erank, eigenscore, erank, llm_check_hidden_score, matrix_entropy
    from .compare import CompareResult, compare
    from .bench import BenchResult, bench  # the module stays importable as sys.modules["rankme_fast.bench"]
except KeyboardInterrupt:
    if not _run_as_cli():
        raise  # a library import: the caller's KeyboardInterrupt
    _sys.stderr.write("rankme-fast: interrupted\n")
    raise SystemExit(130) from None

__version__ = "0.1.0"

__all__ = [
    "ApproxSpectrum",
    "BenchResult",
    "CompareResult",
    "GramAccumulator",
    "ScoreResult",
    "Spectrum",
    "alpha_entropy",
    "alpha_req",
    "bench",
    "collapse_auc",
    "compare",
    "diff_erank",
    "effective_rank",
    "eigenscore",
    "erank",
    "lidar",
    "llm_check_hidden_score",
    "matrix_entropy",
    "nesum",
    "participation_ratio",
    "rankme",
    "score",
    "show_config",
    "spectrum",
    "stable_rank",
]
