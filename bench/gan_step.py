"""Seconds per CycleGAN training step (one generator and one discriminator update) on this
machine, for planning a ``covidray gan train`` run before starting it:

    python bench/gan_step.py --size 128 --ngf 32 --n-blocks 6 [--threads 1] [--steps 3]

Random images, no Ray, no data (``covidray.gan.model.time_steps``); a GPU when there is one.
Prints the seconds per step, the hours that ``--iterations`` steps would take, the load average
and a last line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--ngf", type=int, default=32)
    parser.add_argument("--n-blocks", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after 1 warm-up)")
    parser.add_argument("--iterations", type=int, default=5000, help="for the hours estimate")
    args = parser.parse_args()

    from covidray.gan.config import GanConfig
    from covidray.gan.model import time_steps

    cfg = GanConfig(
        data="unused", out="unused", size=args.size, ngf=args.ngf, n_blocks=args.n_blocks,
        torch_threads=args.threads,
    )  # fmt: skip
    load = os.getloadavg()[0]
    s_per_step = time_steps(cfg, steps=args.steps)
    hours = s_per_step * args.iterations / 3600
    print(
        f"{args.size} px, {args.n_blocks} blocks, ngf {args.ngf}: {s_per_step:.2f} s/iter, "
        f"{args.iterations} iterations ≈ {hours:.1f} h (load average {load:.1f})"
    )
    result = {"size": args.size, "ngf": args.ngf, "n_blocks": args.n_blocks}
    result.update(s_per_iter=round(s_per_step, 3), hours=round(hours, 2), load=load)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
