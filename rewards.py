"""Rewards, one function per column of the paper's Table 2: images (B, 3, H, W) in [0, 1] + prompts in, (B,) out.

Mini world (programmatic scorers; their paper counterparts in brackets):
  geneval   [GenEval, an object detector]   colour blobs -> shape, colour, count, position checks; the fraction of
            the prompt's checks that pass (Flow-GRPO trains on partial credit; eval.py reports strict accuracy, ==1).
  ocr       [PaddleOCR edit distance]       template-matching reader; 1 - edit distance / len(target).
  pickscore [PickScore, human preference]   on the 0..26 scale: 26 x preference in [0, 1]; prompt alignment of a
            scene's sky, ground and named object, plus vividness and contrast, which people like and which it
            rewards past what is natural, so pushing it saturates backgrounds (costing GenEval) and clips (DeQA).
  deqa      [DeQA-Score, image quality]     on the 1..5 MOS scale: penalises noise (Immerkaer's estimator),
            blur (weak edges) and clipped pixels. Its noise filter also reacts to thin strokes, so pushing DeQA
            smooths digits (costing OCR): the seesaw the paper describes.
A reward that a prompt does not ask about (OCR on a shape prompt) is NaN; `combine` skips it.
"""
import torch
import torch.nn.functional as F

import miniworld as mw

PALETTE = torch.tensor(list(mw.COLORS.values()))  # (5, 3)
COLOR_NAMES = list(mw.COLORS)


def _prompt(p):
    return p["prompt"] if isinstance(p, dict) else p


# ----------------------------------------------------------------------------------------------- blobs
def blobs(images, min_area=8):
    """Saturated connected regions of each palette colour: per image a list of dicts (color, shape, area, cx, cy)."""
    B, _, H, W = images.shape
    mx, mn = images.max(1).values, images.min(1).values
    is_obj = ((mx - mn) > 0.35) & (mx > 0.35)                                      # (B, H, W)
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
                h, w = float(ys.max() - ys.min() + 1), float(xs.max() - xs.min() + 1)
                fill = area / (h * w)
                top = float((ys < ys.min() + h / 2).sum()) / area
                corners = sum(bool(m[int(y - 0.5), int(x - 0.5)]) for y in (ys.min(), ys.max()) for x in (xs.min(), xs.max()))
                if corners >= 3 or fill > 0.95:  # a circle never fills its bounding box's corners
                    shape = "square"
                elif top < 0.42:                 # most pixels in the lower half: apex up
                    shape = "triangle"
                else:
                    shape = "circle"
                found.append({"color": COLOR_NAMES[k], "shape": shape, "area": area,
                              "cx": float(xs.mean()), "cy": float(ys.mean())})
        out.append(found)
    return out


# ----------------------------------------------------------------------------------------------- the rewards
def geneval(images, prompts):
    """Fraction of a composition prompt's checks that pass (each object's count, then its relation); NaN otherwise."""
    scores = []
    for found, p in zip(blobs(images), prompts):
        spec = mw.parse(_prompt(p))
        if spec["task"] != "geneval":
            scores.append(float("nan"))
            continue
        checks, matches = [], []
        for shape, color, count in spec["objects"]:
            m = [o for o in found if o["shape"] == shape and (color is None or o["color"] == color)]
            matches.append(m)
            checks.append(len(m) == count if count > 1 else len(m) >= 1)  # GenEval counts exactly, else presence
        if spec["relation"]:
            def holds(a, b):
                return {"left of": b["cx"] - a["cx"] > 2, "right of": a["cx"] - b["cx"] > 2,
                        "above": b["cy"] - a["cy"] > 2, "below": a["cy"] - b["cy"] > 2}[spec["relation"]]
            checks.append(any(holds(a, b) for a in matches[0] for b in matches[1]))
        scores.append(sum(checks) / len(checks))
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
            align.append(torch.tensor(float(any(o["shape"] == shape and o["color"] == color for o in found[i]))))
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
SCALE = {"geneval": 1.0, "ocr": 1.0, "pickscore": 26.0, "deqa": 5.0}  # Table 2's Avg divides by these


def parse_spec(spec):
    """'ocr' or 'geneval:0.4,ocr:0.3,pickscore:0.3' -> {name: weight}; one clear ValueError otherwise."""
    out = {}
    for part in spec.split(","):
        name, _, w = part.strip().partition(":")
        if name not in REWARDS:
            raise mw.BadInput(f"unknown reward {name!r}; choose from {', '.join(REWARDS)} (weights as name:0.5,...)")
        try:
            out[name] = float(w) if w else 1.0
        except ValueError:
            raise mw.BadInput(f"reward weight {w!r} for {name} is not a number (write e.g. {name}:0.5)") from None
        if not out[name] > 0 or out[name] != out[name]:
            raise mw.BadInput(f"reward weight for {name} must be a positive number, got {w}")
    return out


def combine(weights, images, prompts):
    """Weighted sum of rewards, each divided by its Table 2 scale; rewards a prompt does not ask about (NaN) are
    skipped and the remaining weights renormalised. Returns the total (B,) and each reward (B,)."""
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
        raise mw.BadInput(f"no reward in {list(weights)} applies to the prompt {bad!r}; add one that does")
    return num / den, each
