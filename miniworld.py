"""The mini world: a procedural text-to-image world with the paper's four tasks at toy scale (32x32 RGB).

  geneval   : five shapes with colours, counts and positions  ("a red circle left of a blue ring", "three diamonds")
  ocr       : one or two digits                               ('the text "47"')
  pickscore : a scene to be liked                             ("a yellow circle over the sea at sunset")
  deqa      : a scene to be rendered cleanly                  ("the hills at night")

The renderer draws what a prompt says, as a sign painter would: digits and shapes are pixel art on the model's
4-px patch grid (glyphs in 4-px blocks, shapes in 2-px blocks) and each composition has one layout per object
count, so the 2.3M-parameter model learns which shapes, colours, counts and digits to draw in minutes of CPU.
`render(..., defects=True)` makes the pretraining data imperfect on purpose (wrong counts, colours, shapes and
digits, swapped relations, blur, noise, clutter, dull colours), so the base model that learns from it has headroom
on every metric, the way SD3.5-M starts at GenEval 0.63 and OCR 0.59. Evaluation prompts are a fixed, seeded
hold-out that Stage 1 and 2 never train on (pretraining sees them, as SD3.5's web data has seen GenEval-like
captions); a family of colour-shape bindings (OOD_BINDINGS) is seen by no stage at all. The scorers for these
images live in rewards.py.
Images are float tensors (3, 32, 32) in [0, 1].
"""
import json
import os
import random
import re

import torch
import torch.nn.functional as F

from runs import BadInput

SIZE = 32

TASKS = ("geneval", "ocr", "pickscore", "deqa")
COLORS = {"red": (0.90, 0.15, 0.15), "green": (0.15, 0.78, 0.20), "blue": (0.20, 0.30, 0.95),
          "yellow": (0.95, 0.85, 0.10), "purple": (0.70, 0.20, 0.85)}
# a shape whose colour the prompt leaves open has its usual one, as a banana is yellow (one image per prompt
# rather than five: the model learns shapes, not an average of colours)
SHAPES = ("circle", "square", "triangle", "diamond", "ring")  # five classes, as GenEval's objects: enough to hold out
USUAL_COLOR = {"circle": "red", "square": "blue", "triangle": "green", "diamond": "yellow", "ring": "purple"}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "ring": "rings"}
NUMBERS = {"two": 2, "three": 3, "four": 4}
RELATIONS = ("left of", "right of", "above", "below")
TIMES = {"dawn": ((0.45, 0.55, 0.85), (0.97, 0.75, 0.55)), "noon": ((0.45, 0.62, 0.90), (0.60, 0.80, 0.97)),
         "sunset": ((0.45, 0.20, 0.50), (0.92, 0.60, 0.45)), "night": ((0.03, 0.04, 0.14), (0.12, 0.14, 0.32))}
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
                raise BadInput(f"the mini world has no word {p[:40]!r} (prompt {short(text)}); its vocabulary is in "
                               "miniworld.VOCAB")
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
    return CATEGORY.get(prompt)


CATEGORY = {p: cat for cat, ps in geneval_categories().items() for p in ps}

# Colour-shape bindings that no stage ever sees, neither in a prompt nor in an image: every shape and every colour
# is seen, but not these pairings (each shape's one unusual colour of a derangement of USUAL_COLOR). Prompts that
# name one are the out-of-distribution family, kept for the paper's Table 3 (T2I-CompBench's attribute binding).
OOD_BINDINGS = {("purple", "triangle"), ("yellow", "square"), ("green", "ring"), ("red", "diamond"),
                ("blue", "circle")}


def bindings(spec):
    """The (colour, shape) pairs an image of this spec shows (a shape without a colour has its usual one)."""
    objs = spec.get("objects") or ([spec["object"]] if spec.get("object") else [])
    return {(c or USUAL_COLOR[s], s) for s, c, _ in objs}


def is_ood(prompt):
    """Does the prompt name a binding that no stage sees?"""
    return bool(bindings(parse(prompt)) & OOD_BINDINGS)


def all_prompts(task):
    """Every prompt string of a task (the grammar is finite, so the hold-out is exact), out-of-distribution
    family included."""
    if task == "geneval":
        return [p for ps in geneval_categories().values() for p in ps]
    if task == "ocr":
        return [f'the text "{n}"' for n in range(100)]  # 1 or 2 digits
    if task in ("pickscore", "deqa"):
        out = [f"the {sc} at {t}" for sc in SCENES for t in TIMES]
        return out + [f"a {c} {s} over the {sc} at {t}" for c in COLORS for s in SHAPES for sc in SCENES for t in TIMES]
    raise BadInput(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")


def _split(task):
    """(held-out, train) prompts, neither holding an out-of-distribution one. The held-out ones are evaluated on
    and never trained on by Stage 1 or 2; pretraining sees both (pretrain_prompts), as SD3.5's web-scale pretraining
    has seen captions like GenEval's and Flow-GRPO removes only the test prompts from its RL prompts. GenEval's are
    split within each category and come as {category: prompts}, so that both sides weigh the six categories equally,
    as GenEval's score does (colour attribution alone is 260 of the grammar's 460 in-distribution prompts)."""
    if task == "geneval":
        held, train = {}, {}
        for cat, prompts in geneval_categories().items():
            prompts = [p for p in prompts if not is_ood(p)]
            random.Random(f"heldout-geneval-{cat}").shuffle(prompts)
            n_eval = max(2, len(prompts) // 4)  # single object: 2 of 5 shapes held out; two objects: 5 of 20
            held[cat], train[cat] = prompts[:n_eval], prompts[n_eval:]
        return held, train
    if task in ("pickscore", "deqa"):  # one scene grammar, two disjoint prompt sets
        general = [p for p in all_prompts("pickscore") if not is_ood(p)]
        random.Random("heldout-general").shuffle(general)
        half = general[0::2] if task == "pickscore" else general[1::2]
        return half[:64], half[64:]
    prompts = all_prompts(task)
    random.Random(f"heldout-{task}").shuffle(prompts)
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


# Pretraining's task mix: composition, the hardest to learn, half; text a sixth (it is learnt fast); pickscore and
# deqa, which share one scene grammar, a sixth each.
PRETRAIN_MIX = ("geneval", "ocr", "geneval", "pickscore", "geneval", "deqa")


def train_prompts(tasks=TASKS, seed=0, pretrain=False):
    """An endless stream of training prompts, tasks in turn (a task listed twice comes twice as often): Stage 1 and
    2's (the held-out prompts left out), or with pretrain=True pretraining's (held-out ones in, out-of-distribution
    ones still out)."""
    rng = random.Random(seed)
    pools = {}
    for t in tasks:
        held, train = _split(t)
        pools[t] = (train if not pretrain else {c: held[c] + train[c] for c in held} if isinstance(held, dict)
                    else held + train)
    while True:
        for t in tasks:
            yield {"prompt": _pick(pools[t], 0, rng), "task": t}


def prompt_stream(prompt_files, tasks, seed, mini=True):
    """An endless, seeded stream of training prompts of these tasks: the prompt files' (read, and every prompt
    checked, now: not when it is first drawn, maybe on one rank only), or the mini world's. Every task needs a
    prompt (those of other tasks are left out: the scripts name them)."""
    if not prompt_files:
        return train_prompts(tasks, seed=seed)
    ps = [p for spec in prompt_files for p in read_prompt_file(spec, mini) if p["task"] in tasks]
    missing = [t for t in tasks if t not in {p["task"] for p in ps}]
    if missing:
        raise BadInput(f"{' '.join(prompt_files)} hold no prompt of task {missing[0]}, which this run trains")

    def stream(rng=random.Random(seed)):
        while True:
            yield rng.choice(ps)
    return stream()


def prompt_digest(prompt_files, mini=True):
    """sha256 of the prompts the files hold (None without files): a run records it, and --resume compares it."""
    if not prompt_files:
        return None
    import hashlib
    return hashlib.sha256(json.dumps([read_prompt_file(s, mini) for s in prompt_files]).encode()).hexdigest()


def short(text, n=80):
    """A prompt as quoted in a message: at most n characters."""
    return repr(text) if len(text) <= n else repr(text[:n]) + f"... ({len(text)} characters)"


def read_prompt_file(spec, mini=True):
    """Prompts with task labels from a file. Either JSONL lines {"prompt": ..., "task": ...}, or TASK=PATH: every
    prompt of PATH gets the label TASK, PATH being a .txt (one prompt per line) or a .jsonl with a "prompt" field:
    Flow-GRPO's layout (ocr/train.txt, pickscore/train.txt, geneval/train_metadata.jsonl). Every prompt is checked
    (check_prompt); one clear error names the first bad line."""
    task, path = spec.split("=", 1) if "=" in spec and not os.path.exists(spec) else (None, spec)
    st = os.stat(path) if os.path.exists(path) else None
    key = (spec, mini, st and (st.st_ino, st.st_mtime_ns, st.st_size))
    if key in READ:  # read once per run: a pipe (<(...)) can be read only once
        return READ[key]
    if task is not None and task not in TASKS:
        raise BadInput(f"--prompt_file {spec}: unknown task {task!r}; choose from {', '.join(TASKS)}")
    try:
        lines = open(path, encoding="utf-8-sig").read().splitlines()  # -sig: a byte-order mark is not a word
    except UnicodeDecodeError as e:
        raise BadInput(f"prompt file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise BadInput(f"cannot read prompt file {path}: {e.strerror}") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if task and not path.lower().endswith(".jsonl"):
            out.append({"prompt": line.strip(), "task": task})
            continue
        try:
            rec = json.loads(line)
            assert isinstance(rec, dict) and isinstance(rec["prompt"], str) and (task or rec["task"]) in TASKS
        except (ValueError, KeyError, AssertionError, TypeError, RecursionError):
            want = '{"prompt": str}' if task else f'{{"prompt": str, "task": one of {list(TASKS)}}}'
            raise BadInput(f"{path}:{i}: expected a JSON line {want} (or give TASK=PATH)") from None
        out.append({"prompt": rec["prompt"], "task": task or rec["task"],
                    **({"tag": rec["tag"]} if isinstance(rec.get("tag"), str) else {})})  # GenEval's category
    for i, p in enumerate(out):
        check_prompt(p, mini, f"{path}: prompt {i + 1}")
    if not out:
        raise BadInput(f"{path}: the prompt file is empty")
    long = [p["prompt"] for p in out if mini and len(tokenize(p["prompt"])) > MAX_TOKENS]
    if long:
        warn(f"{len(long)} prompt(s) of {path} are longer than the mini text encoder's {MAX_TOKENS} tokens and are "
             f"cut there, e.g. {short(long[0])}")
    READ[key] = out
    return out


READ = {}


MAX_TOKENS = 10  # the mini text encoder's window


def warn(message, _said=set()):
    """A warning on stderr, once per message."""
    if message not in _said:
        _said.add(message)
        import sys
        print(f"warning: {message}", file=sys.stderr)


def check_prompt(p, mini, where="prompt"):
    """A prompt its task's reward can score: for the mini world, a sentence of its grammar with the label's task;
    for real models, an OCR prompt needs its text in quotes (the OCR reward reads the quoted text)."""
    text, task = p["prompt"], p["task"]
    if not text.strip():
        raise BadInput(f"{where} is empty")
    if task == "ocr" and not re.search(r'"[^"]+"', text):
        raise BadInput(f"{where} {short(text)} is labelled ocr but quotes no text to render (write it in double quotes)")
    if mini:
        tokenize(text)
        if text not in GRAMMAR.setdefault(task, set(all_prompts(task))):
            raise BadInput(f"{where} {short(text)} is not a {task} prompt of the mini world's grammar (see "
                           f"miniworld.all_prompts('{task}'))")


GRAMMAR = {}  # task -> the set of its prompts


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
_yy16, _xx16 = torch.meshgrid(torch.arange(SIZE // 2) + 0.5, torch.arange(SIZE // 2) + 0.5, indexing="ij")


def shape_mask(shape, cx, cy, r):
    """Boolean (32, 32) mask of a shape of half-size r (px) centred at (cx, cy), drawn in 2-px blocks: a shape is
    pixel art on a 16x16 grid, so that each of the model's 4-px patches holds 2x2 blocks rather than a curve."""
    x, y, cx, cy, r = _xx16, _yy16, cx / 2, cy / 2, r / 2
    if shape == "circle":
        cells = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        cells = ((x - cx).abs() <= r) & ((y - cy).abs() <= r)
    elif shape == "diamond":  # a square standing on a corner, as wide as the others
        cells = (x - cx).abs() + (y - cy).abs() <= r
    elif shape == "ring":     # a circle with a hole of half its radius
        d2 = (x - cx) ** 2 + (y - cy) ** 2
        cells = (d2 <= r * r) & (d2 >= (0.5 * r) ** 2)
    else:                     # triangle: apex up, base down; width grows linearly from the apex
        t = (y - (cy - r)) / (2 * r)
        cells = (t >= 0) & (t <= 1) & ((x - cx).abs() <= r * t)
    return cells.repeat_interleave(2, 0).repeat_interleave(2, 1)


def paint(img, mask, color):
    img[:, mask] = torch.tensor(color).view(3, 1).expand(3, int(mask.sum()))


def _background(rng):
    g = rng.uniform(0.10, 0.25)
    ramp = torch.linspace(-1, 1, SIZE).view(1, SIZE, 1) * rng.uniform(-0.04, 0.04)
    return (torch.full((3, SIZE, SIZE), g) + ramp).clamp(0, 1)


# Where objects go: like the text, a composition has one layout per object count (the relation picks the
# order), so that the model spends its capacity on which shapes, colours and counts to draw rather than on where.
LAYOUTS = {1: [(16, 16)], 2: [(8, 16), (24, 16)], 3: [(16, 8), (8, 24), (24, 24)], 4: [(8, 8), (24, 8), (8, 24), (24, 24)],
           5: [(6, 6), (26, 6), (6, 26), (26, 26), (16, 16)]}  # five: a miscount in the data (smaller shapes)
RELATION_LAYOUT = {"left of": [(8, 16), (24, 16)], "right of": [(24, 16), (8, 16)], "above": [(16, 8), (16, 24)],
                   "below": [(16, 24), (16, 8)]}


def render_geneval(spec, rng):
    img = _background(rng)
    objs = []  # (shape, colour)
    for shape, color, count in spec["objects"]:
        objs += [(shape, color)] * count
    objs = [(s, c or USUAL_COLOR[s]) for s, c in objs]
    r = 6 if len(objs) <= 4 else 4
    places = RELATION_LAYOUT[spec["relation"]] if spec["relation"] and len(objs) == 2 else LAYOUTS[len(objs)]
    for (shape, color), (cx, cy) in zip(objs, places):
        paint(img, shape_mask(shape, cx, cy, r), COLORS[color])
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
    paint(img, shape_mask("circle", rng.choice([4, 6, 8, 24, 26, 28]), 4, 2), sun)  # off to a side, smaller than any object
    if spec["object"]:
        shape, color, _ = spec["object"]
        paint(img, shape_mask(shape, 16, 2 * ((horizon - 7) // 2), 6), COLORS[color])  # in the middle, over the horizon
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
        # (a wrong colour or shape never makes an out-of-distribution binding: no image shows one)
        if kind == "count" and o[2] > 1:
            o[2] += rng.choice([-1, 1])
        elif kind == "color" and o[1]:
            o[1] = rng.choice([c for c in COLORS if c != o[1] and (c, o[0]) not in OOD_BINDINGS])
        elif kind == "swap" and len(objs) == 2:
            objs.reverse()
        else:
            o[0] = rng.choice([s for s in SHAPES if s != o[0] and (o[1] or USUAL_COLOR[s], s) not in OOD_BINDINGS])
        spec = {**spec, "objects": [tuple(o) for o in objs]}
        if len({(s, c) for s, c, _ in spec["objects"]}) < len(spec["objects"]):  # two identical phrases: keep one
            spec["objects"] = spec["objects"][:1]
            spec["relation"] = None
        return spec
    return None


# How often pretraining shows a prompt drawn wrong, by GenEval category and for text: the profile of SD3.5-Medium,
# which draws a single object nearly always right, colours and two objects mostly, counts, positions and colour
# bindings about half the time, and text about 0.6 of the time (GenEval 0.63, OCR 0.59).
WRONG = {"single_object": 0.0, "two_object": 0.25, "counting": 0.3, "colors": 0.12, "position": 0.3,
         "color_attr": 0.3, "ocr": 0.5}
# ... and how often an image is blurred, noisy, dull or cluttered: scenes most often, so that the base draws them
# below their clean quality, leaving the DeQA and PickScore teachers room (SD3.5-M: DeQA 4.07 of 5).
DEGRADED = {"geneval": 0.1, "ocr": 0.25, "pickscore": 0.75}


CLUTTER = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in OOD_BINDINGS]


def render(text, rng=None, defects=False):
    """Draw a prompt. With defects=True, images come out wrong (WRONG) or degraded (DEGRADED) on purpose."""
    rng = rng or random.Random()
    spec = parse(text)
    task = {"general": "pickscore"}.get(spec["task"], spec["task"])
    if defects and rng.random() < WRONG.get(CATEGORY.get(text, spec["task"]), 0):
        spec = corrupt(text, rng)
    if spec["task"] == "geneval":
        img = render_geneval(spec, rng)
    elif spec["task"] == "ocr":
        img = render_ocr(spec["text"], rng)
    else:
        img = render_general(spec, rng)
    if defects and rng.random() < DEGRADED[task]:
        kind = rng.choice(["blur", "noise", "dull", "clutter"])
        if kind == "blur":
            img = blur(img)
        elif kind == "noise":
            img = img + rng.uniform(0.04, 0.12) * torch.randn(img.shape, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        elif kind == "dull":
            gray = img.mean(0, keepdim=True)
            img = gray + rng.uniform(0.3, 0.6) * (img - gray)
        else:
            color, shape = rng.choice(CLUTTER)
            paint(img, shape_mask(shape, rng.uniform(3, 29), rng.uniform(3, 29), 1.5), COLORS[color])
    return img.clamp(0, 1)


def render_batch(prompts, seed, defects=False):
    rng = random.Random(seed)
    return torch.stack([render(p["prompt"] if isinstance(p, dict) else p, rng, defects) for p in prompts])
