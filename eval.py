"""Table 2: sample each task's held-out prompts with the ODE and score them.

    python eval.py ckpts/base.safetensors ckpts/teachers/*.safetensors ckpts/students/opd.safetensors
A checkpoint is a base model or a LoRA (a teacher or a student; it records its base, or give --model). Every row
uses the same prompts and the same initial noise, so rows differ only by the model. Columns as in the paper:
GenEval (strict: every check passes), OCR Acc., DeQA, PickScore, and Avg = mean(GenEval, OCR, DeQA/5, PickScore/26),
each with its standard error. Writes table.md, table.json, a grid <row>.png per checkpoint and compare.png (the same
prompts side by side across rows) into --out, a new folder or one an earlier evaluation wrote."""
import json
import math
import os
import textwrap

import torch
from PIL import Image, ImageDraw

import checkpoints
import flow_matching as fm
import lora
import miniworld as mw
import real_rewards
import rewards
import runs
import sample
from runs import BadInput

COLUMNS = [("GenEval", "geneval"), ("OCR Acc.", "ocr"), ("DeQA", "deqa"), ("PickScore", "pickscore")]
TEACHERS = {"GenEval": "GRPO-GenEval", "OCR Acc.": "GRPO-OCR", "DeQA": "GRPO-DeQA", "PickScore": "GRPO-PickScore"}
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
            if runs.stop_signalled():  # Ctrl-C / SIGTERM: stop within one batch
                raise runs.Interrupted("a stop signal arrived during the evaluation")
            chunk = prompts[i:i + batch]
            out = fm.rollout(model, fm.encode_prompts(model, chunk), steps, guidance, sde=[], x=noise[i:i + batch])
            img = fm.to_images(model, out["states"][:, -1]).float().cpu()
            vals.append(rewards.metric(task)(img, chunk))
            if i == 0:
                images.append(img[:8])
                shown += [p["prompt"] for p in chunk[:8]]
        vals = torch.cat(vals)
        scores[task] = vals.tolist()
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
    lines = ["| GenEval by category | " + " | ".join(f"{CATEGORY_NAMES.get(c, c)} (n={n[c]})" for c in cats) + " |",
             "|---|" + "---|" * len(cats)]
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


UNITS = {"GenEval": "GenEval (fraction right)", "OCR Acc.": "OCR Acc. (1 - edit distance)", "Avg": "Avg (Table 2's)",
         "DeQA": "DeQA (MOS, 1-5)", "PickScore": "PickScore (0-26)"}


def wall_clock(recs):
    """Each record's training time so far, in seconds: its step times the median time of a step (the t_* fields a
    record gives its own step; evaluation excluded). The median keeps one stalled step (a busy machine) from
    standing for the steps around it."""
    per_step = sorted(sum(v for k, v in r.items() if k.startswith("t_")) for r in recs)
    median = per_step[len(per_step) // 2] if per_step else 0.0
    return [r["step"] * median for r in recs]


def time_to_reach(student, mix, teachers=()):
    """When the student's held-out Avg first reaches GRPO-Mix's final one: (level, seconds of Stage 2, seconds with
    its teachers' training, GRPO-Mix's whole run), or None if it never does. Each argument: a log's records."""
    evals = [(t, r["eval/Avg"]) for r, t in zip(student, wall_clock(student)) if "eval/Avg" in r]
    level = [r["eval/Avg"] for r in mix if "eval/Avg" in r][-1]
    t = next((t for t, v in evals if v >= level), None)
    if t is None:
        return None
    stage1 = sum(wall_clock(recs)[-1] for recs in teachers)
    return level, t, t + stage1, wall_clock(mix)[-1]


def read_logs(paths):
    """{a log's file name: its records}; a NaN or inf anywhere is refused (it would draw a garbage panel)."""
    names = [os.path.basename(p).rsplit(".", 1)[0] for p in paths]
    if len(set(names)) < len(names):
        raise ValueError(f"two logs are named {max(names, key=names.count)!r}; the curves name a log by its file")
    return {n: [json.loads(l, parse_constant=_not_finite) for l in open(p)] for n, p in zip(names, paths)}


def _not_finite(constant):
    raise ValueError(f"a log holds {constant}")


def curves(logs, table=None, teachers=TEACHERS):
    """The seesaw as a picture: each metric's held-out score (eval/* records) for each JSONL log (GRPO-Mix, Flow-OPD;
    a single-reward teacher's log counts only for main's time-to-Mix),
    against the training step (top row) and against training time in seconds (bottom row), with the specialist
    teachers' and the base's final levels from a table.json as dashed lines."""
    runs_ = {k: v for k, v in read_logs(logs).items() if any(kk.startswith("eval/") for r in v for kk in r)  # the students and
             and sum(kk.startswith("reward/") for r in v[:1] for kk in r) != 1}                    # mixes, not teachers
    if not runs_:
        raise ValueError("the logs hold no held-out evaluation (eval/* records; train with --eval_every N)")
    rows = json.load(open(table))["rows"] if table else {}
    titles = [c for c, _ in COLUMNS] + ["Avg"]
    W, H, pad, top = 300, 230, 46, 24
    img = Image.new("RGB", (W * len(titles), 2 * H + 20 + 12 * (len(runs_) + 2)), "white")
    draw = ImageDraw.Draw(img)
    palette = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]
    color = {name: palette[i % len(palette)] for i, name in enumerate(sorted(runs_))}
    for row, (xname, xs_of) in enumerate((("training step", lambda recs: [r["step"] for r in recs]),
                                          ("training time (s): steps x median step", wall_clock))):
        for k, title in enumerate(titles):
            x0, y0 = k * W, row * H
            lines = {name: [(x, r[f"eval/{title}"]) for x, r in zip(xs_of(recs), recs) if f"eval/{title}" in r]
                     for name, recs in runs_.items()}
            levels = {row_: rows[row_][title][0] for row_ in ("Base", teachers.get(title)) if title in rows.get(row_, {})}
            values = [v for p in lines.values() for _, v in p] + list(levels.values())
            xs = [x for p in lines.values() for x, _ in p]
            if not values:
                continue
            lo, hi = min(values), max(values)
            lo, hi = lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9)
            x_lo, x_hi = min(xs), max(max(xs), min(xs) + 1e-9)
            sx = lambda x: x0 + pad + (x - x_lo) / (x_hi - x_lo) * (W - pad - 10)  # noqa: E731
            sy = lambda v: y0 + top + (hi - v) / (hi - lo) * (H - top - 30)  # noqa: E731
            draw.rectangle([x0 + pad, y0 + top, x0 + W - 10, y0 + H - 30], outline="black")
            draw.text((x0 + pad, y0 + 6), UNITS[title], fill="black")
            for v in (lo, (lo + hi) / 2, hi):
                draw.text((x0 + 4, sy(v) - 6), f"{v:.3g}", fill="black")
            for x in (x_lo, (x_lo + x_hi) / 2, x_hi):
                draw.text((sx(x) - 10, y0 + H - 28), f"{x:.0f}", fill="black")
            draw.text((x0 + pad + 60, y0 + H - 16), xname, fill="black")
            for name, value in levels.items():
                for xd in range(x0 + pad, x0 + W - 10, 8):
                    draw.line([xd, sy(value), xd + 4, sy(value)], fill=(150, 150, 150) if name == "Base" else (0, 0, 0))
                draw.text((x0 + W - 10 - 7 * len(name), sy(value) - 11), name, fill=(90, 90, 90))
            for name, p in lines.items():
                p = sorted(p)
                draw.line([(sx(x), sy(v)) for x, v in p] if len(p) > 1 else [(sx(p[0][0]), sy(p[0][1]))] * 2,
                          fill=color[name], width=2)
    for y, name in enumerate(sorted(runs_)):
        draw.text((pad, 2 * H + 6 + 12 * y), f"{name} (held-out, EMA weights)", fill=color[name])
    draw.text((pad, 2 * H + 6 + 12 * len(runs_)), "dashed: final levels from the table (grey: Base; black: the column's specialist teacher)",
              fill="black")
    return img


def paired(tables, a, b):
    """Row a minus row b over the same prompts and noise, pooled over tables (seeds): {column: (mean, standard
    error)}, and Avg's, whose error combines the four columns' (they are scored on different prompts)."""
    out = {}
    for name, task in COLUMNS:
        d = torch.tensor([x - y for t in tables for x, y in zip(t["scores"][a][task], t["scores"][b][task])])
        out[name] = (float(d.mean()), float(d.std() / math.sqrt(len(d))))
    out["Avg"] = (sum(out[n][0] / rewards.SCALE[t] for n, t in COLUMNS) / 4,
                  math.sqrt(sum((out[n][1] / rewards.SCALE[t]) ** 2 for n, t in COLUMNS)) / 4)
    return out


def pool(paths):
    """Several seeds' table.json -> the mean table (+- the seeds' standard deviation) and the paired differences
    the README quotes (95% interval = 1.96 standard errors)."""
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
    cols = [c for c, _ in COLUMNS] + ["Avg"]
    lines = [f"| Model ({len(tables)} seeds) | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for n in names:
        cells = []
        for c in cols:
            v = torch.tensor([t["rows"][n][c][0] for t in tables])
            s = float(v.std()) if len(v) > 1 else 0.0
            cells.append(f"{float(v.mean()):.2f} ± {s:.2f}" if c in ("DeQA", "PickScore") else f"{float(v.mean()):.3f} ± {s:.3f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "| paired difference (pooled over seeds) | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    teachers = [f"GRPO-{r}" for r in ("GenEval", "OCR", "PickScore", "DeQA")]
    pairs = [(a, b) for a, b in [("Flow-OPD (Merge)", b) for b in ["GRPO-Mix", *teachers[:3], "Flow-OPD (Merge) w/o MAR",
                                                                     "Merge", "Merge+GRPO-Mix"]]
             + [("Flow-OPD (SFT)", "SFT+GRPO-Mix"), ("Flow-OPD (SFT)", "GRPO-Mix")] + [("GRPO-Mix", t) for t in teachers]
             + [(t, "Base") for t in teachers] if a in names and b in names]
    for a, b in pairs:
        d = paired(tables, a, b)
        lines.append(f"| {a} - {b} | " + " | ".join(
            f"{d[c][0]:+.3f} ± {1.96 * d[c][1]:.3f}" if c not in ("DeQA", "PickScore") else
            f"{d[c][0]:+.2f} ± {1.96 * d[c][1]:.2f}" for c in cols) + " |")
    return "\n".join(lines)


def draw_curves(args):
    """eval.py --curves LOG... [--table table.json] --out curves.png"""
    for p in args.curves + ([args.table] if args.table else []):
        if not os.path.isfile(p):
            raise BadInput(f"{p} does not exist; give training logs (runs/*.jsonl) and an eval.py table.json")
    if not args.out.endswith(".png"):
        raise BadInput(f"--out {args.out}: with --curves, --out is the picture to write, a .png")
    checkpoints.check_writable(args.out)
    if os.path.exists(args.out) and not args.overwrite:
        raise BadInput(f"{args.out} exists; pass --overwrite to replace it, or choose another --out")
    try:
        picture = curves(args.curves, args.table)
        logs = read_logs(args.curves)
        students = [n for n, recs in logs.items() if any(k.startswith("opd/") for r in recs for k in r)]
        rewarded = {n: sum(k.startswith("reward/") for r in recs[:1] for k in r) for n, recs in logs.items()}
        mixes = [n for n, k in rewarded.items() if k > 1]
        singles = [logs[n] for n, k in rewarded.items() if k == 1]
        for s, m in [(s, m) for s in students for m in mixes]:
            hit = time_to_reach(logs[s], logs[m], singles)
            print(f"{s} never reaches {m}'s final Avg" if hit is None else
                  f"{s} first reaches {m}'s final Avg {hit[0]:.3f} after {hit[1]:.0f} s of Stage 2, {hit[2]:.0f} s with "
                  f"its {len(singles)} teachers' training; {m}'s whole run took {hit[3]:.0f} s")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError) as e:
        raise BadInput(f"cannot read the logs or the table ({type(e).__name__}: {e}); give JSONL training logs and "
                       "an eval.py table.json") from None
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    picture.save(args.out)
    print(f"wrote {args.out}")


def main(argv=None):
    ap = runs.parser("Evaluate checkpoints on the held-out prompts: the paper's Table 2.")
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
    real_rewards.add_args(ap)
    args = ap.parse_args(argv)
    modes = [m for m, on in (("checkpoints", args.ckpts), ("--curves", args.curves), ("--pool", args.pool)) if on]
    if len(modes) > 1 or args.table and not args.curves or args.pool and args.out != ap.get_default("out"):
        raise BadInput(f"{' and '.join(modes)}: give one of checkpoints, --curves LOG... [--table] or --pool TABLE... "
                       "(which prints, and writes no --out)")
    if args.curves:
        return draw_curves(args)
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
    twice = sorted({n for n, _ in named if slugs.count(slug(n)) > 1 or slug(n) in ("compare", "table")})
    if twice:
        raise BadInput(f"the row {twice[0]!r} would write the same picture as another row or compare.png "
                       f"({slug(twice[0])}.png); name the rows apart with NAME=PATH")
    for f in [f"{s}.png" for s in slugs] + ["compare.png", "table.md", "table.json", "table.json.tmp"]:
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
               [f"{s}.png" for s in slugs] + earlier + ["compare.png", "table.md", "table.json"]}
    for spec in [*(args.prompt_file or []), *(p for _, p in named)]:
        path = spec.split("=", 1)[1] if "=" in spec and not os.path.exists(spec) else spec
        if os.path.realpath(path) in written:
            raise BadInput(f"{path} is an input and would be written over by this evaluation; choose another --out")
    theirs = [f for f in [f"{s}.png" for s in slugs] + ["compare.png", "table.md"]
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
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = fm.dtype_for(args.precision, device)
    for base in dict.fromkeys(base for *_, base in sources):
        real_rewards.use_backends(args, mw.TASKS, base, device)
    rows, raw, pictures = {}, {}, {}
    for name, path, kind, base in sources:
        model = load_row(path, kind, base, device, dtype, args.resolution)
        model.max_sequence_length = args.max_sequence_length
        scores, images, shown = evaluate(model, args.n, args.steps, args.guidance, args.seed, args.batch,
                                         args.resolution, by_task)
        rows[name], raw[name], pictures[name] = summarise(scores), scores, images
        print(markdown({name: rows[name]}).splitlines()[-1], flush=True)
    table = markdown(rows)
    cats = category_markdown(raw)
    table += "\n\n" + cats if cats else ""
    print("\n" + table)
    if runs.stop_signalled():  # a Ctrl-C after the last batch: still nothing written
        raise runs.Interrupted("a stop signal arrived")
    for f in earlier:  # --overwrite: remove what the earlier evaluation wrote, and only that
        if os.path.isfile(os.path.join(args.out, f)):
            os.remove(os.path.join(args.out, f))
    os.makedirs(args.out, exist_ok=True)  # only now: a bad row writes nothing
    files = [f"{slug(name)}.png" for name in pictures] + ["compare.png", "table.md", "table.json"]
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
