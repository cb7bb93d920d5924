"""Stage 2: Flow-OPD. Distil several LoRA teachers into one student by on-policy distillation (Eq. 7-12).

    torchrun --nproc_per_node=8 opd_student.py --teachers ckpts/teachers/*
    python opd_student.py --teachers geneval=A.safetensors ocr=B.safetensors pickscore=C --anchor D --init merge

One step, top to bottom:
  1. the student samples its own SDE trajectories (Eq. 5-6)
  2. each prompt is routed to the one teacher of its task label, k(c) (Eq. 7)
  3. that teacher's velocity v* at every state the student visited
  4. the dense reward r_t = -lambda_t || sg[v_theta] - v* ||^2, lambda_t = (-dt) kappa_t^2 / (2 s_t^2) (Eq. 9-10),
     which is exactly the KL between the student's and the teacher's Gaussian steps
  5. the update: Eq. 11 with an advantage built from step 4 (or, by default, its expectation in closed form: the
     gradient of Eq. 9's KL), plus MAR toward the frozen quality anchor (Eq. 12, mar.py)

Advantages (--advantage), three estimators of the gradient of Eq. 9's KL at the visited states:
  analytic (default)  the loss is Eq. 9's KL itself, gradient through mu_theta, as Eq. 12 treats the anchor: the
                      closed-form expectation of `logratio` (Rao-Blackwellised), so the same gradient without the noise.
  logratio            A_t = log pi*(x_t+1 | x_t) - log pi_old(x_t+1 | x_t) in Eq. 11: E[A_t] = r_t, and its policy
                      gradient is -grad KL, the per-token reverse KL of LLM on-policy distillation (Eq. 2). Unbiased,
                      but its signal is eps . (mu_old - mu*) summed over all D dimensions: measured on the mini world,
                      100 steps moved the student a fraction of what 10 analytic steps do, and lr 3e-3 diverged.
  paper               A_t = r_t (the official code). r_t is a function of the state x_t only, and the ratio scores
                      the action x_t -> x_t+1, so E[r_t grad log pi(x_t+1 | x_t)] = 0: the step's own KL gets no push.
test_all.py checks all three against the closed-form gradient.

By default the deqa (quality) teacher is the MAR anchor and not a routed task, as in the paper (GenEval, OCR and
PickScore routed; --tasks adds deqa).

Teachers are LoRA adapters on the one frozen base in memory; every trained step runs one forward per teacher on
the samples routed to it. The student is one more adapter (rank sum r_k after a merge cold start), or with --full a
full copy of the base, sharded with FSDP under torchrun.
"""
import argparse
import copy
import dataclasses
import json
import os
import random
import shutil
import time

import torch
from safetensors import safe_open
from tqdm import tqdm

import flow_matching as fm
import grpo_teacher as grpo
import lora
import mar
import merge
import miniworld as mw
import runs
import sde_sampler as sampler
from runs import BadInput


# ----------------------------------------------------------------------------------------------- Eq. 7, 9, 10
def kappa_lambda(sigmas, t, noise_level):
    """kappa_t = 1 + s_t^2 (1 - sigma_t) / (2 sigma_t),  lambda_t = (-dt) kappa_t^2 / (2 s_t^2)   (Eq. 9)."""
    sigma, sigma_next = float(sigmas[t]), float(sigmas[t + 1])
    _, s = sampler.noise_std(sigma, sigma_next, noise_level, float(sigmas[1]))
    kappa = 1 + s ** 2 * (1 - sigma) / (2 * sigma)
    return kappa, (sigma - sigma_next) * kappa ** 2 / (2 * s ** 2)


def dense_reward(v_student, v_target, sigmas, t, noise_level):
    """Eq. 10: r_t = -lambda_t || sg[v_theta] - v* ||^2 (summed over dimensions): minus Eq. 9's KL. (B,)"""
    _, lam = kappa_lambda(sigmas, t, noise_level)
    return -lam * ((v_student.detach().float() - v_target.float()) ** 2).flatten(1).sum(1)


def read_meta(path):
    """Our metadata of a LoRA file ({} for a peft dir); None if the file is not a LoRA at all."""
    if os.path.isdir(path):
        return {} if os.path.isfile(os.path.join(path, "adapter_config.json")) else None
    try:
        with safe_open(path, "pt") as f:
            m = f.metadata() or {}
    except Exception:
        return None
    return json.loads(m.get("flow_opd", "{}")) if m.get("format") == "flow-opd-lora" else None


def resolve_teachers(specs):
    """--teachers entries (PATH, or LABEL=PATH) -> routes {task label: path} (Eq. 7's k(c)), and what was skipped.
    A file that is not a teacher (a merge, a GRPO-Mix, a student, not a LoRA) is skipped and said so."""
    routes, skipped = {}, []
    for spec in specs:
        label, path = (None, spec)
        if "=" in spec and not os.path.exists(spec):
            label, path = spec.split("=", 1)
        path = lora.fetch_adapter(path)
        if not os.path.exists(path):
            raise BadInput(f"teacher {path} does not exist; train one with `python grpo_teacher.py --reward TASK`")
        meta = read_meta(path)
        if meta is None:
            if label:
                raise BadInput(f"{path} is not a LoRA adapter; a teacher is a grpo_teacher.py output or a peft dir")
            skipped.append((path, "not a LoRA adapter"))
            continue
        if label is None and meta.get("role") != "teacher":
            skipped.append((path, f"role {meta.get('role', 'unknown')!r}, not a teacher (name it LABEL=PATH to use it)"))
            continue
        tasks = [label] if label else meta.get("tasks", [])
        for task in tasks:
            if task in routes:
                raise BadInput(f"two teachers claim task {task!r}: {routes[task]} and {path}; keep one, or "
                                  f"route explicitly with {task}=PATH")
            routes[task] = path
    if not routes:
        raise BadInput(f"no teachers among {specs}; give grpo_teacher.py outputs or LABEL=PATH")
    return routes, skipped


def route(prompts, routes):
    """Eq. 7's hard router: {task: [local sample indices]}; a label no teacher covers stops the run."""
    groups = {}
    for i, p in enumerate(prompts):
        if p["task"] not in routes:
            raise BadInput(f"task label {p['task']!r} has no teacher (teachers cover {sorted(routes)}); "
                              f"add --teachers {p['task']}=PATH or drop those prompts")
        groups.setdefault(p["task"], []).append(i)
    return groups


@torch.no_grad()
def routed_velocity(model, x_t, sigma, enc, groups, guidance, micro_batch):
    """v*(x_t, t, c) = v_{T_k(c)}(x_t, t, c) (Eq. 7): each teacher runs once on the samples routed to it."""
    v_star = torch.empty_like(x_t, dtype=torch.float32)
    for task, idx in groups.items():
        lora.set_adapter(model.transformer, f"teacher:{task}")
        for mb in torch.tensor(idx, dtype=torch.long).split(micro_batch):
            v_star[mb] = fm.velocity(model, x_t[mb], sigma, fm.select(enc, mb), guidance)
    return v_star


# ----------------------------------------------------------------------------------------------- cold start
def sft_cold_start(model, student, params, routes, tasks, args, device):
    """SFT: Eq. 1 on images each prompt's routed teacher generates (ODE), into the student."""
    opt = torch.optim.AdamW(params, lr=args.sft_lr)
    stream = mw.prompt_stream(args.prompt_file, tasks, args.seed)
    pool = []
    for i in tqdm(range(0, args.sft_samples, args.micro_batch), desc="sft: teacher samples", leave=False):
        prompts = [next(stream) for _ in range(min(args.micro_batch, args.sft_samples - i))]
        for task, idx in route(prompts, routes).items():
            lora.set_adapter(model.transformer, f"teacher:{task}")
            enc = fm.encode_prompts(model, [prompts[j] for j in idx])
            g = torch.Generator().manual_seed(args.seed * 7919 + i)
            out = sampler.sample(model, enc, args.sample_steps, args.guidance, sde=[], generator=g)
            pool += [(prompts[j], out["states"][k, -1]) for k, j in enumerate(idx)]
    lora.set_adapter(student.transformer, "student")
    rng = random.Random(args.seed)
    for _ in tqdm(range(args.sft_steps), desc="sft: Eq. 1", leave=False):
        batch = rng.sample(pool, min(args.micro_batch, len(pool)))
        x0 = torch.stack([x for _, x in batch]).to(device)
        loss = fm.flow_matching_loss(student, x0, fm.encode_prompts(model, [p for p, _ in batch])).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


# ----------------------------------------------------------------------------------------------- --full
def full_student(model, transformer, pairs, world):
    """--full: the student is a full copy of the base in float32, cold-started by folding the merged teachers'
    deltas (B A, already scaled) into its weights; under torchrun sharded with FSDP (runs.fsdp_shard)."""
    with torch.no_grad():
        for mod, (A, B) in (pairs or {}).items():
            W = transformer.get_submodule(mod).weight
            W += (B @ A).to(W)
    transformer.requires_grad_(True)
    if world > 1:
        runs.fsdp_shard(transformer, next(model.transformer.parameters()).dtype)
    return dataclasses.replace(model, transformer=transformer)


def checkpoint_full(args, model, student, opt, meta, order_rng, rank, world):
    """--full: the student at --out, and the resumable state beside it (weights and AdamW gathered to rank 0)."""
    sd, opt_state = runs.gather_full(student.transformer, opt)
    if rank == 0:
        save_full(args, model, sd, {**meta, "config": vars(args)})
    runs.save_state(args.out, meta["step"], {f"full.{k}": v for k, v in sd.items()}, opt_state,
                    {**meta, "config": vars(args)}, [order_rng], rank, world)


def save_full(args, model, sd, meta):
    """The full student (a state dict) at --out: a mini checkpoint (eval.py reads it like a base), or for SD3 a
    diffusers transformer folder, written beside it and renamed."""
    if model.kind == "mini":
        fm.save_model(model, args.out, {"flow_opd": json.dumps(meta)}, transformer_state=sd)
        return
    from diffusers import SD3Transformer2DModel
    t = SD3Transformer2DModel.from_config(model.transformer.config)
    t.load_state_dict(sd)
    tmp = args.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t.save_pretrained(tmp)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Stage 2: Flow-OPD, multi-teacher on-policy distillation with MAR.")
    runs.add_common_args(ap)
    ap.set_defaults(prompts=32, group=1, steps=60, lr=1e-3, clip=1e-4)
    ap.add_argument("--teachers", nargs="+", default=["ckpts/teachers"], help="teacher LoRAs: PATH or LABEL=PATH")
    ap.add_argument("--anchor", default="auto", help="MAR anchor: PATH, 'none', or 'auto' (the deqa teacher)")
    ap.add_argument("--beta", type=float, default=mar.BETA, help="MAR weight beta of Eq. 12 (official: 0.04)")
    ap.add_argument("--advantage", choices=["analytic", "logratio", "paper"], default="analytic",
                    help="estimator of Eq. 9's gradient; see the docstring")
    ap.add_argument("--adv_norm", action="store_true", help="normalise advantages over the global batch")
    ap.add_argument("--init", choices=["merge", "sft", "base"], default="merge", help="cold start of the student")
    ap.add_argument("--sft_samples", type=int, default=512)
    ap.add_argument("--sft_steps", type=int, default=200)
    ap.add_argument("--sft_lr", type=float, default=1e-3)
    ap.add_argument("--tasks", nargs="+", default=None, help="prompt task labels to train on (default: the teachers', "
                    "but deqa: the paper routes GenEval, OCR and PickScore and keeps the quality teacher as the anchor)")
    ap.add_argument("--full", action="store_true", help="train every weight of the student (FSDP under torchrun) "
                    "instead of a LoRA: --out is then a full checkpoint (SD3: a transformer folder)")
    ap.add_argument("--out", default="ckpts/students/opd.safetensors")
    args = ap.parse_args(argv)
    rank, world, device = runs.dist_setup()
    if len(args.teachers) == 1 and os.path.isdir(args.teachers[0]) and not os.path.isfile(
            os.path.join(args.teachers[0], "adapter_config.json")):  # a folder of teachers
        args.teachers = sorted(os.path.join(args.teachers[0], f) for f in os.listdir(args.teachers[0]))
    check_args(args, world)
    routes, skipped = resolve_teachers(args.teachers)
    tasks = args.tasks or [t for t in sorted(routes) if t != "deqa"]
    if not tasks:
        raise BadInput("no task to distil: the only teacher is the quality (deqa) one, which is the MAR anchor; add "
                          "teachers, or --tasks deqa to route it")
    route([{"prompt": "", "task": t} for t in tasks], routes)  # every label has its one teacher, before any work
    anchor = routes.get("deqa") if args.anchor == "auto" else None if args.anchor == "none" else args.anchor
    anchor = anchor and lora.fetch_adapter(anchor)
    if anchor and not os.path.exists(anchor):
        raise BadInput(f"anchor {anchor} does not exist; give a deqa teacher's path or --anchor none")
    runs.catch_signals()
    torch.manual_seed(args.seed)

    # one frozen base, every teacher and the anchor as adapters on it, the student as one more
    model = fm.load_base(args, device)
    base_hash = fm.fingerprint(model)
    full = copy.deepcopy(model.transformer).float() if args.full else None  # before any adapter is added
    teacher_set = []
    for task, path in sorted(routes.items()):
        meta = lora.load_lora(path, model.transformer, f"teacher:{task}")
        if meta.get("base_hash") and meta["base_hash"] != base_hash:
            raise BadInput(f"teacher {path} was trained on another base (hash {meta['base_hash']}, --model "
                              f"{args.model} has {base_hash}); distil teachers of the base you load")
        teacher_set.append({"task": task, "path": path, "sha256": merge.sha256(path)})
    anchor_name = None
    if anchor:
        anchor_name = next((f"teacher:{t}" for t, p in routes.items() if p == anchor), "anchor")
        if anchor_name == "anchor":
            lora.load_lora(anchor, model.transformer, "anchor")
    pairs, r, _ = merge.merge_files(sorted(set(routes.values()))) if args.init == "merge" else (None, 0, None)
    if args.full:  # the student's forward: its own full copy ...
        student = full_student(model, full, pairs, world)
        params = list(student.transformer.parameters())
    else:          # ... or the one base with the "student" adapter (rank sum r_k after a merge, scaling 1)
        student = model
        if pairs:
            lora.add_lora_pairs(model.transformer, "student", pairs, r, float(r))
        else:
            lora.add_lora(model.transformer, "student", args.rank, args.alpha)
        params = lora.adapter_params(model.transformer, "student")
    if rank == 0:
        for path, why in skipped:
            print(f"skipped {path}: {why}")
        print(f"routes (Eq. 7): {', '.join(f'{t} -> {p}' for t, p in sorted(routes.items()))}; anchor (Eq. 12): "
              f"{anchor or 'none'}; init {args.init}; student: " + (f"full ({sum(p.numel() for p in params) / 1e6:.1f}M "
              "parameters, FSDP)" if args.full else f"LoRA on {len(params) // 2} layers"))
    if args.init == "sft" and not args.resume:
        sft_cold_start(model, student, params, routes, tasks, args, device)
        if not args.full:  # (every rank trained on the same pool; FSDP keeps its shards in step by itself)
            runs.all_reduce_mean([p.data for p in params], world)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    T = args.sample_steps
    sde = sampler.sde_steps(T, window=args.sde_window)
    N = args.prompts * args.group
    local = list(range(rank * N // world, (rank + 1) * N // world))
    stream, order_rng = mw.prompt_stream(args.prompt_file, tasks, args.seed), random.Random(args.seed)
    meta = {"role": "student", "full": args.full, "tasks": tasks, "teachers": teacher_set, "init": args.init,
            "base_path": args.model, "base_hash": base_hash, "anchor": {"path": anchor, "sha256": merge.sha256(anchor)} if anchor else None}
    check_teacher_set(args, meta)
    start, state, opt_state = runs.resume(args, stream, order_rng, rank, world, {"base_hash": base_hash},
                                          may_change=("teachers", "anchor"),  # checked by content above
                                          read_tensors=rank == 0 or not args.full)
    if start and args.full:
        runs.restore_full(student.transformer, opt, state, opt_state, world)
    elif start:
        runs.restore_params(params, opt, state, opt_state)
    log = runs.open_log(args, rank)

    bad = bad_total = 0
    stop, step = False, start - 1
    bar = tqdm(range(start, args.steps), desc="opd", disable=rank != 0, mininterval=2, initial=start, total=args.steps)
    for step in bar:
        t0 = time.time()
        batch = [next(stream) for _ in range(args.prompts)]
        prompts = [batch[i // args.group] for i in local]
        enc = fm.encode_prompts(model, prompts)
        x, eps = runs.sample_noise(args.seed, step, local, model.latent_shape(args.resolution), T)
        # 1. the student's own trajectories
        lora.set_adapter(student.transformer, "student")  # (a full student has no adapters: a no-op)
        traj = sampler.sample(student, enc, T, args.guidance, args.noise_level, sde, x=x, eps=eps)
        states, sigmas, old_lp, v_old = traj["states"], traj["sigmas"], traj["log_probs"].to(device), traj["velocities"]
        t1 = time.time()

        # 2-4. route, teacher velocities at the visited states, dense rewards and advantages
        groups = route(prompts, routes)
        n_local = len(local)
        reward = torch.zeros(n_local, T, device=device)
        adv = torch.zeros(n_local, T, device=device)
        mu_anchor, mu_target = {}, {}
        vel_mse = {task: 0.0 for task in groups}
        with torch.no_grad():
            for t in sde:
                v_star = routed_velocity(model, states[:, t], float(sigmas[t]), enc, groups, args.guidance,
                                         args.micro_batch)                                        # Eq. 7
                for task, idx in groups.items():
                    vel_mse[task] += float(((v_old[idx, t] - v_star[idx]) ** 2).mean()) / len(sde)
                reward[:, t] = dense_reward(v_old[:, t], v_star, sigmas, t, args.noise_level)   # Eq. 10
                mu_star, std = sampler.gaussian_step(states[:, t], v_star, sigmas, t, args.noise_level)  # Eq. 7
                if args.advantage == "paper":
                    adv[:, t] = reward[:, t]
                elif args.advantage == "analytic":
                    mu_target[t] = mu_star
                else:  # log pi*(x_t+1 | x_t) - log pi_old(x_t+1 | x_t), summed over dims: E = r_t (Eq. 9)
                    D = states[0, 0].numel()
                    adv[:, t] = D * (sampler.log_prob(states[:, t + 1], mu_star, std) - old_lp[:, t])
                if anchor_name:
                    mu_anchor[t] = mar.anchor_mean(model, anchor_name, states[:, t], sigmas, t, enc, args.guidance,
                                                   args.noise_level)
        if args.adv_norm:
            a = runs.all_gather(adv[:, sde].flatten(), world)
            adv = (adv - a.mean()) / (a.std() + 1e-8)
        t2 = time.time()

        # 5. clipped update (Eq. 11) + MAR (Eq. 12)
        lora.set_adapter(student.transformer, "student")
        stats = torch.zeros(4, device=device)  # loss, MAR KL, clip fraction, approx KL
        for epoch in range(args.inner_epochs):
            opt.zero_grad(set_to_none=True)
            steps_t = order_rng.sample(sde, len(sde))
            n = n_local * len(steps_t)
            epoch_loss = torch.zeros(1, device=device)
            for t in steps_t:
                for mb in torch.arange(n_local).split(args.micro_batch):
                    _, lp, mu, std = grpo.policy_step(student, states[mb], sigmas, t, fm.select(enc, mb), args)
                    pg, ratio = grpo.clipped_surrogate(lp, old_lp[mb, t], adv[mb, t], args.clip)   # Eq. 11
                    if args.advantage == "analytic":  # E[pg]'s gradient in closed form: Eq. 9's KL, per dimension
                        pg = sampler.kl_per_dim(mu, mu_target[t][mb], std)
                    kl = mar.mar_kl(mu, mu_anchor[t][mb], std) if anchor_name else torch.zeros_like(pg)  # Eq. 12
                    loss = (pg + args.beta * kl).sum() / n
                    loss.backward()
                    with torch.no_grad():
                        epoch_loss += loss.detach()
                        stats += torch.stack([(pg + args.beta * kl).sum(), kl.sum(),
                                              ((ratio - 1).abs() > args.clip).float().sum(),
                                              (0.5 * (lp - old_lp[mb, t]) ** 2).sum()]) / n / args.inner_epochs
            runs.all_reduce_mean(([] if args.full else [p.grad for p in params]) + [epoch_loss], world)  # FSDP: done
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
            bad = runs.finite_or_skip(bool(torch.isfinite(grad_norm) and torch.isfinite(epoch_loss)), bad, step,
                                    args.max_bad_steps, args.out)
            if bad:
                bad_total += 1
                break
            opt.step()
        runs.all_reduce_mean([stats], world)
        t3 = time.time()

        if rank == 0 and ((step + 1) % args.log_every == 0 or step == 0):
            by_t = reward.mean(0)
            rec = {"step": step + 1, **{f"opd/vel_mse/{k}": v for k, v in vel_mse.items()},
                   **{f"opd/reward/t{t}": float(by_t[t]) for t in sde}, "loss": stats[0].item(),
                   "mar_kl": stats[1].item(), "clip_frac": stats[2].item(), "approx_kl": stats[3].item(),
                   "grad_norm": float(grad_norm), "bad_steps": bad_total, "t_rollout": t1 - t0, "t_teachers": t2 - t1, "t_update": t3 - t2}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
                                if "/reward/" not in k))
        stop = runs.stop_requested(world, device)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps or stop:
            if args.full:
                checkpoint_full(args, model, student, opt, {**meta, "step": step + 1}, order_rng, rank, world)
            else:
                runs.checkpoint(args, lambda m: lora.save_lora(args.out, model.transformer, "student", m), params,
                                opt, {**meta, "step": step + 1}, order_rng, rank, world)
        if stop:
            break
    if rank == 0:
        print(f"stopped by {runs.STOP['signal']} after step {step + 1}; --resume continues" if stop else f"saved {args.out}")
    if world > 1:
        torch.distributed.destroy_process_group()


def check_teacher_set(args, meta):
    """--resume must distil the same teachers (content, not just paths) toward the same anchor: say what changed."""
    if not args.resume or not os.path.isdir(runs.state_dir(args.out)):
        return
    steps = sorted(d for d in os.listdir(runs.state_dir(args.out)) if d.startswith("step_"))
    if not steps:
        return
    with safe_open(os.path.join(runs.state_dir(args.out), steps[-1], "state.safetensors"), "pt") as f:
        old = json.loads(f.metadata()["flow_opd_state"])
    was, now = {t["task"]: t for t in old["teachers"]}, {t["task"]: t for t in meta["teachers"]}
    changes = [f"{t}: {was[t]['path'] if t in was else 'none'} -> {now[t]['path'] if t in now else 'none'}"
               + (" (same path, new content)" if t in was and t in now and was[t]["path"] == now[t]["path"] else "")
               for t in sorted(set(was) | set(now)) if was.get(t) != now.get(t)]
    if old["anchor"] != meta["anchor"]:
        changes.append(f"anchor: {(old['anchor'] or {}).get('path')} -> {(meta['anchor'] or {}).get('path')}")
    if changes:
        raise BadInput(f"--resume with another teacher set than the checkpoint's: {'; '.join(changes)}; resume "
                          "with the original teachers, or drop --resume to start over")


def check_args(args, world):
    sampler.check_sampling_args(args.sample_steps, args.guidance, args.noise_level)
    sampler.sde_steps(args.sample_steps, window=args.sde_window)
    runs.check_common_args(args, world)
    if args.beta < 0:
        raise BadInput(f"--beta must be >= 0, got {args.beta}")
    if args.sft_samples < 1 or args.sft_steps < 1 or not args.sft_lr > 0:
        raise BadInput("--sft_samples and --sft_steps must be >= 1 and --sft_lr > 0")
    runs.check_writable(args.out)


if __name__ == "__main__":
    runs.run(main)
