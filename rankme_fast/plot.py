"""matplotlib figures (optional extra ``[plot]``): imported only when a plot is asked for."""
from __future__ import annotations

ERR_FLOOR = 1e-16  # an error of exactly 0 is drawn here (float64 resolution)


def _pyplot():
    try:
        import matplotlib  # noqa: PLC0415
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'rankme_fast[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def bench_pareto(result, path) -> None:
    """Seconds vs RankMe relative error (log-log), one labelled marker per route that ran: exact routes
    filled circles, approximate ones open triangles; ours in blue, peers' routes in orange."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    import math  # noqa: PLC0415

    from matplotlib.ticker import FuncFormatter  # noqa: PLC0415
    ran = [r for r in result.rows if r.status == "ok" and r.median_s and r.rankme_rel_err is not None]
    if not ran:
        raise ValueError("nothing to plot: no route ran")
    placed: list = []  # (log10 x, log10 y, label offset) of the labels so far: nudge near-coincident ones
    for r in sorted(ran, key=lambda r: (r.median_s, r.rankme_rel_err)):
        err = max(r.rankme_rel_err, ERR_FLOOR)
        color = "tab:blue" if r.kind == "ours" else "tab:orange"
        if r.exact:
            ax.scatter(r.median_s, err, s=60, marker="o", color=color, zorder=3)
        else:
            ax.scatter(r.median_s, err, s=70, marker="^", facecolors="none", edgecolors=color, linewidths=1.5, zorder=3)
        lx, ly = math.log10(r.median_s), math.log10(err)
        dy = 4
        while any(abs(lx - px) < 0.3 and abs(ly - py) < 0.45 and pdy == dy for px, py, pdy in placed):
            dy -= 9  # the next free line below
        placed.append((lx, ly, dy))
        ax.annotate(r.name, (r.median_s, err), textcoords="offset points", xytext=(5, dy), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.set_xlabel("median seconds")
    ax.set_ylabel(f"RankMe relative error vs {result.reference.split(' (')[0]} (0 drawn at {ERR_FLOOR:g})")
    ax.set_title(f"{result.n:,} x {result.d:,} {result.dtype}, {result.source}", fontsize=9)
    from matplotlib.lines import Line2D  # noqa: PLC0415
    ax.legend(handles=[Line2D([], [], marker="o", color="tab:blue", ls="", label="ours, exact"),
                       Line2D([], [], marker="^", mfc="none", color="tab:blue", ls="", label="ours, approximate"),
                       Line2D([], [], marker="o", color="tab:orange", ls="", label="peer, exact"),
                       Line2D([], [], marker="^", mfc="none", color="tab:orange", ls="", label="peer, approximate")],
              fontsize=7, loc="best")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _alpha_fit(sv, index_range=(5, 100)):
    """(ks, σ_k/σ_1 of the α-ReQ least-squares line, α, (lo, hi)) or None when α-ReQ is undefined."""
    import warnings  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from . import metrics as _m  # noqa: PLC0415
    k = sv.shape[-1]
    lo, hi = index_range[0], min(index_range[1], k)
    if hi - lo + 1 < 2:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            alpha = float(_m.alpha_req(sv, (lo, hi)))
    except ValueError:
        return None
    i = torch.arange(lo, hi + 1, dtype=torch.float64)
    y = 2.0 * torch.log(sv[lo - 1: hi].double())
    c = float(y.mean() + alpha * torch.log(i).mean())  # log λ_i ≈ c − α log i
    line = torch.exp((c - alpha * torch.log(i)) / 2 - torch.log(sv[0].double()))
    return i.numpy(), line.numpy(), alpha, (lo, hi)


def spectrum_axes(spec, ax=None, label=None, fit: bool = True, annotate: bool = True):
    """Draw one spectrum on ``ax`` (a new figure when None): σ_k/σ_1 against k, log-log; with ``fit`` the
    α-ReQ line over its index range, with ``annotate`` RankMe and the effective rank in the legend."""
    import math  # noqa: PLC0415

    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    sv = spec.singular_values.detach().double().cpu()
    if sv.ndim != 1:
        raise ValueError(f"plot draws one spectrum; this one is batched with shape {tuple(sv.shape)}")
    if not bool((sv > 0).any()):
        raise ValueError("nothing to plot: every singular value is 0")
    pos = sv[sv > 0]
    k = range(1, pos.numel() + 1)
    txt = label or ""
    if annotate:
        extra = f"RankMe {spec.rankme():.4g}, eff. rank {spec.effective_rank():.4g}"
        txt = f"{txt}: {extra}" if txt else extra
    (h,) = ax.plot(list(k), (pos / pos[0]).numpy(), lw=1.5, label=txt or None)
    if fit:
        f = _alpha_fit(sv)
        if f is not None:
            ks, line, alpha, (lo, hi) = f
            ax.plot(ks, line, ls="--", lw=1.2, color=h.get_color(), alpha=0.8,
                    label=f"α-ReQ fit, k = {lo}..{hi}: α = {alpha:.3g}" if not math.isnan(alpha) else None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("σ_k / σ_1")
    ax.grid(True, which="both", alpha=0.3)
    if txt or fit:
        ax.legend(fontsize=7, loc="lower left")
    return ax


def score_spectrum(result, path=None, ax=None):
    """The ``score --plot`` figure: the spectrum of the first centring the result holds for its first
    metric, the α-ReQ fit and RankMe / effective rank annotated; saved as PNG to ``path`` when given."""
    plt = _pyplot()
    first = next(iter(result.metrics))
    c = result.centered[first]
    spec = result.spectra[c]
    own = ax is None
    ax = spectrum_axes(spec, ax=ax)
    ax.set_title(f"{result.source}: {result.n_rows:,} x {result.n_features:,} {result.dtype}"
                 f"{', centred' if c else ''}", fontsize=9)
    if path is not None:
        fig = ax.figure
        fig.tight_layout()
        fig.savefig(path, format="png")
        if own:
            plt.close(fig)
    return ax


def compare_figure(result, path=None, metric=None):
    """The ``compare --plot`` figure: every model's spectrum (log-log, σ_k/σ_1) and, with labels, the metric
    against the label with Kendall's τ (and weighted τ) in the legend."""
    plt = _pyplot()
    metric = metric or result.metrics[0]
    if metric not in result.metrics:
        raise ValueError(f"metric {metric!r} was not computed; choose from {result.metrics}")
    has_labels = bool(result.labels)
    fig, axes = plt.subplots(1, 2 if has_labels else 1, figsize=(12 if has_labels else 6.5, 4.5), dpi=120,
                             squeeze=False)
    ax = axes[0][0]
    for name in result.names:
        r = result.results[name]
        spec = r.spectra[r.centered[result.metrics[0]]]
        spectrum_axes(spec, ax=ax, label=f"{name} ({result.metrics[0]} {r.metrics[result.metrics[0]]:.4g})",
                      fit=False, annotate=False)
    ax.set_title("spectra", fontsize=9)
    if has_labels:
        ax2 = axes[0][1]
        xs = [result.results[n].metrics[metric] for n in result.names]
        ys = [result.labels[n] for n in result.names]
        c = result.correlations[metric]
        ax2.scatter(xs, ys, s=40, zorder=3,
                    label=f"Kendall τ = {c['kendall']:.3f}, weighted τ = {c['weighted_tau']:.3f}, "
                          f"Spearman ρ = {c['spearman']:.3f}")
        for n, x, y in zip(result.names, xs, ys):
            ax2.annotate(n, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax2.set_xlabel(metric)
        ax2.set_ylabel("label" + ("" if result.higher_is_better else " (lower is better)"))
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=7, loc="best")
        ax2.set_title(f"{metric} vs label ({c['n']} models)", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, format="png")
        plt.close(fig)
    return fig
