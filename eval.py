"""Table 2: sample each task's held-out prompts with the ODE and score them.

    python eval.py ckpts/base.safetensors ckpts/teachers/*.safetensors ckpts/students/opd.safetensors
A checkpoint is a base model or a LoRA (a teacher or a student; it records its base, or give --model). Every row
uses the same prompts and the same initial noise, so rows differ only by the model. Columns as in the paper:
GenEval (strict: every check passes), OCR Acc., DeQA, PickScore, and Avg = mean(GenEval, OCR, DeQA/5, PickScore/26),
each with its standard error. --ood adds Table 3's analogue (ood.py: compositions no stage sees), --quality Table
4's (quality.py: metrics no reward optimises) and variety.png (the same prompts under four noises: MAR's picture).
Writes table.md, table.json, a grid <row>.png per checkpoint and compare.png (the same prompts side by side across
rows) into --out, a new folder or one an earlier evaluation wrote. --pool pools seeds, --curves draws training
curves (curves.py)."""
import json
import math
import os
import textwrap

import torch
from PIL import Image, ImageDraw

import checkpoints
import curves
import flow_matching as fm
import lora
import miniworld as mw
import ood
import quality
import real_rewards
import rewards
import runs
import sample
from runs import BadInput

COLUMNS = [("GenEval", "geneval"), ("OCR Acc.", "ocr"), ("DeQA", "deqa"), ("PickScore", "pickscore")]
CATEGORY_NAMES = {"single_object": "single object", "two_object": "two objects", "counting": "counting",
                  "colors": "colours", "position": "position", "color_attr": "colour attribution"}  # GenEval's six


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


def row_source(path, model_path):
    """What a row is, read before any work: ("lora" | "transformer" | "model", the base it samples with)."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(
            os.path.join(path, "model_index.json")):  # a full SD3 student (opd_student --full): a transformer folder
        if not model_path:
            raise BadInput(f"{path} is a transformer alone; give its pipeline with --model")
        return "transformer", model_path
    if not os.path.exists(path) and (path.endswith(".safetensors") or path.count("/") != 1 or
                                     os.path.isdir(path.split("/")[0])):  # "t/ocr" beside a folder t: a local typo
        raise BadInput(f"{path} does not exist; give a checkpoint, a LoRA, a diffusers folder or hub id (owner/name)")
    kind, meta = lora.adapter_kind(path) if os.path.exists(path) else ("model", {})
    if kind == "lora":
        base = model_path or meta.get("base_path")
        if not base:
            raise BadInput(f"{path} is a LoRA that does not record its base; give it with --model")
        if base.endswith(".safetensors") and not os.path.isfile(base):
            raise BadInput(f"{path} records its base as {base}, which does not exist here; give the base with --model")
        return "lora", base
    if kind in ("other", "folder"):
        raise BadInput(f"{path} is neither a model nor a LoRA; give base checkpoints, LoRAs or NAME=PATH")
    if model_path and os.path.exists(model_path) and os.path.exists(path) and not os.path.samefile(model_path, path):
        raise BadInput(f"{path} is a whole model, which --model {model_path} (the base of LoRA rows) does not apply to; "
                       "evaluate the two as separate rows")
    return "model", path


def load_row(path, kind, base, device="cpu", dtype=torch.float32, resolution=512):
    """A model ready to sample: a base, a LoRA applied to its base, or a full transformer on its pipeline."""
    model = fm.load_model(base, device, dtype, resolution)
    if kind == "transformer":
        from diffusers import SD3Transformer2DModel
        model.transformer = fm.check_finite(SD3Transformer2DModel.from_pretrained(path, torch_dtype=dtype), path)
        model.pipe.transformer = model.transformer.to(device).requires_grad_(False)
    elif kind == "lora":
        meta = lora.load_lora(path, model.transformer, "row")
        if meta.get("base_hash") and meta["base_hash"] != fm.fingerprint(model):
            raise BadInput(f"{path} was trained on another base than {base} (hash {meta['base_hash']} vs "
                           f"{fm.fingerprint(model)}); give the right --model")
        lora.set_adapter(model.transformer, "row")
    return model


def slug(name):
    """A row's name as a file name: "Flow-OPD (Merge) w/o MAR" -> "flow-opd-merge-w-o-mar"."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split()) or "row"


def _sample(model, prompts, noise, steps, guidance, batch, each):
    """ODE samples of the prompts from this noise, batch by batch: each(images, prompts, start) sees every batch."""
    for i in range(0, len(prompts), batch):
        if runs.stop_signalled():  # Ctrl-C / SIGTERM: stop within one batch
            raise runs.Interrupted("a stop signal arrived during the evaluation")
        chunk = prompts[i:i + batch]
        out = fm.rollout(model, fm.encode_prompts(model, chunk), steps, guidance, sde=[], x=noise[i:i + batch])
        each(fm.to_images(model, out["states"][:, -1]).float().cpu(), chunk, i)


@torch.no_grad()
def evaluate(model, n=128, steps=10, guidance=1.0, seed=0, batch=64, resolution=512, prompts_by_task=None,
             ood_kinds=False, quality_metrics=False):
    """Score n held-out prompts per task (the mini world's, or the first n of each task's prompt file); with
    ood_kinds, also n prompts of each out-of-distribution kind (Table 3); with quality_metrics, the held-out quality
    metrics (Table 4): aesthetic and agreement on the same pictures, diversity on min(16, n) prompts per task x
    4 noises.
    Returns ({column: [scores]}, images, prompts) for the grid, and the diversity pictures (for variety.png)."""
    scores, images, shown, variety = {}, [], [], []

    def noise(k, m):  # the same for every row: Table 2's task k, an OOD kind (10 + k), diversity (20 + k)
        return torch.randn((m, *model.latent_shape(resolution)), generator=torch.Generator().manual_seed(seed + k))

    for k, task in enumerate(mw.TASKS):
        prompts = (prompts_by_task or {}).get(task) or mw.eval_prompts(task, n)
        prompts = [prompts[i % len(prompts)] for i in range(n)]
        vals = []

        def each(img, chunk, i):
            vals.append(rewards.metric(task)(img, chunk))
            if quality_metrics:
                scores.setdefault("quality:aesthetic", []).extend(quality.aesthetic(img).tolist())
                scores.setdefault("quality:agreement", []).extend(quality.agreement(img, chunk).tolist())
            if i == 0:
                images.append(img[:8])
                shown.extend(p["prompt"] for p in chunk[:8])
        _sample(model, prompts, noise(k, n), steps, guidance, batch, each)
        scores[task] = torch.cat(vals).tolist()
        if task == "geneval":
            scores["geneval_category"] = [p.get("tag") or mw.geneval_category(p["prompt"]) for p in prompts]
    for k, kind in enumerate(ood.KINDS if ood_kinds else ()):
        vals, prompts = [], ood.eval_prompts(kind, n)  # all of a kind that has fewer than n
        _sample(model, prompts, noise(10 + k, len(prompts)), steps, guidance, batch,
                lambda img, chunk, i: vals.append(ood.score(img, chunk)))
        scores[f"ood:{kind}"] = torch.cat(vals).tolist()
    for k, task in enumerate(mw.TASKS if quality_metrics else ()):
        pics, m = [], min(16, n)
        prompts = [p for p in mw.eval_prompts(task, m) for _ in range(4)]  # 16 prompts (at most n) x 4 noises
        _sample(model, prompts, noise(20 + k, 4 * m), steps, guidance, batch, lambda img, chunk, i: pics.append(img))
        pics = torch.cat(pics).view(m, 4, *pics[0].shape[1:])
        scores.setdefault("quality:diversity", []).extend(quality.diversity(pics).tolist())
        variety.append(pics[:2].flatten(0, 1))  # the first two prompts of each task, 4 noises each
    return scores, torch.cat(images), shown, variety


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
    lines = ["| GenEval by category | " + " | ".join(f"{CATEGORY_NAMES.get(c, c)} (n={n[c]})" for c in cats) + " |",
             "|---|" + "---|" * len(cats)]
    lines += [f"| {name} | " + " | ".join(f"{got[c][0]:.3f}" if c in got else "-" for c in cats) + " |"
              for name, got in per_row.items()]
    return "\n".join(lines)


# The tables: (title, [(column, score key)], the mean column). Table 2's mean is the paper's Avg (DeQA / 5,
# PickScore / 26); Tables 3 and 4 appear when their scores were asked for (--ood, --quality).
TABLES = [("Table 2", COLUMNS, "Avg"),
          ("Table 3 (out of distribution)", [("Binding", "ood:binding"), ("Three objects", "ood:three"),
                                             ("Numeracy", "ood:numeracy"), ("Spatial", "ood:spatial"),
                                             ("Scene", "ood:scene")], "OOD mean"),
          ("Table 4 (held-out quality)", [("Aesthetic", "quality:aesthetic"), ("Agreement", "quality:agreement"),
                                          ("Diversity", "quality:diversity")], None)]


def tables_of(scores):
    """The tables whose scores are all there."""
    return [t for t in TABLES if all(key in scores for _, key in t[1])]


def summarise(scores):
    """Mean and standard error per column of every table present, and each table's mean column (Table 2's Avg =
    mean(GenEval, OCR, DeQA/5, PickScore/26))."""
    row = {}
    for _, columns, mean_name in tables_of(scores):
        for name, key in columns:
            v = torch.tensor(scores[key])
            row[name] = (float(v.mean()), float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0)
        if mean_name:
            scale = [rewards.SCALE.get(key, 1.0) for _, key in columns]
            row[mean_name] = (sum(row[c][0] / s for (c, _), s in zip(columns, scale)) / len(columns),
                              math.sqrt(sum((row[c][1] / s) ** 2 for (c, _), s in zip(columns, scale))) / len(columns))
    return row


def fmt(column, mean, spread, sign=""):
    """DeQA and PickScore with two decimals, the fractions with three."""
    return f"{mean:{sign}.2f} ± {spread:.2f}" if column in ("DeQA", "PickScore") else f"{mean:{sign}.3f} ± {spread:.3f}"


def markdown(rows, table=TABLES[0]):
    cols = [c for c, _ in table[1]] + ([table[2]] if table[2] else [])
    lines = ["| Model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(c, *row[c]) for c in cols) + " |")
    return "\n".join(lines)


def paired(tables, a, b, table=TABLES[0]):
    """Row a minus row b over the same prompts and noise, pooled over tables (seeds): {column: (mean, standard
    error)}, and the mean column's, whose error combines the columns' (they are scored on different prompts)."""
    out, columns, mean_name = {}, table[1], table[2]
    for name, key in columns:
        d = torch.tensor([x - y for t in tables for x, y in zip(t["scores"][a][key], t["scores"][b][key])])
        out[name] = (float(d.mean()), float(d.std() / math.sqrt(len(d))))
    if mean_name:
        scale = [rewards.SCALE.get(key, 1.0) for _, key in columns]
        out[mean_name] = (sum(out[n][0] / s for (n, _), s in zip(columns, scale)) / len(columns),
                          math.sqrt(sum((out[n][1] / s) ** 2 for (n, _), s in zip(columns, scale))) / len(columns))
    return out


def pool(paths):
    """Several seeds' table.json -> for each table they all hold, the mean table (+- the seeds' standard deviation)
    and the paired differences the README quotes (95% interval = 1.96 standard errors)."""
    tables = [json.load(open(p)) for p in paths]
    seeds = [t["args"]["seed"] for t in tables]
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"two tables come from the same seed ({seeds}); pool one table per seed")
    for k in ("n", "steps", "guidance", "resolution", "prompt_file", "model"):  # one setting, several seeds
        if len({json.dumps(t["args"].get(k)) for t in tables}) > 1:
            raise ValueError(f"the tables were made with different --{k}; pool the seeds of one setting")
    names = list(tables[0]["rows"])
    if any(list(t["rows"]) != names for t in tables) or not all(math.isfinite(x) for t in tables for r in
                                                              t["scores"].values() for _, c in COLUMNS for x in r[c]):
        raise ValueError("the tables hold different rows, or a NaN score; pool whole tables of one pipeline")
    teachers = [f"GRPO-{r}" for r in ("GenEval", "OCR", "PickScore", "DeQA")]
    pairs = [(a, b) for a, b in [("Flow-OPD (Merge)", b) for b in ["GRPO-Mix", *teachers, "Flow-OPD (Merge) w/o MAR",
                                                                     "Merge", "Merge+GRPO-Mix"]]
             + [("Flow-OPD (SFT)", "SFT+GRPO-Mix"), ("Flow-OPD (SFT)", "GRPO-Mix")] + [("GRPO-Mix", t) for t in teachers]
             + [(t, "Base") for t in teachers] if a in names and b in names]
    held = [[t[0] for t in tables_of(tb["scores"][names[0]])] for tb in tables]
    if any(h != held[0] for h in held):
        raise ValueError(f"the tables hold different tables ({' / '.join(', '.join(h) for h in held)}); evaluate "
                         "every seed with the same --ood and --quality")
    lines = []
    for table in tables_of(tables[0]["scores"][names[0]]):
        title, columns, mean_name = table
        cols = [c for c, _ in columns] + ([mean_name] if mean_name else [])
        lines += ([] if table is TABLES[0] else ["", f"{title}:", ""])
        lines += [f"| Model ({len(tables)} seeds) | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for n in names:
            cells = []
            for c in cols:
                v = torch.tensor([t["rows"][n][c][0] for t in tables])
                cells.append(fmt(c, float(v.mean()), float(v.std()) if len(v) > 1 else 0.0))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines += ["", "| paired difference (pooled over seeds) | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for a, b in pairs:
            d = paired(tables, a, b, table)
            lines.append(f"| {a} - {b} | " + " | ".join(fmt(c, d[c][0], 1.96 * d[c][1], "+") for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = runs.parser("Evaluate checkpoints on the held-out prompts: the paper's Table 2 (--ood, --quality: "
                     "Tables 3 and 4).")
    ap.add_argument("ckpts", nargs="*", help="base checkpoints, LoRA teachers / students, or NAME=PATH to name a row "
                    "(default name: the file name)")
    ap.add_argument("--curves", nargs="+", default=None, metavar="LOG", help="instead: draw these training logs' held-out "
                    "curves (with --table's teacher levels) into --out, a .png")
    ap.add_argument("--table", default=None, help="with --curves: a table.json whose teachers and base give the levels")
    ap.add_argument("--pool", nargs="+", default=None, metavar="TABLE", help="instead: pool several seeds' table.json "
                    "into the mean table and the paired differences (95%% intervals)")
    ap.add_argument("--model", default=None, help="the base for LoRA checkpoints (default: the one the LoRA records)")
    ap.add_argument("--n", type=int, default=128, help="held-out prompts per task")
    ap.add_argument("--steps", type=int, default=10, help="ODE steps per image")
    ap.add_argument("--guidance", type=float, default=1.0, help="CFG scale (1: none; SD3.5: 4.5)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initial noise, the same for every row")
    ap.add_argument("--out", default="eval_out", help="folder for table.md, table.json, compare.png and a grid per row")
    ap.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier evaluation in --out")
    ap.add_argument("--batch", type=int, default=64, help="samples per forward")
    ap.add_argument("--resolution", type=int, default=512, help="SD3 image size (the mini world is 32x32)")
    ap.add_argument("--max_sequence_length", type=int, default=128, help="SD3: T5 prompt tokens (Flow-GRPO: 128)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="base weights (auto: bf16 "
                    "for SD3 on CUDA)")
    ap.add_argument("--prompt_file", nargs="+", default=None, help="TASK=PATH or JSONL {prompt, task}: evaluate "
                    "these prompts (the first --n of each task) instead of the mini world's held-out ones")
    ap.add_argument("--ood", action="store_true", help="also Table 3's analogue: --n prompts of each kind of "
                    "composition no stage sees (ood.py)")
    ap.add_argument("--quality", action="store_true", help="also Table 4's analogue: the quality metrics no reward "
                    "optimises (quality.py), and variety.png (the same prompts under four noises, across rows)")
    real_rewards.add_args(ap)
    args = ap.parse_args(argv)
    modes = [m for m, on in (("checkpoints", args.ckpts), ("--curves", args.curves), ("--pool", args.pool)) if on]
    if len(modes) > 1 or args.table and not args.curves or args.pool and args.out != ap.get_default("out"):
        raise BadInput(f"{' and '.join(modes)}: give one of checkpoints, --curves LOG... [--table] or --pool TABLE... "
                       "(which prints, and writes no --out)")
    if args.curves:
        return curves.draw(args)
    if args.pool:
        for p in args.pool:
            if not os.path.isfile(p):
                raise BadInput(f"{p} does not exist; give eval.py's table.json of each seed")
        try:
            print(pool(args.pool))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError) as e:
            raise BadInput(f"cannot pool {args.pool} ({type(e).__name__}: {e}); give eval.py's table.json files") from None
        return
    if not args.ckpts:
        raise BadInput("give checkpoints to evaluate (or --curves LOG... to draw training curves)")
    runs.catch_signals()  # Ctrl-C / SIGTERM: stop within one batch, one line, nothing written
    checkpoints.lock_out(os.path.join(args.out, "table.json"), 0, 1)  # one evaluation per --out at a time
    runs.check_finite(args)
    if not 2 <= args.n <= 10_000 or args.batch < 1:
        raise BadInput(f"--n must be 2..10000 prompts per task and --batch >= 1, got {args.n} and {args.batch}")
    if not args.out:
        raise BadInput("--out is empty; give the folder to write the table and the grids to")
    runs.check_sampling_args(args.steps, args.guidance, 0.0, "--steps")
    previous = os.path.join(args.out, "table.json")
    if os.path.exists(previous) and not args.overwrite:
        raise BadInput(f"{args.out} holds an earlier evaluation; pass --overwrite to replace it, or another --out")
    named = [("", c) if os.path.exists(c) or "=" not in c else tuple(c.split("=", 1)) for c in args.ckpts]
    named = [(name or os.path.basename(path.rstrip("/")).rsplit(".safetensors", 1)[0], path) for name, path in named]
    slugs = [slug(n) for n, _ in named]
    if any(not n.isprintable() for n, _ in named):
        raise BadInput("a row name holds a newline or another control character; name the row with NAME=PATH")
    if any(len(s) > 100 for s in slugs):
        raise BadInput(f"a row name of {max(map(len, slugs))} characters is too long for its picture's file name; "
                       "give at most 100 with NAME=PATH")
    twice = sorted({n for n, _ in named if slugs.count(slug(n)) > 1 or slug(n) in ("compare", "table", "variety")})
    if twice:
        raise BadInput(f"the row {twice[0]!r} would write the same picture as another row, compare.png or "
                       f"variety.png ({slug(twice[0])}.png); name the rows apart with NAME=PATH")
    extra = ["variety.png"] if args.quality else []
    for f in [f"{s}.png" for s in slugs] + extra + ["compare.png", "table.md", "table.json", "table.json.tmp"]:
        checkpoints.check_writable(os.path.join(args.out, f))  # each: no link, folder or unwritable place
    earlier = []
    if os.path.exists(previous):  # what an earlier evaluation wrote: only plain files of ours, in --out itself
        try:
            earlier = [f for f in json.load(open(previous))["files"] if f == os.path.basename(f) and
                       (f.endswith(".png") or f in ("table.md", "table.json"))]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise BadInput(f"{previous} is damaged (an evaluation stopped while writing it?); delete {args.out} or "
                           "choose another --out") from None
    written = {os.path.realpath(os.path.join(args.out, f)) for f in
               [f"{s}.png" for s in slugs] + earlier + extra + ["compare.png", "table.md", "table.json"]}
    for spec in [*(args.prompt_file or []), *(p for _, p in named)]:
        path = spec.split("=", 1)[1] if "=" in spec and not os.path.exists(spec) else spec
        if os.path.realpath(path) in written:
            raise BadInput(f"{path} is an input and would be written over by this evaluation; choose another --out")
    theirs = [f for f in [f"{s}.png" for s in slugs] + extra + ["compare.png", "table.md"]
              if os.path.exists(os.path.join(args.out, f)) and f not in earlier]
    if theirs and not args.overwrite:  # a file no evaluation of ours listed: somebody else's
        raise BadInput(f"{args.out} already holds {theirs[0]}, which no earlier evaluation wrote there; give an empty "
                       "or new --out (or --overwrite to replace it)")
    sources = [(name, path, *row_source(path, args.model)) for name, path in named]  # every row checked first
    by_task = {}
    for spec in args.prompt_file or []:
        for p in mw.read_prompt_file(spec, mini=all(base.endswith(".safetensors") for *_, base in sources)):
            by_task.setdefault(p["task"], []).append(p)
    short = sorted(t for t, ps in by_task.items() if len(ps) < args.n)
    if short:
        raise BadInput(f"--n {args.n} but --prompt_file holds {len(by_task[short[0]])} prompt(s) of task {short[0]}; "
                       "give --n at most that, or more prompts (a prompt is never scored twice)")
    sd3 = [path for _, path, _, base in sources if not base.endswith(".safetensors")]
    if sd3 and (args.ood or args.quality):
        raise BadInput(f"--ood and --quality are the mini world's (its grammar and its clean pictures); {sd3[0]} is "
                       "an SD3 model: leave them out")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = fm.dtype_for(args.precision, device)
    for base in dict.fromkeys(base for *_, base in sources):
        real_rewards.use_backends(args, mw.TASKS, base, device)
    rows, raw, pictures, variety = {}, {}, {}, {}
    for name, path, kind, base in sources:
        model = load_row(path, kind, base, device, dtype, args.resolution)
        model.max_sequence_length = args.max_sequence_length
        scores, images, shown, pics = evaluate(model, args.n, args.steps, args.guidance, args.seed, args.batch,
                                               args.resolution, by_task, args.ood, args.quality)
        rows[name], raw[name], pictures[name], variety[name] = summarise(scores), scores, images, pics
        print(markdown({name: rows[name]}).splitlines()[-1], flush=True)
    table = markdown(rows)
    cats = category_markdown(raw)
    table += "\n\n" + cats if cats else ""
    for t in tables_of(next(iter(raw.values())))[1:]:
        table += f"\n\n{t[0]}:\n\n" + markdown(rows, t)
    print("\n" + table)
    if runs.stop_signalled():  # a Ctrl-C after the last batch: still nothing written
        raise runs.Interrupted("a stop signal arrived")
    for f in earlier:  # --overwrite: remove what the earlier evaluation wrote, and only that
        if os.path.isfile(os.path.join(args.out, f)):
            os.remove(os.path.join(args.out, f))
    os.makedirs(args.out, exist_ok=True)  # only now: a bad row writes nothing
    files = [f"{slug(name)}.png" for name in pictures] + extra + ["compare.png", "table.md", "table.json"]
    if args.quality:  # MAR's picture: each row's samples of the same prompts under the same four noises
        shown4 = [p["prompt"] for task in mw.TASKS for p in mw.eval_prompts(task, 2) for _ in range(4)]
        comparison({name: torch.cat(v) for name, v in variety.items()}, shown4, per_task=8).save(
            os.path.join(args.out, "variety.png"))
    for name, images in pictures.items():
        sample.grid(images, shown).save(os.path.join(args.out, f"{slug(name)}.png"))
    comparison(pictures, shown).save(os.path.join(args.out, "compare.png"))
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "table.json.tmp"), "w") as f:  # complete, or the earlier one
        json.dump({"rows": rows, "scores": raw, "args": vars(args), "files": files}, f, indent=1)
    os.replace(os.path.join(args.out, "table.json.tmp"), os.path.join(args.out, "table.json"))
    print(f"wrote {args.out}/table.md, table.json, compare.png (the same prompts across rows) and a grid per row")


if __name__ == "__main__":
    runs.run(main)
