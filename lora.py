"""LoRA written out by hand: a frozen Linear plus named low-rank adapters, switched by name, so that every teacher,
the MAR anchor and the student live as adapters on the one frozen base in memory. Files use peft / diffusers key
names (`transformer.<module>.lora_A.weight`), so diffusers' `pipe.load_lora_weights` reads ours and we read peft's.

    y = W x + (alpha / r) B A x        (the active adapter; B = 0 at init, so an adapter starts as a no-op)
"""
import json
import math
import os
import re

import torch
import torch.nn as nn
from safetensors import safe_open

from runs import BadInput, atomic_save

# Flow-GRPO's LoRA targets (peft names): the attention's image and text projections, in every attention module
# (SD3.5's dual-attention blocks have a second one, attn2)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


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
