"""``gram-fast``: float32 Gram; a second float32 pass in the first pass's eigenbasis when eigenvalues fall
below the float32 noise floor (RuntimeWarning). RankMe within ``FAST_RANKME_RTOL`` (1e-2)."""
from __future__ import annotations

import warnings

import torch

from .._threads import dense_step
from ..gram import eigvals_desc, fast_gram, ldexp, scaled_copy
from ..spectrum import FAST_FLOOR, FAST_RANKME_RTOL, Spectrum
from . import Cost, Strategy
from ._common import dims, per_item, raise_if_nonfinite


def cost(n, d, itemsize, device, options) -> Cost:
    k, m = dims(n, d)
    # one float32 Gram + eigh (vectors), and the refinement pass (a product and a Gram) when it runs
    return Cost(float(m) * k * (k + 1) + 9.0 * k**3, float(n) * d * itemsize, 12.0 * k * k + (64 << 20))


def _fast(x: torch.Tensor, center: bool):
    res = fast_gram(x, center=center)
    g = res.gram
    if not bool(torch.isfinite(g).all()):
        return None, res.backend, ()
    with dense_step(g):
        lam, vecs = torch.linalg.eigh(g)
    lam = lam.flip(-1)
    vecs = vecs.flip(-1)
    floor = FAST_FLOOR * float(torch.diagonal(g).sum())
    below = int((lam < floor).sum())
    notes: tuple = ()
    if below:
        refined = fast_gram(x, center=center, basis=vecs)
        lam = eigvals_desc(refined.gram)
        msg = (
            f"precision='fast': {below} of {lam.numel()} eigenvalues lie below the float32 noise floor "
            f"({FAST_FLOOR:.1e}·tr G); ran a second float32 pass in the first pass's eigenbasis. "
            f"Documented RankMe error <= {FAST_RANKME_RTOL:g} relative; use precision='exact' for 1e-4."
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=5)
        notes = (msg,)
    return lam.clamp_min(0.0).sqrt(), res.backend, notes


def run(t, *, center, backend=None, rtol=None, **_):  # noqa: ARG001
    if t.ndim == 3:
        return per_item(run, t, center=center)
    # float64 beyond 2^±400: squares would leave float64's range (the float32 chunks are scaled, but the
    # float64 sums are not); work on the exact copy t·2^k and scale σ back (other dtypes cannot get there)
    x, k = scaled_copy(t)
    sv, be, notes = _fast(x, center)
    if sv is None or not bool(torch.isfinite(sv).all()):
        raise_if_nonfinite(t)
    if k:
        sv = ldexp(sv, -k)
    used = "gram+refine" if notes else "gram"
    return Spectrum(sv, t.shape[0], t.shape[1], center, used, be, "fast", False, FAST_RANKME_RTOL, notes)


STRATEGY = Strategy("gram-fast", False, "float32 Gram (+ refinement pass), RankMe within 1e-2", cost, run,
                    batched=True)
