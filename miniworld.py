"""The mini world: a procedural text-to-image world with the paper's four tasks at toy scale (32x32 RGB).

  geneval   : shapes with colours, counts and positions      ("a red circle left of a blue square")
  ocr       : one or two digits                               ('the text "47"')
  pickscore : a scene to be liked                             ("a yellow circle over the sea at sunset")
  deqa      : a scene to be rendered cleanly                  ("the hills at night")

The renderer draws what a prompt says. `render(..., defects=True)` makes the pretraining data imperfect on purpose
(wrong counts, swapped colours, wrong digits, blur, noise, clutter, dull colours), so the base model that learns from
it has headroom on every metric, the way SD3.5-M starts at GenEval 0.63 and OCR 0.59. Evaluation prompts are a
fixed, seeded hold-out that `train_prompts` never returns. The scorers for these images live in rewards.py.
Images are float tensors (3, 32, 32) in [0, 1].
"""
import json
import os
import math
import random

import torch
import torch.nn.functional as F

from runs import BadInput

SIZE = 32

TASKS = ("geneval", "ocr", "pickscore", "deqa")
COLORS = {"red": (0.90, 0.15, 0.15), "green": (0.15, 0.78, 0.20), "blue": (0.20, 0.30, 0.95),
          "yellow": (0.95, 0.85, 0.10), "purple": (0.70, 0.20, 0.85)}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBERS = {"two": 2, "three": 3, "four": 4}
RELATIONS = ("left of", "right of", "above", "below")
TIMES = {"dawn": ((0.45, 0.55, 0.85), (0.97, 0.75, 0.55)), "noon": ((0.25, 0.50, 0.95), (0.60, 0.80, 0.97)),
         "sunset": ((0.45, 0.20, 0.50), (0.97, 0.50, 0.20)), "night": ((0.03, 0.04, 0.14), (0.12, 0.14, 0.32))}
SCENES = {"sea": (0.10, 0.30, 0.70), "hills": (0.20, 0.60, 0.20), "desert": (0.85, 0.70, 0.40),
          "forest": (0.05, 0.35, 0.12), "snow": (0.90, 0.92, 0.95), "field": (0.70, 0.75, 0.20)}
FONT = {"0": "111101101101111", "1": "110010010010111", "2": "111001111100111", "3": "111001111001111",
        "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
        "8": "111101111101111", "9": "111101111001111"}  # 3x5 glyphs; every glyph touches all four sides
GLYPH_SCALE = 4  # one font pixel = one 4x4 patch of the mini model: text on the patch grid, like a sign
GLYPH_W, GLYPH_H, GLYPH_GAP = 3 * GLYPH_SCALE, 5 * GLYPH_SCALE, GLYPH_SCALE
VOCAB = (["<pad>", "a", "an", "the", "and", "of", "at", "over", "text", '"', "left", "right", "above", "below"]
         + list(COLORS) + list(SHAPES) + list(PLURAL.values()) + list(NUMBERS) + list(TIMES) + list(SCENES)
         + list(FONT))


# ----------------------------------------------------------------------------------------------- prompts
def tokenize(text):
    """Words, quotes and single digits; an unknown word is a ValueError naming it."""
    words = text.lower().replace('"', ' " ').split()
    toks = []
    for w in words:
        parts = list(w) if w.isdigit() else [w]
        for p in parts:
            if p not in VOCAB:
                raise BadInput(f"the mini world has no word {p!r} (prompt {text!r}); its vocabulary is in miniworld.VOCAB")
            toks.append(VOCAB.index(p))
    return toks


def geneval_categories():
    """GenEval's six categories (its score is their mean), in the mini world's grammar."""
    return {
        "single_object": [f"a {s}" for s in SHAPES],
        "two_object": [f"a {a} and a {b}" for a in SHAPES for b in SHAPES if a != b],
        "counting": [f"{n} {PLURAL[s]}" for n in NUMBERS for s in SHAPES]
                    + [f"{n} {c} {PLURAL[s]}" for n in NUMBERS for c in COLORS for s in SHAPES],
        "colors": [f"a {c} {s}" for c in COLORS for s in SHAPES],
        "position": [f"a {a} {r} a {b}" for r in RELATIONS for a in SHAPES for b in SHAPES if a != b],
        "color_attr": [f"a {c1} {a} and a {c2} {b}" for c1 in COLORS for c2 in COLORS if c1 != c2
                       for a in SHAPES for b in SHAPES if a != b],
    }


def geneval_category(prompt):
    """The GenEval category of one of the grammar's composition prompts (None for any other prompt)."""
    return next((cat for cat, ps in geneval_categories().items() if prompt in ps), None)


def all_prompts(task):
    """Every prompt string of a task (the grammar is finite, so the hold-out is exact)."""
    if task == "geneval":
        return [p for ps in geneval_categories().values() for p in ps]
    if task == "ocr":
        return [f'the text "{n}"' for n in range(100)]  # 1 or 2 digits
    if task in ("pickscore", "deqa"):
        out = [f"the {sc} at {t}" for sc in SCENES for t in TIMES]
        return out + [f"a {c} {s} over the {sc} at {t}" for c in COLORS for s in SHAPES for sc in SCENES for t in TIMES]
    raise BadInput(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")


def _split(task):
    """(held-out, train) prompts. GenEval's are split within each category and come as {category: prompts}, so
    that both sides weigh the six categories equally, as GenEval's score does (colour attribution alone is 120 of
    the grammar's 213 prompts)."""
    if task == "geneval":
        held, train = {}, {}
        for cat, prompts in geneval_categories().items():
            random.Random(f"heldout-geneval-{cat}").shuffle(prompts)
            n_eval = max(1, len(prompts) // 5)
            held[cat], train[cat] = prompts[:n_eval], prompts[n_eval:]
        return held, train
    prompts = all_prompts(task)
    random.Random(f"heldout-{task}").shuffle(prompts)
    if task in ("pickscore", "deqa"):  # one scene grammar, two disjoint prompt sets
        general = all_prompts("pickscore")
        random.Random("heldout-general").shuffle(general)
        half = general[0::2] if task == "pickscore" else general[1::2]
        return half[:64], half[64:]
    n_eval = len(prompts) // 5
    return prompts[:n_eval], prompts[n_eval:]


def _pick(pool, i, rng=None):
    """The i-th prompt of a pool (cycling), or a random one; a GenEval pool goes category by category."""
    if isinstance(pool, dict):
        cats = list(pool)
        pool = pool[cats[i % len(cats)]] if rng is None else pool[rng.choice(cats)]
        i //= len(cats)
    return pool[i % len(pool)] if rng is None else rng.choice(pool)


def eval_prompts(task, n=64):
    """The held-out evaluation prompts of a task, fixed by seed (never returned by train_prompts)."""
    held = _split(task)[0]
    return [{"prompt": _pick(held, i), "task": task} for i in range(n)]


# Pretraining's task mix: composition and text, the hard tasks, a third each; pickscore and deqa, which share one
# scene grammar, a sixth each. The base it gives: GenEval 0.32 / OCR 0.43 (GenEval by category: single object 0.64,
# colours 0.67, position 0.24, two objects 0.18, counting 0.10, colour attribution 0.10).
PRETRAIN_MIX = ("geneval", "ocr", "pickscore", "geneval", "ocr", "deqa")


def train_prompts(tasks=TASKS, seed=0):
    """An endless stream of training prompts, tasks in turn (a task listed twice comes twice as often)."""
    rng = random.Random(seed)
    pools = {t: _split(t)[1] for t in tasks}
    while True:
        for t in tasks:
            yield {"prompt": _pick(pools[t], 0, rng), "task": t}


def prompt_stream(prompt_files, tasks, seed):
    """An endless, seeded stream of training prompts of these tasks: the prompt files' (read and checked now, not at
    the first step), or the mini world's."""
    if not prompt_files:
        return train_prompts(tasks, seed=seed)
    ps = [p for spec in prompt_files for p in read_prompt_file(spec) if p["task"] in tasks]
    if not ps:
        raise BadInput(f"{' '.join(prompt_files)} hold no prompts of task(s) {tasks}")

    def stream(rng=random.Random(seed)):
        while True:
            yield rng.choice(ps)
    return stream()


def read_prompt_file(spec):
    """Prompts with task labels from a file. Either JSONL lines {"prompt": ..., "task": ...}, or TASK=PATH: every
    prompt of PATH gets the label TASK, PATH being a .txt (one prompt per line) or a .jsonl with a "prompt" field:
    Flow-GRPO's layout (ocr/train.txt, pickscore/train.txt, geneval/train_metadata.jsonl). One clear error else."""
    task, path = spec.split("=", 1) if "=" in spec and not os.path.exists(spec) else (None, spec)
    if task is not None and task not in TASKS:
        raise BadInput(f"--prompt_file {spec}: unknown task {task!r}; choose from {', '.join(TASKS)}")
    try:
        lines = open(path).read().splitlines()
    except OSError as e:
        raise BadInput(f"cannot read prompt file {path}: {e.strerror}") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if task and not path.endswith(".jsonl"):
            out.append({"prompt": line.strip(), "task": task})
            continue
        try:
            rec = json.loads(line)
            assert isinstance(rec, dict) and isinstance(rec["prompt"], str) and (task or rec["task"]) in TASKS
        except (ValueError, KeyError, AssertionError, TypeError):
            want = '{"prompt": str}' if task else f'{{"prompt": str, "task": one of {list(TASKS)}}}'
            raise BadInput(f"{path}:{i}: expected a JSON line {want} (or give TASK=PATH)") from None
        out.append({"prompt": rec["prompt"], "task": task or rec["task"],
                    **({"tag": rec["tag"]} if isinstance(rec.get("tag"), str) else {})})  # GenEval's category
    if not out:
        raise BadInput(f"{path}: the prompt file is empty")
    return out


def parse(text):
    """A prompt back to what it asks for: {'task', 'objects': [(shape, colour|None, count)], 'relation', 'text', ...}."""
    w = text.split()
    if text.startswith('the text "'):
        return {"task": "ocr", "text": text[len('the text "'):-1]}
    if " at " in text and w[-2] == "at" and w[-1] in TIMES:
        scene, obj = w[-3], None
        if w[0] == "a":
            obj = (w[2], w[1], 1)
        return {"task": "general", "scene": scene, "time": w[-1], "object": obj}

    def phrase(ws):  # "a red circle", "three circles", "a circle"
        if ws[0] in NUMBERS:
            count, rest = NUMBERS[ws[0]], ws[1:]
            shape = [s for s in SHAPES if PLURAL[s] == rest[-1]][0]
        else:
            count, rest, shape = 1, ws[1:], ws[-1]
        return (shape, rest[0] if len(rest) == 2 else None, count)

    for rel in RELATIONS:
        if f" {rel} " in text:
            a, b = text.split(f" {rel} ")
            return {"task": "geneval", "objects": [phrase(a.split()), phrase(b.split())], "relation": rel}
    parts = text.split(" and ")
    return {"task": "geneval", "objects": [phrase(p.split()) for p in parts], "relation": None}


# ----------------------------------------------------------------------------------------------- drawing
_yy, _xx = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")


def shape_mask(shape, cx, cy, r):
    """Boolean (32, 32) mask of a shape of half-size r centred at (cx, cy)."""
    if shape == "circle":
        return (_xx - cx) ** 2 + (_yy - cy) ** 2 <= r * r
    if shape == "square":
        return ((_xx - cx).abs() <= r) & ((_yy - cy).abs() <= r)
    # triangle: apex up, base down; width shrinks linearly to the apex
    t = (_yy - (cy - r)) / (2 * r)
    return (t >= 0) & (t <= 1) & ((_xx - cx).abs() <= r * t)


def paint(img, mask, color):
    img[:, mask] = torch.tensor(color).view(3, 1).expand(3, int(mask.sum()))


def _background(rng):
    g = rng.uniform(0.10, 0.25)
    ramp = torch.linspace(-1, 1, SIZE).view(1, SIZE, 1) * rng.uniform(-0.04, 0.04)
    return (torch.full((3, SIZE, SIZE), g) + ramp).clamp(0, 1)


def _place(rng, sizes, rel=None, tries=500):
    """Centres for objects of half-sizes `sizes`, apart, with `rel` holding between the first two."""
    for _ in range(tries):
        pts = []
        for r in sizes:  # one at a time, so four objects still fit
            for _ in range(50):
                p = (rng.uniform(r + 1, SIZE - r - 1), rng.uniform(r + 1, SIZE - r - 1))
                if all(math.dist(p, q) > 1.3 * (r + rq) + 1.5 for q, rq in zip(pts, sizes)):  # squares' corners too
                    pts.append(p)
                    break
        ok = len(pts) == len(sizes)
        if rel and ok:
            (ax, ay), (bx, by) = pts[0], pts[1]
            ok = {"left of": bx - ax > 8, "right of": ax - bx > 8, "above": by - ay > 8, "below": ay - by > 8}[rel]
        if ok:
            return pts
    raise RuntimeError("could not place objects")


def render_geneval(spec, rng):
    img = _background(rng)
    objs = []  # (shape, colour)
    for shape, color, count in spec["objects"]:
        objs += [(shape, color)] * count
    used = {c for _, c in objs if c}
    free = [c for c in COLORS if c not in used]
    objs = [(s, c or rng.choice(free)) for s, c in objs]
    r = 5.5 if len(objs) <= 2 else 4.0
    for (shape, color), (cx, cy) in zip(objs, _place(rng, [r] * len(objs), spec["relation"])):
        paint(img, shape_mask(shape, cx, cy, r * rng.uniform(0.9, 1.1)), COLORS[color])
    return img


def render_ocr(text, rng):
    img = torch.empty(3, SIZE, SIZE)
    bg = [rng.uniform(0.05, 0.45) for _ in range(3)]
    img[:] = torch.tensor(bg).view(3, 1, 1)
    ink = rng.uniform(0.85, 0.97)
    w = len(text) * (GLYPH_W + GLYPH_GAP) - GLYPH_GAP
    # Centred on the patch grid, like a sign: the prompt fixes where the text goes, so the model spends its
    # capacity on the glyphs rather than on averaging over positions (random placement gave OCR 0.11).
    x0 = GLYPH_SCALE * ((SIZE - w) // (2 * GLYPH_SCALE))
    y0 = GLYPH_SCALE * ((SIZE - GLYPH_H) // (2 * GLYPH_SCALE))
    for k, ch in enumerate(text):
        bits = torch.tensor([int(b) for b in FONT[ch]], dtype=torch.float32).view(5, 3)
        glyph = bits.repeat_interleave(GLYPH_SCALE, 0).repeat_interleave(GLYPH_SCALE, 1).bool()
        x = x0 + k * (GLYPH_W + GLYPH_GAP)
        img[:, y0:y0 + GLYPH_H, x:x + GLYPH_W][:, glyph] = ink
    return img


def render_general(spec, rng):
    top, bottom = TIMES[spec["time"]]
    horizon = rng.randint(17, 21)
    t = torch.linspace(0, 1, horizon).view(1, horizon, 1)
    img = torch.empty(3, SIZE, SIZE)
    img[:, :horizon] = torch.tensor(top).view(3, 1, 1) * (1 - t) + torch.tensor(bottom).view(3, 1, 1) * t
    ground = torch.tensor(SCENES[spec["scene"]]).view(3, 1, 1)
    shade = torch.linspace(1.0, 0.8, SIZE - horizon).view(1, -1, 1)
    img[:, horizon:] = ground * shade
    if spec["scene"] == "hills":  # a rounded horizon
        paint(img, shape_mask("circle", rng.uniform(6, 26), horizon + 6, 9), tuple(0.9 * g for g in SCENES["hills"]))
    if spec["scene"] == "forest":
        for x in range(3, SIZE, 7):
            paint(img, shape_mask("triangle", x + rng.uniform(-1, 1), horizon - 1, 3), (0.04, 0.28, 0.10))
    sun = (0.95, 0.92, 0.75) if spec["time"] == "night" else (0.97, 0.85, 0.30)
    paint(img, shape_mask("circle", rng.uniform(4, 28), rng.uniform(3, 7), 2), sun)  # smaller than any object
    if spec["object"]:
        shape, color, _ = spec["object"]
        paint(img, shape_mask(shape, rng.uniform(8, 24), horizon - 7, 4), COLORS[color])
    return img


def blur(img):
    """3x3 box blur (replicate padding) on (3, H, W) or (B, 3, H, W)."""
    x = img if img.dim() == 4 else img[None]
    x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return x if img.dim() == 4 else x[0]


def corrupt(text, rng):
    """The spec of a prompt with one thing wrong: a count, a colour, a shape, an order, a digit."""
    spec = parse(text)
    if spec["task"] == "ocr":
        s = list(spec["text"])
        k = rng.randrange(len(s))
        choice = rng.random()
        if choice < 0.6 or len(s) == 1:
            s[k] = rng.choice([d for d in FONT if d != s[k]])
        else:
            del s[k]
        return {"task": "ocr", "text": "".join(s)}
    if spec["task"] == "geneval":
        objs = [list(o) for o in spec["objects"]]
        o = rng.choice(objs)
        kind = rng.choice(["count", "color", "shape", "swap"])
        if kind == "count" and o[2] > 1:
            o[2] += rng.choice([-1, 1])
        elif kind == "color" and o[1]:
            o[1] = rng.choice([c for c in COLORS if c != o[1]])
        elif kind == "swap" and len(objs) == 2:
            objs.reverse()
        else:
            o[0] = rng.choice([s for s in SHAPES if s != o[0]])
        spec = {**spec, "objects": [tuple(o) for o in objs]}
        if len({(s, c) for s, c, _ in spec["objects"]}) < len(spec["objects"]):  # two identical phrases: keep one
            spec["objects"] = spec["objects"][:1]
            spec["relation"] = None
        return spec
    return None


def render(text, rng=None, defects=False):
    """Draw a prompt. With defects=True about a third of images come out wrong or degraded, on purpose."""
    rng = rng or random.Random()
    spec = parse(text)
    if defects and rng.random() < 0.15 and spec["task"] in ("geneval", "ocr"):
        spec = corrupt(text, rng)
    if spec["task"] == "geneval":
        img = render_geneval(spec, rng)
    elif spec["task"] == "ocr":
        img = render_ocr(spec["text"], rng)
    else:
        img = render_general(spec, rng)
    if defects and rng.random() < 0.25:
        kind = rng.choice(["blur", "noise", "dull", "clutter"])
        if kind == "blur":
            img = blur(img)
        elif kind == "noise":
            img = img + rng.uniform(0.04, 0.12) * torch.randn(img.shape, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        elif kind == "dull":
            gray = img.mean(0, keepdim=True)
            img = gray + rng.uniform(0.3, 0.6) * (img - gray)
        else:
            paint(img, shape_mask(rng.choice(SHAPES), rng.uniform(3, 29), rng.uniform(3, 29), 1.5),
                  COLORS[rng.choice(list(COLORS))])
    return img.clamp(0, 1)


def render_batch(prompts, seed, defects=False):
    rng = random.Random(seed)
    return torch.stack([render(p["prompt"] if isinstance(p, dict) else p, rng, defects) for p in prompts])
