"""Stage 1: a Flow-GRPO teacher for one reward, as a LoRA adapter on a frozen base (PAPER.md, "Stage 1").

    python grpo_teacher.py --reward ocr                                    # a specialist teacher
    python grpo_teacher.py --reward geneval:0.4,ocr:0.3,pickscore:0.3     # GRPO-Mix, the baseline
    torchrun --nproc_per_node=8 grpo_teacher.py --reward ocr ...           # same run, 8 processes

Per step: G SDE rollouts of each of B prompts under the policy (Eq. 5), the reward of each final image, the
group-relative advantage A_i = (R_i - mean_group R) / (std_group R + 1e-4), then for every stochastic step t the
clipped surrogate of Eq. 11 on pi(x_t+1 | x_t) (Eq. 6) plus beta * KL(pi_theta || pi_ref) to the frozen base (the
same model with its adapter off). A prompt's G samples may sit on different ranks: rewards are all-gathered, so
every advantage sees its whole group, and gradients are averaged over ranks (DDP's semantics).
"""
import argparse
import json
import os
import random
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import flow_matching as fm
import miniworld as mw
import rewards
import sde_sampler as sampler


# ----------------------------------------------------------------------------------------------- torchrun
def dist_setup():
    """(rank, world, device). Under torchrun: nccl on CUDA, gloo on CPU. Alone: (0, 1, cuda or cpu)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def all_gather(x, world):
    """Concatenate each rank's (n, ...) tensor in rank order (every rank gets the whole)."""
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def all_reduce_mean(tensors, world):
    """Average gradients (or stats) over ranks in place: what DDP does, for the few LoRA tensors we train."""
    if world == 1:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for t in tensors:
        t.copy_(flat[i:i + t.numel()].view_as(t))
        i += t.numel()


def sample_noise(seed, step, indices, shape, steps):
    """Initial noise and SDE noise for global samples `indices`, each from its own seed: the same sample gets the
    same noise on 1 rank or 8. Returns x_0 (n, *shape) and eps (n, steps, *shape)."""
    x, eps = [], []
    for i in indices:
        g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_000_003 + int(i)) % 2 ** 63)
        x.append(torch.randn(shape, generator=g))
        eps.append(torch.randn((steps, *shape), generator=g))
    return torch.stack(x), torch.stack(eps)


# ----------------------------------------------------------------------------------------------- Flow-GRPO
def group_advantages(R, group):
    """(N,) rewards of N/group prompts x group samples, in prompt order -> (N,) group-relative advantages."""
    r = R.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-4)).flatten()


def clipped_surrogate(log_prob, old_log_prob, adv, clip):
    """Eq. 11, per sample: -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = pi_theta / pi_old. Returns loss, rho."""
    ratio = torch.exp(log_prob - old_log_prob)
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv), ratio


def prompt_stream(args, tasks):
    """An endless, seeded stream of training prompts: a prompt file's (read and checked now, not at the first step),
    or the mini world's for these tasks."""
    if not args.prompt_file:
        return mw.train_prompts(tasks, seed=args.seed)
    ps = [p for spec in args.prompt_file for p in mw.read_prompt_file(spec) if p["task"] in tasks]
    if not ps:
        raise fm.BadInput(f"{' '.join(args.prompt_file)} hold no prompts of task(s) {tasks}")

    def stream(rng=random.Random(args.seed)):
        while True:
            yield rng.choice(ps)
    return stream()


def add_common_args(ap):
    """The rollout / update flags grpo_teacher.py and opd_student.py share (Flow-GRPO's names and SD3.5 values)."""
    ap.add_argument("--model", default="ckpts/base.safetensors", help="mini checkpoint, or an SD3 dir / hub id")
    ap.add_argument("--prompt_file", nargs="+", default=None,
                    help="JSONL {prompt, task} files, or TASK=PATH (.txt or .jsonl); default: the mini world's prompts")
    ap.add_argument("--steps", type=int, default=100, help="training steps (each: rollouts + one update)")
    ap.add_argument("--prompts", type=int, default=8, help="B: prompts per step (global)")
    ap.add_argument("--group", type=int, default=8, help="G: samples per prompt (Flow-GRPO on SD3.5: 24)")
    ap.add_argument("--sample_steps", type=int, default=10, help="T: denoising steps of a rollout")
    ap.add_argument("--sde_window", type=int, nargs=2, default=None, help="train only steps [a, b) (Flow-GRPO-Fast)")
    ap.add_argument("--guidance", type=float, default=1.0, help="CFG scale in rollouts and updates (SD3.5: 4.5)")
    ap.add_argument("--noise_level", type=float, default=0.7, help="a of Eq. 5")
    ap.add_argument("--lr", type=float, default=3e-4, help="Flow-GRPO on SD3.5: 3e-4")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (SD3.5: 32)")
    ap.add_argument("--alpha", type=float, default=16, help="LoRA alpha (SD3.5: 64)")
    ap.add_argument("--clip", type=float, default=1e-4, help="eps of Eq. 11 (log-probs are per dimension)")
    ap.add_argument("--inner_epochs", type=int, default=1, help="updates on each batch of rollouts")
    ap.add_argument("--micro_batch", type=int, default=64, help="samples per forward in the update")
    ap.add_argument("--max_grad_norm", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save_every", type=int, default=50)
    ap.add_argument("--log_every", type=int, default=5)
    ap.add_argument("--log_file", default=None, help="JSONL log (default: runs/<out name>.jsonl)")
    ap.add_argument("--resolution", type=int, default=512, help="SD3 image size (the mini world is 32x32)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="base weights (auto: "
                    "bf16 for SD3 on CUDA); adapters and the SDE math stay float32")
    ap.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing in the transformer (SD3.5)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of --out")
    ap.add_argument("--max_bad_steps", type=int, default=5, help="stop after this many NaN updates in a row")


def load_base(args, device):
    """The frozen base in --precision (SD3 on CUDA: bf16 weights; LoRA and SDE math stay float32), --grad_ckpt."""
    model = fm.load_model(args.model, device, fm.dtype_for(args.precision, device))
    if args.grad_ckpt:
        model.transformer.enable_gradient_checkpointing()
    return model


def check_common_args(args, world):
    sampler.check_sampling_args(args.sample_steps, args.guidance, args.noise_level)
    sampler.sde_steps(args.sample_steps, window=args.sde_window)
    if not args.noise_level > 0:
        raise fm.BadInput("--noise_level must be > 0 for training: the policy needs exploration (Eq. 5)")
    for name in ("steps", "prompts", "group", "rank", "inner_epochs", "micro_batch", "save_every", "log_every",
                 "max_bad_steps"):
        if getattr(args, name) < 1:
            raise fm.BadInput(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not (args.lr > 0 and args.clip > 0 and args.alpha > 0):
        raise fm.BadInput("--lr, --clip and --alpha must be > 0")
    if (args.prompts * args.group) % world:
        raise fm.BadInput(f"the global batch --prompts x --group = {args.prompts * args.group} does not divide "
                          f"over {world} processes; change --prompts or --group")


def policy_step(model, states, sigmas, t, enc, args):
    """v_theta at x_t (with gradient) and the Gaussian step it defines (Eq. 5-6): log pi(x_t+1 | x_t), mu, std."""
    v = fm.velocity(model, states[:, t], float(sigmas[t]), enc, args.guidance)
    _, lp, mu, std = sampler.sde_step(states[:, t], v, sigmas, t, args.noise_level, x_next=states[:, t + 1])
    return v, lp, mu, std


def main(argv=None):
    ap = argparse.ArgumentParser(description="Stage 1: train a Flow-GRPO LoRA teacher for one reward (or GRPO-Mix).")
    add_common_args(ap)
    # mini-world defaults (Flow-GRPO on SD3.5: --lr 3e-4 and thousands of steps): measured, 3e-4 barely moves the
    # mini model in 60 steps, 3e-3 lifts PickScore in 40; 50 steps keep a teacher near 5 CPU minutes
    ap.set_defaults(lr=3e-3, steps=50)
    ap.add_argument("--reward", default="ocr", help="geneval | ocr | pickscore | deqa, or name:weight,... (GRPO-Mix)")
    ap.add_argument("--beta", type=float, default=0.04, help="KL to the frozen base (Flow-GRPO: 0.04, PickScore 0.01)")
    ap.add_argument("--out", default=None, help="default: ckpts/teachers/<reward>.safetensors, or ckpts/baselines/ for a mix")
    rewards.add_args(ap)
    args = ap.parse_args(argv)
    rank, world, device = dist_setup()
    weights = rewards.parse_spec(args.reward)
    tasks = list(dict.fromkeys(weights))  # a reward's name is the task label it serves
    role = "teacher" if len(weights) == 1 else "mix"
    args.out = args.out or f"ckpts/{'teachers' if role == 'teacher' else 'baselines'}/{'+'.join(tasks)}.safetensors"
    check_common_args(args, world)
    if args.beta < 0:
        raise fm.BadInput(f"--beta must be >= 0, got {args.beta}")
    fm.check_writable(args.out)
    fm.catch_signals()
    torch.manual_seed(args.seed)  # the same LoRA init on every rank

    model = load_base(args, device)
    rewards.use_backends(args, device)
    base_hash = fm.fingerprint(model)
    fm.add_lora(model.transformer, "policy", args.rank, args.alpha)
    params = fm.adapter_params(model.transformer, "policy")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    T = args.sample_steps
    sde = sampler.sde_steps(T, window=args.sde_window)
    N = args.prompts * args.group
    local = list(range(rank * N // world, (rank + 1) * N // world))  # this rank's global sample indices
    stream, order_rng = prompt_stream(args, tasks), random.Random(args.seed)
    meta = {"role": role, "rewards": weights, "tasks": tasks, "base_path": args.model, "base_hash": base_hash}
    start, state, opt_state = resume(args, stream, order_rng, rank, world, {"base_hash": base_hash})
    if start:
        restore_lora(params, opt, state, opt_state)
    log = open_log(args, rank)
    if rank == 0:
        print(f"{role} {args.reward}: {args.steps} steps x {args.prompts} prompts x {args.group} samples on {world} "
              f"process(es), trained steps {sde}, LoRA r={args.rank} ({sum(p.numel() for p in params) / 1e6:.2f}M params)")

    bad = bad_total = 0
    stop, step = False, start - 1
    bar = tqdm(range(start, args.steps), desc=f"grpo {args.reward}", disable=rank != 0, mininterval=2, initial=start,
               total=args.steps)
    for step in bar:
        t0 = time.time()
        batch = [next(stream) for _ in range(args.prompts)]
        prompts = [batch[i // args.group] for i in local]
        enc = fm.encode_prompts(model, prompts)
        x, eps = sample_noise(args.seed, step, local, model.latent_shape(args.resolution), T)
        fm.set_adapter(model.transformer, "policy")
        traj = sampler.sample(model, enc, T, args.guidance, args.noise_level, sde, x=x, eps=eps)
        states, sigmas, old_lp = traj["states"], traj["sigmas"], traj["log_probs"].to(device)
        t1 = time.time()
        total, each = rewards.combine(weights, fm.to_images(model, states[:, -1]), prompts)
        R = all_gather(total.to(device), world)
        adv = group_advantages(R, args.group)[local[0]:local[-1] + 1]
        t2 = time.time()

        stats = torch.zeros(4, device=device)  # loss, KL to base, clip fraction, approx KL (global means)
        ratio_dev = 0.0  # max |rho - 1| in the first pass: 0 up to float error, since it is on-policy
        for epoch in range(args.inner_epochs):
            opt.zero_grad(set_to_none=True)
            steps_t = order_rng.sample(sde, len(sde))  # Flow-GRPO visits the trained steps in random order
            n = len(local) * len(steps_t)
            epoch_loss = torch.zeros(1, device=device)
            for t in steps_t:
                for mb in torch.arange(len(local)).split(args.micro_batch):
                    e = fm.select(enc, mb)
                    if args.beta > 0:
                        with torch.no_grad():
                            fm.set_adapter(model.transformer, None)  # the frozen base: pi_ref
                            v_ref = fm.velocity(model, states[mb, t], float(sigmas[t]), e, args.guidance)
                            fm.set_adapter(model.transformer, "policy")
                    v, lp, mu, std = policy_step(model, states[mb], sigmas, t, e, args)
                    pg, ratio = clipped_surrogate(lp, old_lp[mb, t], adv[mb], args.clip)      # Eq. 11
                    kl = torch.zeros_like(pg)
                    if args.beta > 0:
                        mu_ref, _ = sampler.gaussian_step(states[mb, t], v_ref, sigmas, t, args.noise_level)
                        kl = sampler.kl_per_dim(mu, mu_ref, std)
                    loss = (pg + args.beta * kl).sum() / n
                    loss.backward()
                    with torch.no_grad():
                        epoch_loss += loss.detach()
                        stats += torch.stack([(pg + args.beta * kl).sum(), kl.sum(),
                                              ((ratio - 1).abs() > args.clip).float().sum(),
                                              (0.5 * (lp - old_lp[mb, t]) ** 2).sum()]) / n / args.inner_epochs
                        if epoch == 0:
                            ratio_dev = max(ratio_dev, float((ratio - 1).abs().max()))
            all_reduce_mean([p.grad for p in params] + [epoch_loss], world)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            bad = fm.finite_or_skip(bool(torch.isfinite(grad_norm) and torch.isfinite(epoch_loss)), bad, step,
                                    args.max_bad_steps, args.out)  # the same verdict on every rank: all-reduced
            if bad:
                bad_total += 1
                break
            opt.step()
        all_reduce_mean([stats], world)
        t3 = time.time()

        if rank == 0 and ((step + 1) % args.log_every == 0 or step == 0):
            rec = {"step": step + 1, "reward": R.mean().item(), "reward_std": R.std().item(),
                   **{f"reward/{k}": float(v.nanmean()) for k, v in each.items()},
                   "adv_mean": adv.mean().item(), "adv_abs": adv.abs().mean().item(), "loss": stats[0].item(),
                   "kl_base": stats[1].item(), "clip_frac": stats[2].item(), "approx_kl": stats[3].item(),
                   "grad_norm": float(grad_norm), "ratio_dev": ratio_dev, "bad_steps": bad_total, "t_rollout": t1 - t0, "t_reward": t2 - t1, "t_update": t3 - t2}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
        stop = fm.stop_requested(world, device)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps or stop:
            checkpoint(args, model, "policy", params, opt, {**meta, "step": step + 1}, order_rng, rank, world)
        if stop:
            break
    if rank == 0:
        print(f"stopped by {fm.STOP['signal']} after step {step + 1}; --resume continues" if stop else f"saved {args.out}")
    if world > 1:
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------- runs survive
def resume(args, stream, order_rng, rank, world, expect, may_change=(), read_tensors=True):
    """--resume: the latest checkpoint's (step, tensors, optimizer state), the RNGs and the prompt position restored;
    (0, None, None) without --resume. The caller puts its weights back (restore_lora, or opd_student's --full)."""
    if not args.resume:
        return 0, None, None
    tensors, meta, opt_state = fm.load_state(args.out, vars(args), rank, world, [order_rng], may_change, read_tensors)
    for k, v in expect.items():
        if meta.get(k) != v:
            raise fm.BadInput(f"--resume: the checkpoint has {k} {meta.get(k)!r}, this run {v!r}; resume with the "
                              "run's own --model and teachers, or drop --resume")
    for _ in range(meta["step"] * args.prompts):  # the data position: the prompt stream is a seeded sequence
        next(stream)
    if rank == 0:
        print(f"resumed {args.out} at step {meta['step']}")
    return meta["step"], tensors, opt_state


def restore_lora(params, opt, tensors, opt_state):
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
    opt.load_state_dict(opt_state)


def checkpoint(args, model, name, params, opt, meta, order_rng, rank, world):
    """The adapter at --out (what the next stage reads) and the resumable state beside it, both atomically."""
    if rank == 0:
        fm.save_lora(args.out, model.transformer, name, {**meta, "config": vars(args)})
    fm.save_state(args.out, meta["step"], {f"param.{i}": p for i, p in enumerate(params)}, opt.state_dict(),
                  {**meta, "config": vars(args)}, [order_rng], rank, world)


def open_log(args, rank):
    """The JSONL log (rank 0): appended to on --resume, so one file holds the whole run."""
    if rank != 0:
        return None
    path = args.log_file or os.path.join("runs", os.path.basename(args.out).rsplit(".", 1)[0] + ".jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return open(path, "a" if args.resume else "w")


if __name__ == "__main__":
    fm.run(main)
