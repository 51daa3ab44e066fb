"""Accuracy of the integer-slicing Gram scheme (the exact mode of the Triton kernel) on CPU.

    python benchmarks/slicing_accuracy.py [N] [d] [dtypes]      (default 20000 512 float32,bfloat16)

Runs the scheme's pure-torch twin (rankme_fast.kernels.slices: the same digits and the same int32
classes as the kernel, computed exactly in float64) with S = 3 and 4 digits, next to the float64 Gram,
on the DESIGN §3 spectra, raw and centred (centred inputs carry an offset), and prints RankMe's relative
error and max_k |σ_k − σ_k^ref| / σ_1 against the float64 SVD of the same input — the DESIGN §3
contract is 1e-4 and 1e-6. Needs no GPU: the numbers are properties of the scheme.
"""
import sys

import torch

from rankme_fast.demo import make_embeddings
from rankme_fast.kernels import slices
from rankme_fast.metrics import rankme


def errs(g, ref):
    sv = torch.linalg.eigvalsh(g).flip(0).clamp_min(0).sqrt()
    r, rr = float(rankme(sv)), float(rankme(ref))
    return abs(r - rr) / rr, float((sv - ref).abs().max() / ref[0])


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    d = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    dts = [getattr(torch, a) for a in (sys.argv[3] if len(sys.argv) > 3 else "float32,bfloat16").split(",")]
    print(f"N={n} d={d}; cells: RankMe rel. error / max σ error (÷σ1)")
    print("| dtype | spectrum | centred | S=3 | S=4 | float64 Gram |")
    print("|---|---|---|---|---|---|")
    for dt in dts:
        for kind in ("flat", "rank1", "rank8", "power2", "exp", "rank8_noise"):
            for center in (False, True):
                off = (100.0 if dt == torch.float32 else 1.0) if center else 0.0
                # entries ~ 1/sqrt(d): representable in every dtype next to the offset
                z = make_embeddings(n, d, kind, dtype=torch.float64, seed=1, scale=n**0.5, offset=off).to(dt)
                z64 = z.double()
                ref = torch.linalg.svdvals(z64 - z64.mean(0) if center else z64)
                shift = z[:4096].double().mean(0).to(dt).double() if center else None
                cells = []
                for s in (3, 4):
                    g = torch.zeros(d, d, dtype=torch.float64)
                    cs = torch.zeros(d, dtype=torch.float64)
                    slices.gram_update(z, g, col_sum=cs if center else None, col_shift=shift, slices=s)
                    if center:
                        g -= torch.outer(cs, cs) / n
                    cells.append(errs(g, ref))
                v = z64 - shift if center else z64
                g = v.T @ v
                if center:
                    g -= torch.outer(v.sum(0), v.sum(0)) / n
                cells.append(errs(g, ref))
                txt = " | ".join(f"{a:.1e} / {b:.1e}" for a, b in cells)
                print(f"| {str(dt)[6:]} | {kind} | {'yes' if center else 'no'} | {txt} |", flush=True)


if __name__ == "__main__":
    main()
