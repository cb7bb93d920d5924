"""The model every other file uses, LoRA adapters, and flow matching (Eq. 1).

Two backends behind the same few functions (encode_prompts, velocity, to_images):
  mini : diffusers' SD3Transformer2DModel in pixel space on 32x32 RGB (no VAE) with a small learned text encoder
         over the mini world's vocabulary. `python flow_matching.py` pretrains it from scratch on the CPU.
  sd3  : Stable Diffusion 3 / 3.5 through diffusers' StableDiffusion3Pipeline (VAE latents, its text encoders).
Both run the same MMDiT, so velocity() is one function. A checkpoint is a plain safetensors file with a JSON config.

Eq. 1:  x_sigma = (1 - sigma) x_0 + sigma eps,   L_FM = E || v(x_sigma, sigma, c) - (eps - x_0) ||^2
"""
import argparse
import hashlib
import json
import math
import os
import re
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import miniworld as mw
from miniworld import BadInput

MINI_CONFIG = dict(sample_size=32, patch_size=4, in_channels=3, out_channels=3, num_layers=4, attention_head_dim=32,
                   num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128,
                   pooled_projection_dim=128, pos_embed_max_size=8)
MAX_TOKENS = 10
# Flow-GRPO's LoRA targets (peft names): the attention's image and text projections, in every attention module
# (SD3.5's dual-attention blocks have a second one, attn2)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class MiniTextEncoder(nn.Module):
    """Learned embeddings of the mini world's words -> the token sequence and pooled vector SD3's MMDiT expects."""

    def __init__(self, dim=128, pooled_dim=128):
        super().__init__()
        self.tok = nn.Embedding(len(mw.VOCAB), dim)
        # as large as the word embeddings: "47" vs "74" and "left of" differ only by position (0.02 gave OCR 0.18)
        self.pos = nn.Parameter(torch.randn(MAX_TOKENS, dim))
        self.pool = nn.Linear(dim, pooled_dim)

    def forward(self, prompts):
        ids = torch.zeros(len(prompts), MAX_TOKENS, dtype=torch.long)  # 0 = <pad>; "" is the null prompt
        for i, p in enumerate(prompts):
            t = mw.tokenize(p)[:MAX_TOKENS]
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

    @property
    def device(self):
        return next(self.transformer.parameters()).device

    def latent_shape(self, resolution=None):
        if self.kind == "mini":
            return (3, 32, 32)
        r = resolution or 512
        return (self.transformer.config.in_channels, r // 8, r // 8)


def new_mini_model(seed=0):
    torch.manual_seed(seed)
    from diffusers import SD3Transformer2DModel
    return Model(SD3Transformer2DModel(**MINI_CONFIG), "mini", text_encoder=MiniTextEncoder(), config=dict(MINI_CONFIG))


def load_model(source, device="cpu", dtype=torch.float32):
    """A mini checkpoint (.safetensors) or an SD3 pipeline (a diffusers directory or hub id)."""
    if source.endswith(".safetensors"):
        if not os.path.isfile(source):
            raise BadInput(f"checkpoint {source} does not exist; pretrain one with `python flow_matching.py --out {source}`")
        try:
            with safe_open(source, "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise BadInput(f"checkpoint {source} is not a readable safetensors file ({type(e).__name__}); "
                           "re-create it with `python flow_matching.py`") from None
        if meta.get("format") != "flow-opd-mini":
            raise BadInput(f"{source} is not a flow-opd base model (format={meta.get('format')!r}); "
                           "a LoRA teacher goes to --teachers, a base to --model")
        config = json.loads(meta["config"])
        from diffusers import SD3Transformer2DModel
        model = Model(SD3Transformer2DModel(**config), "mini", text_encoder=MiniTextEncoder(), source=source, config=config)
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
        pipe = StableDiffusion3Pipeline.from_pretrained(source, torch_dtype=dtype, **absent)
    except Exception as e:
        raise BadInput(f"cannot load {source!r} as a Stable Diffusion 3 pipeline ({type(e).__name__}: {str(e)[:200]}); "
                       "give a mini .safetensors checkpoint or a diffusers SD3 directory / hub id") from None
    pipe.to(device)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if m is not None:
            m.requires_grad_(False)
    return Model(pipe.transformer, "sd3", pipe=pipe, source=source, config=dict(pipe.transformer.config))


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
    atomic_save(sd, path, {k: str(v) for k, v in meta.items()})


def atomic_save(tensors, path, metadata):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; a shared checkpoint should follow the umask
    os.replace(tmp, path)  # never a half-written file over a good one


def fingerprint(model):
    """A short hash of the base weights, so teachers trained on another base can be refused."""
    h = hashlib.sha256()
    for name, p in sorted(model.transformer.state_dict().items()):
        if ".lora_" in name:
            continue
        name = name.replace(".base.", ".")
        h.update(name.encode() + str(tuple(p.shape)).encode())
        h.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- the three functions
@torch.no_grad()
def _encode_sd3(model, texts):
    pe, _, pooled, _ = model.pipe.encode_prompt(texts, None, None, device=model.device, do_classifier_free_guidance=False)
    return pe, pooled


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
    seq = torch.stack([model.cache[t][0] for t in texts])
    pooled = torch.stack([model.cache[t][1] for t in texts])
    return {"seq": seq, "pooled": pooled, "null_seq": model.cache[""][0][None], "null_pooled": model.cache[""][1][None]}


def select(enc, idx):
    """The rows `idx` of an encoding (the null prompt stays)."""
    return {**enc, "seq": enc["seq"][idx], "pooled": enc["pooled"][idx]}


def velocity(model, x, sigma, enc, guidance=1.0):
    """v(x, sigma, c): (B, C, H, W), sigma a float or (B,). Classifier-free guidance as one batched forward."""
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
        v = v_uncond + guidance * (v_cond - v_uncond)
    return v


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


# ----------------------------------------------------------------------------------------------- LoRA
class LoRALinear(nn.Module):
    """A frozen Linear plus named low-rank adapters; y = W x + (alpha / r) B A x for the active adapter."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.scaling, self.active = {}, None

    def add(self, name, rank, alpha):
        self.lora_A[name] = nn.Linear(self.base.in_features, rank, bias=False,
                                      device=self.base.weight.device, dtype=torch.float32)
        self.lora_B[name] = nn.Linear(rank, self.base.out_features, bias=False,
                                      device=self.base.weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))  # peft's init: B = 0, so a no-op at start
        nn.init.zeros_(self.lora_B[name].weight)
        self.scaling[name] = alpha / rank

    def delta(self, name):
        """The dense weight update (alpha / r) B A of one adapter: (out, in)."""
        return self.scaling[name] * self.lora_B[name].weight @ self.lora_A[name].weight

    def forward(self, x):
        y = self.base(x)
        if self.active is None:
            return y
        a = self.active
        return y + (self.lora_B[a](self.lora_A[a](x.float())) * self.scaling[a]).to(y.dtype)


def lora_layers(transformer):
    return {n: m for n, m in transformer.named_modules() if isinstance(m, LoRALinear)}


def add_lora(transformer, name, rank=32, alpha=64, targets=LORA_TARGETS):
    """Add a named adapter on every target projection (wrapping the Linear the first time)."""
    if rank < 1 or alpha <= 0:
        raise BadInput(f"LoRA rank must be >= 1 and alpha > 0, got rank={rank}, alpha={alpha}")
    for path, module in list(transformer.named_modules()):
        if isinstance(module, nn.Linear) and any(path == t or path.endswith("." + t) for t in targets) \
                and ".base" not in path:
            parent, _, child = path.rpartition(".")
            setattr(transformer.get_submodule(parent), child, LoRALinear(module))
    for layer in lora_layers(transformer).values():
        if name in layer.lora_A:
            raise BadInput(f"an adapter named {name!r} is already loaded")
        layer.add(name, rank, alpha)


def set_adapter(transformer, name):
    """Make one adapter active (None: the bare base model)."""
    for layer in lora_layers(transformer).values():
        layer.active = name


def adapter_params(transformer, name):
    return [p for l in lora_layers(transformer).values() for p in (l.lora_A[name].weight, l.lora_B[name].weight)]


def lora_pairs(transformer, name):
    """{module path: (A (r, in), B (out, r))} of one adapter, detached float32 on the CPU."""
    return {path: (layer.lora_A[name].weight.detach().float().cpu(), layer.lora_B[name].weight.detach().float().cpu())
            for path, layer in lora_layers(transformer).items() if name in layer.lora_A}


def write_lora(path, pairs, rank, alpha, meta):
    """Save factor pairs as safetensors with peft / diffusers key names (transformer.<module>.lora_A.weight), which
    diffusers' pipe.load_lora_weights reads, alpha where diffusers looks for it, and our metadata as JSON."""
    sd = {}
    for mod, (A, B) in pairs.items():
        sd[f"transformer.{mod}.lora_A.weight"] = A.contiguous()
        sd[f"transformer.{mod}.lora_B.weight"] = B.contiguous()
    targets = sorted({re.sub(r"^.*\.attn2?\.", "", m) for m in pairs})
    adapter = {"r": rank, "lora_alpha": alpha, "target_modules": targets}
    atomic_save(sd, path, {"format": "flow-opd-lora", "flow_opd": json.dumps(meta),
                           "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in adapter.items()})})


def save_lora(path, transformer, name, meta):
    layer = next(l for l in lora_layers(transformer).values() if name in l.lora_A)
    rank = layer.lora_A[name].weight.shape[0]
    write_lora(path, lora_pairs(transformer, name), rank, layer.scaling[name] * rank, meta)


def read_lora(path):
    """A LoRA from our .safetensors or a peft directory (adapter_model.safetensors + adapter_config.json).
    Returns ({module path: (A, B)}, rank, alpha, our metadata dict or {})."""
    if os.path.isdir(path):
        cfg_path, path = os.path.join(path, "adapter_config.json"), os.path.join(path, "adapter_model.safetensors")
        if not (os.path.isfile(cfg_path) and os.path.isfile(path)):
            raise BadInput(f"{os.path.dirname(path)} is not a peft adapter (needs adapter_config.json and adapter_model.safetensors)")
        cfg = json.load(open(cfg_path))
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise BadInput(f"{cfg_path}: per-module rank_pattern / alpha_pattern are not supported")
        rank, alpha, meta = cfg["r"], cfg["lora_alpha"], {}
    elif not os.path.isfile(path):
        raise BadInput(f"LoRA {path} does not exist; train one with grpo_teacher.py or give a peft adapter directory")
    else:
        rank = alpha = None
        meta = {}
    try:
        with safe_open(path, "pt") as f:
            m = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise BadInput(f"{path} is not a readable safetensors file ({type(e).__name__}); it may be truncated") from None
    if rank is None:
        if "lora_adapter_metadata" not in m:
            raise BadInput(f"{path} is not a LoRA adapter (no lora_adapter_metadata); a base model goes to --model")
        adapter = json.loads(m["lora_adapter_metadata"])
        rank, alpha = adapter["transformer.r"], adapter["transformer.lora_alpha"]
        meta = json.loads(m.get("flow_opd", "{}"))
    pairs = {}
    for k, v in tensors.items():
        for prefix in ("base_model.model.", "transformer."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.endswith(".lora_A.weight") or k.endswith(".lora_A.default.weight"):
            mod = k.split(".lora_A")[0]
            pairs.setdefault(mod, [None, None])[0] = v
        elif k.endswith(".lora_B.weight") or k.endswith(".lora_B.default.weight"):
            mod = k.split(".lora_B")[0]
            pairs.setdefault(mod, [None, None])[1] = v
    if not pairs or any(a is None or b is None for a, b in pairs.values()):
        raise BadInput(f"{path} holds no complete lora_A / lora_B pairs")
    return {k: tuple(v) for k, v in pairs.items()}, rank, alpha, meta


def fetch_adapter(path):
    """A local LoRA file or peft dir, or a hub id (owner/name, e.g. jieliu/SD3.5M-FlowGRPO-Text) fetched with
    huggingface_hub (a diffusers dependency). Returns a local path."""
    if os.path.exists(path) or path.endswith(".safetensors") or path.count("/") != 1:
        return path
    try:
        from huggingface_hub import snapshot_download
        local = snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:
        raise BadInput(f"{path} is neither a local path nor a downloadable hub adapter ({type(e).__name__}); "
                       "download it and give the directory") from None
    found = [r for r, _, files in os.walk(local) if "adapter_config.json" in files]
    return found[0] if len(found) == 1 else local


def load_lora(path, transformer, name):
    """Read a LoRA file or peft directory into a new named adapter. Returns our metadata (or {})."""
    pairs, rank, alpha, meta = read_lora(path)
    add_lora_pairs(transformer, name, pairs, rank, alpha, source=path)
    return meta


def add_lora_pairs(transformer, name, pairs, rank, alpha, source="adapter"):
    """A new adapter holding the given factors {module: (A, B)}; modules it does not name get a zero delta."""
    add_lora(transformer, name, rank, alpha, targets=tuple(pairs))
    layers = lora_layers(transformer)
    for mod, (A, B) in pairs.items():
        if mod not in layers:
            raise BadInput(f"{source}: the model has no module {mod}; the adapter was made for another architecture")
        layer = layers[mod]
        if A.shape != layer.lora_A[name].weight.shape or B.shape != layer.lora_B[name].weight.shape:
            raise BadInput(f"{source}: {mod} has shape A{tuple(A.shape)} B{tuple(B.shape)}, the model wants "
                           f"A{tuple(layer.lora_A[name].weight.shape)} B{tuple(layer.lora_B[name].weight.shape)}")
        layer.lora_A[name].weight.data.copy_(A)
        layer.lora_B[name].weight.data.copy_(B)
    for mod, layer in layers.items():
        if mod not in pairs and name in layer.lora_B:
            layer.lora_B[name].weight.data.zero_()


# ----------------------------------------------------------------------------------------------- runs survive
# A run writing OUT keeps one resumable checkpoint in a hidden folder beside it (shell globs skip it):
#   .OUT.resume/step_00000050/state.safetensors   weights, optimizer, step, data position (rank 0; JSON metadata)
#                             rng_rank<r>.json    every RNG state of process r
# written as .step_*.tmp and renamed once complete, so a crash never leaves a half checkpoint over a good one.
class Diverged(RuntimeError):
    """K updates in a row had a NaN / inf loss or gradient."""


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


def barrier(world):
    if world > 1:
        dist.barrier()


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


# ----------------------------------------------------------------------------------------------- pretraining
def lr_at(step, steps, lr, warmup=200):
    return lr * min(1, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Pretrain the mini world's base model with flow matching (Eq. 1).")
    ap.add_argument("--out", default="ckpts/base.safetensors")
    ap.add_argument("--steps", type=int, default=2300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--cfg_drop", type=float, default=0.1, help="fraction of prompts replaced by '' (for CFG)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--save_every", type=int, default=500, help="resumable checkpoint every N steps")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of --out")
    ap.add_argument("--max_bad_steps", type=int, default=5, help="stop after this many NaN updates in a row")
    args = ap.parse_args(argv)
    if min(args.steps, args.batch, args.save_every, args.max_bad_steps) < 1 or not args.lr > 0 \
            or not 0 <= args.cfg_drop < 1 or not 0 <= args.ema < 1:
        raise BadInput("--steps, --batch, --save_every and --max_bad_steps must be >= 1, --lr > 0, "
                       "0 <= --cfg_drop < 1, 0 <= --ema < 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    check_writable(args.out)
    catch_signals()

    model = new_mini_model(args.seed)
    params = list(model.transformer.parameters()) + list(model.text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    prompts, rng = mw.train_prompts(mw.PRETRAIN_MIX, seed=args.seed), random.Random(args.seed)
    start = 0
    if args.resume:
        tensors, meta, opt_state = load_state(args.out, vars(args), loop_rngs=[rng])
        opt.load_state_dict(opt_state)
        with torch.no_grad():
            for i, (p, e) in enumerate(zip(params, ema)):
                p.copy_(tensors[f"param.{i}"]), e.copy_(tensors[f"ema.{i}"])
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
        x0 = from_images(model, torch.stack([mw.render(p["prompt"], rng, defects=True) for p in batch]))
        texts = ["" if rng.random() < args.cfg_drop else p["prompt"] for p in batch]
        sigma = torch.sigmoid(torch.randn(args.batch))
        loss = flow_matching_loss(model, x0, encode_prompts(model, texts), sigma)  # Eq. 1
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        bad = finite_or_skip(bool(torch.isfinite(grad_norm) and torch.isfinite(loss).all()), bad, step,
                             args.max_bad_steps, args.out)
        if not bad:
            opt.step()
            with torch.no_grad():
                decay = min(args.ema, (1 + step) / (10 + step))  # warm up, or the random init lingers in the average
                for e, p in zip(ema, params):
                    e.lerp_(p, 1 - decay)
                b = (sigma * 4).long().clamp(max=3)
                bins[0].index_add_(0, b, loss.detach())
                bins[1].index_add_(0, b, torch.ones_like(loss))
        if (step + 1) % 200 == 0 or step + 1 == args.steps:
            by_bin = " ".join(f"{v:.3f}" for v in (bins[0] / bins[1].clamp(min=1)).tolist())
            tqdm.write(f"step {step + 1:5d}  loss {float(bins[0].sum() / bins[1].sum()):.4f}  "
                       f"by sigma [0-.25 .25-.5 .5-.75 .75-1]: {by_bin}  lr {lr_at(step, args.steps, args.lr):.2e}  "
                       f"{time.time() - t0:.0f}s")
            bins[0].zero_(), bins[1].zero_()
        stop = stop_requested(1)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps or stop:
            tensors = {**{f"param.{i}": p for i, p in enumerate(params)}, **{f"ema.{i}": e for i, e in enumerate(ema)}}
            save_state(args.out, step + 1, tensors, opt.state_dict(), {"config": vars(args)}, loop_rngs=[rng])
        if stop:
            print(f"stopped by {STOP['signal']} after step {step + 1}; `python flow_matching.py --resume` continues")
            return
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    save_model(model, args.out, {"step": args.steps, "seed": args.seed, "params": n_params})
    print(f"saved {args.out} ({time.time() - t0:.0f}s)")


def check_writable(path):
    """Fail before any work if OUT cannot be written; create nothing (folders are made when the file is saved)."""
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d) or not os.access(d, os.W_OK) or d.startswith("/proc"):
        raise BadInput(f"cannot write {path} ({d} is not a writable folder); choose another --out")


def run(main_fn):
    """Every script's entry point: bad input is one line on stderr and exit 2, never a traceback; a run that
    diverged is one line and exit 3."""
    try:
        main_fn()
    except (BadInput, Diverged) as e:
        if int(os.environ.get("RANK", 0)) == 0:  # under torchrun every rank sees it; say it once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, BadInput) else 3)


if __name__ == "__main__":
    run(main)
