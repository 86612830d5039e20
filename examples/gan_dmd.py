"""A small DCGAN on real digits with and without the dynamically masked discriminator (DMD).

    python examples/gan_dmd.py --steps 800 --out runs/gan

Sample grids are written as PNG; see benchmarks/dmd_digits.py for the 3-seed comparison.
"""
import argparse

import torch

import canonwrap as cw
from canonwrap.gan import DCGANDiscriminator, DCGANGenerator, DynamicMask, RetardationDetector, train_gan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--out", default="runs/gan")
    p.add_argument("--no-dmd", action="store_true")
    a = p.parse_args()

    torch.manual_seed(0)
    images = cw.load_digits(pad=0).train_x  # (N, 1, 28, 28) in [0, 1]
    gen, disc = DCGANGenerator(width=32), DCGANDiscriminator(width=32)
    if not a.no_dmd:
        disc = DynamicMask(disc, layers=["block2"], ratio=0.5, period=50, kind="spatial",
                           detector=RetardationDetector(window=32, threshold=1.0))
    history = train_gan(gen, disc, images, steps=a.steps, out_dir=a.out, sample_every=200)
    print(f"final D loss {history['d_loss'][-1]:.3f}, G loss {history['g_loss'][-1]:.3f}, "
          f"masked {sum(history['masked'])}/{len(history['masked'])} steps; samples in {a.out}")


if __name__ == "__main__":
    main()
