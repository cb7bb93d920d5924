"""Table 2: sample each task's held-out prompts with the ODE and score them.

    python eval.py ckpts/base.safetensors ckpts/teachers/*.safetensors ckpts/student.safetensors

A checkpoint is a base model or a LoRA (a teacher or a student; it records its base, or give --model). Every row
uses the same prompts and the same initial noise, so rows differ only by the model. Columns as in the paper:
GenEval (strict: every check passes), OCR Acc., DeQA, PickScore, and Avg = mean(GenEval, OCR, DeQA/5, PickScore/26),
each with its standard error. Writes <out>/table.md, <out>/table.json, a grid <out>/<row>.png per checkpoint and
<out>/compare.png, the same prompts side by side across rows.
"""
import argparse
import json
import math
import os
import textwrap

import torch
from PIL import Image, ImageDraw

import flow_matching as fm
import lora
import miniworld as mw
import rewards
import runs
import sde_sampler as sampler
from runs import BadInput

COLUMNS = [("GenEval", "geneval"), ("OCR Acc.", "ocr"), ("DeQA", "deqa"), ("PickScore", "pickscore")]


def comparison(images_by_row, prompts, per_task=3, scale=3):
    """One picture: a row per checkpoint, the same prompts (per_task of each task) in the same columns."""
    names = list(images_by_row)
    cols = [i for i in range(len(prompts)) if i % 8 < per_task]
    H = images_by_row[names[0]].shape[-1] * scale
    left, top = 150, 46
    canvas = Image.new("RGB", (left + len(cols) * H, top + len(names) * H), "white")
    draw = ImageDraw.Draw(canvas)
    for j, i in enumerate(cols):
        draw.multiline_text((left + j * H + 2, 2), "\n".join(textwrap.wrap(prompts[i], 17)[:3]), fill="black")
    for r, name in enumerate(names):
        draw.multiline_text((4, top + r * H + H // 3), "\n".join(textwrap.wrap(name, 22)[:3]), fill="black")
        arr = (images_by_row[name].permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().cpu().numpy()
        for j, i in enumerate(cols):
            canvas.paste(Image.fromarray(arr[i]).resize((H, H), Image.NEAREST), (left + j * H, top + r * H))
    return canvas


def load_row(path, model_path=None, device="cpu", dtype=torch.float32):
    """A base checkpoint, or a LoRA applied to its base. Returns the model ready to sample."""
    if path.endswith(".safetensors") and os.path.isfile(path):
        from safetensors import safe_open
        try:
            with safe_open(path, "pt") as f:
                fmt = (f.metadata() or {}).get("format")
        except Exception:
            raise BadInput(f"{path} is not a readable safetensors file; it may be truncated") from None
        if fmt == "flow-opd-lora":
            meta = lora.read_lora(path)[3]
            base = model_path or meta.get("base_path")
            model = fm.load_model(base, device, dtype)
            if meta.get("base_hash") and meta["base_hash"] != fm.fingerprint(model):
                raise BadInput(f"{path} was trained on another base than {base} (hash {meta['base_hash']} vs "
                                  f"{fm.fingerprint(model)}); give the right --model")
            lora.load_lora(path, model.transformer, "row")
            lora.set_adapter(model.transformer, "row")
            return model
    if model_path and os.path.isfile(os.path.join(path, "config.json")):  # a full SD3 student (opd_student --full)
        from diffusers import SD3Transformer2DModel
        model = fm.load_model(model_path, device, dtype)
        model.transformer = SD3Transformer2DModel.from_pretrained(path, torch_dtype=dtype).to(device).requires_grad_(False)
        model.pipe.transformer = model.transformer
        return model
    if model_path and os.path.isdir(path):  # a peft adapter directory on --model
        model = fm.load_model(model_path, device, dtype)
        lora.load_lora(path, model.transformer, "row")
        lora.set_adapter(model.transformer, "row")
        return model
    return fm.load_model(path, device, dtype)


@torch.no_grad()
def evaluate(model, n=128, steps=10, guidance=1.0, seed=0, batch=64, resolution=512, prompts_by_task=None):
    """Score n held-out prompts per task (the mini world's, or the first n of each task's prompt file).
    Returns ({column: [scores]}, images, prompts) for the grid."""
    scores, images, shown = {}, [], []
    for task in mw.TASKS:
        prompts = (prompts_by_task or {}).get(task) or mw.eval_prompts(task, n)
        prompts = [prompts[i % len(prompts)] for i in range(n)]
        g = torch.Generator().manual_seed(seed + mw.TASKS.index(task))
        noise = torch.randn((n, *model.latent_shape(resolution)), generator=g)  # the same for every row
        vals = []
        for i in range(0, n, batch):
            chunk = prompts[i:i + batch]
            out = sampler.sample(model, fm.encode_prompts(model, chunk), steps, guidance, sde=[], x=noise[i:i + batch])
            img = fm.to_images(model, out["states"][:, -1])
            vals.append(rewards.REWARDS[task](img, chunk))
            if i == 0:
                images.append(img[:8])
                shown += [p["prompt"] for p in chunk[:8]]
        vals = torch.cat(vals)
        scores[task] = (vals == 1).float().tolist() if task == "geneval" else vals.tolist()  # GenEval is strict
        if task == "geneval":
            scores["geneval_category"] = [p.get("tag") or mw.geneval_category(p["prompt"]) for p in prompts]
    return scores, torch.cat(images), shown


def by_category(scores):
    """GenEval's strict accuracy in each of its categories (where the prompts have one): {category: (mean, n)}."""
    out = {}
    for ok, cat in zip(scores["geneval"], scores["geneval_category"]):
        if cat is not None:
            out.setdefault(cat, []).append(ok)
    return {cat: (sum(v) / len(v), len(v)) for cat, v in out.items()}


def category_markdown(raw):
    """A second table: GenEval per category, a row per checkpoint ("" when no prompt has a category)."""
    per_row = {name: by_category(scores) for name, scores in raw.items()}
    cats = list(dict.fromkeys(c for got in per_row.values() for c in got))
    if not cats:
        return ""
    n = {c: next(got[c][1] for got in per_row.values() if c in got) for c in cats}
    lines = ["| GenEval by category | " + " | ".join(f"{c} (n={n[c]})" for c in cats) + " |", "|---|" + "---|" * len(cats)]
    lines += [f"| {name} | " + " | ".join(f"{got[c][0]:.3f}" if c in got else "-" for c in cats) + " |"
              for name, got in per_row.items()]
    return "\n".join(lines)


def summarise(scores):
    """Mean and standard error per column, and Avg = mean(GenEval, OCR, DeQA/5, PickScore/26)."""
    row = {}
    for name, task in COLUMNS:
        v = torch.tensor(scores[task])
        row[name] = (float(v.mean()), float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0)
    avg = sum(row[name][0] / rewards.SCALE[task] for name, task in COLUMNS) / 4
    se = math.sqrt(sum((row[name][1] / rewards.SCALE[task]) ** 2 for name, task in COLUMNS)) / 4
    row["Avg"] = (avg, se)
    return row


def markdown(rows):
    cols = [c for c, _ in COLUMNS] + ["Avg"]
    lines = ["| Model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in rows.items():
        fmt = lambda c: f"{row[c][0]:.2f} ± {row[c][1]:.2f}" if c in ("DeQA", "PickScore") else f"{row[c][0]:.3f} ± {row[c][1]:.3f}"
        lines.append(f"| {name} | " + " | ".join(fmt(c) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Evaluate checkpoints on the held-out prompts: the paper's Table 2.")
    ap.add_argument("ckpts", nargs="+", help="base checkpoints or LoRA teachers/students (NAME=PATH to name a row)")
    ap.add_argument("--model", default=None, help="the base for LoRA checkpoints (default: recorded in the LoRA)")
    ap.add_argument("--n", type=int, default=128, help="held-out prompts per task")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="eval_out")
    ap.add_argument("--batch", type=int, default=64, help="samples per forward")
    ap.add_argument("--resolution", type=int, default=512, help="SD3 image size (the mini world is 32x32)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--prompt_file", nargs="+", default=None, help="TASK=PATH or JSONL {prompt, task}: evaluate "
                    "these prompts (the first --n of each task) instead of the mini world's held-out ones")
    rewards.add_args(ap)
    args = ap.parse_args(argv)
    if args.n < 2:
        raise BadInput(f"--n must be >= 2 prompts per task, got {args.n}")
    sampler.check_sampling_args(args.steps, args.guidance, 0.0)
    runs.check_writable(os.path.join(args.out, "table.md"))
    by_task = {}
    for spec in args.prompt_file or []:
        for p in mw.read_prompt_file(spec):
            by_task.setdefault(p["task"], []).append(p)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = fm.dtype_for(args.precision, device)
    rewards.use_backends(args, device)
    named = [c.split("=", 1) if "=" in c else (os.path.basename(c).rsplit(".", 1)[0], c) for c in args.ckpts]
    rows, raw, pictures = {}, {}, {}
    for name, path in named:
        model = load_row(path, args.model, device, dtype)
        scores, images, shown = evaluate(model, args.n, args.steps, args.guidance, args.seed, args.batch,
                                         args.resolution, by_task)
        rows[name], raw[name], pictures[name] = summarise(scores), scores, images
        print(markdown({name: rows[name]}).splitlines()[-1], flush=True)
    table = markdown(rows)
    cats = category_markdown(raw)
    table += "\n\n" + cats if cats else ""
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)  # only now: a bad row writes nothing
    for name, images in pictures.items():
        sampler.grid(images, shown).save(os.path.join(args.out, "".join(c if c.isalnum() or c in "-_." else "_" for c in name) + ".png"))
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump({"rows": rows, "scores": raw, "args": vars(args)}, f, indent=1)
    comparison(pictures, shown).save(os.path.join(args.out, "compare.png"))
    print(f"wrote {args.out}/table.md, table.json, compare.png (the same prompts across rows) and a grid per row")


if __name__ == "__main__":
    runs.run(main)
