"""Sampling as a policy: SD3's sigma schedule, the ODE step (Eq. 1), the SDE step and its Gaussian log-density
(Eq. 5-6), and a sampler that returns whole trajectories. All math in float32.

  Eq. 5   mu = x + [ v + s^2 / (2 sigma) (x + (1 - sigma) v) ] dt,   s = a sqrt(sigma / (1 - sigma)),  dt < 0
          x_next = mu + s sqrt(-dt) eps
  Eq. 6   log pi(x_next | x) = log N(x_next; mu, s^2 (-dt) I), averaged over dimensions as Flow-GRPO does
"""
import argparse
import math
import textwrap

import torch
from PIL import Image, ImageDraw

import flow_matching as fm
import lora
import miniworld as mw
import runs
from runs import BadInput


def sigma_schedule(steps, shift=3.0):
    """sigma_0 = 1 > ... > sigma_T = 0: SD3's pipeline takes linspace(1, 1/T, T), shifts it, and appends 0. (T+1,)"""
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    s = shift * s / (1 + (shift - 1) * s)
    return torch.cat([s, s.new_zeros(1)]).float()


def ode_step(x, v, sigma, sigma_next):
    """Euler on dx = v dsigma (Eq. 1's ODE)."""
    return x + (sigma_next - sigma) * v


def noise_std(sigma, sigma_next, noise_level, sigma_1):
    """s_t sqrt(-dt) of Eq. 5. At sigma = 1, s uses the next sigma (sigma_1), as Flow-GRPO does, to stay finite."""
    s = noise_level * math.sqrt(sigma / (1 - (sigma if sigma < 1 else sigma_1)))
    return s * math.sqrt(sigma - sigma_next), s


def sde_mean(x, v, sigma, sigma_next, s):
    """mu_theta(x_t) of Eq. 5: affine in v, which is why Eq. 9's KL is a velocity distance."""
    dt = sigma_next - sigma
    return x + (v + s ** 2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt


def log_prob(x_next, mu, std):
    """Eq. 6, log N(x_next; mu, std^2 I) averaged over the D dimensions: (B,). Written out by hand."""
    lp = -((x_next.float() - mu.float()) ** 2) / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def gaussian_step(x, v, sigmas, t, noise_level):
    """Step t's Gaussian policy (Eq. 5-6) given v at x_t: its mean mu (float32, like x) and std s_t sqrt(-dt)."""
    sigma, sigma_next = float(sigmas[t]), float(sigmas[t + 1])
    std, s = noise_std(sigma, sigma_next, noise_level, float(sigmas[1]))
    return sde_mean(x.float(), v.float(), sigma, sigma_next, s), std


def sde_step(x, v, sigmas, t, noise_level, x_next=None, eps=None, generator=None):
    """One Euler-Maruyama step of Eq. 5 from sigma_t to sigma_t+1. Given x_next (a stored sample) it only scores it.
    Returns x_next, log pi(x_next | x) (Eq. 6, (B,)), the mean mu and the std."""
    mu, std = gaussian_step(x, v, sigmas, t, noise_level)
    if x_next is None:
        if eps is None:
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        x_next = mu + std * eps.to(mu.device)
    return x_next, log_prob(x_next, mu, std), mu, std


def kl_per_dim(mu_a, mu_b, std):
    """KL( N(mu_a, std^2 I) || N(mu_b, std^2 I) ) / D = ||mu_a - mu_b||^2 / (2 std^2 D): (B,). Two steps that share
    the covariance; times D it is the KL of Eq. 9 and Eq. 12. Per dimension like Eq. 6, so Flow-GRPO's beta carries."""
    return ((mu_a.float() - mu_b.float()) ** 2).flatten(1).mean(1) / (2 * std ** 2)


def sde_steps(steps, sde="all-but-last", window=None):
    """Which steps are stochastic (and so trained): Flow-GRPO's all but the last, or Flow-GRPO-Fast's window [a, b)."""
    if window is not None:
        a, b = window
        if not 0 <= a < b <= steps - 1:
            raise BadInput(f"--sde_window {a} {b} must satisfy 0 <= a < b <= steps - 1 = {steps - 1}")
        return list(range(a, b))
    if sde == "none":
        return []
    return list(range(steps - 1))


@torch.no_grad()
def sample(model, enc, steps=10, guidance=1.0, noise_level=0.7, sde=None, shift=3.0, x=None, eps=None,
           generator=None, resolution=None, progress=False):
    """Run B prompts from noise to images. `sde`: the stochastic step indices (default: all but the last).
    x: the initial noise, eps (B, T, ...): the SDE noise of each step (default: drawn from `generator`).
    Returns {"states": (B, T+1, C, H, W) x_0..x_T, "velocities": (B, T, C, H, W) the (guided) v at each step,
    "sigmas": (T+1,), "log_probs": (B, T) (NaN on ODE steps), "sde": the stochastic step indices}."""
    sde = sde_steps(steps) if sde is None else sde
    B = enc["seq"].shape[0]
    sigmas = sigma_schedule(steps, shift)
    if x is None:
        x = torch.randn((B, *model.latent_shape(resolution)), generator=generator, dtype=torch.float32)
    x = x.to(model.device)
    states, velocities, log_probs = [x], [], torch.full((B, steps), float("nan"))
    it = range(steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="sample", leave=False)
    for t in it:
        sigma, sigma_next = float(sigmas[t]), float(sigmas[t + 1])
        v = fm.velocity(model, x, sigma, enc, guidance)
        velocities.append(v)
        if t in sde and noise_level > 0:  # a = 0 is the ODE (Eq. 6 is undefined there)
            x, lp, _, _ = sde_step(x, v, sigmas, t, noise_level, eps=None if eps is None else eps[:, t].to(x.device),
                                   generator=generator)
            log_probs[:, t] = lp.cpu()
        else:
            x = ode_step(x.float(), v, sigma, sigma_next)
        states.append(x)
    return {"states": torch.stack(states, 1), "velocities": torch.stack(velocities, 1), "sigmas": sigmas,
            "log_probs": log_probs, "sde": list(sde)}


def grid(images, captions, cols=8, scale=4):
    """Images (B, 3, H, W) in [0, 1] with each caption under its image, as one PIL image."""
    B, _, H, W = images.shape
    w, cap = W * scale, 40
    rows = math.ceil(B / cols)
    canvas = Image.new("RGB", (cols * w, rows * (w + cap)), "white")
    draw = ImageDraw.Draw(canvas)
    arr = (images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().cpu().numpy()
    for i in range(B):
        x, y = (i % cols) * w, (i // cols) * (w + cap)
        canvas.paste(Image.fromarray(arr[i]).resize((w, w), Image.NEAREST), (x, y))
        draw.multiline_text((x + 2, y + w + 1), "\n".join(textwrap.wrap(captions[i], 24)[:3]), fill="black")
    return canvas


def main(argv=None):
    ap = argparse.ArgumentParser(description="Sample a grid from a checkpoint with the ODE or the SDE (Eq. 5).")
    ap.add_argument("--model", default="ckpts/base.safetensors")
    ap.add_argument("--lora", default=None, help="a LoRA teacher / student to apply")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable); default: held-out prompts of each task")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--noise_level", type=float, default=0.0, help="a of Eq. 5; 0 samples the ODE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="samples.png")
    ap.add_argument("--bench", type=int, default=0, metavar="B", help="time B-sample SDE rollouts against the floor")
    args = ap.parse_args(argv)
    check_sampling_args(args.steps, args.guidance, args.noise_level)
    model = fm.load_model(args.model)
    if args.bench:
        return bench(model, args)
    if args.lora:
        lora.load_lora(args.lora, model.transformer, "lora")
        lora.set_adapter(model.transformer, "lora")
    prompts = args.prompt or [p["prompt"] for t in mw.TASKS for p in mw.eval_prompts(t, 8)]
    g = torch.Generator().manual_seed(args.seed)
    out = sample(model, fm.encode_prompts(model, prompts), args.steps, args.guidance, args.noise_level,
                 sde=None if args.noise_level > 0 else [], generator=g)
    grid(fm.to_images(model, out["states"][:, -1]), prompts).save(args.out)
    print(f"wrote {args.out}")


def bench(model, args):
    """Rollout throughput (trajectories/s) against its floor: `steps` batched forwards and nothing else."""
    import time
    prompts = [next(mw.train_prompts()) for _ in range(args.bench)]
    enc = fm.encode_prompts(model, prompts)
    x = torch.randn((args.bench, *model.latent_shape()))
    a = args.noise_level or 0.7

    def timed(fn, reps=5):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[reps // 2]

    with torch.no_grad():
        forward = timed(lambda: fm.velocity(model, x, 0.5, enc, args.guidance))
    rollout = timed(lambda: sample(model, enc, args.steps, args.guidance, a, x=x))
    floor = args.steps * forward
    print(f"batch {args.bench}, {args.steps} steps, guidance {args.guidance}: one forward {forward * 1e3:.1f} ms; "
          f"rollout {rollout * 1e3:.0f} ms = {args.bench / rollout:.1f} trajectories/s; floor {floor * 1e3:.0f} ms "
          f"= {args.bench / floor:.1f}/s; overhead {100 * (rollout / floor - 1):.1f}%")


def check_sampling_args(steps, guidance, noise_level):
    if steps < 2:
        raise BadInput(f"--steps must be >= 2, got {steps}")
    if not guidance >= 0:
        raise BadInput(f"--guidance must be >= 0 (1 = no guidance), got {guidance}")
    if not 0 <= noise_level <= 2:
        raise BadInput(f"--noise_level (a of Eq. 5) must be in [0, 2], Flow-GRPO uses 0.7; got {noise_level}")


if __name__ == "__main__":
    runs.run(main)
