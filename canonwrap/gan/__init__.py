"""GAN utilities: the dynamically masked discriminator (DMD) wrapper, its retardation detector,
a small DCGAN for 28x28 digits, a training loop and a Fréchet distance.

Paper: Zhang et al., "Dynamically Masked Discriminator for Generative Adversarial Networks",
NeurIPS 2023.
"""
from canonwrap.gan.dcgan import DCGANDiscriminator, DCGANGenerator
from canonwrap.gan.detector import DetectorOutput, RetardationDetector, improvement_statistic
from canonwrap.gan.fid import ClassCoverage, class_coverage, frechet_distance
from canonwrap.gan.mask import MASK_KINDS, DynamicMask, MaskStep
from canonwrap.gan.train import save_grid, train_gan

__all__ = [
    "DynamicMask", "MaskStep", "MASK_KINDS",
    "RetardationDetector", "DetectorOutput", "improvement_statistic",
    "DCGANGenerator", "DCGANDiscriminator",
    "train_gan", "save_grid",
    "frechet_distance", "class_coverage", "ClassCoverage",
]
