"""The adversarial round of distillation (:mod:`difflab.ddpm.distill`): critic and losses.

A regression onto the teacher's steps makes a student average over what it cannot yet tell
apart: its samples are recognised as well as the teacher's, but they are smoother and less
varied (a one-step student's FD was 3-5x its teacher's, docs/benchmarks.md). So by default a
last, adversarial round (``distill.adversarial``, a share of the budget) follows the
progressive ones, as in adversarial diffusion distillation (Sauer et al. 2023, "Adversarial
Diffusion Distillation"). A class-conditional critic learns to tell real training images from
the student's x_0 predictions, with the hinge loss (Lim & Ye 2017); the student learns to
fool it while staying near the student the progressive rounds made (the "anchor", frozen at
the start of the round; squared error weighted by :data:`ANCHOR_WEIGHT`).

The critic is a small convolutional network in the style of the projection discriminator
(Miyato & Koyama 2018, "cGANs with Projection Discriminator"): spectrally normalised
convolutions (Miyato et al. 2018) halve the image twice, the features are summed over space,
and the score is a linear read-out plus the inner product of the features with an embedding
of the class. It sees x_0 images in [-1, 1] of any size and returns one score per image: high
for real images of the class, low for the student's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from difflab.devices import fused_optimizer

CRITIC_LR = 2e-4  # the critic's Adam learning rate (betas 0, 0.99), constant
CRITIC_WIDTH = 32
STUDENT_LR = 5e-5  # the student's Adam learning rate in the round (betas 0, 0.99), annealed
ANCHOR_WEIGHT = 10.0  # the weight of the squared error to the anchor


class ProjectionDiscriminator(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            spectral_norm(nn.Conv2d(in_channels, w, 3, 1, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(w, 2 * w, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(2 * w, 4 * w, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(4 * w, 4 * w, 3, 1, 1)), nn.LeakyReLU(0.2),
        )  # fmt: skip
        self.read_out = spectral_norm(nn.Linear(4 * w, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, 4 * w))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) in [-1, 1]; y: (B,) class indices. Returns (B,) scores."""
        h = self.features(x).sum(dim=(2, 3))  # (B, 4w)
        return self.read_out(h).squeeze(1) + (self.embed(y) * h).sum(1)


def hinge_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The critic's hinge loss (Lim & Ye 2017): mean relu(1 - D(real)) + mean relu(1 + D(fake))."""
    return torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()


def make_critic(
    in_channels: int, num_classes: int, seed: int, device
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The critic, its initial weights drawn from ``seed`` alone, and its optimizer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        critic = ProjectionDiscriminator(in_channels, num_classes, CRITIC_WIDTH).to(device)
    return critic, torch.optim.Adam(critic.parameters(), lr=CRITIC_LR, betas=(0.0, 0.99),
                                    **fused_optimizer(device))  # fmt: skip


def adversarial_step(
    critic: nn.Module, critic_optimizer: torch.optim.Optimizer, x_hat: torch.Tensor,
    anchor: torch.Tensor, y: torch.Tensor, real: torch.Tensor, y_real: torch.Tensor,
) -> tuple[torch.Tensor, float]:  # fmt: skip
    """One critic update on ``real`` against the student's ``x_hat`` (detached), then the
    student's loss: fool the updated critic, stay near ``anchor``. Returns that loss (to
    back-propagate into the student) and the critic's loss."""
    loss = hinge_loss(critic(real, y_real), critic(x_hat.detach().clamp(-1, 1), y))
    critic_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    critic_optimizer.step()
    critic.requires_grad_(False)  # the student's loss needs no gradient of the critic's weights
    fool = -critic(x_hat.clamp(-1, 1), y).mean()
    critic.requires_grad_(True)
    return fool + ANCHOR_WEIGHT * (x_hat - anchor).pow(2).mean(), float(loss.detach())
