"""Write scikit-learn's digits as one CSV file per client, as sites that each hold their own.

    python make_data.py data --clients 5

writes ``data/clients/site-01.csv`` ... ``site-05.csv`` (each site sees its own mix of
digits: the share of each digit per site is drawn from a Dirichlet distribution) and
``data/server/test.csv``, a quarter of the digits held out for the coordinator. Each file has a
header ``p0,...,p63,label``: 64 pixel intensities from 0 to 16 and the digit.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits


def site_rows(
    labels: np.ndarray, *, clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """The rows of each site: every digit's rows cut among the sites in Dirichlet proportions."""
    sites: list[list[int]] = [[] for _ in range(clients)]
    for digit in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == digit))
        shares = rng.dirichlet(np.full(clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * rows.size).astype(int)
        for site, part in zip(sites, np.split(rows, cuts), strict=True):
            site.extend(part.tolist())
    return [np.sort(np.array(site, dtype=np.int64)) for site in sites]


def write_csv(path: Path, pixels: np.ndarray, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*(f"p{i}" for i in range(pixels.shape[1])), "label"])
        writer.writerows([*row, label] for row, label in zip(pixels, labels, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="where to write clients/ and server/")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=1.0, help="lower: more skewed sites")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    digits = load_digits()
    pixels, labels = digits.data.astype(np.int64), digits.target.astype(np.int64)
    rng = np.random.default_rng(arguments.seed)
    order = rng.permutation(labels.size)
    held = labels.size // 4
    test, train = order[:held], order[held:]
    write_csv(arguments.out / "server" / "test.csv", pixels[test], labels[test])
    sites = site_rows(labels[train], clients=arguments.clients, alpha=arguments.alpha, rng=rng)
    if min(rows.size for rows in sites) == 0:
        raise SystemExit("a site got no rows: give a larger --alpha or fewer --clients")
    for number, rows in enumerate(sites, start=1):
        chosen = train[rows]
        write_csv(
            arguments.out / "clients" / f"site-{number:02d}.csv", pixels[chosen], labels[chosen]
        )
    sizes = ", ".join(str(rows.size) for rows in sites)
    print(f"wrote {arguments.clients} client files ({sizes} rows) and test.csv ({held} rows)")


if __name__ == "__main__":
    main()
