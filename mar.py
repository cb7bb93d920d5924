"""Manifold Anchor Regularization (MAR), Eq. 12.

    L(theta) = -J(theta) + beta E_t [ D_KL( pi_theta(. | x_t, c) || pi_A(. | x_t, c) ) ],
    D_KL = || mu_theta - mu_A ||^2 / (2 s_t^2 (-dt))

pi_A is a frozen aesthetic teacher (trained with the DeQA quality reward). Both steps are Gaussians with the same
covariance (Eq. 6), so the KL is a distance between means, and since mu is affine in v (Eq. 5) a distance between
velocities. Unlike Eq. 10's dense reward, this term keeps its gradient through mu_theta: it pulls the student's
step toward the anchor's at every state the student visits, keeping it on the anchor's high-quality manifold.
As the official code (and Flow-GRPO's KL to its reference) weighs it: per dimension, / 2 s_t^2, i.e. Eq. 12's KL
times (-dt) / D (sde_sampler.kl), so that the official beta = 0.04 means what it means there. The official "w/o MAR"
keeps this same term with the frozen base as the anchor (opd_student.py --anchor base).
Pure math on torch: the anchor's forward comes in as a function velocity(x, sigma) -> v.
"""
import torch

import sde_sampler as sampler

BETA = 0.04  # the official code's weight


@torch.no_grad()
def anchor_mean(anchor_velocity, x_t, sigmas, t, noise_level):
    """mu_A(x_t): the anchor's Gaussian step at the student's state (Eq. 5 with v_A = anchor_velocity(x_t, sigma_t))."""
    return sampler.sde_mean(x_t, anchor_velocity(x_t, float(sigmas[t])), sigmas, t, noise_level)


def mar_kl(mu_student, mu_anchor, sigmas, t, noise_level):
    """Eq. 12's KL(pi_theta || pi_A) per sample, on the losses' scale (sde_sampler.kl): (B,). The gradient flows
    into mu_student only."""
    return sampler.kl(mu_student, mu_anchor.detach(), sigmas, t, noise_level)


def mar_loss(mu_student, mu_anchor, sigmas, t, noise_level, beta=BETA):
    """beta * E[KL(pi_theta || pi_A)] over the batch: the term added to -J(theta) in Eq. 12."""
    return beta * mar_kl(mu_student, mu_anchor, sigmas, t, noise_level).mean()
