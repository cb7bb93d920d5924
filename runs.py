"""The run plumbing the three training scripts share, so that each of them reads as its paper's loop and nothing else:
the entry point that turns bad input into one line, torchrun set-up and collectives, the shared flags, per-sample
noise, the JSONL log, signals and the NaN guard. It imports no other module of this project (where a run writes, and
its checkpoints, are checkpoints.py's).
"""
import argparse
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from tqdm import tqdm


class BadInput(ValueError):
    """A problem with what the user gave us: every script prints it as one line and exits 2."""


class Diverged(RuntimeError):
    """K updates in a row had a NaN / inf loss or gradient."""


def run(main_fn):
    """Every script's entry point: bad input is one line on stderr and exit 2, never a traceback; a run that
    diverged is one line and exit 3; a full disk or another failing write is one line and exit 2. Under torchrun
    the start-up checks are the same on every rank, so rank 0 alone says what is wrong; once the loop runs, the
    rank that hit the problem says it (and a rank whose peer died says only that)."""
    rank = int(os.environ.get("RANK", 0))
    try:
        main_fn()
    except (BadInput, Diverged) as e:
        if rank == 0 or IN_LOOP:
            print(f"error: {e}" if rank == 0 else f"error (rank {rank}): {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, BadInput) else 3)
    except SafetensorError as e:  # its writes: a full disk, a file name too long
        print(f"error: cannot write a checkpoint ({str(e)[:200]}); free space or fix the path, then run again (a "
              "training run: the same command with --resume)", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # stdout closed early (`| head`): quiet, as other command-line tools are
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except OSError as e:  # ENOSPC, EDQUOT, EROFS, EACCES while writing
        print(f"error: {e.strerror or e} ({e.filename or 'a write'}); free space or fix the path, then run again "
              "(a training run: the same command with --resume)", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, Interrupted):
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as e:  # a collective whose peer exited: that peer printed the cause
        if dist.is_initialized() and any(s in str(e) for s in ("Connection closed", "Connection reset", "gloo", "NCCL")):
            print(f"error (rank {rank}): another process of this run stopped (see its error above)", file=sys.stderr)
            sys.exit(1)
        raise
    finally:
        for d in sorted(CREATED, key=len, reverse=True):  # the folders the output checks made, if still empty
            try:
                os.rmdir(d)
            except OSError:
                pass


CREATED = []  # folders made by the output checks (checkpoints.check_writable), deepest first
IN_LOOP = False  # set when a training loop starts: from then on, an error is the raising rank's own


def parser(description):
    """Every script's argparse: each flag's default shown in --help."""
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, as every other bad input (argparse's own prints its whole usage)
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
            sys.exit(2)
    return Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


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
    ap.add_argument("--steps", type=int, default=100, help="training steps; each samples rollouts and updates on them")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per training step, over all processes (B)")
    ap.add_argument("--group", type=int, default=8, help="samples of each prompt per step, the group of Eq. 11's "
                    "advantages (G; Flow-GRPO on SD3.5: 24)")
    ap.add_argument("--sample_steps", type=int, default=10, help="denoising steps of a rollout (T)")
    ap.add_argument("--sde_window", type=int, nargs=2, default=None, metavar=("A", "B"), help="make only denoising "
                    "steps A..B-1 stochastic and trained, the rest deterministic (Flow-GRPO-Fast). None: all but the "
                    "last (Flow-GRPO; SD3's default); the mini world's default is the first half (opd_student.py: "
                    "with --query dense)")
    ap.add_argument("--sde_window_size", type=int, default=0, metavar="K", help="Flow-GRPO-Fast: each training step "
                    "trains K consecutive steps at a random start within --sde_window (0: the whole window)")
    ap.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale in rollouts and "
                    "updates; 1 is none (SD3.5: 4.5)")
    ap.add_argument("--noise_level", type=float, default=0.7, help="the SDE's noise level, a in Eq. 5 (Flow-GRPO: 0.7)")
    ap.add_argument("--lr", type=float, default=3e-4, help="learning rate of AdamW (Flow-GRPO on SD3.5: 3e-4)")
    ap.add_argument("--rank", type=int, default=8, help="rank r of a new LoRA adapter (SD3.5: 32)")
    ap.add_argument("--alpha", type=float, default=16, help="LoRA alpha; the adapter is scaled by alpha / r (SD3.5: 64)")
    ap.add_argument("--clip", type=float, default=1e-4, help="clip range of Eq. 11's ratio, 1 +- this (Flow-GRPO's "
                    "1e-4: its log-probabilities are averaged over dimensions)")
    ap.add_argument("--inner_epochs", type=int, default=1, help="passes over each batch of rollouts")
    ap.add_argument("--micro_batch", type=int, default=64, help="samples per forward pass in the update (memory)")
    ap.add_argument("--max_grad_norm", type=float, default=1.0, help="gradients are clipped to this norm")
    ap.add_argument("--seed", type=int, default=0, help="seed of the adapter's init, the prompts and every noise")
    ap.add_argument("--save_every", type=int, default=50, help="write --out and a resumable checkpoint every N steps")
    ap.add_argument("--log_every", type=int, default=5, help="write a JSONL log record every N steps")
    ap.add_argument("--log_file", default=None, help="the JSONL log (default: runs/<--out's name>.jsonl)")
    ap.add_argument("--resolution", type=int, default=512, help="SD3 image size (the mini world is 32x32)")
    ap.add_argument("--max_sequence_length", type=int, default=128, help="SD3: T5 prompt tokens (Flow-GRPO: 128)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="base weights (auto: "
                    "bf16 for SD3 on CUDA); adapters and the SDE math stay float32")
    ap.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing in the transformer (SD3.5)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of --out")
    ap.add_argument("--overwrite", action="store_true", help="start again over a finished (or stopped) run's --out")
    ap.add_argument("--max_bad_steps", type=int, default=5, help="stop after this many NaN updates in a row")


def prompt_inputs(prompt_files):
    """{flag: path} of the prompt files (TASK=PATH or PATH), for check_out."""
    return {f"--prompt_file {s}": s.split("=", 1)[1] if "=" in s and not os.path.exists(s) else s
            for s in prompt_files or []}


def check_finite(args):
    """Every float flag is a finite number (argparse takes "nan" and "inf" for floats); a seed fits torch's."""
    for k, v in vars(args).items():
        if isinstance(v, float) and not math.isfinite(v):
            raise BadInput(f"--{k} must be a finite number, got {v}")
    if not 0 <= getattr(args, "seed", 0) < 2 ** 31:
        raise BadInput(f"--seed must be an integer from 0 to 2**31 - 1, got {args.seed}")


def parse(ap, argv, per_world):
    """Parse with per-world defaults: per_world(args parsed so far) -> {flag: default} for the mini world or SD3,
    set before the real parse, so that --help states them and args holds the values that run (nothing is
    changed after parsing); --help shows the defaults of the world that --model names."""
    argv = sys.argv[1:] if argv is None else argv
    ap.set_defaults(**per_world(ap.parse_known_args([a for a in argv if a not in ("-h", "--help")])[0]))
    return ap.parse_args(argv)


def check_common_args(args, world):
    """The shared flags' ranges (the sampling flags are check_sampling_args')."""
    check_finite(args)
    if not args.max_grad_norm > 0:
        raise BadInput(f"--max_grad_norm must be > 0 (gradients are clipped to it), got {args.max_grad_norm}")
    if not args.noise_level > 0:
        raise BadInput("--noise_level must be > 0 for training: the policy needs exploration (Eq. 5)")
    if (getattr(args, "eval_every", None) or 0) < 0:
        raise BadInput(f"--eval_every must be >= 0 (0: no evaluation during training), got {args.eval_every}")
    for name in ("steps", "prompts", "group", "rank", "inner_epochs", "micro_batch", "save_every", "log_every",
                 "max_bad_steps"):
        if getattr(args, name) < 1:
            raise BadInput(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not (args.lr > 0 and 0 < args.clip <= 10 and args.alpha > 0):
        raise BadInput("--lr and --alpha must be > 0, and --clip in (0, 10] (Eq. 11 clips the ratio to 1 +- clip)")
    if (args.prompts * args.group) % world:
        raise BadInput(f"the global batch --prompts x --group = {args.prompts * args.group} does not divide "
                       f"over {world} processes; change --prompts or --group")


def check_sampling_args(steps, guidance, noise_level, flag="--sample_steps", window=None, window_size=0):
    """The sampling flags' ranges, and the SDE window's (sde_sampler.sde_steps) against the steps."""
    if steps < 2:
        raise BadInput(f"{flag} (denoising steps) must be >= 2, got {steps}")
    if not 0 <= guidance <= 100:
        raise BadInput(f"--guidance must be in [0, 100] (1 = no guidance; SD3.5: 4.5), got {guidance}")
    if not 0 <= noise_level <= 2:
        raise BadInput(f"--noise_level (a of Eq. 5) must be in [0, 2], Flow-GRPO uses 0.7; got {noise_level}")
    a, b = window if window is not None else (0, steps - 1)
    if not 0 <= a < b <= steps - 1:
        raise BadInput(f"--sde_window {a} {b} must satisfy 0 <= a < b <= steps - 1 = {steps - 1}")
    if window_size and not 1 <= window_size <= b - a:
        raise BadInput(f"--sde_window_size {window_size} must be between 1 and the window's {b - a} steps")


def log_path(args):
    return args.log_file or os.path.join("runs", os.path.basename(args.out.rstrip("/")).rsplit(".", 1)[0] + ".jsonl")


def _step_of(line):
    """The step of a JSONL log line (None for a damaged one: a run killed mid-write)."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError, RecursionError):
        return None


def open_log(args, rank, start):
    """The JSONL log of rank 0, as a function log(record): opened at the first record (a run that stops before its
    first step leaves no log); on --resume it keeps the records up to the checkpoint's step and goes on from there,
    so one file holds the whole run, each step once."""
    path, state = log_path(args), {}

    def log(rec):
        if rank != 0:
            return
        if "f" not in state:
            kept = []
            if args.resume and os.path.isfile(path):
                kept = [l for l in open(path, errors="replace") if _step_of(l) is not None and _step_of(l) <= start]
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            state["f"] = open(path, "w")
            state["f"].writelines(kept)
        state["f"].write(json.dumps(rec) + "\n")
        state["f"].flush()
        tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
                            if "/reward/" not in k))
    return log


# ----------------------------------------------------------------------------------------------- signals, NaN guard
STOP = {}  # the signal that asked this process to stop


class Interrupted(Exception):
    """A stop signal arrived during a long call (a reward server's); the step is abandoned and checkpointed."""


def stop_signalled():
    return "signal" in STOP


def pause(seconds):
    """time.sleep that a stop signal ends at once (runs.Interrupted)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if stop_signalled():
            raise Interrupted("a stop signal arrived")
        time.sleep(min(0.05, end - time.monotonic()) if end > time.monotonic() else 0)


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


def any_rank(flag, world, device="cpu"):
    """Is `flag` true on some rank? (Every rank must call it.)"""
    t = torch.tensor([float(flag)], device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ----------------------------------------------------------------------------------------------- FSDP (--full)
def fsdp_shard(transformer, compute_dtype):
    """Shard each transformer block, then the whole, over the ranks (bf16 compute when the base is bf16, float32
    reduction): each GPU holds 1/world of the weights, gradients and AdamW state."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in transformer.transformer_blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(transformer, mp_policy=mp)
