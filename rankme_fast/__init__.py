"""rankme_fast: exact, fast singular-value spectra of embedding matrices and the metrics built on them.

>>> import torch, rankme_fast as rf
>>> z = torch.randn(10_000, 256)
>>> rf.rankme(z)                      # Garrido et al. 2023, float64-exact
>>> s = rf.spectrum(z, center=True)   # one decomposition, every metric
>>> s.collapse_auc(), s.alpha_req()
>>> rf.score("shards/", metrics="rankme,collapse_auc")   # files larger than RAM, streamed
>>> acc = rf.GramAccumulator(); acc.update(batch); acc.all_reduce(); acc.rankme()

Importing loads no native code; the C++ kernel is loaded on first use (see ``show_config()``).
"""
from ._config import show_config
from .gram import GramAccumulator
from .scoring import ScoreResult, score
from .spectrum import ApproxSpectrum, Spectrum
from .api import alpha_req, collapse_auc, effective_rank, nesum, participation_ratio, rankme, spectrum, stable_rank
from .structured import eigenscore, lidar
from .bench import BenchResult, bench  # the module stays importable as sys.modules["rankme_fast.bench"]

__version__ = "0.1.0"

__all__ = [
    "ApproxSpectrum",
    "BenchResult",
    "GramAccumulator",
    "ScoreResult",
    "Spectrum",
    "alpha_req",
    "bench",
    "collapse_auc",
    "effective_rank",
    "eigenscore",
    "lidar",
    "nesum",
    "participation_ratio",
    "rankme",
    "score",
    "show_config",
    "spectrum",
    "stable_rank",
]
