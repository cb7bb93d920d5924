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
import random
import time

import torch
from tqdm import tqdm

import flow_matching as fm
import lora
import miniworld as mw
import rewards
import runs
import sde_sampler as sampler
from runs import BadInput


# ----------------------------------------------------------------------------------------------- Flow-GRPO
def group_advantages(R, group):
    """(N,) rewards of N/group prompts x group samples, in prompt order -> (N,) group-relative advantages."""
    r = R.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-4)).flatten()


def clipped_surrogate(log_prob, old_log_prob, adv, clip):
    """Eq. 11, per sample: -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = pi_theta / pi_old. Returns loss, rho."""
    ratio = torch.exp(log_prob - old_log_prob)
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv), ratio


def policy_step(model, states, sigmas, t, enc, args):
    """v_theta at x_t (with gradient) and the Gaussian step it defines (Eq. 5-6): log pi(x_t+1 | x_t), mu, std."""
    v = fm.velocity(model, states[:, t], float(sigmas[t]), enc, args.guidance)
    _, lp, mu, std = sampler.sde_step(states[:, t], v, sigmas, t, args.noise_level, x_next=states[:, t + 1])
    return v, lp, mu, std


def check_args(args, world):
    sampler.check_sampling_args(args.sample_steps, args.guidance, args.noise_level)
    sampler.sde_steps(args.sample_steps, window=args.sde_window)
    runs.check_common_args(args, world)
    if args.beta < 0:
        raise BadInput(f"--beta must be >= 0, got {args.beta}")
    runs.check_writable(args.out)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Stage 1: train a Flow-GRPO LoRA teacher for one reward (or GRPO-Mix).")
    runs.add_common_args(ap)
    # mini-world defaults (Flow-GRPO on SD3.5: --lr 3e-4 and thousands of steps): measured, 3e-4 barely moves the
    # mini model in 60 steps, 3e-3 lifts PickScore in 40; 50 steps keep a teacher near 5 CPU minutes
    ap.set_defaults(lr=3e-3, steps=50)
    ap.add_argument("--reward", default="ocr", help="geneval | ocr | pickscore | deqa, or name:weight,... (GRPO-Mix)")
    ap.add_argument("--beta", type=float, default=0.04, help="KL to the frozen base (Flow-GRPO: 0.04, PickScore 0.01)")
    ap.add_argument("--out", default=None, help="default: ckpts/teachers/<reward>.safetensors, or ckpts/baselines/ for a mix")
    rewards.add_args(ap)
    args = ap.parse_args(argv)
    rank, world, device = runs.dist_setup()
    weights = rewards.parse_spec(args.reward)
    tasks = list(dict.fromkeys(weights))  # a reward's name is the task label it serves
    role = "teacher" if len(weights) == 1 else "mix"
    args.out = args.out or f"ckpts/{'teachers' if role == 'teacher' else 'baselines'}/{'+'.join(tasks)}.safetensors"
    check_args(args, world)
    runs.catch_signals()
    torch.manual_seed(args.seed)  # the same LoRA init on every rank

    model = fm.load_base(args, device)
    rewards.use_backends(args, device)
    base_hash = fm.fingerprint(model)
    lora.add_lora(model.transformer, "policy", args.rank, args.alpha)
    params = lora.adapter_params(model.transformer, "policy")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    T = args.sample_steps
    sde = sampler.sde_steps(T, window=args.sde_window)
    N = args.prompts * args.group
    local = list(range(rank * N // world, (rank + 1) * N // world))  # this rank's global sample indices
    stream, order_rng = mw.prompt_stream(args.prompt_file, tasks, args.seed), random.Random(args.seed)
    meta = {"role": role, "rewards": weights, "tasks": tasks, "base_path": args.model, "base_hash": base_hash}
    start, state, opt_state = runs.resume(args, stream, order_rng, rank, world, {"base_hash": base_hash})
    if start:
        runs.restore_params(params, opt, state, opt_state)
    log = runs.open_log(args, rank)
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
        x, eps = runs.sample_noise(args.seed, step, local, model.latent_shape(args.resolution), T)
        lora.set_adapter(model.transformer, "policy")
        traj = sampler.sample(model, enc, T, args.guidance, args.noise_level, sde, x=x, eps=eps)
        states, sigmas, old_lp = traj["states"], traj["sigmas"], traj["log_probs"].to(device)
        t1 = time.time()
        total, each = rewards.combine(weights, fm.to_images(model, states[:, -1]), prompts)
        R = runs.all_gather(total.to(device), world)
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
                            lora.set_adapter(model.transformer, None)  # the frozen base: pi_ref
                            v_ref = fm.velocity(model, states[mb, t], float(sigmas[t]), e, args.guidance)
                            lora.set_adapter(model.transformer, "policy")
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
            runs.all_reduce_mean([p.grad for p in params] + [epoch_loss], world)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            bad = runs.finite_or_skip(bool(torch.isfinite(grad_norm) and torch.isfinite(epoch_loss)), bad, step,
                                    args.max_bad_steps, args.out)  # the same verdict on every rank: all-reduced
            if bad:
                bad_total += 1
                break
            opt.step()
        runs.all_reduce_mean([stats], world)
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
        stop = runs.stop_requested(world, device)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps or stop:
            runs.checkpoint(args, lambda m: lora.save_lora(args.out, model.transformer, "policy", m), params, opt,
                            {**meta, "step": step + 1}, order_rng, rank, world)
        if stop:
            break
    if rank == 0:
        print(f"stopped by {runs.STOP['signal']} after step {step + 1}; --resume continues" if stop else f"saved {args.out}")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    runs.run(main)
