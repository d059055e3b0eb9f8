"""Linear-probe fit time: xlearner's L-BFGS probe against scikit-learn's LogisticRegression.

Both fit the same objective on the same standardised float32 features. Our loss is

    mean_i CE(x_i W + b, y_i) + l2 / 2 * ||W||^2          (bias not penalised)

and scikit-learn's lbfgs multinomial objective (sklearn/linear_model/_linear_loss.py,
``l2_reg_strength = 1 / (C * n)``) is

    mean_i CE(x_i W + b, y_i) + 1 / (2 C n) * ||W||^2,

i.e. ``C * sum_i CE + ||W||^2 / 2`` divided by ``C n``. They coincide for
``C = 1 / (l2 * n)`` with n the number of examples of *that* fit (the selection fits of
the sweep use fewer examples than the refit, so C changes with n at a fixed l2).

    python bench/transfer.py --n 10000 --d 512 --classes 10
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from xlearner.transfer.probe import fit_linear_probe, stratified_split


def gaussian_clusters(
    n: int, d: int, classes: int, separation: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-variance Gaussian clusters whose centres lie ~``separation`` apart."""
    centres = torch.randn(classes, d, generator=generator)
    centres *= separation / (2**0.5 * centres.norm(dim=1, keepdim=True))
    labels = torch.randint(classes, (n,), generator=generator)
    return centres[labels] + torch.randn(n, d, generator=generator), labels


def sklearn_fit(x: np.ndarray, y: np.ndarray, l2: float, max_iter: int) -> LogisticRegression:
    model = LogisticRegression(C=1.0 / (l2 * len(y)), solver="lbfgs", max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


def sklearn_sweep(
    train_x: np.ndarray,
    train_y: np.ndarray,
    grid: list[float],
    max_iter: int,
    fraction: float,
    seed: int,
) -> tuple[float, LogisticRegression]:
    """The probe's protocol with scikit-learn: same split, same selection rule."""
    fit_idx, held_idx = (
        i.numpy() for i in stratified_split(torch.from_numpy(train_y), fraction, seed)
    )
    scores = {}
    for l2 in grid:
        model = sklearn_fit(train_x[fit_idx], train_y[fit_idx], l2, max_iter)
        scores[l2] = model.score(train_x[held_idx], train_y[held_idx])
    chosen = max(grid, key=lambda v: (scores[v], v))
    return chosen, sklearn_fit(train_x, train_y, chosen, max_iter)


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, the calls interleaved so that load from other
    processes hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def print_comparison(title: str, times: dict[str, float], rows: list[tuple[str, str, str]]) -> None:
    ours, theirs = times["xlearner"], times["sklearn"]
    print(f"\n{title}")
    print(f"{'':26s}{'xlearner':>12s}{'sklearn':>12s}")
    print(f"{'median fit time (s)':26s}{ours:12.3f}{theirs:12.3f}   speed-up {theirs / ours:.1f}x")
    for label, a, b in rows:
        print(f"{label:26s}{a:>12s}{b:>12s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="train examples")
    parser.add_argument("--n-val", type=int, default=None, help="val examples (default n/4)")
    parser.add_argument("--d", type=int, default=512, help="feature dimension")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--separation", type=float, default=4.0, help="centre distance / noise std")
    parser.add_argument("--l2", type=float, default=1e-3, help="L2 of the single-fit comparison")
    parser.add_argument("--grid", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1])
    parser.add_argument("--max-iter", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(args.seed)
    n_val = args.n_val or args.n // 4
    x, y = gaussian_clusters(args.n + n_val, args.d, args.classes, args.separation, generator)
    mean, std = x[: args.n].mean(0), x[: args.n].std(0, correction=0)
    x = (x - mean) / std  # standardised once, so both fit exactly the same problem
    train_x, val_x, train_y, val_y = x[: args.n], x[args.n :], y[: args.n], y[args.n :]
    np_train_x, np_val_x = train_x.numpy(), val_x.numpy()
    np_train_y, np_val_y = train_y.numpy(), val_y.numpy()
    print(
        f"features: {args.n} train / {n_val} val x {args.d} dims, {args.classes} classes, "
        f"float32; torch threads {torch.get_num_threads()}; median of {args.repeats} runs"
    )

    def ours(grid: list[float]):
        return fit_linear_probe(
            train_x, train_y, val_x, val_y, num_classes=args.classes, l2_grid=grid,
            max_iter=args.max_iter, seed=args.seed,
        )  # fmt: skip

    def theirs_single() -> LogisticRegression:
        return sklearn_fit(np_train_x, np_train_y, args.l2, args.max_iter)

    def theirs_sweep() -> tuple[float, LogisticRegression]:
        return sklearn_sweep(np_train_x, np_train_y, args.grid, args.max_iter, 0.2, args.seed)

    # Results (and one-time costs such as torch.optim's first-use imports) before timing.
    single, model = ours([args.l2]), theirs_single()
    swept, (sk_l2, sk_model) = ours(args.grid), theirs_sweep()

    times = median_seconds(
        {"xlearner": lambda: ours([args.l2]), "sklearn": theirs_single}, args.repeats
    )
    print_comparison(
        f"single fit, l2={args.l2:g} (sklearn C={1 / (args.l2 * args.n):.4g})",
        times,
        [
            ("val top-1 (%)", f"{single.top1:.2f}", f"{100 * model.score(np_val_x, np_val_y):.2f}"),
            ("L-BFGS iterations", str(single.iterations), str(model.n_iter_[0])),
        ],
    )
    times = median_seconds(
        {"xlearner": lambda: ours(args.grid), "sklearn": theirs_sweep}, args.repeats
    )
    print_comparison(
        f"sweep over l2 {args.grid} on 80% of train, refit on all",
        times,
        [
            ("chosen l2", f"{swept.l2:g}", f"{sk_l2:g}"),
            (
                "val top-1 (%)",
                f"{swept.top1:.2f}",
                f"{100 * sk_model.score(np_val_x, np_val_y):.2f}",
            ),
        ],
    )


if __name__ == "__main__":
    main()
