"""Where a run writes, and how it survives: --out checked before any work (never an input, never another run's
result, one run at a time), files written atomically, and one resumable checkpoint per run that --resume restores
exactly (weights, optimizer, EMA, every RNG, the prompt position), on one process or many.

A run writing OUT keeps its checkpoint in a hidden folder beside it (shell globs skip it):
    .OUT.resume/step_00000050/state.safetensors   weights, optimizer, step, data position (rank 0; JSON metadata)
                              rng_rank<r>.json    every RNG state of process r
written as .step_*.tmp and renamed once complete, so a crash never leaves a half checkpoint over a good one.
"""
import json
import os
import random
import shutil
import tempfile

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from runs import CREATED, BadInput, barrier


def check_writable(path, flag="--out"):
    """Fail before any work if `path` cannot be written, by writing: its missing folders are made now (and removed
    again if the run then stops on bad input), and the temp file the save will write (the final name + ".tmp<pid>")
    is created and removed, so that a name too long, a path over PATH_MAX, a folder reached through `..` or a
    read-only place fail now, not after the work. Nothing stays."""
    if path.endswith(("/", os.sep)) or os.path.isdir(path) or os.path.basename(path) in ("", ".", ".."):
        raise BadInput(f"{flag} {path} is a folder (or ends with '/' or '.'); give the path of the file to write")
    if os.path.islink(path):  # a write would land in the link's target, whatever that is
        raise BadInput(f"{flag} {path} is a symbolic link; give the path of the file itself")
    if os.path.lexists(state_dir(path)) and (os.path.islink(state_dir(path)) or not os.path.isdir(state_dir(path))):
        raise BadInput(f"{state_dir(path)}, where {path}'s run keeps its checkpoints, is a link or a file; remove it "
                       f"or choose another {flag}")
    if os.path.exists(path) and not os.path.isfile(path):
        raise BadInput(f"{flag} {path} exists and is not a regular file (a device, a pipe); choose another {flag}")
    try:
        path.encode("utf-8")  # the path goes into JSON logs and safetensors metadata
    except UnicodeEncodeError:
        raise BadInput(f"{flag} {path.encode('utf-8', 'replace').decode()!r} holds bytes that are not UTF-8; "
                       f"rename it or choose another {flag}") from None
    if len(os.path.basename(path)) > 200:  # + the temp suffix and the resume folder's, within the file system's 255
        raise BadInput(f"{flag}: the file name {os.path.basename(path)[:40]}... is too long ({len(os.path.basename(path))} "
                       "characters, at most 200)")
    folder = os.path.dirname(path) or "."
    deepest = os.path.join(state_dir(path), ".step_00000000.tmp", "rng_rank00000.json")  # the longest path a run writes
    try:
        made = []
        d = folder
        while d and not os.path.isdir(d):
            made.append(d)
            d = os.path.dirname(d)
        if len(os.fsencode(os.path.abspath(deepest))) >= os.pathconf(d or ".", "PC_PATH_MAX"):
            raise OSError(36, "the path is too long for its checkpoints (PATH_MAX)")
        CREATED.extend(made)
        os.makedirs(folder, exist_ok=True)  # `alias/..` resolves as the kernel does, through the link
        probe = f"{path}.tmp{os.getpid()}"
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise BadInput(f"cannot write {path[:120]} ({e.strerror or e}); choose another {flag}") from None


def atomic_save(tensors, path, metadata):
    """safetensors written to a temp file, then renamed: never a half-written file over a good one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # (not abspath: `link/..` is where the link points)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; a shared checkpoint should follow the umask
    os.replace(tmp, path)


def check_out(out, inputs, overwrite=False, resume=False, folder=False, config=None, world=1, may_change=(),
              log=None, resumable=True, own=None):
    """Before any work: --out (and the run's JSONL `log`) is never one of the run's inputs (nor inside its resume
    folder) nor each other, is a file path (or, folder=True, a folder this project wrote), and a finished run's
    output or log is replaced only with --overwrite (--resume continues it), and only if it is one of ours of the
    kinds in `own` (what_is) and a log of ours. inputs: {flag: path}."""
    outputs = {"--out": out, **({"--log_file": log} if log else {})}
    for oflag, o in outputs.items():
        real = os.path.realpath(o)
        for flag, path in list(inputs.items()) + ([("--out", out)] if oflag == "--log_file" else []):
            if path and os.path.exists(path) and (os.path.realpath(path) == real or os.path.exists(o) and
                                                   os.path.samefile(path, o) or  # a hard link too
                                                   os.path.realpath(path).startswith(state_dir(out) + os.sep)):
                raise BadInput(f"{oflag} {o} is also this run's {flag}: it would be written over; choose another {oflag}")
            if path and os.path.isdir(path) and real.startswith(os.path.realpath(path) + os.sep):  # a peft folder's file
                raise BadInput(f"{oflag} {o} is inside this run's {flag} (a folder): it would write over or add to an "
                               f"input; choose another {oflag}")
        if os.path.isfile(o) and shipped(o):
            raise BadInput(f"{oflag} {o} is the {shipped(o)} this project ships, which no run replaces (--overwrite "
                           f"neither); write to another {oflag}")
        if oflag == "--out" and folder:
            if os.path.exists(o) and not os.path.isfile(os.path.join(o, "flow_opd.json")):
                raise BadInput(f"--out {o} exists and was not written by this project; choose a new folder")
        else:
            check_writable(o, oflag)
    if log and os.path.realpath(log) == os.path.realpath(out):
        raise BadInput(f"--log_file {log} is also --out; choose another --log_file")
    if log and os.path.realpath(log).startswith(state_dir(out) + os.sep):
        raise BadInput(f"--log_file {log} is inside the run's checkpoint folder, which each checkpoint replaces; "
                       "choose another --log_file")
    if overwrite and log and os.path.isfile(log) and not ours_log(log):
        raise BadInput(f"--log_file {log} exists and is not a training log (JSON lines of steps); --overwrite replaces "
                       "only a log; choose another --log_file")
    if overwrite and own and os.path.isfile(out) and what_is(out) not in own:
        raise BadInput(f"--out {out} is {what_is(out) or 'not a file of this project'}, not this script's output "
                       f"({' or '.join(own)}): --overwrite replaces only that; choose another --out")
    done = [p for p in (out, log) if p and os.path.exists(p)]
    if resumable and os.path.isdir(state_dir(out)) and any(d.startswith("step_") for d in os.listdir(state_dir(out))):
        done.append(state_dir(out))
    if done == [log] and not (overwrite or resume) and ours_log(log):
        raise BadInput(f"{log} exists but {out} and its checkpoints do not: a run of this --out stopped before its "
                       "first checkpoint (nothing is lost by starting again: pass --overwrite), or the log is another "
                       "run's whose --out has the same file name (give this run its own --log_file)")
    if done and not (overwrite or resume):
        raise BadInput(f"{' and '.join(done)} exist{'s' if len(done) == 1 else ''} (a finished or stopped run's): pass "
                       + ("--resume to continue that run, " if resumable else "") + "--overwrite to replace "
                       + ("them" if len(done) > 1 else "it") + ", or choose another --out"
                       + (" (and --log_file)" if log else ""))
    if overwrite and resume:
        raise BadInput("--overwrite starts the run again and --resume continues it; give one")
    if config is not None and resume:  # the checkpoint's flags and world size, checked now; the weights come later
        load_state(out, config, world=world, read_tensors=False, restore_rng=False, may_change=may_change)


def ours_log(path):
    """Is this a training log of ours (JSON lines with a "step")? Its first line decides."""
    try:
        with open(path) as f:
            return "step" in json.loads(f.readline())
    except (OSError, ValueError, TypeError, RecursionError):
        return False


def read_safetensors(path, fix, what=""):
    """(metadata, tensors) of a safetensors file, or one line saying it is not one (truncated, another format)."""
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise BadInput(f"{what}{path} is not a readable safetensors file ({type(e).__name__}); {fix}") from None


def read_mini(source, mini_config):
    """A mini base file, checked before any work: safetensors whose metadata says format "flow-opd-mini" and holds
    the "config" of its SD3Transformer2DModel (mini_config(depth, width): only the depth, num_layers, and the width,
    32 x num_attention_heads, vary), and finite float tensors "transformer.*" and "text_encoder.*". (config, tensors)"""
    if not os.path.isfile(source):
        raise BadInput(f"checkpoint {source} does not exist; pretrain one with `python flow_matching.py --out {source}`")
    meta, tensors = read_safetensors(source, "re-create it with `python flow_matching.py`", "checkpoint ")
    if meta.get("format") != "flow-opd-mini":
        raise BadInput(f"{source} is not a flow-opd base model (format={meta.get('format')!r}); "
                       "a LoRA teacher goes to --teachers, a base to --model")
    try:
        config = json.loads(meta["config"])
        depth, heads = config["num_layers"], config["num_attention_heads"]
        assert type(depth) is int and type(heads) is int and 1 <= depth <= 64 and 1 <= heads <= 64
        assert config == mini_config(depth, 32 * heads)
    except (KeyError, TypeError, ValueError, AssertionError, RecursionError):
        raise BadInput(f"{source}: its \"config\" metadata is not a mini model's ({str(meta.get('config'))[:60]!r}); "
                       "re-create the file with `python flow_matching.py`") from None
    bad = next((k for k, v in tensors.items() if not v.is_floating_point() or not torch.isfinite(v).all()), None)
    if bad:
        raise BadInput(f"{source}: its tensor {bad} is not finite floats (NaN or inf: a diverged run?); use an "
                       "earlier checkpoint")
    return config, tensors


def what_is(path):
    """A model file of ours: "a base model", or "a <role>" of a LoRA (a teacher, a mix, a merge, a student...);
    None for anything else."""
    try:
        with safe_open(path, "pt") as f:
            m = f.metadata() or {}
        role = json.loads(m.get("flow_opd", "{}")).get("role")
    except Exception:
        return None
    return "a base model" if m.get("format") == "flow-opd-mini" else f"a {role}" if isinstance(role, str) else None


def shipped(path):
    """What a model file that ships with the project is ("base", "teacher"), from its metadata; None otherwise."""
    try:
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("flow_opd_shipped")
    except Exception:  # not a safetensors file: not one of ours
        return None


def lock_out(out, rank, world, device="cpu", flag="--out"):
    """Hold a lock on --out for the life of the run, so that two runs never write one output. The lock is an
    flock on a file in the system's temp folder (named by --out's real path): it dies with the process, so a killed
    run leaves none behind, and nothing is written beside the outputs. Every rank learns rank 0's verdict."""
    import fcntl
    import hashlib
    ok = torch.ones(1, device=device)
    if rank == 0:
        name = hashlib.sha1(os.fsencode(os.path.realpath(out))).hexdigest()[:16]
        folder = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()  # not $TMPDIR: one place for every run
        LOCK[out] = open(os.path.join(folder, f"flow-opd-{name}.lock"), "w")
        try:
            fcntl.flock(LOCK[out], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            ok.zero_()
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        raise BadInput(f"another run is writing {out} right now; wait for it, or choose another {flag}")


LOCK = {}


# ----------------------------------------------------------------------------------------------- checkpoints, --resume
def state_dir(out):
    d, name = os.path.split(out)
    return os.path.join(os.path.realpath(d or "."), f".{name}.resume")  # the whole name: x.safetensors, x.png differ


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
    if len(st["loop"]) != len(loop_rngs):
        raise ValueError("another number of loop RNGs")
    for r, s in zip([random, *loop_rngs], [st["python"], *st["loop"]]):
        r.setstate((s[0], tuple(s[1]), s[2]))


def save_state(out, step, tensors, opt_state, meta, loop_rngs=(), rank=0, world=1, rng=None):
    """One resumable checkpoint of `step` (every rank calls it), replacing the previous one only once complete.
    opt_state: the optimizer's state dict as rank 0 holds it (`opt.state_dict()`, or FSDP's gathered one).
    rng: the RNG states to record (default: now); a step abandoned mid-way records those of its start."""
    root = state_dir(out)
    tmp, final = os.path.join(root, f".step_{step:08d}.tmp"), os.path.join(root, f"step_{step:08d}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(world)
    with open(os.path.join(tmp, f"rng_rank{rank}.json"), "w") as f:
        json.dump(rng or rng_states(*loop_rngs), f)
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


def load_state(out, config, rank=0, world=1, loop_rngs=(), may_change=(), read_tensors=True, restore_rng=True):
    """The latest checkpoint of the run writing `out`: restores every RNG, returns (tensors, meta, optimizer state
    dict). Refuses other flags than the run's (except those that may change: --steps, logging) and another world
    size. read_tensors=False reads the metadata alone (FSDP: rank 0 reads the weights and broadcasts them)."""
    root = state_dir(out)
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []
    if not steps:
        raise BadInput(f"--resume: no checkpoint of {out} in {root} (a run stopped before its first one?); start it "
                       "again without --resume (with --overwrite if its log exists)")
    path = os.path.join(root, steps[-1])
    try:
        with safe_open(os.path.join(path, "state.safetensors"), "pt") as f:
            meta = json.loads(f.metadata()["flow_opd_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()} if read_tensors else {}
        rng = json.load(open(os.path.join(path, f"rng_rank{rank}.json")))
    except Exception as e:
        raise BadInput(f"--resume: {path} is damaged ({type(e).__name__}); delete it to start from scratch") from None
    # the state's metadata: {"step": int, "world": int, "config": {flag: value}, "param_groups": [{...}], ...}
    fields = {"step": int, "world": int, "config": dict, "param_groups": list}
    bad = ["the metadata"] if not isinstance(meta, dict) else \
        [k for k, t in fields.items() if type(meta.get(k)) is not t or t is int and meta[k] < 0]
    bad += [f"the tensor {k}" for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise BadInput(f"--resume: {path} is damaged ({bad[0]}: missing, of another type or not finite); delete it "
                       "to start from scratch")
    if meta["world"] != world:
        raise BadInput(f"--resume: {path} was written by {meta['world']} process(es), this run has {world}; "
                       f"resume with --nproc_per_node={meta['world']}")
    may_change = {"steps", "resume", "overwrite", "save_every", "log_every", "log_file", "threads", "max_bad_steps",
                  "grad_ckpt", "eval_every", "eval_n", "reward_timeout", "reward_retries",
                  *[k for k in config if k.endswith("_url")], *may_change}  # what cannot change the result
    now = json.loads(json.dumps(config))
    changed = [f"--{k} was {meta['config'].get(k)!r}, now {v!r}" if k != "prompt_sha256" else
               "the prompt files hold other prompts than when the run started" for k, v in now.items()
               if k not in may_change and meta["config"].get(k) != v]  # (--micro_batch too: it changes the sums)
    if changed:
        raise BadInput(f"--resume with other flags than the run's: {'; '.join(changed)}; resume with the same flags "
                       "or drop --resume to start over")
    state = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            i, name = k[4:].rsplit(".", 1)  # a parameter's index, or its name (FSDP's full state dict)
            state.setdefault(int(i) if i.isdigit() else i, {})[name] = v
    if restore_rng:
        try:
            set_rng_states(rng, *loop_rngs)
        except Exception as e:
            raise BadInput(f"--resume: {path}/rng_rank{rank}.json is damaged ({type(e).__name__}); delete {path} to "
                           "go back to no checkpoint, or drop --resume to start over") from None
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
    if meta["step"] > args.steps:
        raise BadInput(f"--resume: the checkpoint of {args.out} is at step {meta['step']}, past --steps {args.steps}; "
                       f"give --steps {meta['step']} or more")
    for _ in range(meta["step"] * args.prompts):  # the data position: the prompt stream is a seeded sequence
        next(stream)
    if rank == 0:
        print(f"resumed {args.out} at step {meta['step']}")
    return meta["step"], tensors, opt_state


def check_teacher_set(args, meta):
    """--resume must distil the same teachers (content, not just paths) toward the same anchor: say what changed."""
    if not args.resume:
        return
    old = load_state(args.out, vars(args), world=meta["world"], read_tensors=False, restore_rng=False,
                     may_change=("teachers", "anchor"))[1]
    try:
        was, now = {t["task"]: t for t in old["teachers"]}, {t["task"]: t for t in meta["teachers"]}
        old_anchor = old["anchor"]
        assert all(isinstance(t, dict) and "path" in t for t in was.values())
    except (KeyError, TypeError, AssertionError):
        raise BadInput(f"--resume: the checkpoint of {args.out} does not list its teachers and anchor (damaged); "
                       "drop --resume and pass --overwrite to start over") from None
    sha = lambda x: x.get("sha256") if isinstance(x, dict) else x  # noqa: E731  (content, wherever the file now is)
    changes = [f"{t}: {was[t]['path'] if t in was else 'none'} -> {now[t]['path'] if t in now else 'none'}"
               + (" (same path, new content)" if t in was and t in now and was[t]["path"] == now[t]["path"] else "")
               for t in sorted(set(was) | set(now)) if sha(was.get(t)) != sha(now.get(t))]
    changes += [f"anchor: {old_anchor} -> {meta['anchor']}"] if sha(old_anchor) != sha(meta["anchor"]) else []
    if changes:
        raise BadInput(f"--resume with another teacher set than the checkpoint's: {'; '.join(changes)}; resume "
                       "with the original teachers, or drop --resume to start over")


def restore_params(params, opt, tensors, opt_state, ema=None):
    """--resume: the trained weights, the optimizer, and the EMA ({"w": weights, "k": its update count}), each
    checked against the run's own shapes first."""
    want = {**{f"param.{i}": p.shape for i, p in enumerate(params)},
            **{f"ema.{i}": e.shape for i, e in enumerate((ema or {}).get("w", []))}}
    bad = next((k for k, shape in want.items() if k not in tensors or tensors[k].shape != shape), None)
    bad = bad or next((f"opt.{i}" for i, st in opt_state["state"].items() if not isinstance(i, int) or i >= len(params)
                       or set(st) != {"step", "exp_avg", "exp_avg_sq"}  # AdamW's
                       or any(v.dim() and v.shape != params[i].shape for v in st.values())), None)
    bad = bad or ("ema_k" if "ema_k" in tensors and (tensors["ema_k"].numel() != 1 or tensors["ema_k"] < 0) else None)
    if bad:
        raise BadInput(f"--resume: the checkpoint's {bad} is missing, out of range or of another shape than this run's "
                       "weights (damaged, or another model); drop --resume and pass --overwrite to start over")
    try:  # the hyperparameters are this run's own (its flags, compared already), not the file's
        opt.load_state_dict({"state": opt_state["state"], "param_groups": opt.state_dict()["param_groups"]})
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise BadInput(f"--resume: the checkpoint's optimizer state does not fit this run ({type(e).__name__}); drop "
                       "--resume and pass --overwrite to start over") from None
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
        for i, e in enumerate((ema or {}).get("w", [])):
            e.copy_(tensors[f"ema.{i}"])
    if ema is not None and "ema_k" in tensors:
        ema["k"] = int(tensors["ema_k"])


def checkpoint(args, save_out, params, opt, meta, order_rng, rank, world, ema=None, rng=None):
    """What the next stage reads at --out (rank 0 calls save_out(meta)) and the resumable state beside it: the
    trained weights, their EMA ({"w": weights, "k": its update count}) and the optimizer."""
    if rank == 0:
        save_out({**meta, "config": vars(args)})
    ema = ema or {}
    tensors = {**{f"param.{i}": p for i, p in enumerate(params)}, **{f"ema.{i}": e for i, e in enumerate(ema.get("w", []))},
               "ema_k": torch.tensor([ema.get("k", 0)])}
    save_state(args.out, meta["step"], tensors, opt.state_dict(), {**meta, "config": vars(args)}, [order_rng], rank,
               world, rng)


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
    try:
        set_model_state_dict(module, sd, options=options)
        set_optimizer_state_dict(module, opt, opt_state if sd else {}, options=options)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise BadInput(f"--resume: the checkpoint's weights or optimizer state do not fit this run ({type(e).__name__})"
                       "; drop --resume and pass --overwrite to start over") from None
