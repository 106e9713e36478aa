"""SNR (dB) of every method at 2–8 bits on Gaussian, Laplacian and ReLU(Gaussian) data.

Prints a Markdown table per distribution, next to the rate–distortion bound of a
Gaussian source (6.02 dB per bit) at the same rate. Rates count the payload
only (header bytes are negligible at 1M values).

    python bench/quality.py [--n 1000000] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np

import codec


def snr_db(x: np.ndarray, y: np.ndarray) -> float:
    err = np.mean((x.astype(np.float64) - y) ** 2)
    return float("inf") if err == 0 else 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / err)


def sources(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "Gaussian": rng.standard_normal(n).astype(np.float32),
        "Laplacian": rng.laplace(size=n).astype(np.float32),
        "ReLU(Gaussian)": np.maximum(rng.standard_normal(n), 0).astype(np.float32),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    names = [m["name"] for m in codec.methods()]
    bits_range = range(2, 9)
    print(f"SNR in dB, {args.n:,} values per source, seed {args.seed}; "
          "bound = Gaussian rate–distortion bound at the same rate (6.02 dB/bit).\n")
    for label, x in sources(args.n, args.seed).items():
        print(f"### {label}\n")
        print("| method | " + " | ".join(f"{b} bits" for b in bits_range) + " |")
        print("|---|" + "---:|" * len(bits_range))
        for name in names:
            cells = []
            for b in bits_range:
                y = codec.decode(codec.encode(x, name, b))
                cells.append(f"{snr_db(x, y):.2f}")
            print(f"| {name} | " + " | ".join(cells) + " |")
        print("| *bound* | " + " | ".join(f"{6.0206 * b:.2f}" for b in bits_range) + " |\n")


if __name__ == "__main__":
    main()
