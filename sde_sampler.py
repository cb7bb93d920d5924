"""Sampling as a policy: SD3's sigma schedule, the ODE step (Eq. 1), the SDE step and its Gaussian log-density
(Eq. 5-6), and a sampler that returns whole trajectories. All math in float32.

  Eq. 5   mu = x + [ v + s^2 / (2 sigma) (x + (1 - sigma) v) ] dt,   s = a sqrt(sigma / (1 - sigma)),  dt < 0
          x_next = mu + s sqrt(-dt) eps
  Eq. 6   log pi(x_next | x) = log N(x_next; mu, s^2 (-dt) I), averaged over dimensions as Flow-GRPO does
"""
import math
import random
import textwrap

import torch
from PIL import Image, ImageDraw

import checkpoints
import flow_matching as fm
import lora
import miniworld as mw
import runs
from runs import BadInput


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
    sigma, sigma_next = float(sigmas[t]), float(sigmas[t + 1])
    s = noise_level * math.sqrt(sigma / (1 - (sigma if sigma < 1 else float(sigmas[1]))))
    return s, s * math.sqrt(sigma - sigma_next)


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


def kl(mu_a, mu_b, sigmas, t, noise_level):
    """The KL between two Gaussian steps of step t that share the covariance, in the one convention every loss and
    advantage of this project uses (Flow-GRPO's KL to the reference, the official Flow-OPD's distillation term and
    MAR): per dimension, ||mu_a - mu_b||^2 / (2 s_t^2), s_t = Flow-GRPO's std_dev_t. (B,)
    That is Eq. 9's exact KL times (-dt) / D (exact_kl below), so a published beta means what it means there."""
    s, _ = step_noise(sigmas, t, noise_level)
    return ((mu_a.float() - mu_b.float()) ** 2).flatten(1).mean(1) / (2 * s ** 2)


def exact_kl(mu_a, mu_b, sigmas, t, noise_level):
    """Eq. 9 exactly: KL( N(mu_a, std^2 I) || N(mu_b, std^2 I) ) = ||mu_a - mu_b||^2 / (2 s_t^2 (-dt)), summed over
    the D dimensions. Stated (and tested) here; the losses use kl() above. (B,)"""
    _, std = step_noise(sigmas, t, noise_level)
    return ((mu_a.float() - mu_b.float()) ** 2).flatten(1).sum(1) / (2 * std ** 2)


def sde_steps(steps, window=None, size=0, seed=0):
    """Which steps are stochastic (and so trained): Flow-GRPO's all but the last, a fixed window [a, b), or
    Flow-GRPO-Fast's: `size` consecutive steps at a start drawn (from `seed`, anew each training step) in [a, b)."""
    a, b = window if window is not None else (0, steps - 1)
    if not 0 <= a < b <= steps - 1:
        raise BadInput(f"--sde_window {a} {b} must satisfy 0 <= a < b <= steps - 1 = {steps - 1}")
    if size:
        if not 1 <= size <= b - a:
            raise BadInput(f"--sde_window_size {size} must be between 1 and the window's {b - a} steps")
        a = random.Random(seed).randint(a, b - size)
        b = a + size
    return list(range(a, b))


@torch.no_grad()
def sample(model, enc, steps=10, guidance=1.0, noise_level=0.7, sde=None, x=None, eps=None, generator=None,
           resolution=None, progress=False):
    """Run B prompts from noise to images. `sde`: the stochastic step indices (default: all but the last).
    x: the initial noise, eps (B, T, ...): the SDE noise of each step (default: drawn from `generator`).
    Returns {"states": (B, T+1, C, H, W) x_0..x_T, "velocities": (B, T, C, H, W) the (guided) v at each step,
    "sigmas": (T+1,), "log_probs": (B, T) (NaN on ODE steps), "sde": the stochastic step indices}."""
    sde = sde_steps(steps) if sde is None else sde
    B = enc["seq"].shape[0]
    sigmas = sigma_schedule(model.scheduler, steps)
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
            x, lp, _ = sde_step(x, v, sigmas, t, noise_level, eps=None if eps is None else eps[:, t].to(x.device),
                                generator=generator)
            log_probs[:, t] = lp.cpu()
        else:
            x = ode_step(x.float(), v, sigma, sigma_next)
        states.append(x)
    return {"states": torch.stack(states, 1), "velocities": torch.stack(velocities, 1), "sigmas": sigmas,
            "log_probs": log_probs, "sde": list(sde)}


def grid(images, captions, cols=8, scale=None):
    """Images (B, 3, H, W) in [0, 1] with each caption under its image, as one PIL image; small images are
    enlarged (nearest) to about 128 px, large ones shrunk to 256."""
    B, _, H, W = images.shape
    scale = scale or (max(1, 128 // W) if W <= 256 else 256 / W)
    w, cap = int(W * scale), 40
    rows = math.ceil(B / cols)
    canvas = Image.new("RGB", (cols * w, rows * (w + cap)), "white")
    draw = ImageDraw.Draw(canvas)
    arr = (images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().cpu().numpy()
    for i in range(B):
        x, y = (i % cols) * w, (i // cols) * (w + cap)
        canvas.paste(Image.fromarray(arr[i]).resize((w, w), Image.NEAREST if scale >= 1 else Image.BILINEAR), (x, y))
        draw.multiline_text((x + 2, y + w + 1), "\n".join(textwrap.wrap(captions[i], 24)[:3]), fill="black")
    return canvas


def main(argv=None):
    ap = runs.parser("Sample a grid from a checkpoint with the ODE or the SDE (Eq. 5).")
    ap.add_argument("--model", default="ckpts/base.safetensors", help="mini checkpoint, or an SD3 dir / hub id")
    ap.add_argument("--lora", default=None, help="a LoRA teacher / student to apply")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable); default: held-out prompts of each task")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps")
    ap.add_argument("--guidance", type=float, default=1.0, help="CFG scale (1: none; SD3.5: 4.5)")
    ap.add_argument("--noise_level", type=float, default=0.0, help="a of Eq. 5, the SDE's noise; 0 samples the ODE")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initial (and SDE) noise")
    ap.add_argument("--resolution", type=int, default=512, help="SD3 image size (the mini world is 32x32)")
    ap.add_argument("--max_sequence_length", type=int, default=128, help="SD3: T5 prompt tokens (Flow-GRPO: 128)")
    ap.add_argument("--out", default="samples.png", help="the grid to write (a .png)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--bench", type=int, default=0, metavar="B", help="time B-sample SDE rollouts against the floor")
    args = ap.parse_args(argv)
    runs.check_finite(args)
    check_sampling_args(args.steps, args.guidance, args.noise_level, "--steps")
    if args.bench < 0:
        raise BadInput(f"--bench must be a positive batch size, got {args.bench}")
    if not args.bench:
        if not args.out.lower().endswith(".png"):
            raise BadInput(f"--out {args.out}: the grid is written as a PNG; give a .png path")
        checkpoints.check_out(args.out, {"--model": args.model, "--lora": args.lora}, args.overwrite, resumable=False)
    model = fm.load_model(args.model, resolution=args.resolution)
    model.max_sequence_length = args.max_sequence_length
    if args.bench:
        return bench(model, args)
    if args.lora:
        meta = lora.load_lora(args.lora, model.transformer, "lora")
        if meta.get("base_hash") not in (None, fm.fingerprint(model)):
            raise BadInput(f"--lora {args.lora} was trained on another base than --model {args.model} (hash "
                           f"{meta['base_hash']}); give the base it records ({meta.get('base_path')})")
        lora.set_adapter(model.transformer, "lora")
    prompts = args.prompt or [p["prompt"] for t in mw.TASKS for p in mw.eval_prompts(t, 8)]
    g = torch.Generator().manual_seed(args.seed)
    out = sample(model, fm.encode_prompts(model, prompts), args.steps, args.guidance, args.noise_level,
                 sde=None if args.noise_level > 0 else [], generator=g, resolution=args.resolution, progress=True)
    grid(fm.to_images(model, out["states"][:, -1]), prompts).save(args.out)
    print(f"wrote {args.out}")


def bench(model, args):
    """Rollout throughput (trajectories/s) against its floor: `steps` batched forwards and nothing else."""
    import time
    prompts = [next(mw.train_prompts()) for _ in range(args.bench)]
    enc = fm.encode_prompts(model, prompts)
    x = torch.randn((args.bench, *model.latent_shape(args.resolution)))
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


def check_sampling_args(steps, guidance, noise_level, flag="--sample_steps"):
    if steps < 2:
        raise BadInput(f"{flag} (denoising steps) must be >= 2, got {steps}")
    if not 0 <= guidance <= 100:
        raise BadInput(f"--guidance must be in [0, 100] (1 = no guidance; SD3.5: 4.5), got {guidance}")
    if not 0 <= noise_level <= 2:
        raise BadInput(f"--noise_level (a of Eq. 5) must be in [0, 2], Flow-GRPO uses 0.7; got {noise_level}")


if __name__ == "__main__":
    runs.run(main)
