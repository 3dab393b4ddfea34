"""difflab: a lab bench for diffusion models.

Train a class-conditional DDPM from scratch on small images, watch the forward and reverse
processes, measure samples with a reference classifier, and run controlled experiments.
"""

__version__ = "0.1.0"
