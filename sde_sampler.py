"""Sampling as a policy: SD3's sigma grid, the ODE step (Eq. 1), the SDE step and its Gaussian log-density
(Eq. 5-6), the KL between two steps (Eq. 9), and whole trajectories. Pure math in float32 on torch alone: the
model comes in as a function velocity(x, sigma) -> v (flow_matching.rollout binds one).

  Eq. 5   mu = x + [ v + s^2 / (2 sigma) (x + (1 - sigma) v) ] dt,   s = a sqrt(sigma / (1 - sigma))
          x_next = mu + s sqrt(-dt) eps
  Eq. 6   log pi(x_next | x) = log N(x_next; mu, s^2 (-dt) I), averaged over dimensions as Flow-GRPO does
  Eq. 9   KL(pi_a || pi_b) = ||mu_a - mu_b||^2 / (2 s^2 (-dt))
One sign of dt everywhere, the paper's: dt = sigma_t+1 - sigma_t < 0 (the step's variance is s^2 (-dt)).
"""
import math
import random

import torch


def sigma_schedule(scheduler, steps):
    """sigma_0 = 1 > ... > sigma_T = 0, exactly as StableDiffusion3Pipeline sets them: its scheduler's
    set_timesteps(T) with the scheduler's own config (FlowMatchEulerDiscreteScheduler, shift 3 for SD3 / SD3.5):
    shift(linspace(1, sigma_min, T)) and a final 0. The mini world uses a scheduler of SD3's config. (T+1,)"""
    scheduler = type(scheduler).from_config(scheduler.config)  # a copy: set_timesteps changes its state
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.float().cpu()


def ode_step(x, v, sigma, sigma_next):
    """Euler on dx = v dsigma (Eq. 1's ODE), the scheduler's own step."""
    return x + (sigma_next - sigma) * v


def step_noise(sigmas, t, noise_level):
    """Step t's noise: s_t = a sqrt(sigma / (1 - sigma)) of Eq. 5 (Flow-GRPO's std_dev_t; at sigma = 1 it uses the
    next sigma, as Flow-GRPO does, to stay finite) and the step's std s_t sqrt(-dt) of Eq. 6. Returns (s_t, std)."""
    sigma, dt = float(sigmas[t]), float(sigmas[t + 1]) - float(sigmas[t])
    s = noise_level * math.sqrt(sigma / (1 - (sigma if sigma < 1 else float(sigmas[1]))))
    return s, s * math.sqrt(-dt)


def sde_mean(x, v, sigmas, t, noise_level):
    """mu_theta(x_t) of Eq. 5, in float32: affine in v, which is why Eq. 9's KL is a velocity distance."""
    sigma, sigma_next = float(sigmas[t]), float(sigmas[t + 1])
    s, _ = step_noise(sigmas, t, noise_level)
    x, v, dt = x.float(), v.float(), sigma_next - sigma
    return x + (v + s ** 2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt


def log_prob(x_next, mu, std):
    """Eq. 6, log N(x_next; mu, std^2 I) averaged over the D dimensions: (B,). Written out by hand."""
    lp = -((x_next.float() - mu.float()) ** 2) / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def sde_step(x, v, sigmas, t, noise_level, x_next=None, eps=None, generator=None):
    """One Euler-Maruyama step of Eq. 5 from sigma_t to sigma_t+1. Given x_next (a stored sample) it only scores it.
    Returns x_next, log pi(x_next | x) (Eq. 6, (B,)) and the mean mu."""
    mu = sde_mean(x, v, sigmas, t, noise_level)
    _, std = step_noise(sigmas, t, noise_level)
    if x_next is None:
        if eps is None:
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        x_next = mu + std * eps.to(mu.device)
    return x_next, log_prob(x_next, mu, std), mu


# Eq. 9: both steps share the covariance s_t^2 (-dt) I, so their KL is a distance between means, and since mu is
# affine in v (Eq. 5), mu_a - mu_b = kappa_t (v_a - v_b) dt: a distance between velocities. Two scales of it:
def kl(mu_a, mu_b, sigmas, t, noise_level):
    """The KL every loss and advantage of this project uses (Flow-GRPO's KL to the reference, the official Flow-OPD's
    distillation term and MAR): per dimension, ||mu_a - mu_b||^2 / (2 s_t^2), s_t = Flow-GRPO's std_dev_t. That is
    exact_kl times (-dt) / D, the scale on which a published beta (0.04) is set. (B,)"""
    s, _ = step_noise(sigmas, t, noise_level)
    return ((mu_a.float() - mu_b.float()) ** 2).flatten(1).mean(1) / (2 * s ** 2)


def exact_kl(mu_a, mu_b, sigmas, t, noise_level):
    """Eq. 9 as written: KL( N(mu_a, std^2 I) || N(mu_b, std^2 I) ) = ||mu_a - mu_b||^2 / (2 s_t^2 (-dt)), summed
    over the D dimensions. Stated (and tested) here; no loss uses it. (B,)"""
    _, std = step_noise(sigmas, t, noise_level)
    return ((mu_a.float() - mu_b.float()) ** 2).flatten(1).sum(1) / (2 * std ** 2)


def kappa_lambda(sigmas, t, noise_level):
    """Eq. 9-10's velocity form: kappa_t = 1 + s_t^2 (1 - sigma_t) / (2 sigma_t), lambda_t = (-dt) kappa_t^2 / (2 s_t^2),
    so that exact_kl = lambda_t ||v_a - v_b||^2 summed over dimensions."""
    sigma, dt = float(sigmas[t]), float(sigmas[t + 1]) - float(sigmas[t])
    s, _ = step_noise(sigmas, t, noise_level)
    kappa = 1 + s ** 2 * (1 - sigma) / (2 * sigma)
    return kappa, -dt * kappa ** 2 / (2 * s ** 2)


def sde_steps(steps, window=None, size=0, seed=0):
    """Which steps are stochastic (and so trained): Flow-GRPO's all but the last, a fixed window [a, b), or
    Flow-GRPO-Fast's: `size` consecutive steps at a start drawn (from `seed`, anew each training step) in [a, b).
    (The scripts check the window's flags before any work: runs.check_sampling_args.)"""
    a, b = window if window is not None else (0, steps - 1)
    if size:
        a = random.Random(seed).randint(a, b - size)
        b = a + size
    return list(range(a, b))


@torch.no_grad()
def sample(velocity, x, sigmas, noise_level=0.7, sde=None, eps=None, generator=None):
    """Run B samples from noise x (B, C, H, W) down the grid sigmas (T+1,): `velocity(x, sigma) -> v` is the model.
    `sde`: the stochastic step indices (default: all but the last); eps (B, T, ...): each step's SDE noise
    (default: drawn from `generator`). Returns {"states": (B, T+1, C, H, W) x_0..x_T, "velocities": (B, T, C, H, W)
    the v at each step, "sigmas": (T+1,), "log_probs": (B, T) (NaN on ODE steps), "sde": the stochastic steps}."""
    steps = len(sigmas) - 1
    sde = sde_steps(steps) if sde is None else sde
    B = x.shape[0]
    states, velocities, log_probs = [x], [], torch.full((B, steps), float("nan"))
    for t in range(steps):
        sigma, sigma_next = float(sigmas[t]), float(sigmas[t + 1])
        v = velocity(x, sigma)
        velocities.append(v)
        if t in sde and noise_level > 0:  # a = 0 is the ODE (Eq. 6 is undefined there)
            x, lp, _ = sde_step(x, v, sigmas, t, noise_level, eps=None if eps is None else eps[:, t].to(x.device),
                                generator=generator)
            log_probs[:, t] = lp.cpu()
        else:
            x = ode_step(x.float(), v, sigma, sigma_next)
        states.append(x)
    return {"states": torch.stack(states, 1), "velocities": torch.stack(velocities, 1), "sigmas": sigmas,
            "log_probs": log_probs, "sde": list(sde)}
