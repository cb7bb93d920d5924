"""Stage 2: Flow-OPD. Distil several LoRA teachers into one student by on-policy distillation (Eq. 7-12).

    torchrun --nproc_per_node=8 opd_student.py --teachers ckpts/*
    python opd_student.py --teachers geneval=A.safetensors ocr=B.safetensors pickscore=C --anchor D --init merge

One step of main(), top to bottom:
  1. the student samples its own SDE trajectories (Eq. 5-6)
  2. each prompt is routed to the one teacher of its task label, k(c) (Eq. 7)
  3. that teacher's velocity v* at every state the student visited, and the MAR anchor's mean there
  4. the dense reward r_t = -lambda_t || sg[v_theta] - v* ||^2 (Eq. 9-10): minus the KL between the student's and the
     teacher's Gaussian steps, on Flow-GRPO's scale (per dimension, / 2 s_t^2: docs/conventions.md)
  5. the update: opd_loss (Eq. 9-11) plus MAR toward the frozen quality anchor (Eq. 12), as Flow-GRPO updates

Estimators (--advantage) of the gradient of the KL at the visited states, one branch each of opd_loss:
  analytic (default)  the loss is the step's KL itself, gradient through mu_theta, as Eq. 12 treats the anchor. This
                      is what the official code computes: its advantage is -KL from the gradient-carrying forward,
                      so its gradient is the KL's own (its ratio is 1 at the first update).
  rtg                 analytic plus the return-to-go term that the exact gradient of the trajectory KL
                      KL(P_theta || P*) adds: Eq. 11 with A_t = the sum of the later steps' dense rewards.
  logratio            A_t = log pi*(x_t+1 | x_t) - log pi_old(x_t+1 | x_t) in Eq. 11: E[A_t] = r_t, and its policy
                      gradient is -grad KL, the per-token reverse KL of LLM on-policy distillation (Eq. 2); unbiased
                      but noisy (a dot product of the noise with mu_old - mu* over all D dimensions).
  paper               A_t = r_t detached, the paper's text. r_t is a function of x_t only and the ratio scores the
                      action x_t -> x_t+1, so E[r_t grad log pi(x_t+1 | x_t)] = 0: the step's own KL gets no push.
test_all.py checks them against the closed-form gradient. --query low (DanceOPD) queries the teacher at one low-noise
state per rollout, with plain velocity MSE.

By default the deqa (quality) teacher is the MAR anchor, not a routed task (GenEval, OCR, PickScore), as in the paper;
"w/o MAR" is the official ablation, --anchor base: the same beta KL, to the frozen base. Teachers, the anchor and the
student are LoRA adapters on one frozen base in memory; with --full the student is a full copy, sharded by FSDP.
"""
import copy
import os
import random
import time

import torch
from tqdm import tqdm

import checkpoints
import flow_matching as fm
import grpo_teacher as grpo
import lora
import mar
import merge
import miniworld as mw
import real_rewards
import runs
import sde_sampler as sampler
from runs import BadInput


# ----------------------------------------------------------------------------------------------- Eq. 7, 9-12
def dense_reward(v_student, v_target, sigmas, t, noise_level):
    """Eq. 10, r_t = -lambda_t || sg[v_theta] - v* ||^2, on the losses' scale: times (-dt) / D, which makes it
    -sampler.kl of the two steps' means (tested). (B,)"""
    _, lam = sampler.kappa_lambda(sigmas, t, noise_level)
    dt = float(sigmas[t + 1] - sigmas[t])
    return dt * lam * ((v_student.detach().float() - v_target.float()) ** 2).flatten(1).mean(1)


def return_to_go(reward):
    """(B, T) dense rewards -> (B, T): the sum of each step's later rewards (the trajectory KL's extra advantage)."""
    return reward.flip(1).cumsum(1).flip(1) - reward


def opd_loss(args, v, log_prob, mu, x_t, x_next, v_star, old_log_prob, reward, later, sigmas, t):
    """Stage 2's loss of the student's step x_t -> x_next, per sample (b,): Eq. 9-11 for --query and --advantage
    (MAR, Eq. 12, is added beside it). v, log_prob, mu: the student's velocity, log pi_theta(x_next | x_t) and mean at
    x_t, with gradient (grpo.policy_step); v_star: the routed teachers' velocity there (Eq. 7); old_log_prob, reward
    and later: the rollout's log pi_old, dense rewards (Eq. 10) and their return-to-go, read only where needed."""
    if args.query == "low":  # DanceOPD: one low-noise state per rollout, plain velocity MSE
        return ((v.float() - v_star) ** 2).flatten(1).mean(1)
    mu_star = sampler.sde_mean(x_t, v_star, sigmas, t, args.noise_level)  # the teacher's step (Eq. 5 with v*)
    if args.advantage == "analytic":  # the step's KL itself (Eq. 9), gradient through mu_theta
        return sampler.kl(mu, mu_star, sigmas, t, args.noise_level)
    # Eq. 11's ratio is of densities averaged over the D dimensions (Flow-GRPO's log-prob), so an advantage on the
    # KL's scale carries a factor D for its gradient to be the KL's (tested)
    D, dt = x_t[0].numel(), float(sigmas[t + 1] - sigmas[t])
    if args.advantage == "rtg":
        pg, _ = grpo.clipped_surrogate(log_prob, old_log_prob, D * later, args.clip)
        return sampler.kl(mu, mu_star, sigmas, t, args.noise_level) + pg
    if args.advantage == "paper":  # the paper's A_t = r_t, as the official code
        return grpo.clipped_surrogate(log_prob, old_log_prob, reward, args.clip)[0]
    _, std = sampler.step_noise(sigmas, t, args.noise_level)  # logratio
    adv = D * -dt * (sampler.log_prob(x_next, mu_star, std) - old_log_prob)
    return grpo.clipped_surrogate(log_prob, old_log_prob, adv, args.clip)[0]


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


# ----------------------------------------------------------------------------------------------- cold starts
def sft_cold_start(model, student, params, routes, tasks, args, device, rank=0, world=1):
    """SFT: Eq. 1 on the ODE images of each prompt's routed teacher, into the student; False if a signal stopped it."""
    opt = torch.optim.AdamW(params, lr=args.sft_lr)
    stream = mw.prompt_stream(args.prompt_file, tasks, args.seed, mini=model.kind == "mini")
    pool = []
    for i in tqdm(range(0, args.sft_samples, args.micro_batch), desc="sft: teacher samples", leave=False):
        prompts = [next(stream) for _ in range(min(args.micro_batch, args.sft_samples - i))]
        for task, idx in route(prompts, routes).items():
            lora.set_adapter(model.transformer, f"teacher:{task}")
            enc = fm.encode_prompts(model, [prompts[j] for j in idx])
            g = torch.Generator().manual_seed(args.seed * 7919 + i)
            out = fm.rollout(model, enc, args.sample_steps, args.guidance, sde=[], generator=g,
                             resolution=args.resolution)
            pool += [(prompts[j], out["states"][k, -1]) for k, j in enumerate(idx)]
    if not args.full:
        lora.set_adapter(student.transformer, "student")
    rng = random.Random(args.seed)
    for _ in tqdm(range(args.sft_steps), desc="sft: Eq. 1", leave=False):
        if runs.stop_requested(world, device):  # every rank agrees, or FSDP's collectives hang
            if rank == 0:
                print(f"stopped by {runs.STOP.get('signal', 'a signal')} during the SFT cold start; run it again to start over")
            return False
        batch = rng.sample(pool, min(args.micro_batch, len(pool)))
        x0 = torch.stack([x for _, x in batch]).to(device)
        loss = fm.flow_matching_loss(student, x0, fm.encode_prompts(model, [p for p, _ in batch])).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if not args.full:  # (every rank trained on the same pool; FSDP keeps its shards in step by itself)
        runs.all_reduce_mean([p.data for p in params], world)
    return True


# ----------------------------------------------------------------------------------------------- set-up
def parse_args(argv=None):
    ap = runs.parser("Stage 2: Flow-OPD, multi-teacher on-policy distillation with MAR.")
    runs.add_common_args(ap)
    grpo.add_update_args(ap)
    ap.set_defaults(prompts=32, group=1, steps=60, lr=3e-3)  # the mini world's (official: lr 1e-4)
    ap.add_argument("--teachers", nargs="+", default=["ckpts/teachers"], help="teacher LoRAs: PATH, LABEL=PATH, or "
                    "folders of them (searched one level deep; bases, mixes, merges and students are skipped)")
    ap.add_argument("--anchor", default="auto", help="MAR anchor (Eq. 12): PATH, 'auto' (the deqa teacher), 'base' "
                    "(the same beta KL to the frozen base: the official 'w/o MAR'), or 'none' (no regulariser)")
    ap.add_argument("--beta", type=float, default=mar.BETA, help="MAR weight beta of Eq. 12 (official: 0.04)")
    ap.add_argument("--advantage", choices=["analytic", "rtg", "logratio", "paper"], default="analytic",
                    help="estimator of the KL's gradient (see the docstring)")
    ap.add_argument("--query", choices=["dense", "low"], default="dense", help="query the teacher at every trained "
                    "step (Eq. 9-10), or at one low-noise state per rollout with velocity MSE (DanceOPD)")
    ap.add_argument("--cfg_grad", choices=["cond", "both"], default="both", help="with CFG, the update's gradient "
                    "flows through both branches (the official Flow-OPD code) or the conditional one only")
    ap.add_argument("--init", default="merge", help="cold start of the student: merge (of the routed teachers), sft "
                    "(Eq. 1 on their samples), base (a new adapter), or a LoRA file (e.g. a saved SFT cold start)")
    ap.add_argument("--sft_samples", type=int, default=512, help="--init sft: teacher images to fine-tune on")
    ap.add_argument("--sft_steps", type=int, default=200, help="--init sft: flow-matching steps on them")
    ap.add_argument("--sft_lr", type=float, default=1e-3, help="--init sft: their learning rate")
    ap.add_argument("--tasks", nargs="+", default=None, help="prompt task labels to train on (default: the teachers', "
                    "but deqa: the paper routes GenEval, OCR and PickScore and keeps the quality teacher as the anchor)")
    ap.add_argument("--full", action="store_true", help="train every weight of the student (FSDP under torchrun) "
                    "instead of a LoRA: --out is then a full checkpoint (SD3: a transformer folder)")
    ap.add_argument("--out", default="ckpts/students/opd.safetensors", help="the student (--steps 0: the cold start)")
    real_rewards.add_args(ap)
    return runs.parse(ap, argv, per_world)


def per_world(args):
    """The defaults that differ between the worlds: with a dense query the mini world trains its teachers' window, the
    first half of the denoising steps (measured: it closes the OCR gap; SD3 trains every SDE step but the last, as
    the official code), and evaluates every 10 steps. --full keeps no EMA (a 2nd copy)."""
    mini = fm.is_mini(args.model)
    return {"sde_window": [0, (args.sample_steps + 1) // 2] if mini and args.query == "dense" else None,
            "eval_every": 10 if mini else 0, "ema_decay": 0.0 if args.full else 0.9}


def resolve_inputs(args):
    """Eq. 7's routes (task -> teacher), the tasks trained and the MAR anchor ('base', None or a path), checked first."""
    routes, skipped = lora.resolve_teachers(args.teachers)
    tasks = list(dict.fromkeys(args.tasks or [t for t in sorted(routes) if t != "deqa"]))  # each task once
    for t in [t for t in [*routes, *tasks] if t not in mw.TASKS]:
        raise BadInput(f"unknown task label {t!r} (in --teachers LABEL=PATH or --tasks); labels are {', '.join(mw.TASKS)}")
    if not tasks:
        raise BadInput("no task to distil: the only teacher is the quality (deqa) one, which is the MAR anchor; add "
                       "teachers, or --tasks deqa to route it")
    route([{"prompt": "", "task": t} for t in tasks], routes)  # every label has its one teacher, before any work
    anchor = {"auto": routes.get("deqa"), "none": None, "base": "base"}.get(args.anchor, args.anchor)
    skipped += [(p, f"serves {t}, which is not distilled: add it to --tasks") for t, p in routes.items()
                if t not in tasks and (t != "deqa" or anchor in (None, "base"))]  # (deqa's: the MAR anchor)
    prompts = [p for s in args.prompt_file or [] for p in mw.read_prompt_file(s, fm.is_mini(args.model))]
    skipped += [(f"the --prompt_file prompts of task {t}", "no teacher distils it") for t in
                sorted({p["task"] for p in prompts} - set(tasks))]
    if anchor not in (None, "base"):
        anchor = lora.fetch_adapter(anchor)
        if not os.path.exists(anchor):
            raise BadInput(f"anchor {anchor} does not exist; give a deqa teacher's path, --anchor base or none")
    if args.init not in ("merge", "sft", "base") and not os.path.exists(args.init):
        raise BadInput(f"--init {args.init}: no such file; give merge, sft, base or a LoRA cold start")
    return routes, skipped, tasks, anchor


def build(args, model, routes, tasks, anchor, world):
    """Every teacher and the anchor as adapters on the one frozen base, and the student from its cold start (its
    own adapter, or its own copy with --full): (student, its parameters, the anchor's adapter name, output metadata)."""
    base_hash = fm.fingerprint(model)
    full = copy.deepcopy(model.transformer).float() if args.full else None  # before any adapter is added

    def load_adapter(path, name, what):  # a teacher or the anchor, of this base only
        meta = lora.load_lora(path, model.transformer, name)
        if meta.get("base_hash") not in (None, base_hash):
            raise BadInput(f"{what} {path} was trained on another base (hash {meta['base_hash']}, --model {args.model} "
                           f"has {base_hash}); give {what}s of the base you load")
    teacher_set = []
    for task, path in sorted(routes.items()):
        load_adapter(path, f"teacher:{task}", "teacher")
        teacher_set.append({"task": task, "path": path, "sha256": merge.sha256(path)})
    anchor_name = None if anchor is None else "base" if anchor == "base" else next(
        (f"teacher:{t}" for t, p in routes.items() if p == anchor), "anchor")
    if anchor_name == "anchor":
        load_adapter(anchor, "anchor", "anchor")
    pairs, scale = None, 1.0
    if args.init == "merge":  # the routed teachers only, as the official merge.sh (docs/conventions.md)
        pairs = merge.merge_files(sorted({routes[t] for t in tasks}))[0]
    elif args.init not in ("sft", "base"):
        pairs, scale, init_meta = lora.read_lora(args.init)
        if init_meta.get("base_hash") not in (None, base_hash):
            raise BadInput(f"--init {args.init} was made on another base; give a cold start of this base")
    if args.full:  # the student's forward: its own full copy ...
        student = fm.full_student(model, full, pairs, scale, world)
        params = list(student.transformer.parameters())
    else:          # ... or the one base with the "student" adapter
        student = model
        if pairs:
            lora.add_lora_pairs(model.transformer, "student", pairs, scale)
        else:
            lora.add_lora(model.transformer, "student", args.rank, args.alpha)
        params = lora.adapter_params(model.transformer, "student")
    meta = {"role": "student" if args.steps else args.init, "full": args.full, "tasks": tasks, "teachers": teacher_set,
            "init": args.init, "base_path": fm.recorded_path(args.model), "base_hash": base_hash,
            "anchor": {"path": anchor, "sha256": merge.sha256(anchor)} if anchor not in (None, "base") else anchor}
    return student, params, anchor_name, meta


def saver(args, model, student, params, opt, ema, meta, order_rng, rank, world):
    """checkpoint(step): --out (a LoRA student holds its EMA weights) and the resumable checkpoint beside it."""
    def checkpoint(step):
        if args.full:  # weights and AdamW gathered to rank 0 (a full student keeps no EMA)
            sd, opt_state = checkpoints.gather_full(student.transformer, opt)
            if rank == 0:
                fm.save_full(args.out, model, sd, {**meta, "step": step, "config": vars(args)})
            checkpoints.save_state(args.out, step, {f"full.{k}": v for k, v in sd.items()}, opt_state,
                                   {**meta, "step": step, "config": vars(args)}, [order_rng], rank, world)
            return

        def save_out(m):
            grpo.swap_ema(ema, params)
            lora.save_lora(args.out, model.transformer, "student", m)
            grpo.swap_ema(ema, params)
        checkpoints.checkpoint(args, save_out, params, opt, {**meta, "step": step}, order_rng, rank, world, ema)
    return checkpoint


def say_setup(args, routes, skipped, tasks, anchor, sde, params):
    if skipped:
        print("skipped " + "; ".join(f"{p} ({why})" for p, why in skipped[:12])
              + (f"; and {len(skipped) - 12} more" if len(skipped) > 12 else ""))
    print(f"routes (Eq. 7): {', '.join(f'{t} -> {routes[t]}' for t in tasks)}; MAR anchor (Eq. 12): {anchor or 'none'}; "
          f"cold start {args.init}; SDE steps trained {sde} of {args.sample_steps}; student: "
          + (f"full ({sum(p.numel() for p in params) / 1e6:.1f}M parameters, FSDP)" if args.full
             else f"LoRA on {len(params) // 2} layers"))


def adapter_velocity(model, name, enc, guidance):
    """v(x, sigma) of one adapter on the shared base (None: the frozen base), for the sampler or the anchor."""
    def velocity(x, sigma):
        active = lora.active_adapter(model.transformer)
        lora.set_adapter(model.transformer, name)
        v = fm.velocity(model, x, sigma, enc, guidance)
        lora.set_adapter(model.transformer, active)
        return v
    return velocity


# ----------------------------------------------------------------------------------------------- the loop
def main(argv=None):
    args = parse_args(argv)
    rank, world, device = runs.dist_setup()
    check_args(args, world)
    routes, skipped, tasks, anchor = resolve_inputs(args)
    stream = mw.prompt_stream(args.prompt_file, tasks, args.seed, mini=fm.is_mini(args.model))
    args.prompt_sha256 = mw.prompt_digest(args.prompt_file, fm.is_mini(args.model))  # recorded; --resume compares it
    args.init_sha256 = merge.sha256(args.init) if os.path.exists(args.init) else None  # (and a cold start's content)
    checkpoints.check_out(args.out, {"--model": args.model, "--init": args.init, "--anchor": anchor,
                                     **{f"--teachers {t}": p for t, p in routes.items()}, **runs.prompt_inputs(args.prompt_file)},
                          args.overwrite, args.resume, folder=args.full and not fm.is_mini(args.model),
                          config=vars(args), world=world, may_change=("teachers", "anchor"), log=runs.log_path(args),
                          own=("a student", f"a {args.init}"))  # (a cold start's role is its --init)
    for path, flag in ((args.out, "--out"), (runs.log_path(args), "--log_file")):  # one run per output and log
        checkpoints.lock_out(path, rank, world, device, flag)
    runs.catch_signals()
    torch.manual_seed(args.seed)
    real_rewards.use_backends(args, list(mw.TASKS) if args.eval_every else [], args.model, device)  # held-out evaluation
    model = fm.load_base(args, device)
    T = args.sample_steps
    sigmas = sampler.sigma_schedule(model.scheduler, T)
    sde = sampler.sde_steps(T, args.sde_window)
    low = [t for t in sde if float(sigmas[t]) <= 0.5]  # DanceOPD's low-noise states
    if args.query == "low" and not low:
        raise BadInput(f"--query low needs a trained step at sigma <= 0.5; the trained steps are {sde} (sigma "
                       f"{[round(float(s), 3) for s in sigmas]})")
    student, params, anchor_name, meta = build(args, model, routes, tasks, anchor, world)
    if rank == 0:
        say_setup(args, routes, skipped, tasks, anchor, sde, params)
    if args.init == "sft" and not args.resume and not sft_cold_start(model, student, params, routes, tasks, args,
                                                                      device, rank, world):
        return  # stopped by a signal before any checkpoint
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    ema = {"w": [p.detach().clone() for p in params] if args.ema_decay else []}
    N = args.prompts * args.group
    local = list(range(rank * N // world, (rank + 1) * N // world))
    order_rng = random.Random(args.seed)
    checkpoints.check_teacher_set(args, {**meta, "world": world})
    start, state, opt_state = checkpoints.resume(args, stream, order_rng, rank, world, {"base_hash": meta["base_hash"]},
                                                 may_change=("teachers", "anchor"),  # checked by content above
                                                 read_tensors=rank == 0 or not args.full)
    if state is not None and args.full:  # (a checkpoint of step 0 too: the SFT cold start of --steps 0)
        checkpoints.restore_full(student.transformer, opt, state, opt_state, world)
    elif state is not None:
        checkpoints.restore_params(params, opt, state, opt_state, ema)
    log = runs.open_log(args, rank, start)
    checkpoint = saver(args, model, student, params, opt, ema, meta, order_rng, rank, world)
    if args.steps == 0:  # the cold start alone (for Table 2's SFT+GRPO-Mix)
        checkpoint(0)
        if rank == 0:
            print(f"saved the {args.init} cold start at {args.out}")
        return
    query = sde if args.query == "dense" else low[-1:]
    bad = bad_total = 0
    stop, step = False, start - 1
    runs.IN_LOOP = True
    for step in tqdm(range(start, args.steps), desc="opd", disable=rank != 0, mininterval=2, initial=start,
                     total=args.steps):
        t0 = time.time()
        batch = [next(stream) for _ in range(args.prompts)]
        prompts = [batch[i // args.group] for i in local]
        enc = fm.encode_prompts(model, prompts)
        x, eps = runs.sample_noise(args.seed, step, local, model.latent_shape(args.resolution), T)
        if args.sde_window_size:  # Flow-GRPO-Fast: this step's window (a low query: its lowest-noise step)
            sde = sampler.sde_steps(T, args.sde_window, args.sde_window_size, seed=args.seed * 1_000_003 + step)
            query = sde if args.query == "dense" else sde[-1:]
        # 1. the student's own trajectories (Eq. 5-6)
        if not args.full:
            lora.set_adapter(model.transformer, "student")
        traj = fm.rollout(student, enc, T, args.guidance, args.noise_level, sde, x=x, eps=eps)
        states, old_lp, v_old = traj["states"], traj["log_probs"].to(device), traj["velocities"]
        t1 = time.time()

        # 2-4. route (Eq. 7), the teachers' velocities v* at the visited states, the dense rewards (Eq. 10), and the
        # anchor's means (Eq. 12)
        groups = route(prompts, routes)
        reward = torch.zeros(len(local), T, device=device)
        v_star, mu_anchor, vel_mse = {}, {}, {task: 0.0 for task in groups}
        anchor_v = anchor_name and adapter_velocity(model, None if anchor_name == "base" else anchor_name, enc,
                                                    args.guidance)
        with torch.no_grad():
            for t in query:
                v_star[t] = routed_velocity(model, states[:, t], float(sigmas[t]), enc, groups, args.guidance,
                                            args.micro_batch)
                for task, idx in groups.items():
                    vel_mse[task] += float(((v_old[idx, t] - v_star[t][idx]) ** 2).mean()) / len(query)
                reward[:, t] = dense_reward(v_old[:, t], v_star[t], sigmas, t, args.noise_level)
                if anchor_v:
                    mu_anchor[t] = mar.anchor_mean(anchor_v, states[:, t], sigmas, t, args.noise_level)
        later = return_to_go(reward)
        t2 = time.time()

        # 5. the update (Eq. 11, Flow-GRPO's) on opd_loss plus MAR (Eq. 12)
        if not args.full:
            lora.set_adapter(model.transformer, "student")

        def loss_fn(t, mb):
            v, lp, mu = grpo.policy_step(student, states[mb], sigmas, t, fm.select(enc, mb), args)
            loss = opd_loss(args, v, lp, mu, states[mb, t], states[mb, t + 1], v_star[t][mb], old_lp[mb, t],
                            reward[mb, t], later[mb, t], sigmas, t)
            kl = mar.mar_kl(mu, mu_anchor[t][mb], sigmas, t, args.noise_level) if anchor_v else torch.zeros_like(loss)
            ratio = torch.exp(lp - old_lp[mb, t])
            return loss + args.beta * kl, {"mar_kl": kl, "clip_frac": ((ratio - 1).abs() > args.clip).float(),
                                           "approx_kl": 0.5 * (lp - old_lp[mb, t]) ** 2, "ratio_dev": (ratio - 1).abs()}
        stats, bad = grpo.update(params, opt, ema, torch.ones(N, dtype=torch.bool), local, query, loss_fn,
                                 ("mar_kl", "clip_frac", "approx_kl", "ratio_dev"), args, world, order_rng, step, bad,
                                 fsdp=args.full and world > 1)
        bad_total += "skipped" in stats
        t3 = time.time()

        rec = grpo.eval_log(student, params, ema, args, step, rank, every_rank=args.full and world > 1)
        if rank == 0 and ((step + 1) % args.log_every == 0 or step == 0 or rec):
            by_t = reward.mean(0)
            log({"step": step + 1, **{f"opd/vel_mse/{k}": v for k, v in vel_mse.items()},
                 **{f"opd/reward/t{t}": float(by_t[t]) for t in query}, **stats, "bad_steps": bad_total, **rec,
                 "t_rollout": t1 - t0, "t_teachers": t2 - t1, "t_update": t3 - t2})
        stop = runs.stop_requested(world, device)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps or stop:
            checkpoint(step + 1)
        if stop:
            break
    if rank == 0:
        print(f"stopped by {runs.STOP.get('signal', 'a signal to another process')} after step {step + 1}; the same "
              "command with --resume continues" if stop else f"saved {args.out}")
    if world > 1:
        torch.distributed.destroy_process_group()


def check_args(args, world):
    runs.check_sampling_args(args.sample_steps, args.guidance, args.noise_level, window=args.sde_window,
                             window_size=args.sde_window_size)
    if args.steps < 0:
        raise BadInput(f"--steps must be >= 0 (0: write the cold start alone), got {args.steps}")
    steps, args.steps = args.steps, max(args.steps, 1)  # --steps 0 (the cold start alone) passes the >= 1 check
    runs.check_common_args(args, world)
    args.steps = steps
    if args.full and args.ema_decay:
        raise BadInput("--full keeps no EMA of the weights (it would hold a second full copy); drop --ema_decay")
    if not (args.beta >= 0 and args.opt_steps >= 1 and args.ema_every >= 1 and 0 <= args.ema_decay < 1
            and args.eval_n >= 2):
        raise BadInput("--beta must be >= 0, --opt_steps and --ema_every >= 1, 0 <= --ema_decay < 1, --eval_n >= 2")
    if args.full and world > 1 and (args.prompts * args.group // world) % args.opt_steps:
        raise BadInput(f"--full under FSDP needs every process to hold as many samples of each of the --opt_steps "
                       f"{args.opt_steps} parts: make --prompts x --group / processes a multiple of {args.opt_steps}")
    if args.steps == 0 and args.resume:
        raise BadInput("--steps 0 writes a cold start; it has nothing to resume (drop --resume)")
    if args.sft_samples < 1 or args.sft_steps < 1 or not args.sft_lr > 0:
        raise BadInput("--sft_samples and --sft_steps must be >= 1 and --sft_lr > 0")
    sft = (args.sft_samples, args.sft_steps, args.sft_lr) != (512, 200, 1e-3)  # not their defaults
    if args.query == "low" and args.advantage != "analytic" or args.init != "sft" and sft:
        raise BadInput("--advantage has no effect with --query low, nor --sft_* without --init sft; drop them")


if __name__ == "__main__":
    runs.run(main)
