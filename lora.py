"""LoRA written out by hand: a frozen Linear plus named low-rank adapters, switched by name, so that every teacher,
the MAR anchor and the student live as adapters on the one frozen base in memory. Files use peft / diffusers key
names (`transformer.<module>.lora_A.weight`), so diffusers' `pipe.load_lora_weights` reads ours and we read theirs.

    y = W x + scale B A x,   scale = alpha / r   (peft's use_rslora: alpha / sqrt(r))

Only the active adapter runs; a layer that an adapter does not cover adds nothing for it. A new adapter starts as
peft's init_lora_weights="gaussian" does (Flow-GRPO's choice): A ~ N(0, 1/r^2), B = 0, so it starts as a no-op.
Formats read: ours, a peft directory (adapter_config.json + adapter_model.safetensors, what Flow-GRPO publishes),
a diffusers `save_lora_weights` file or folder (pytorch_lora_weights.safetensors; without adapter metadata diffusers
takes alpha = r, and so do we). A LoRA variant these two formulas do not cover (DoRA, LoRA biases, trained biases,
modules_to_save, per-module rank or alpha patterns) is refused by name rather than loaded wrong. resolve_teachers
finds the teachers among adapters on disk (opd_student.py --teachers).
"""
import json
import math
import os
import re

import torch
import torch.nn as nn
from safetensors import safe_open

from checkpoints import atomic_save, read_safetensors
from runs import BadInput

# Flow-GRPO's LoRA targets (its train_sd3.py, matched by peft's suffix rule): the image and text projections of the
# joint attention. SD3.5's dual-attention blocks have a second attention, attn2, which this list does not match.
LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                "attn.to_out.0", "attn.to_q", "attn.to_v")


class LoRALinear(nn.Module):
    """A frozen Linear plus named low-rank adapters; y = W x + scale B A x for the active adapter."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.scaling, self.active = {}, None

    def add(self, name, rank, scale):
        self.lora_A[name] = nn.Linear(self.base.in_features, rank, bias=False,
                                      device=self.base.weight.device, dtype=torch.float32)
        self.lora_B[name] = nn.Linear(rank, self.base.out_features, bias=False,
                                      device=self.base.weight.device, dtype=torch.float32)
        nn.init.normal_(self.lora_A[name].weight, std=1 / rank)  # peft's "gaussian" init
        nn.init.zeros_(self.lora_B[name].weight)
        self.scaling[name] = scale

    def forward(self, x):
        y = self.base(x)
        a = self.active
        if a is None or a not in self.lora_A:  # the base, or an adapter that leaves this layer alone
            return y
        return y + (self.lora_B[a](self.lora_A[a](x.float())) * self.scaling[a]).to(y.dtype)


def lora_layers(transformer):
    return {n: m for n, m in transformer.named_modules() if isinstance(m, LoRALinear)}


def _matches(path, targets):
    return any(path == t or path.endswith("." + t) for t in targets)  # peft's suffix rule


def add_lora(transformer, name, rank=32, alpha=64, targets=LORA_TARGETS, scale=None):
    """Add a named adapter of rank r on every Linear matching `targets` (wrapping it the first time)."""
    if rank < 1 or alpha <= 0:
        raise BadInput(f"LoRA rank must be >= 1 and alpha > 0, got rank={rank}, alpha={alpha}")
    if any(name in layer.lora_A for layer in lora_layers(transformer).values()):
        raise BadInput(f"an adapter named {name!r} is already loaded")
    width = min((min(m.in_features, m.out_features) for p, m in transformer.named_modules()
                 if isinstance(m, nn.Linear) and _matches(p, targets)), default=rank)
    if rank > width:
        raise BadInput(f"LoRA rank {rank} exceeds the adapted layers' width {width} (a LoRA that wide is a full matrix); "
                       f"give --rank {width} or less, or --full")
    added = 0
    for path, module in list(transformer.named_modules()):
        if isinstance(module, LoRALinear) and _matches(path, targets):
            module.add(name, rank, alpha / rank if scale is None else scale)
            added += 1
        elif isinstance(module, nn.Linear) and _matches(path, targets) and ".base" not in path:
            parent, _, child = path.rpartition(".")
            layer = LoRALinear(module)
            layer.add(name, rank, alpha / rank if scale is None else scale)
            setattr(transformer.get_submodule(parent), child, layer)
            added += 1
    if not added:
        raise BadInput(f"adapter {name!r}: no module of the model matches its targets {sorted(targets)[:4]}...")


def set_adapter(transformer, name):
    """Make one adapter active (None: the bare base model)."""
    layers = lora_layers(transformer).values()
    if name is not None and not any(name in layer.lora_A for layer in layers):
        raise KeyError(f"no adapter named {name!r}")
    for layer in layers:
        layer.active = name


def active_adapter(transformer):
    return next(iter(lora_layers(transformer).values())).active


def adapter_params(transformer, name):
    return [p for l in lora_layers(transformer).values() if name in l.lora_A
            for p in (l.lora_A[name].weight, l.lora_B[name].weight)]


def lora_pairs(transformer, name):
    """{module path: (A (r, in), B (out, r))} of one adapter, detached float32 on the CPU."""
    return {path: (layer.lora_A[name].weight.detach().float().cpu(), layer.lora_B[name].weight.detach().float().cpu())
            for path, layer in lora_layers(transformer).items() if name in layer.lora_A}


def write_lora(path, pairs, scale, meta):
    """Save factor pairs as safetensors with peft / diffusers key names (transformer.<module>.lora_A.weight), the
    adapter config where diffusers' load_lora_weights looks for it, and our metadata as JSON."""
    sd = {}
    for mod, (A, B) in pairs.items():
        sd[f"transformer.{mod}.lora_A.weight"] = A.contiguous()
        sd[f"transformer.{mod}.lora_B.weight"] = B.contiguous()
    ranks = {A.shape[0] for A, _ in pairs.values()}
    assert len(ranks) == 1, "one rank for every module"
    rank = ranks.pop()
    targets = sorted({re.sub(r"^.*\.(attn2?\.)", r"\1", m) for m in pairs})  # attn.to_q, attn2.to_q, ...
    adapter = {"r": rank, "lora_alpha": scale * rank, "target_modules": targets}
    atomic_save(sd, path, {"format": "flow-opd-lora", "flow_opd": json.dumps(meta),
                           "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in adapter.items()})})


def save_lora(path, transformer, name, meta):
    layer = next(l for l in lora_layers(transformer).values() if name in l.lora_A)
    write_lora(path, lora_pairs(transformer, name), layer.scaling[name], meta)


# ----------------------------------------------------------------------------------------------- reading adapters
UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "a LoRA bias", "modules_to_save": "modules_to_save",
               "rank_pattern": "a per-module rank_pattern", "alpha_pattern": "a per-module alpha_pattern"}


def adapter_scale(config, where):
    """The scale of a peft LoRA config (adapter_config.json, or diffusers' lora_adapter_metadata): alpha / r, or
    alpha / sqrt(r) with use_rslora. A field we cannot honour exactly is refused by name."""
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise BadInput(f"{where}: {key}={config[key]!r} ({what}) is not supported; only plain LoRA (optionally "
                           "use_rslora) loads exactly here")
    if config.get("bias", "none") not in ("none", None):
        raise BadInput(f"{where}: bias={config['bias']!r} trains the base layers' biases, which this loader does not "
                       "apply; only bias='none' is supported")
    if config.get("peft_type", "LORA") != "LORA":
        raise BadInput(f"{where}: peft_type={config['peft_type']!r}; only LORA adapters are supported")
    try:
        r, alpha = config["r"], config["lora_alpha"]
        assert isinstance(r, int) and r >= 1 and isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0
    except KeyError as e:
        raise BadInput(f"{where} lacks the field {e.args[0]!r}; a LoRA config needs r and lora_alpha") from None
    except AssertionError:
        raise BadInput(f"{where}: r must be an integer >= 1 and lora_alpha a positive number, got r={config['r']!r}, "
                       f"lora_alpha={config['lora_alpha']!r}") from None
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def read_lora(path):
    """A LoRA from our .safetensors, a peft directory, or a diffusers file / folder.
    Returns ({module path: (A, B)}, scale, our metadata dict or {})."""
    config = None
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):  # peft
            cfg_path, path = os.path.join(path, "adapter_config.json"), os.path.join(path, "adapter_model.safetensors")
            try:
                config = json.load(open(cfg_path))
                assert isinstance(config, dict)
            except (ValueError, AssertionError, UnicodeDecodeError, RecursionError):
                raise BadInput(f"{cfg_path} is not a JSON object; re-save the adapter with peft") from None
            config = {**config, "_where": cfg_path}
        elif os.path.isfile(os.path.join(path, "pytorch_lora_weights.safetensors")):  # diffusers' save_lora_weights
            path = os.path.join(path, "pytorch_lora_weights.safetensors")
        else:
            raise BadInput(f"{path} is not a LoRA folder: it holds neither adapter_config.json (peft) nor "
                           "pytorch_lora_weights.safetensors (diffusers)")
    if not os.path.isfile(path):
        raise BadInput(f"LoRA {path} does not exist; train one with grpo_teacher.py or give a peft adapter directory")
    m, tensors = read_safetensors(path, "it may be truncated")
    meta = our_meta(m, path)
    if config is None and "lora_adapter_metadata" in m:  # ours, or diffusers' with its metadata
        try:
            adapter = json.loads(m["lora_adapter_metadata"])
            assert isinstance(adapter, dict)
        except (ValueError, AssertionError, RecursionError):
            raise BadInput(f"{path}: its lora_adapter_metadata is not a JSON object; the file is damaged") from None
        config = {k.split(".", 1)[1]: v for k, v in adapter.items() if k.startswith("transformer.")}
        config["_where"] = f"{path} (lora_adapter_metadata)"
    pairs, other = {}, []
    for k, v in tensors.items():
        for prefix in ("base_model.model.", "transformer."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        hit = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", k)
        if hit and not v.is_floating_point():
            raise BadInput(f"{path}: {k} holds {v.dtype} values; LoRA factors are floating point (the file is damaged)")
        if hit:
            pairs.setdefault(hit.group(1), [None, None])["AB".index(hit.group(2))] = v.float()
        else:
            other.append(k)
    if not pairs:
        raise BadInput(f"{path} is not a LoRA adapter (no lora_A / lora_B weights); a base model goes to --model")
    if other:
        kind = ("DoRA (lora_magnitude_vector)" if any("lora_magnitude_vector" in k for k in other) else
                "LoRA biases (lora_bias)" if any(".lora_" in k and k.endswith(".bias") for k in other) else
                "kohya-style .alpha keys" if any(k.endswith(".alpha") for k in other) else
                "trained biases or modules_to_save")
        raise BadInput(f"{path} holds {kind}, e.g. {other[0]}; only plain LoRA pairs are supported")
    if any(a is None or b is None for a, b in pairs.values()):
        raise BadInput(f"{path} holds an incomplete lora_A / lora_B pair")
    for m, (a, b) in pairs.items():  # lora_A (r, in), lora_B (out, r)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise BadInput(f"{path}: {m} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; a LoRA pair is "
                           "lora_A (r, in) and lora_B (out, r)")
    if not all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in pairs.values()):
        raise BadInput(f"{path} holds NaN or inf weights (a diverged run?); give a finite adapter")
    if config is None and meta:  # ours always records its scale: without it the delta would be off by alpha / r
        raise BadInput(f"{path}: a flow-opd LoRA without its lora_adapter_metadata (r, lora_alpha); the file is damaged")
    if config is None:  # diffusers' save_lora_weights without metadata: diffusers then takes alpha = r (scale 1)
        scale = 1.0
    else:
        scale = adapter_scale(config, config["_where"])
        ranks = {a.shape[0] for a, _ in pairs.values()}
        if len(ranks) != 1 or config["r"] not in ranks:
            raise BadInput(f"{config['_where']}: r={config['r']!r} but the weights have rank(s) {sorted(ranks)}")
    return {k: tuple(v) for k, v in pairs.items()}, scale, meta


def our_meta(m, path):
    """This project's metadata of a checkpoint ("flow_opd": JSON), its fields' types checked: {} when absent."""
    try:
        meta = json.loads(m.get("flow_opd", "{}"))
        assert isinstance(meta, dict) and isinstance(meta.get("role", ""), str)
        assert isinstance(meta.get("base_hash", ""), (str, type(None))) and isinstance(meta.get("base_path", ""), (str, type(None)))
        assert isinstance(meta.get("tasks", []), list) and all(isinstance(t, str) for t in meta.get("tasks", []))
    except (ValueError, AssertionError, RecursionError):
        raise BadInput(f"{path}: its flow_opd metadata is damaged (not the JSON object this project writes); "
                       "re-create the file or move it away") from None
    return meta


def adapter_kind(path):
    """What a path holds: ("lora", our metadata or {}), ("base", metadata) for a model (a mini checkpoint, a full
    student, a diffusers folder), ("folder", {}) for a plain folder, ("other", {}) for anything else. A .safetensors
    file that cannot be read is an error, never a skip: a truncated teacher must not vanish from a run."""
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, f)) for f in ("adapter_config.json", "pytorch_lora_weights.safetensors")):
            return "lora", {}
        if any(os.path.isfile(os.path.join(path, f)) for f in ("model_index.json", "config.json")):
            return "base", {}
        return "folder", {}
    if not path.endswith(".safetensors"):
        return "other", {}
    try:
        with safe_open(path, "pt") as f:
            m, keys = f.metadata() or {}, list(f.keys())
    except Exception as e:
        raise BadInput(f"{path} cannot be read ({type(e).__name__}); it may be truncated: re-create it or move it "
                       "away") from None
    meta = our_meta(m, path)
    if m.get("format") == "flow-opd-mini":
        return "base", meta
    return ("lora", meta) if any(".lora_A." in k for k in keys) else ("other", {})


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
    """Read a LoRA file or folder into a new named adapter. Returns our metadata (or {})."""
    pairs, scale, meta = read_lora(path)
    add_lora_pairs(transformer, name, pairs, scale, source=path)
    return meta


def add_lora_pairs(transformer, name, pairs, scale, source="adapter"):
    """A new adapter holding the given factors {module: (A, B)} on exactly those modules."""
    layers = {p: m for p, m in transformer.named_modules() if isinstance(m, (nn.Linear, LoRALinear))}
    for mod, (A, B) in pairs.items():
        if mod not in layers:
            raise BadInput(f"{source}: the model has no module {mod}; the adapter was made for another architecture")
        base = layers[mod].base if isinstance(layers[mod], LoRALinear) else layers[mod]
        if A.shape[1] != base.in_features or B.shape[0] != base.out_features or A.shape[0] != B.shape[1]:
            raise BadInput(f"{source}: {mod} has shape A{tuple(A.shape)} B{tuple(B.shape)}, the model wants "
                           f"A(r, {base.in_features}) B({base.out_features}, r)")
    if any(name in layer.lora_A for layer in lora_layers(transformer).values()):
        raise BadInput(f"an adapter named {name!r} is already loaded")
    for mod, (A, B) in pairs.items():
        layer = transformer.get_submodule(mod)
        if not isinstance(layer, LoRALinear):
            parent, _, child = mod.rpartition(".")
            layer = LoRALinear(layer)
            setattr(transformer.get_submodule(parent), child, layer)
        layer.add(name, A.shape[0], scale)
        layer.lora_A[name].weight.data.copy_(A)
        layer.lora_B[name].weight.data.copy_(B)


def resolve_teachers(specs):
    """--teachers entries -> routes {task label: path} (Eq. 7's k(c)) and what was skipped, with why.
    LABEL=PATH routes an adapter explicitly. A folder is an adapter (adapter_config.json, a diffusers LoRA file) or
    is searched one level deep, hidden entries (resume folders) skipped; a file is a teacher when its metadata says
    so (grpo_teacher.py's); a base, a mix, a merge or a student is skipped; an unreadable .safetensors is an error."""
    routes, skipped, queue = {}, [], [(s, 0) for s in specs]
    while queue:
        spec, depth = queue.pop(0)
        label, path = (None, spec)
        if "=" in spec and not os.path.exists(spec):
            label, path = spec.split("=", 1)
        path = fetch_adapter(path)
        if not os.path.exists(path):
            raise BadInput(f"teacher {path} does not exist; train one with `python grpo_teacher.py --reward TASK`")
        kind, meta = adapter_kind(path)
        if kind == "folder" and label is None and depth == 0:
            queue += [(os.path.join(path, f), 1) for f in sorted(os.listdir(path)) if not f.startswith(".")]
            continue
        if label is None and (kind != "lora" or meta.get("role") != "teacher"):
            skipped.append((path, f"a {meta['role']}" if meta.get("role") else {
                "lora": "a LoRA without a task label: name it LABEL=PATH", "base": "a base model",
                "folder": "a folder", "other": "not a checkpoint"}[kind]))
            continue
        if kind != "lora":
            raise BadInput(f"{path} is not a LoRA adapter; a teacher is a grpo_teacher.py output or a peft dir")
        tasks = [label] if label else meta.get("tasks")
        if not tasks or not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise BadInput(f"teacher {path}: its metadata names no task (\"tasks\": {tasks!r}); route it with LABEL=PATH")
        for task in tasks:
            if task in routes:
                raise BadInput(f"two teachers claim task {task!r}: {routes[task]} and {path}; keep one, or "
                               f"route explicitly with {task}=PATH")
            routes[task] = path
    if not routes:
        raise BadInput(f"no teachers among {' '.join(specs)}; give grpo_teacher.py outputs, a folder of them, or "
                       "LABEL=PATH")
    return routes, skipped


# ----------------------------------------------------------------------------------------------- cold start
