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
