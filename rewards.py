"""Rewards, one function per column of the paper's Table 2: images (B, 3, H, W) in [0, 1] + prompts in, (B,) out.

Mini world (programmatic scorers; their paper counterparts in brackets):
  geneval   [GenEval, an object detector]   saturated colour blobs -> shape (by fill, hole and taper), colour,
            count and position; the training reward is Flow-GRPO's reward server's partial credit, Table 2's column
            GenEval's strict 0/1 (geneval_strict).
  ocr       [PaddleOCR edit distance]       template-matching reader; 1 - edit distance / len(target).
  pickscore [PickScore, human preference]   on the 0..26 scale: 26 x preference in [0, 1]; prompt alignment of a
            scene's sky, ground and named object, plus vividness and contrast, which people like and which it
            rewards past what is natural, so pushing it saturates backgrounds (costing GenEval) and clips (DeQA).
  deqa      [DeQA-Score, image quality]     on the 1..5 MOS scale: penalises noise (Immerkaer's estimator),
            blur (weak edges) and clipped pixels. Its noise filter also reacts to thin strokes, so pushing DeQA
            smooths digits (costing OCR): the seesaw the paper describes.
A reward that a prompt does not ask about (OCR on a shape prompt) is NaN; `combine` skips it. Real images get real
scorers under the same names (real_rewards.py).
"""
import math

import torch
import torch.nn.functional as F

import miniworld as mw
from runs import BadInput

PALETTE = torch.tensor(list(mw.COLORS.values()))  # (5, 3)
COLOR_NAMES = list(mw.COLORS)


def _prompt(p):
    return p["prompt"] if isinstance(p, dict) else p


# ----------------------------------------------------------------------------------------------- blobs
def shape_of(m, x0, x1, y0, y1):
    """The shape a blob (a bool mask with bounding box [x0, x1) x [y0, y1)) is most like: each of the five drawn at
    the box's centre and size, the one of highest overlap (IoU), if that is at least 1/2 (else "blob"). Like a
    detector, it forgives a shape drawn a little off; unlike a rule on a few pixels, its score moves smoothly."""
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2
    iou = {s: float((m & t).sum()) / float((m | t).sum()) for s in mw.SHAPES for t in [mw.shape_mask(s, cx, cy, r)]}
    best = max(iou, key=iou.get)
    return best if iou[best] >= 0.5 else "blob"


def blobs(images, min_area=8):
    """Saturated connected regions of each palette colour: per image a list of dicts (color, shape, area, cx, cy)."""
    B, _, H, W = images.shape
    mx, mn = images.max(1).values, images.min(1).values
    is_obj = ((mx - mn) > 0.5) & (mx > 0.35)   # saturated like the palette; skies, grounds and text are not (B, H, W)
    dist = ((images.permute(0, 2, 3, 1)[:, :, :, None, :] - PALETTE) ** 2).sum(-1)  # (B, H, W, 5)
    cls = torch.where(is_obj, dist.argmin(-1), -1)
    mask = torch.stack([cls == k for k in range(len(PALETTE))], 1).float()        # (B, 5, H, W)
    labels = (torch.arange(1, H * W + 1, dtype=torch.float32).view(1, 1, H, W)) * mask
    while True:  # flood fill: every pixel takes the largest label among its 4 neighbours of the same colour
        p = F.pad(labels, (1, 1, 1, 1))
        new = torch.stack([labels, p[..., :-2, 1:-1], p[..., 2:, 1:-1], p[..., 1:-1, :-2], p[..., 1:-1, 2:]]).amax(0) * mask
        if torch.equal(new, labels):
            break
        labels = new
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    out = []
    for b in range(B):
        found = []
        for k in range(len(PALETTE)):
            lab = labels[b, k]
            for v in lab.unique():
                if v == 0:
                    continue
                m = lab == v
                area = int(m.sum())
                if area < min_area:
                    continue
                ys, xs = yy[m], xx[m]
                y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
                found.append({"color": COLOR_NAMES[k], "shape": shape_of(m, x0, x1, y0, y1), "area": area,
                              "w": x1 - x0, "h": y1 - y0, "cx": float(xs.mean()), "cy": float(ys.mean())})
        out.append(found)
    return out


# ----------------------------------------------------------------------------------------------- the rewards
def _relation_holds(relation, matches_a, matches_b):
    """Does some pair (a, b) of found objects stand in the prompt's relation ("a left of b": a's centre at least 2 px
    left of b's)?"""
    def holds(a, b):
        return {"left of": b["cx"] - a["cx"] > 2, "right of": a["cx"] - b["cx"] > 2,
                "above": b["cy"] - a["cy"] > 2, "below": a["cy"] - b["cy"] > 2}[relation]
    return any(holds(a, b) for a in matches_a for b in matches_b)


def geneval(images, prompts):
    """Flow-GRPO's GenEval training reward (its reward server's partial credit) on a composition prompt, NaN on any
    other: the mean of these terms, per object clause (shape, colour, count k, with n shapes found):
      count   1 - |k - n| / k, floored at 0 (the server's can go negative when n > 2k; a reward below "nothing
              drawn" would push the policy toward empty images)
      colour  1 - |k - n_colour| / k when the count is right, else 0 (if the prompt names a colour)
      relation 1 if it holds between the objects of the right shape and colour, else 0 (also 0 when a count is
              wrong; the server's indentation gives a failed relation half credit, which we do not copy)
    So "three circles" with two drawn scores 2/3, "a red circle" drawn blue 1/2."""
    scores = []
    for found, p in zip(blobs(images), prompts):
        spec = mw.parse(_prompt(p))
        if spec["task"] != "geneval":
            scores.append(float("nan"))
            continue
        terms, matches, counts_right = [], [], True
        for shape, color, k in spec["objects"]:
            of_shape = [o for o in found if o["shape"] == shape]
            terms.append(max(0.0, 1 - abs(k - len(of_shape)) / k))
            right = [o for o in of_shape if color is None or o["color"] == color]
            matches.append(right)
            counts_right &= len(of_shape) == k
            if color:
                terms.append(max(0.0, 1 - abs(k - len(right)) / k) if len(of_shape) == k else 0.0)
        if spec["relation"]:
            terms.append(float(counts_right and _relation_holds(spec["relation"], *matches)))
        scores.append(sum(terms) / len(terms))
    return torch.tensor(scores)


def geneval_strict(images, prompts):
    """GenEval's own evaluation (Table 2's column): 1 if the image is right, else 0; NaN off composition prompts.
    Each object must be found with its colour (at least once; exactly k times for a count k > 1, GenEval's
    include + exclude), and the relation must hold."""
    scores = []
    for found, p in zip(blobs(images), prompts):
        spec = mw.parse(_prompt(p))
        if spec["task"] != "geneval":
            scores.append(float("nan"))
            continue
        matches = [[o for o in found if o["shape"] == shape and (color is None or o["color"] == color)]
                   for shape, color, _ in spec["objects"]]
        ok = all(len(m) == k if k > 1 else len(m) >= 1 for m, (_, _, k) in zip(matches, spec["objects"]))
        if spec["relation"]:
            ok = ok and _relation_holds(spec["relation"], *matches)
        scores.append(float(ok))
    return torch.tensor(scores)


TEMPLATES = torch.tensor([[float(b) for b in mw.FONT[d]] for d in "0123456789"])  # (10, 15)


def read_text(img):
    """The digits drawn in an image: find the bright ink, cut it into glyph cells, match each to the 3x5 font."""
    gray = img.mean(0)
    bg, ink = gray.median(), torch.quantile(gray.flatten(), 0.97)
    if ink - bg < 0.2:
        return ""
    fg = gray > (bg + ink) / 2
    cols = (fg.sum(0) >= 2).nonzero().flatten()
    rows = (fg.sum(1) >= 2).nonzero().flatten()
    if len(cols) == 0 or len(rows) == 0:
        return ""
    x0, x1, y0, y1 = int(cols.min()), int(cols.max()) + 1, int(rows.min()), int(rows.max()) + 1
    stride = mw.GLYPH_W + mw.GLYPH_GAP
    n = max(1, min(3, round((x1 - x0 + mw.GLYPH_GAP) / stride)))
    cell = (x1 - x0 + mw.GLYPH_GAP) / n
    norm = ((gray - bg) / (ink - bg)).clamp(0, 1)
    text = ""
    for k in range(n):
        a = int(round(x0 + k * cell))
        b = max(a + 1, int(round(x0 + (k + 1) * cell - mw.GLYPH_GAP * cell / stride)))
        crop = norm[y0:y1, a:b][None, None]
        glyph = F.interpolate(crop, size=(5, 3), mode="area").flatten()
        text += "0123456789"[int(((TEMPLATES - glyph) ** 2).sum(1).argmin())]
    return text


def edit_distance(a, b):
    d = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, cb in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (ca != cb))
    return d[len(b)]


def ocr(images, prompts):
    """1 - edit distance / len(target), floored at 0 (Flow-GRPO's OCR reward); NaN for prompts with no text."""
    scores = []
    for img, p in zip(images, prompts):
        spec = mw.parse(_prompt(p))
        if spec["task"] != "ocr":
            scores.append(float("nan"))
            continue
        target = spec["text"]
        scores.append(max(0.0, 1 - edit_distance(read_text(img), target) / len(target)))
    return torch.tensor(scores)


def colourfulness(images):
    """Hasler & Suesstrunk's colourfulness on [0, 1] images: (B,)."""
    r, g, b = images.unbind(1)
    rg, yb = (r - g).flatten(1), (0.5 * (r + g) - b).flatten(1)
    return (rg.std(1) ** 2 + yb.std(1) ** 2).sqrt() + 0.3 * (rg.mean(1) ** 2 + yb.mean(1) ** 2).sqrt()


def pickscore(images, prompts):
    """26 x preference: 0.6 alignment (sky, ground, named object) + 0.4 appeal (vivid, contrasty) for scene prompts,
    appeal alone for the others."""
    lum = images.mean(1).flatten(1)
    appeal = 0.5 * (colourfulness(images) / 0.6).clamp(max=1) + 0.5 * (lum.std(1) / 0.3).clamp(max=1)
    found = blobs(images, min_area=20)
    scores = []
    for i, p in enumerate(prompts):
        spec = mw.parse(_prompt(p))
        if spec["task"] != "general":
            scores.append(float(appeal[i]))
            continue
        top, bottom = (torch.tensor(c) for c in mw.TIMES[spec["time"]])
        sky = images[i, :, 2:12].mean((1, 2))
        ground = images[i, :, 24:].mean((1, 2))
        want_sky = 0.6 * top + 0.4 * bottom
        align = [torch.exp(-((sky - want_sky) ** 2).sum() / 0.05),
                 torch.exp(-((ground - 0.9 * torch.tensor(mw.SCENES[spec["scene"]])) ** 2).sum() / 0.05)]
        if spec["object"]:
            shape, color, _ = spec["object"]
            align.append(torch.tensor(float(any(o["shape"] == shape and o["color"] == color and max(o["w"], o["h"]) <= 16
                                                for o in found[i]))))
        scores.append(0.6 * float(torch.stack(align).mean()) + 0.4 * float(appeal[i]))
    return 26 * torch.tensor(scores)


LAPLACE = torch.tensor([[1.0, -2, 1], [-2, 4, -2], [1, -2, 1]]).view(1, 1, 3, 3)


def deqa(images, prompts=None):
    """1 + 4 x quality, quality = 1 - noise - blur - clipping penalties (each clamped), on any image."""
    gray = images.mean(1, keepdim=True)
    H, W = gray.shape[-2:]
    # Immerkaer (1996): sigma = sqrt(pi/2) / (6 (W-2)(H-2)) * sum |I * M|
    noise = (torch.pi / 2) ** 0.5 * F.conv2d(gray, LAPLACE).abs().sum((1, 2, 3)) / (6 * (W - 2) * (H - 2))
    grad = torch.cat([(gray[..., 1:, :] - gray[..., :-1, :]).abs().flatten(1),
                      (gray[..., :, 1:] - gray[..., :, :-1]).abs().flatten(1)], 1)
    edges = grad.topk(grad.shape[1] // 50, dim=1).values.mean(1)  # strength of the strongest 2% of edges
    clipped = ((images < 0.02) | (images > 0.98)).float().flatten(1).mean(1)
    quality = (1 - (noise / 0.06).clamp(max=1) * 0.45 - (1 - edges / 0.3).clamp(0, 1) * 0.35
               - (clipped / 0.2).clamp(max=1) * 0.2)
    return 1 + 4 * quality.clamp(0, 1)


REWARDS = {"geneval": geneval, "ocr": ocr, "pickscore": pickscore, "deqa": deqa}


def metric(task):
    """Table 2's column for a task: the reward itself, but GenEval's is strict (geneval_strict; with a reward server,
    a score of exactly 1)."""
    if task != "geneval":
        return REWARDS[task]
    if REWARDS["geneval"] is geneval:
        return geneval_strict
    return lambda images, prompts: (lambda s: torch.where(s.isnan(), s, (s == 1).float()))(REWARDS["geneval"](images, prompts))
SCALE = {"geneval": 1.0, "ocr": 1.0, "pickscore": 26.0, "deqa": 5.0}  # Table 2's Avg divides by these


def parse_spec(spec):
    """'ocr' or 'geneval:0.4,ocr:0.3,pickscore:0.3' -> {name: weight}; one clear ValueError otherwise."""
    out = {}
    for part in spec.split(","):
        name, _, w = part.strip().partition(":")
        if name in out:
            raise BadInput(f"reward {name!r} appears twice in {spec!r}; give each reward once, with its weight")
        if name not in REWARDS:
            raise BadInput(f"unknown reward {name!r}; choose from {', '.join(REWARDS)} (weights as name:0.5,...)")
        try:
            out[name] = float(w) if w else 1.0
        except ValueError:
            raise BadInput(f"reward weight {w!r} for {name} is not a number (write e.g. {name}:0.5)") from None
        if not (math.isfinite(out[name]) and out[name] > 0):
            raise BadInput(f"reward weight for {name} must be a positive finite number, got {w}")
    return out


def combine(weights, images, prompts):
    """Weighted sum of rewards, each divided by its Table 2 scale; rewards a prompt does not ask about (NaN) are
    skipped and the remaining weights renormalised. Returns the total (B,) and each reward (B,)."""
    images = images.detach().float().cpu()  # the scorers are CPU code (or servers)
    each = {name: REWARDS[name](images, prompts) for name in weights}
    num = torch.zeros(len(prompts))
    den = torch.zeros(len(prompts))
    for name, w in weights.items():
        r = each[name] / SCALE[name]
        ok = ~r.isnan()
        num += torch.where(ok, w * r, 0.0)
        den += ok * w
    if (den == 0).any():
        bad = _prompt(prompts[int((den == 0).nonzero()[0])])
        raise BadInput(f"no reward in {list(weights)} applies to the prompt {bad!r}; add one that does")
    return num / den, each
