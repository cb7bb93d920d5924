"""The run plumbing the three training scripts share, so that each of them reads as its paper's loop and nothing else:
torchrun set-up and collectives, the shared flags, per-sample noise, checkpoints and --resume, signals, the NaN
guard, and the entry point that turns bad input into one line. It imports no other module of this project.

A run writing OUT keeps one resumable checkpoint in a hidden folder beside it (shell globs skip it):
    .OUT.resume/step_00000050/state.safetensors   weights, optimizer, step, data position (rank 0; JSON metadata)
                              rng_rank<r>.json    every RNG state of process r
written as .step_*.tmp and renamed once complete, so a crash never leaves a half checkpoint over a good one.
"""
import json
import os
import random
import shutil
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm


class BadInput(ValueError):
    """A problem with what the user gave us: every script prints it as one line and exits 2."""


class Diverged(RuntimeError):
    """K updates in a row had a NaN / inf loss or gradient."""


def run(main_fn):
    """Every script's entry point: bad input is one line on stderr and exit 2, never a traceback; a run that
    diverged is one line and exit 3."""
    try:
        main_fn()
    except (BadInput, Diverged) as e:
        if int(os.environ.get("RANK", 0)) == 0:  # under torchrun every rank sees it; say it once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, BadInput) else 3)


def check_writable(path):
    """Fail before any work if OUT cannot be written; create nothing (folders are made when the file is saved)."""
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d) or not os.access(d, os.W_OK) or d.startswith("/proc"):
        raise BadInput(f"cannot write {path} ({d} is not a writable folder); choose another --out")


def atomic_save(tensors, path, metadata):
    """safetensors written to a temp file, then renamed: never a half-written file over a good one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; a shared checkpoint should follow the umask
    os.replace(tmp, path)


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


def barrier(world):
    if world > 1:
        dist.barrier()


def sample_noise(seed, step, indices, shape, steps):
    """Initial noise and SDE noise for global samples `indices`, each from its own seed: the same sample gets the
    same noise on 1 rank or 8. Returns x_0 (n, *shape) and eps (n, steps, *shape)."""
    x, eps = [], []
    for i in indices:
        g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_000_003 + int(i)) % 2 ** 63)
        x.append(torch.randn(shape, generator=g))
        eps.append(torch.randn((steps, *shape), generator=g))
    return torch.stack(x), torch.stack(eps)


# ----------------------------------------------------------------------------------------------- the shared flags
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


def check_common_args(args, world):
    """The shared flags' ranges (the sampling flags are sde_sampler.check_sampling_args')."""
    if not args.noise_level > 0:
        raise BadInput("--noise_level must be > 0 for training: the policy needs exploration (Eq. 5)")
    for name in ("steps", "prompts", "group", "rank", "inner_epochs", "micro_batch", "save_every", "log_every",
                 "max_bad_steps"):
        if getattr(args, name) < 1:
            raise BadInput(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not (args.lr > 0 and args.clip > 0 and args.alpha > 0):
        raise BadInput("--lr, --clip and --alpha must be > 0")
    if (args.prompts * args.group) % world:
        raise BadInput(f"the global batch --prompts x --group = {args.prompts * args.group} does not divide "
                       f"over {world} processes; change --prompts or --group")


def open_log(args, rank):
    """The JSONL log (rank 0): appended to on --resume, so one file holds the whole run."""
    if rank != 0:
        return None
    path = args.log_file or os.path.join("runs", os.path.basename(args.out).rsplit(".", 1)[0] + ".jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return open(path, "a" if args.resume else "w")


# ----------------------------------------------------------------------------------------------- signals, NaN guard
STOP = {}  # the signal that asked this process to stop


def catch_signals():
    """SIGINT / SIGTERM ask the loop to checkpoint at the end of its step and exit 0; a second one kills."""
    def handler(signum, frame):
        STOP["signal"] = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)


def stop_requested(world, device="cpu"):
    """Did any rank get a signal? Every rank must agree, or the collective ops of the next step hang."""
    flag = torch.tensor([float("signal" in STOP)], device=device)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def finite_or_skip(ok, bad, step, max_bad, out):
    """NaN guard: count a skipped update; K in a row stop the run, leaving the last checkpoint as it was."""
    if ok:
        return 0
    bad += 1
    tqdm.write(f"step {step + 1}: NaN or inf loss / gradient, update skipped ({bad} in a row)")
    if bad >= max_bad:
        raise Diverged(f"{bad} updates in a row had a NaN or inf loss or gradient (step {step + 1}); the last good "
                       f"checkpoint of {out} is intact: lower --lr or check the rewards, then --resume")
    return bad


# ----------------------------------------------------------------------------------------------- checkpoints, --resume
def state_dir(out):
    d, name = os.path.split(os.path.abspath(out))
    return os.path.join(d, f".{name.rsplit('.', 1)[0]}.resume")


def rng_states(*loop_rngs):
    """Every RNG this process draws from, as JSON: torch (CPU, CUDA), numpy, python and the loop's own Randoms."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": random.getstate(), "loop": [r.getstate() for r in loop_rngs]}


def set_rng_states(st, *loop_rngs):
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    if st["cuda"]:
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in st["cuda"]])
    np.random.set_state((st["numpy"][0], np.array(st["numpy"][1], dtype=np.uint32), *st["numpy"][2:]))
    for r, s in zip([random, *loop_rngs], [st["python"], *st["loop"]]):
        r.setstate((s[0], tuple(s[1]), s[2]))


def save_state(out, step, tensors, opt_state, meta, loop_rngs=(), rank=0, world=1):
    """One resumable checkpoint of `step` (every rank calls it), replacing the previous one only once complete.
    opt_state: the optimizer's state dict as rank 0 holds it (`opt.state_dict()`, or FSDP's gathered one)."""
    root = state_dir(out)
    tmp, final = os.path.join(root, f".step_{step:08d}.tmp"), os.path.join(root, f"step_{step:08d}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(world)
    with open(os.path.join(tmp, f"rng_rank{rank}.json"), "w") as f:
        json.dump(rng_states(*loop_rngs), f)
    barrier(world)
    if rank == 0:
        sd = opt_state  # AdamW: {"state": {i or name: {step, exp_avg, exp_avg_sq}}, "param_groups": [...]}
        tensors = {**tensors, **{f"opt.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}}
        meta = {**meta, "step": step, "world": world, "param_groups": sd["param_groups"]}
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.path.join(tmp, "state.safetensors"),
                  metadata={"flow_opd_state": json.dumps(meta)})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for d in os.listdir(root):
            if d.startswith("step_") and d != os.path.basename(final):
                shutil.rmtree(os.path.join(root, d))
    barrier(world)


def load_state(out, config, rank=0, world=1, loop_rngs=(), may_change=(), read_tensors=True):
    """The latest checkpoint of the run writing `out`: restores every RNG, returns (tensors, meta, optimizer state
    dict). Refuses other flags than the run's (except those that may change: --steps, logging) and another world
    size. read_tensors=False reads the metadata alone (FSDP: rank 0 reads the weights and broadcasts them)."""
    root = state_dir(out)
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []
    if not steps:
        raise BadInput(f"--resume: no checkpoint of {out} in {root}; run without --resume to start from scratch")
    path = os.path.join(root, steps[-1])
    try:
        with safe_open(os.path.join(path, "state.safetensors"), "pt") as f:
            meta = json.loads(f.metadata()["flow_opd_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()} if read_tensors else {}
        rng = json.load(open(os.path.join(path, f"rng_rank{rank}.json")))
    except Exception as e:
        raise BadInput(f"--resume: {path} is damaged ({type(e).__name__}); delete it to start from scratch") from None
    if meta["world"] != world:
        raise BadInput(f"--resume: {path} was written by {meta['world']} process(es), this run has {world}; "
                       f"resume with --nproc_per_node={meta['world']}")
    may_change = {"steps", "resume", "save_every", "log_every", "log_file", "threads", "max_bad_steps", *may_change}
    now = json.loads(json.dumps(config))
    changed = [f"--{k} was {meta['config'].get(k)!r}, now {v!r}" for k, v in now.items()
               if k not in may_change and meta["config"].get(k) != v]
    if changed:
        raise BadInput(f"--resume with other flags than the run's: {'; '.join(changed)}; resume with the same flags "
                       "or drop --resume to start over")
    state = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            i, name = k[4:].rsplit(".", 1)  # a parameter's index, or its name (FSDP's full state dict)
            state.setdefault(int(i) if i.isdigit() else i, {})[name] = v
    set_rng_states(rng, *loop_rngs)
    return tensors, meta, {"state": state, "param_groups": meta["param_groups"]}


def resume(args, stream, order_rng, rank, world, expect, may_change=(), read_tensors=True):
    """--resume: the latest checkpoint's (step, tensors, optimizer state), the RNGs and the prompt position restored;
    (0, None, None) without --resume. The caller puts its weights back (restore_params, or opd_student's --full)."""
    if not args.resume:
        return 0, None, None
    tensors, meta, opt_state = load_state(args.out, vars(args), rank, world, [order_rng], may_change, read_tensors)
    for k, v in expect.items():
        if meta.get(k) != v:
            raise BadInput(f"--resume: the checkpoint has {k} {meta.get(k)!r}, this run {v!r}; resume with the "
                           "run's own --model and teachers, or drop --resume")
    for _ in range(meta["step"] * args.prompts):  # the data position: the prompt stream is a seeded sequence
        next(stream)
    if rank == 0:
        print(f"resumed {args.out} at step {meta['step']}")
    return meta["step"], tensors, opt_state


def restore_params(params, opt, tensors, opt_state):
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
    opt.load_state_dict(opt_state)


def checkpoint(args, save_out, params, opt, meta, order_rng, rank, world):
    """What the next stage reads at --out (rank 0 calls save_out(meta)) and the resumable state beside it."""
    if rank == 0:
        save_out({**meta, "config": vars(args)})
    save_state(args.out, meta["step"], {f"param.{i}": p for i, p in enumerate(params)}, opt.state_dict(),
               {**meta, "config": vars(args)}, [order_rng], rank, world)


# ----------------------------------------------------------------------------------------------- FSDP (--full)
def fsdp_shard(transformer, compute_dtype):
    """Shard each transformer block, then the whole, over the ranks (bf16 compute when the base is bf16, float32
    reduction): each GPU holds 1/world of the weights, gradients and AdamW state."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in transformer.transformer_blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(transformer, mp_policy=mp)


def gather_full(module, opt):
    """The full weights and AdamW state gathered to rank 0 as plain tensors (the same on one process and from FSDP
    shards; every rank takes part)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def restore_full(module, opt, tensors, opt_state, world):
    """--full --resume: rank 0 read the checkpoint; it is broadcast and each rank keeps its own shards. (Two calls:
    set_state_dict would take the other ranks' empty model dict for "optimizer only" and skip the broadcast.)"""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    sd = {k[5:]: v for k, v in tensors.items() if k.startswith("full.")}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world > 1)
    set_model_state_dict(module, sd, options=options)
    set_optimizer_state_dict(module, opt, opt_state if sd else {}, options=options)
