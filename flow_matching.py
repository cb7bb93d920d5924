"""The model every other file uses, and flow matching (Eq. 1).

Two backends behind the same few functions (encode_prompts, velocity, to_images):
  mini : diffusers' SD3Transformer2DModel in pixel space on 32x32 RGB (no VAE) with a small learned text encoder
         over the mini world's vocabulary. `python flow_matching.py` pretrains it from scratch on the CPU.
  sd3  : Stable Diffusion 3 / 3.5 through diffusers' StableDiffusion3Pipeline (VAE latents, its text encoders).
Both run the same MMDiT, so velocity() is one function. A checkpoint is a plain safetensors file with a JSON config.

Eq. 1:  x_sigma = (1 - sigma) x_0 + sigma eps,   L_FM = E || v(x_sigma, sigma, c) - (eps - x_0) ||^2
"""
import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
from tqdm import tqdm

import checkpoints
import miniworld as mw
import runs
import sde_sampler as sampler
from runs import BadInput

warnings.filterwarnings("ignore", ".*torch_dtype.*", FutureWarning)  # diffusers' new name, `dtype`, is not in older ones

MINI_CONFIG = dict(sample_size=32, patch_size=4, in_channels=3, out_channels=3, num_layers=4, attention_head_dim=32,
                   num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128,
                   pooled_projection_dim=128, pos_embed_max_size=8)


class MiniTextEncoder(nn.Module):
    """Learned embeddings of the mini world's words -> the token sequence and pooled vector SD3's MMDiT expects."""

    def __init__(self, dim=128, pooled_dim=128):
        super().__init__()
        self.tok = nn.Embedding(len(mw.VOCAB), dim)
        # as large as the word embeddings: "47" vs "74" and "left of" differ only by position (0.02 gave OCR 0.18)
        self.pos = nn.Parameter(torch.randn(mw.MAX_TOKENS, dim))
        self.pool = nn.Linear(dim, pooled_dim)

    def forward(self, prompts):
        ids = torch.zeros(len(prompts), mw.MAX_TOKENS, dtype=torch.long)  # 0 = <pad>; "" is the null prompt
        for i, p in enumerate(prompts):
            t = mw.tokenize(p)[:mw.MAX_TOKENS]
            ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        seq = self.tok(ids.to(self.pos.device)) + self.pos  # (B, L, D)
        return seq, self.pool(seq.mean(1))                   # (B, L, D), (B, P)


@dataclass
class Model:
    transformer: nn.Module
    kind: str                     # "mini" or "sd3"
    text_encoder: nn.Module = None  # mini only
    pipe: object = None             # sd3 only: the StableDiffusion3Pipeline (VAE, text encoders, tokenizers)
    source: str = ""
    config: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    scheduler: object = None        # the pipeline's FlowMatchEulerDiscreteScheduler: its sigma grid is ours
    max_sequence_length: int = 128  # sd3: T5 tokens (Flow-GRPO's 128; the pipeline's default is 256)

    @property
    def device(self):
        return next(self.transformer.parameters()).device

    def latent_shape(self, resolution=None):
        if self.kind == "mini":
            return (3, 32, 32)
        r = (resolution or 512) // self.pipe.vae_scale_factor
        return (self.transformer.config.in_channels, r, r)


def mini_scheduler():
    """The mini world samples on SD3's sigma grid: the scheduler of SD3's pipeline, with its config (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def mini_config(depth=4, width=128):
    """SD3's MMDiT at the mini world's size: `depth` joint blocks, `width` = 32-dim heads x heads."""
    return {**MINI_CONFIG, "num_layers": depth, "num_attention_heads": width // 32, "caption_projection_dim": width}


def new_mini_model(seed=0, depth=4, width=128):
    torch.manual_seed(seed)
    from diffusers import SD3Transformer2DModel
    config = mini_config(depth, width)
    return Model(SD3Transformer2DModel(**config), "mini", text_encoder=MiniTextEncoder(), config=config,
                 scheduler=mini_scheduler())


def check_resolution(source, resolution, transformer_config, vae_factor):
    """An SD3 image side must be a positive multiple of the VAE's factor times the patch size (16 for SD3), and its
    patches must fit the transformer's position embeddings (pos_embed_max_size)."""
    unit = vae_factor * transformer_config["patch_size"]
    largest = unit * transformer_config["pos_embed_max_size"]
    if not (0 < resolution <= largest and resolution % unit == 0):
        raise BadInput(f"--resolution {resolution} does not fit {source}: it must be a multiple of {unit} (VAE factor "
                       f"{vae_factor} x patch {transformer_config['patch_size']}) between {unit} and {largest}")


def is_mini(source):
    """Is --model the mini world's (a .safetensors base) rather than an SD3 pipeline (a folder or hub id)?"""
    return source.endswith(".safetensors")


def load_model(source, device="cpu", dtype=torch.float32, resolution=512):
    """A mini checkpoint (.safetensors) or an SD3 pipeline (a diffusers directory or hub id). For SD3, --resolution is
    checked against the model (before loading when the directory is local)."""
    if is_mini(source):
        config, tensors = checkpoints.read_mini(source, mini_config)
        from diffusers import SD3Transformer2DModel
        model = Model(SD3Transformer2DModel(**config), "mini", text_encoder=MiniTextEncoder(), source=source, config=config,
                      scheduler=mini_scheduler())
        try:
            model.transformer.load_state_dict({k[12:]: v for k, v in tensors.items() if k.startswith("transformer.")})
            model.text_encoder.load_state_dict({k[13:]: v for k, v in tensors.items() if k.startswith("text_encoder.")})
        except RuntimeError:
            raise BadInput(f"{source} does not match the model its config describes; the file is damaged") from None
        model.transformer.to(device).requires_grad_(False)  # the mini model is float32
        model.text_encoder.to(device).requires_grad_(False)
        return model
    from diffusers import StableDiffusion3Pipeline
    absent = {}  # components saved as null (no T5, say) must be passed as None explicitly
    index = os.path.join(source, "model_index.json")
    if os.path.isfile(index):
        absent = {k: None for k, v in json.load(open(index)).items() if isinstance(v, list) and v[0] is None}
        try:
            t_cfg = json.load(open(os.path.join(source, "transformer", "config.json")))
            vae_cfg = json.load(open(os.path.join(source, "vae", "config.json")))
        except (OSError, ValueError):
            t_cfg = None
        if t_cfg:
            check_resolution(source, resolution, t_cfg, 2 ** (len(vae_cfg["block_out_channels"]) - 1))
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(source, torch_dtype=dtype, **absent)
    except Exception as e:
        raise BadInput(f"cannot load {source!r} as a Stable Diffusion 3 pipeline ({type(e).__name__}: {str(e)[:200]}); "
                       "give a mini .safetensors checkpoint or a diffusers SD3 directory / hub id") from None
    check_resolution(source, resolution, pipe.transformer.config, pipe.vae_scale_factor)
    pipe.to(device)
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, part) is not None:
            check_finite(getattr(pipe, part).requires_grad_(False), source, part)
    return Model(pipe.transformer, "sd3", pipe=pipe, source=source, config=dict(pipe.transformer.config),
                 scheduler=pipe.scheduler)


def check_finite(module, source, part="transformer"):
    """A NaN weight gives NaN images and rewards of 0 without a word: one pass over the weights finds it first (a
    second or so for SD3.5-M on a GPU)."""
    bad = next((n for n, p in module.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()), None)
    if bad:
        raise BadInput(f"{source}: {part}'s weight {bad} holds NaN or inf (a damaged download or a diverged "
                       "fine-tune); download the model again or use an earlier checkpoint")
    return module


def load_base(args, device):
    """The frozen base of a training run: --model in --precision (SD3 on CUDA: bf16 weights; LoRA and the SDE math
    stay float32), with --grad_ckpt."""
    model = load_model(args.model, device, dtype_for(args.precision, device), args.resolution)
    model.max_sequence_length = args.max_sequence_length
    if args.grad_ckpt:
        model.transformer.enable_gradient_checkpointing()
    return model


def recorded_path(source):
    """How an output records its base: an absolute path for a local file or folder (so that it resolves from any
    working directory), a hub id as it is."""
    return os.path.abspath(source) if os.path.exists(source) else source


def dtype_for(precision, device):
    """--precision: bf16, fp32, or auto (bf16 for SD3 on CUDA; the mini model is always float32)."""
    bf16 = precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def save_model(model, path, meta=None, transformer_state=None):
    """A mini base (transformer + text encoder) as safetensors; written to a temp file, then renamed.
    transformer_state: the transformer's weights when they live elsewhere (a full student gathered from FSDP)."""
    sd = {f"transformer.{k}": v for k, v in (transformer_state or model.transformer.state_dict()).items()}
    sd.update({f"text_encoder.{k}": v for k, v in model.text_encoder.state_dict().items()})
    sd = {k: v.detach().float().contiguous().cpu() for k, v in sd.items()}
    meta = {"format": "flow-opd-mini", "config": json.dumps(model.config), **(meta or {})}
    checkpoints.atomic_save(sd, path, {k: str(v) for k, v in meta.items()})


def full_student(model, transformer, pairs, scale, world):
    """--full: the student is a full copy of the base in float32, cold-started by folding the cold start's deltas
    (scale B A) into its weights; under torchrun sharded with FSDP (runs.fsdp_shard)."""
    with torch.no_grad():
        for mod, (A, B) in (pairs or {}).items():
            W = transformer.get_submodule(mod).weight
            W += (scale * B @ A).to(W)
    transformer.requires_grad_(True)
    if world > 1:
        runs.fsdp_shard(transformer, next(model.transformer.parameters()).dtype)
    return replace(model, transformer=transformer)


def save_full(out, model, sd, meta):
    """A full student (a state dict) at `out`: a mini checkpoint (eval.py reads it like a base), or for SD3 a
    diffusers transformer folder, written beside it and renamed."""
    if model.kind == "mini":
        return save_model(model, out, {"flow_opd": json.dumps(meta)}, transformer_state=sd)
    from diffusers import SD3Transformer2DModel
    t = SD3Transformer2DModel.from_config(model.transformer.config)
    t.load_state_dict(sd)
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t.save_pretrained(tmp)
    with open(os.path.join(tmp, "flow_opd.json"), "w") as f:  # what makes it ours to replace on a re-run
        json.dump(meta, f)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def fingerprint(model):
    """A short hash of every base weight (names, shapes and every value, as float32, so that a bf16 load and a
    float32 load of one base agree), so teachers trained on another base can be refused. Streamed tensor by tensor:
    SD3.5-M's 2.24B weights are about 9 GB of float32 through sha256, seconds on one core."""
    h = hashlib.sha256()
    for name, p in sorted(model.transformer.state_dict().items()):
        if ".lora_" in name:
            continue
        name = name.replace(".base.", ".")
        h.update(name.encode() + str(tuple(p.shape)).encode())
        h.update(p.detach().float().cpu().contiguous().numpy())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- the three functions
@torch.no_grad()
def _encode_sd3(model, texts):
    pipe = model.pipe
    for t in texts:  # the pipeline cuts a long prompt quietly (a logger warning); say it once, naming the window
        for tok, window in ((pipe.tokenizer, pipe.tokenizer.model_max_length), (pipe.tokenizer_3, model.max_sequence_length)):
            if tok is not None and len(tok(t).input_ids) > window:
                mw.warn(f"prompt {t!r} is longer than the text encoder's window of {window} tokens and is cut there")
    pe, _, pooled, _ = model.pipe.encode_prompt(texts, None, None, device=model.device, do_classifier_free_guidance=False,
                                                max_sequence_length=model.max_sequence_length)
    return pe, pooled


CACHE = 4096  # sd3 prompt embeddings kept (about 1.7 MB each for SD3.5 in bf16)


def encode_prompts(model, prompts):
    """Prompt dicts or strings -> {"seq": (B, L, D), "pooled": (B, P), "null_seq", "null_pooled"} for CFG.
    sd3 caches each prompt's embedding (computed once); mini recomputes (cheap, and trainable in pretraining)."""
    texts = [p["prompt"] if isinstance(p, dict) else p for p in prompts]
    if model.kind == "mini":
        seq, pooled = model.text_encoder(texts + [""])
        return {"seq": seq[:-1], "pooled": pooled[:-1], "null_seq": seq[-1:], "null_pooled": pooled[-1:]}
    missing = [t for t in dict.fromkeys(texts + [""]) if t not in model.cache]
    if missing:
        pe, pooled = _encode_sd3(model, missing)
        model.cache.update({t: (pe[i], pooled[i]) for i, t in enumerate(missing)})
        for t in list(model.cache)[:max(0, len(model.cache) - CACHE)]:  # the oldest go (T5 embeddings are large)
            if t not in texts and t != "":
                del model.cache[t]
    seq = torch.stack([model.cache[t][0] for t in texts])
    pooled = torch.stack([model.cache[t][1] for t in texts])
    return {"seq": seq, "pooled": pooled, "null_seq": model.cache[""][0][None], "null_pooled": model.cache[""][1][None]}


def select(enc, idx):
    """The rows `idx` of an encoding (the null prompt stays)."""
    return {**enc, "seq": enc["seq"][idx], "pooled": enc["pooled"][idx]}


def velocity(model, x, sigma, enc, guidance=1.0, detach_uncond=False):
    """v(x, sigma, c): (B, C, H, W), sigma a float or (B,). Classifier-free guidance as one batched forward, the
    unconditional half first as in StableDiffusion3Pipeline (detach_uncond: no gradient through that half)."""
    B = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(B)
    dtype = next(model.transformer.parameters()).dtype
    seq, pooled = enc["seq"], enc["pooled"]
    if guidance != 1.0:
        x = torch.cat([x, x])
        seq = torch.cat([enc["null_seq"].expand_as(seq), seq])
        pooled = torch.cat([enc["null_pooled"].expand_as(pooled), pooled])
        sigma = torch.cat([sigma, sigma])
    v = model.transformer(hidden_states=x.to(dtype), encoder_hidden_states=seq.to(dtype),
                          pooled_projections=pooled.to(dtype), timestep=sigma * 1000, return_dict=False)[0].float()
    if guidance != 1.0:
        v_uncond, v_cond = v.chunk(2)
        v_uncond = v_uncond.detach() if detach_uncond else v_uncond
        v = v_uncond + guidance * (v_cond - v_uncond)
    return v


def rollout(model, enc, steps, guidance=1.0, noise_level=0.7, sde=None, x=None, eps=None, generator=None,
            resolution=None):
    """The sampler (Eq. 5-6, sde_sampler.sample) with this model's velocity, on its pipeline's sigma grid.
    x: the initial noise (default: drawn from `generator`); the rest as sde_sampler.sample."""
    sigmas = sampler.sigma_schedule(model.scheduler, steps)
    if x is None:
        x = torch.randn((enc["seq"].shape[0], *model.latent_shape(resolution)), generator=generator, dtype=torch.float32)
    return sampler.sample(lambda x_t, sigma: velocity(model, x_t, sigma, enc, guidance), x.to(model.device), sigmas,
                          noise_level, sde, eps, generator)


@torch.no_grad()
def to_images(model, x):
    """Final samples -> images (B, 3, H, W) in [0, 1]."""
    if model.kind == "mini":
        return ((x.float() + 1) / 2).clamp(0, 1)
    vae = model.pipe.vae
    z = x.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return ((vae.decode(z, return_dict=False)[0].float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def from_images(model, images):
    """Images in [0, 1] -> x_0 (the inverse of to_images: pixels for mini, VAE latents for sd3)."""
    if model.kind == "mini":
        return images * 2 - 1
    vae = model.pipe.vae
    z = vae.encode(images.to(vae.dtype) * 2 - 1).latent_dist.sample()
    return ((z - vae.config.shift_factor) * vae.config.scaling_factor).float()


def flow_matching_loss(model, x0, enc, sigma=None, noise=None):
    """Eq. 1, per sample: || v(x_sigma, sigma, c) - (eps - x_0) ||^2 averaged over dimensions. (B,)"""
    B = x0.shape[0]
    if sigma is None:  # SD3's logit-normal sampling of sigma
        sigma = torch.sigmoid(torch.randn(B, device=x0.device))
    noise = torch.randn_like(x0) if noise is None else noise
    s = sigma.view(B, 1, 1, 1)
    x_sigma = (1 - s) * x0 + s * noise                              # Eq. 1, the optimal-transport path
    v = velocity(model, x_sigma, sigma, enc)
    return ((v - (noise - x0)) ** 2).mean((1, 2, 3))


# ----------------------------------------------------------------------------------------------- pretraining
def lr_at(step, steps, lr, warmup=200):
    return lr * min(1, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def main(argv=None):
    ap = runs.parser("Pretrain the mini world's base model with flow matching (Eq. 1).")
    ap.add_argument("--out", default="ckpts/base-retrained.safetensors",
                    help="the base checkpoint to write (the shipped ckpts/base.safetensors is never written over)")
    ap.add_argument("--steps", type=int, default=12000, help="training steps")
    ap.add_argument("--batch", type=int, default=32, help="images per step")
    ap.add_argument("--depth", type=int, default=4, help="MMDiT blocks")
    ap.add_argument("--width", type=int, default=128, help="MMDiT width (a multiple of its 32-dim heads)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warm-up, then cosine decay)")
    ap.add_argument("--ema", type=float, default=0.999, help="decay of the weights' EMA, which is what gets saved")
    ap.add_argument("--cfg_drop", type=float, default=0.1, help="fraction of prompts replaced by '' (for CFG)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the init, the data and the noise")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--save_every", type=int, default=1000, help="resumable checkpoint every N steps")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of --out")
    ap.add_argument("--overwrite", action="store_true", help="start again over a finished (or stopped) run's --out")
    ap.add_argument("--max_bad_steps", type=int, default=5, help="stop after this many NaN updates in a row")
    args = ap.parse_args(argv)
    runs.check_finite(args)
    if min(args.steps, args.batch, args.save_every, args.max_bad_steps) < 1 or not args.lr > 0 \
            or not 0 <= args.cfg_drop < 1 or not 0 <= args.ema < 1 or args.threads < 0 or args.depth < 1 \
            or args.width < 32 or args.width % 32:
        raise BadInput("--steps, --batch, --save_every, --max_bad_steps and --depth must be >= 1, --width a multiple "
                       "of 32, --lr > 0, 0 <= --cfg_drop < 1, 0 <= --ema < 1, --threads >= 0 (0: torch's default)")
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoints.check_out(args.out, {}, args.overwrite, args.resume, config=vars(args), own=("a base model",))
    checkpoints.lock_out(args.out, 0, 1)
    runs.catch_signals()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = new_mini_model(args.seed, args.depth, args.width)
    model.transformer.to(device), model.text_encoder.to(device)
    params = list(model.transformer.parameters()) + list(model.text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    prompts, rng = mw.train_prompts(mw.PRETRAIN_MIX, seed=args.seed, pretrain=True), random.Random(args.seed)
    start = 0
    if args.resume:
        tensors, meta, opt_state = checkpoints.load_state(args.out, vars(args), loop_rngs=[rng])
        if meta["step"] > args.steps:
            raise BadInput(f"--resume: the checkpoint is at step {meta['step']}, past --steps {args.steps}")
        checkpoints.restore_params(params, opt, tensors, opt_state, {"w": ema})  # (each tensor's shape checked)
        start = meta["step"]
        for _ in range(start * args.batch):  # the data position: the prompt stream is a seeded sequence
            next(prompts)
        print(f"resumed {args.out} at step {start}")
    n_params = sum(p.numel() for p in model.transformer.parameters())
    print(f"mini base: transformer {n_params / 1e6:.2f}M params, text encoder "
          f"{sum(p.numel() for p in model.text_encoder.parameters()) / 1e6:.2f}M; {args.steps} steps x {args.batch}")
    bins, bad, t0 = (torch.zeros(4), torch.zeros(4)), 0, time.time()
    for step in tqdm(range(start, args.steps), desc="pretrain", initial=start, total=args.steps, mininterval=2):
        batch = [next(prompts) for _ in range(args.batch)]
        x0 = from_images(model, torch.stack([mw.render(p["prompt"], rng, defects=True) for p in batch])).to(device)
        texts = ["" if rng.random() < args.cfg_drop else p["prompt"] for p in batch]
        sigma = torch.sigmoid(torch.randn(args.batch)).to(device)
        loss = flow_matching_loss(model, x0, encode_prompts(model, texts), sigma)  # Eq. 1
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        bad = runs.finite_or_skip(bool(torch.isfinite(grad_norm) and torch.isfinite(loss).all()), bad, step,
                             args.max_bad_steps, args.out)
        if not bad:
            opt.step()
            with torch.no_grad():
                decay = min(args.ema, (1 + step) / (10 + step))  # warm up, or the random init lingers in the average
                for e, p in zip(ema, params):
                    e.lerp_(p, 1 - decay)
                b = (sigma * 4).long().clamp(max=3).cpu()
                bins[0].index_add_(0, b, loss.detach().cpu())
                bins[1].index_add_(0, b, torch.ones(len(b)))
        if (step + 1) % 200 == 0 or step + 1 == args.steps:
            by_bin = " ".join(f"{v:.3f}" for v in (bins[0] / bins[1].clamp(min=1)).tolist())
            tqdm.write(f"step {step + 1:5d}  loss {float(bins[0].sum() / bins[1].sum()):.4f}  "
                       f"by sigma [0-.25 .25-.5 .5-.75 .75-1]: {by_bin}  lr {lr_at(step, args.steps, args.lr):.2e}  "
                       f"{time.time() - t0:.0f}s")
            bins[0].zero_(), bins[1].zero_()
        stop = runs.stop_requested(1)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps or stop:
            tensors = {**{f"param.{i}": p for i, p in enumerate(params)}, **{f"ema.{i}": e for i, e in enumerate(ema)}}
            checkpoints.save_state(args.out, step + 1, tensors, opt.state_dict(), {"config": vars(args)}, loop_rngs=[rng])
        if stop:
            print(f"stopped by {runs.STOP['signal']} after step {step + 1}; the same command with --resume continues")
            return
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    save_model(model, args.out, {"step": args.steps, "seed": args.seed, "params": n_params})
    print(f"saved {args.out} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    runs.run(main)
