"""Manifold Anchor Regularization (MAR), Eq. 12.

    L(theta) = -J(theta) + beta E_t [ D_KL( pi_theta(. | x_t, c) || pi_A(. | x_t, c) ) ],
    D_KL = || mu_theta - mu_A ||^2 / (2 s_t^2 (-dt))

pi_A is a frozen aesthetic teacher (trained with the DeQA quality reward). Both steps are Gaussians with the same
covariance (Eq. 6), so the KL is a distance between means, and since mu is affine in v (Eq. 5) a distance between
velocities. Unlike Eq. 10's dense reward, this term keeps its gradient through mu_theta: it pulls the student's
step toward the anchor's at every state the student visits, keeping it on the anchor's high-quality manifold.
Per dimension (like Eq. 6's log-probs), so the official beta = 0.04 carries over; times D it is Eq. 12's KL.
"""
import torch

import flow_matching as fm
import lora
import sde_sampler as sampler

BETA = 0.04  # the official code's weight


def mar_kl(mu_student, mu_anchor, std):
    """Eq. 12's KL per sample, per dimension: (B,). Gradient flows into mu_student only."""
    return sampler.kl_per_dim(mu_student, mu_anchor.detach(), std)


@torch.no_grad()
def anchor_mean(model, anchor, x_t, sigmas, t, enc, guidance, noise_level):
    """mu_A(x_t): the anchor adapter's Gaussian step at the student's state (Eq. 5 with v_A)."""
    active = next(iter(lora.lora_layers(model.transformer).values())).active
    lora.set_adapter(model.transformer, anchor)
    v_anchor = fm.velocity(model, x_t, float(sigmas[t]), enc, guidance)
    lora.set_adapter(model.transformer, active)
    return sampler.gaussian_step(x_t, v_anchor, sigmas, t, noise_level)[0]


def mar_loss(mu_student, mu_anchor, std, beta=BETA):
    """beta * E[KL(pi_theta || pi_A)] over the batch: the term added to -J(theta) in Eq. 12."""
    return beta * mar_kl(mu_student, mu_anchor, std).mean()
