"""Training curves: the seesaw as a picture, and how soon the student reaches GRPO-Mix (the paper's claim that distillation is faster than mixing rewards).

    python eval.py --curves runs/grpo-mix.jsonl runs/opd-merge.jsonl --table eval_out/table.json --out curves.png
Each log's held-out evaluations (eval/* records, written every --eval_every steps) against the training step and
against training time, with a table's base and specialist teachers as dashed levels; and the time-to-Mix line.
"""
import json
import os

from PIL import Image, ImageDraw

import checkpoints
from runs import BadInput

TEACHERS = {"GenEval": "GRPO-GenEval", "OCR Acc.": "GRPO-OCR", "DeQA": "GRPO-DeQA", "PickScore": "GRPO-PickScore"}

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
    titles = list(TEACHERS) + ["Avg"]
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




def draw(args):
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
