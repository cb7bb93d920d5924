"""Stage 1: a Flow-GRPO teacher for one reward, as a LoRA adapter on a frozen base (the paper's "Stage 1").

    python grpo_teacher.py --reward ocr                                    # a specialist teacher
    python grpo_teacher.py --reward geneval:0.4,ocr:0.3,pickscore:0.3     # GRPO-Mix, the baseline
    torchrun --nproc_per_node=8 grpo_teacher.py --reward ocr ...           # same run, 8 processes

Per step: G SDE rollouts of each of B prompts under the policy (Eq. 5), the reward of each final image, the
group-relative advantage A_i = (R_i - mean_group R) / (std_group R + 1e-4), then for every stochastic step t the
clipped surrogate of Eq. 11 on pi(x_t+1 | x_t) (Eq. 6) plus beta * KL(pi_theta || pi_ref) to the frozen base (the
same model with its adapter off). A prompt's G samples may sit on different ranks: rewards are all-gathered, so
every advantage sees its whole group, and gradients are averaged over ranks (DDP's semantics).
"""
import math
import os
import random
import time

import torch
from tqdm import tqdm

import checkpoints
import flow_matching as fm
import lora
import merge
import miniworld as mw
import real_rewards
import rewards
import runs
import sde_sampler as sampler
from runs import BadInput


# ----------------------------------------------------------------------------------------------- Flow-GRPO
def group_advantages(R, group, std="global", clip=5.0):
    """(N,) rewards of N/group prompts x group samples, in prompt order -> (N,) advantages: each reward minus its
    group's mean, over the std of the whole batch (Flow-GRPO's global_std; "group": the group's own std) + 1e-4,
    clipped to +-clip (Flow-GRPO's adv_clip_max 5). A group whose rewards are all equal gets exactly 0."""
    r = R.view(-1, group)
    spread = r.std(1, unbiased=False, keepdim=True)
    scale = R.std(unbiased=False) if std == "global" else spread
    adv = ((r - r.mean(1, keepdim=True)) / (scale + 1e-4)).clamp(-clip, clip)
    return torch.where(spread > 0, adv, torch.zeros_like(adv)).flatten()


def clipped_surrogate(log_prob, old_log_prob, adv, clip):
    """Eq. 11, per sample: -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = pi_theta / pi_old. Returns loss, rho."""
    ratio = torch.exp(log_prob - old_log_prob)
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv), ratio


def policy_step(model, states, sigmas, t, enc, args):
    """v_theta at x_t (with gradient) and the Gaussian step it defines (Eq. 5-6): log pi(x_t+1 | x_t) and mu.
    --cfg_grad cond detaches CFG's unconditional branch (Flow-GRPO's train_sd3.py at ac4c86e)."""
    v = fm.velocity(model, states[:, t], float(sigmas[t]), enc, args.guidance, detach_uncond=args.cfg_grad == "cond")
    _, lp, mu = sampler.sde_step(states[:, t], v, sigmas, t, args.noise_level, x_next=states[:, t + 1])
    return v, lp, mu


def update(params, opt, ema, keep, local, sde, loss_fn, names, args, world, order_rng, step, bad, fsdp=False):
    """Flow-GRPO's update on one batch of rollouts. The kept samples (keep: (N,) global mask; local: this rank's
    global indices) are dealt, in global order, into --opt_steps parts (Flow-GRPO: 2, each half the rollouts; dealt
    rather than cut, so that every rank holds a share of every part), and each part is one optimizer step: its
    gradient is the mean of loss_fn over the part's samples and every trained step t, visited in random order,
    micro-batch by micro-batch; the same on 1 rank or 8. A rank with no sample in a part adds a zero gradient
    (FSDP, whose every forward is a collective, gets equal shares: opd_student.check_args).
    loss_fn(t, mb) -> (per-sample loss (b,), {name: per-sample values} for `names`) for the local sample indices mb.
    Returns ({stat: global mean over samples and steps; ratio_dev: max |rho - 1| of the first, on-policy part}, bad)."""
    kept = keep.nonzero().flatten().tolist()
    parts = [kept[j::args.opt_steps] for j in range(args.opt_steps)]
    sums, count, norms, ratio_dev = {k: 0.0 for k in ("loss", *names) if k != "ratio_dev"}, 0, [], 0.0
    for epoch in range(args.inner_epochs):
        for j, part in enumerate(p for p in parts if p):
            mine = torch.tensor([i - local[0] for i in part if local[0] <= i <= local[-1]], dtype=torch.long)
            steps_t = order_rng.sample(sde, len(sde))  # Flow-GRPO visits the trained steps in random order
            n = len(part) * len(steps_t)
            opt.zero_grad(set_to_none=True)
            part_loss = torch.zeros(1, device=params[0].device)
            for t in steps_t:
                for mb in mine.split(args.micro_batch) if len(mine) else []:
                    loss, stats = loss_fn(t, mb)
                    (loss.sum() * world / n).backward()  # averaged over ranks below: the part's global mean
                    with torch.no_grad():
                        part_loss += loss.detach().sum() * world / n
                        for k, v in {"loss": loss, **stats}.items():
                            if k == "ratio_dev":
                                ratio_dev = max(ratio_dev, float(v.max())) if epoch == j == 0 else ratio_dev
                            else:
                                sums[k] += float(v.sum())
                        count += len(mb)
            for p in params:
                if p.grad is None:  # this rank had no sample in the part
                    p.grad = torch.zeros_like(p)
            runs.all_reduce_mean(([] if fsdp else [p.grad for p in params]) + [part_loss], world)  # FSDP reduced them
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
            norms.append(float(grad_norm))
            bad = runs.finite_or_skip(bool(torch.isfinite(grad_norm) and torch.isfinite(part_loss).all()), bad, step,
                                      args.max_bad_steps, args.out)  # the same verdict on every rank: all-reduced
            if bad:
                return {"skipped": 1.0}, bad
            # Flow-GRPO steps its EMA after every training batch (per process) with the optimizer steps done so far:
            # the part's first batches come before its optimizer step, its last one after
            for _ in range(math.ceil(len(part) / (world * args.micro_batch)) - 1):
                ema_update(ema, params, args, ema.get("k", 0))
            opt.step()
            if not all(torch.isfinite(p).all() for p in params):  # never train on, or checkpoint, broken weights
                raise runs.Diverged(f"the weights became NaN / inf at step {step + 1} (finite gradient, norm "
                                    f"{float(grad_norm):.3g}); the last checkpoint of {args.out} is intact: lower --lr")
            ema["k"] = ema.get("k", 0) + 1  # optimizer steps done (Flow-GRPO's global_step)
            ema_update(ema, params, args, ema["k"])
    total = torch.tensor([float(count), *sums.values()], dtype=torch.float64, device=params[0].device)
    runs.all_reduce_mean([total], world)
    means = {k: float(v / max(total[0], 1)) for k, v in zip(sums, total[1:])}
    return {**means, "grad_norm": sum(norms) / max(len(norms), 1), "ratio_dev": ratio_dev,
            "kept": len(kept) / len(keep)}, bad


STATS = ("kl_base", "clip_frac", "approx_kl", "ratio_dev")  # what loss_fn reports per sample, besides the loss


def ema_update(ema, params, args, k):
    """Flow-GRPO's EMAModuleWrapper.step(params, k), k the optimizer steps done: when (k + 1) % ema_every == 0, the
    EMA moves toward the weights with decay min((1 + k) / (10 + k), ema_decay) (Flow-GRPO: 0.9, every 8). The EMA is
    what --out holds and what is evaluated; --ema_decay 0 keeps none."""
    if args.ema_decay and (k + 1) % args.ema_every == 0:
        decay = min((1 + k) / (10 + k), args.ema_decay)
        with torch.no_grad():
            for e, p in zip(ema["w"], params):
                e.add_((1 - decay) * (p.detach() - e))


def swap_ema(ema, params):
    """Swap the EMA weights into the model (and back, called again); a no-op without EMA."""
    if ema.get("w"):
        with torch.no_grad():
            for e, p in zip(ema["w"], params):
                tmp = p.detach().clone()
                p.copy_(e)
                e.copy_(tmp)


def add_update_args(ap):
    """The update flags both stages share (Flow-GRPO's SD3 values)."""
    ap.add_argument("--opt_steps", type=int, default=2, help="optimizer steps per batch of rollouts, each over an "
                    "equal part of them (Flow-GRPO: 2)")
    ap.add_argument("--ema_decay", type=float, default=0.9, help="EMA of the trained weights, saved and evaluated "
                    "(Flow-GRPO: 0.9; a --full student keeps none); 0 keeps none")
    ap.add_argument("--ema_every", type=int, default=8, help="optimizer steps between EMA updates (Flow-GRPO: 8)")
    ap.add_argument("--eval_every", type=int, default=None, help="evaluate on --eval_n held-out prompts per task "
                    "every N steps, logged as eval/* (mini world: 10; SD3: 0, off)")
    ap.add_argument("--eval_n", type=int, default=32, help="held-out prompts per task of that evaluation")


def eval_log(model, params, ema, args, step, rank, every_rank=False):
    """The quick held-out evaluation of the (EMA) weights every --eval_every steps: {"eval/<column>": mean}. Rank 0
    evaluates (every rank, with the same prompts, when the model is sharded: FSDP's forward needs them all)."""
    if not args.eval_every or ((step + 1) % args.eval_every and step + 1 != args.steps and step != 0) or \
            (rank and not every_rank):
        return {}
    import eval as ev
    swap_ema(ema, params)
    try:
        scores = ev.evaluate(model, args.eval_n, args.sample_steps, args.guidance, seed=10_000,
                             resolution=args.resolution)[0]
    except runs.Interrupted:  # a stop signal during a reward server's call: the step's end checkpoints
        return {}
    finally:
        swap_ema(ema, params)
    return {f"eval/{k}": v[0] for k, v in ev.summarise(scores).items()}


def per_world(args):
    """The defaults that differ between the worlds. The mini world trains Flow-GRPO-Fast's window, the first half of
    the denoising steps (the SD3 grid's last SDE steps leave pixel images too noisy to score: DeQA 2.8 against 4.4
    for the ODE), and evaluates every 10 steps; SD3 trains every SDE step but the last, as Flow-GRPO does."""
    mini = fm.is_mini(args.model)
    return {"sde_window": [0, (args.sample_steps + 1) // 2] if mini else None, "eval_every": 10 if mini else 0}


def check_args(args, world):
    runs.check_sampling_args(args.sample_steps, args.guidance, args.noise_level, window=args.sde_window,
                             window_size=args.sde_window_size)
    runs.check_common_args(args, world)
    if args.group < 2:
        raise BadInput(f"--group {args.group}: group-relative advantages need at least 2 samples per prompt")
    if not (args.beta >= 0 and args.adv_clip > 0 and args.opt_steps >= 1 and args.ema_every >= 1
            and 0 <= args.ema_decay < 1 and args.eval_n >= 2):
        raise BadInput("--beta must be >= 0, --adv_clip > 0, --opt_steps and --ema_every >= 1, 0 <= --ema_decay < 1, "
                       "--eval_n >= 2")


def main(argv=None):
    ap = runs.parser("Stage 1: train a Flow-GRPO LoRA teacher for one reward (or GRPO-Mix).")
    runs.add_common_args(ap)
    add_update_args(ap)
    ap.set_defaults(lr=1e-3, steps=50)  # the mini world's (measured); Flow-GRPO on SD3.5: --lr 3e-4, thousands of steps
    ap.add_argument("--reward", default="ocr", help="geneval | ocr | pickscore | deqa, or name:weight,... (GRPO-Mix)")
    ap.add_argument("--beta", type=float, default=0.04, help="KL to the frozen base (Flow-GRPO: 0.04, PickScore 0.01)")
    ap.add_argument("--adv_std", choices=["global", "group"], default="global", help="advantages divide by the std of "
                    "the whole batch (Flow-GRPO's global_std) or of each group")
    ap.add_argument("--adv_clip", type=float, default=5.0, help="advantages are clipped to +-this (Flow-GRPO: 5)")
    ap.add_argument("--cfg_grad", choices=["cond", "both"], default="cond", help="with CFG, the update's gradient "
                    "flows through the conditional branch only (Flow-GRPO's train_sd3.py) or both (Flow-OPD's)")
    ap.add_argument("--init", default=None, help="start the policy from this LoRA (a merge or an SFT student: "
                    "Table 2's Merge+GRPO-Mix and SFT+GRPO-Mix) instead of a new rank --rank adapter")
    ap.add_argument("--out", default=None, help="default: ckpts/teachers/<reward>.safetensors, or ckpts/baselines/ for a mix")
    real_rewards.add_args(ap)
    args = runs.parse(ap, argv, per_world)
    rank, world, device = runs.dist_setup()
    weights = rewards.parse_spec(args.reward)
    tasks = list(dict.fromkeys(weights))  # a reward's name is the task label it serves
    role = "teacher" if len(weights) == 1 and not args.init else "mix"
    if args.out == "":
        raise BadInput("--out is empty; give the file to write, or leave --out out for the default path")
    args.out = args.out or f"ckpts/{'teachers' if role == 'teacher' else 'baselines'}/{'+'.join(tasks)}.safetensors"
    check_args(args, world)
    stream = mw.prompt_stream(args.prompt_file, tasks, args.seed, mini=fm.is_mini(args.model))
    args.prompt_sha256 = mw.prompt_digest(args.prompt_file, fm.is_mini(args.model))  # recorded; --resume compares it
    args.init_sha256 = merge.sha256(args.init) if args.init and os.path.exists(args.init) else None  # and --init's
    others = sorted({p["task"] for s in args.prompt_file or [] for p in mw.read_prompt_file(s, fm.is_mini(args.model))}
                    - set(tasks))
    if others and rank == 0:  # (not in silence)
        print(f"skipped the --prompt_file prompts of task(s) {', '.join(others)}: no --reward scores them")
    checkpoints.check_out(args.out, {"--model": args.model, "--init": args.init, **runs.prompt_inputs(args.prompt_file)},
                          args.overwrite, args.resume, config=vars(args), world=world, log=runs.log_path(args),
                          own=("a teacher", "a mix"))
    for path, flag in ((args.out, "--out"), (runs.log_path(args), "--log_file")):  # one run per output and log
        checkpoints.lock_out(path, rank, world, device, flag)
    runs.catch_signals()
    torch.manual_seed(args.seed)  # the same LoRA init on every rank

    real_rewards.use_backends(args, list(mw.TASKS) if args.eval_every else tasks, args.model, device)  # real images need
    # real scorers (the held-out evaluation scores all four tasks), before any work
    model = fm.load_base(args, device)
    base_hash = fm.fingerprint(model)
    if args.init:
        pairs, scale, init_meta = lora.read_lora(args.init)
        if init_meta.get("base_hash") not in (None, base_hash):
            raise BadInput(f"--init {args.init} was made on another base (hash {init_meta['base_hash']}, --model has "
                           f"{base_hash}); give a cold start of this base")
        lora.add_lora_pairs(model.transformer, "policy", pairs, scale, source=args.init)
    else:
        lora.add_lora(model.transformer, "policy", args.rank, args.alpha)
    params = lora.adapter_params(model.transformer, "policy")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    ema = {"w": [p.detach().clone() for p in params] if args.ema_decay else []}
    T = args.sample_steps
    N = args.prompts * args.group
    local = list(range(rank * N // world, (rank + 1) * N // world))  # this rank's global sample indices
    order_rng = random.Random(args.seed)
    meta = {"role": role, "rewards": weights, "tasks": tasks, "base_path": fm.recorded_path(args.model),
            "base_hash": base_hash, "init": args.init}
    start, state, opt_state = checkpoints.resume(args, stream, order_rng, rank, world, {"base_hash": base_hash})
    if state is not None:
        checkpoints.restore_params(params, opt, state, opt_state, ema)
    log = runs.open_log(args, rank, start)
    if rank == 0:
        print(f"{role} {args.reward}: {args.steps} training steps x {args.prompts} prompts x {args.group} samples on "
              f"{world} process(es); SDE steps trained {sampler.sde_steps(T, args.sde_window)} of {T} denoising steps"
              f"{f' ({args.sde_window_size} at a time)' if args.sde_window_size else ''}; LoRA "
              f"{sum(p.numel() for p in params) / 1e6:.2f}M params" + (f" from {args.init}" if args.init else ""))

    def save_out(meta, step, rng=None):  # --out holds the EMA weights, as Flow-GRPO saves them; and the checkpoint
        def write(m):
            swap_ema(ema, params)
            lora.save_lora(args.out, model.transformer, "policy", m)
            swap_ema(ema, params)
        checkpoints.checkpoint(args, write, params, opt, {**meta, "step": step}, order_rng, rank, world, ema, rng)

    bad = bad_total = 0
    stop, step = False, start - 1
    runs.IN_LOOP = True
    bar = tqdm(range(start, args.steps), desc=f"grpo {args.reward}", disable=rank != 0, mininterval=2, initial=start,
               total=args.steps)
    for step in bar:
        t0 = time.time()
        rng_start = checkpoints.rng_states(order_rng)  # what an abandoned step's checkpoint records
        batch = [next(stream) for _ in range(args.prompts)]
        prompts = [batch[i // args.group] for i in local]
        enc = fm.encode_prompts(model, prompts)
        x, eps = runs.sample_noise(args.seed, step, local, model.latent_shape(args.resolution), T)
        sde = sampler.sde_steps(T, args.sde_window, args.sde_window_size, seed=args.seed * 1_000_003 + step)
        lora.set_adapter(model.transformer, "policy")
        traj = fm.rollout(model, enc, T, args.guidance, args.noise_level, sde, x=x, eps=eps)
        states, sigmas, old_lp = traj["states"], traj["sigmas"], traj["log_probs"].to(device)
        t1 = time.time()
        try:
            total, each = rewards.combine(weights, fm.to_images(model, states[:, -1]), prompts)
        except runs.Interrupted:  # a stop signal during a reward server's call: give up the step, not the run
            total, each = torch.full((len(local),), float("nan")), {}
        if runs.any_rank(runs.stop_signalled() and not each, world, device):
            save_out(meta | {"step": step}, step, rng_start)
            stop = True
            break
        R = runs.all_gather(total.to(device), world)
        adv_all = group_advantages(R, args.group, args.adv_std, args.adv_clip)
        adv = adv_all[local[0]:local[-1] + 1]
        t2 = time.time()

        def loss_fn(t, mb):
            """Eq. 11's clipped surrogate plus beta * KL(pi_theta || pi_ref) to the frozen base, per sample."""
            e = fm.select(enc, mb)
            if args.beta > 0:
                with torch.no_grad():
                    lora.set_adapter(model.transformer, None)  # the frozen base: pi_ref
                    v_ref = fm.velocity(model, states[mb, t], float(sigmas[t]), e, args.guidance)
                    lora.set_adapter(model.transformer, "policy")
            _, lp, mu = policy_step(model, states[mb], sigmas, t, e, args)
            pg, ratio = clipped_surrogate(lp, old_lp[mb, t], adv[mb], args.clip)                   # Eq. 11
            kl = torch.zeros_like(pg)
            if args.beta > 0:
                kl = sampler.kl(mu, sampler.sde_mean(states[mb, t], v_ref, sigmas, t, args.noise_level), sigmas, t,
                                args.noise_level)
            return pg + args.beta * kl, {"kl_base": kl, "clip_frac": ((ratio - 1).abs() > args.clip).float(),
                                         "approx_kl": 0.5 * (lp - old_lp[mb, t]) ** 2, "ratio_dev": (ratio - 1).abs()}
        if torch.isfinite(R).all():
            stats, bad = update(params, opt, ema, adv_all != 0, local, sde, loss_fn, STATS, args, world, order_rng,
                                step, bad)
        else:  # a broken reward: no update on it (the NaN guard counts it)
            stats, bad = {"skipped": 1.0}, runs.finite_or_skip(False, bad, step, args.max_bad_steps, args.out)
        bad_total += "skipped" in stats
        t3 = time.time()

        rec = eval_log(model, params, ema, args, step, rank)
        if rank == 0 and ((step + 1) % args.log_every == 0 or step == 0 or rec):
            rec = {"step": step + 1, "reward": R.mean().item(), "reward_std": R.std().item(),
                   **{f"reward/{k}": float(v.nanmean()) for k, v in each.items()}, "adv_abs": adv_all.abs().mean().item(),
                   **stats, "bad_steps": bad_total, **rec, "t_rollout": t1 - t0, "t_reward": t2 - t1, "t_update": t3 - t2}
            log(rec)
        stop = runs.stop_requested(world, device)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps or stop:
            save_out(meta, step + 1)
        if stop:
            step += 1
            break
    if rank == 0:
        print(f"stopped by {runs.STOP.get('signal', 'a signal to another process')} after step {step}; the same command with --resume continues" if stop
              else f"saved {args.out}")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    runs.run(main)
