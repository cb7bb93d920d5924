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
import argparse
import base64
import io
import json
import re
import time
import urllib.error
import urllib.request

import torch
import torch.nn.functional as F

import miniworld as mw
from runs import BadInput

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


# ----------------------------------------------------------------------------------------------- real backends
# For Stable Diffusion 3.5 the same names get real scorers (flags from add_args, installed by use_backends):
#   pickscore  transformers' CLIPModel + processor from a path: logit_scale * cos(image, text), PickScore's formula
#   ocr        an OCR engine (optional extra: paddleocr), 1 - edit distance / len(the prompt's quoted text)
#   geneval, deqa   reward servers over HTTP + JSON: POST {"images": [base64 PNG], "prompts": [str]} ->
#              {"scores": [float | null]}; timeouts, bounded retries, one clear error. Never pickle.
# `python rewards.py --serve geneval --port 8000` is a reference server (standard library + this file).
def to_uint8(img):
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8 numpy, what PIL and OCR engines take."""
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def png_b64(img):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(to_uint8(img)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def from_png_b64(s):
    import numpy as np
    from PIL import Image
    arr = np.array(Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255


def remote(name, url, timeout=120.0, retries=3, backoff=2.0):
    """A reward served over HTTP + JSON. Down or slow: retried `retries` times, then one clear error."""
    def score(images, prompts):
        body = json.dumps({"images": [png_b64(i) for i in images], "prompts": [_prompt(p) for p in prompts]}).encode()
        for attempt in range(retries):
            try:
                req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    answer = r.read()
                break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                why = getattr(e, "reason", e)
                if attempt + 1 == retries:
                    raise BadInput(f"the {name} reward server at {url} is down or too slow ({why}) after {retries} "
                                      f"tries of {timeout:g} s; start it (python rewards.py --serve {name}) or fix "
                                      f"--{name}_url") from None
                time.sleep(backoff * 2 ** attempt)
        try:
            scores = json.loads(answer)["scores"]
            assert isinstance(scores, list) and len(scores) == len(prompts)
            return torch.tensor([float("nan") if s is None else float(s) for s in scores])
        except (ValueError, KeyError, TypeError, AssertionError):
            raise BadInput(f"the {name} reward server at {url} answered garbage ({answer[:80]!r}); it must return "
                              f'{{"scores": [{len(prompts)} numbers]}}') from None
    return score


def clip_pickscore(path, processor=None, device="cpu"):
    """PickScore: logit_scale * cos(image, text) of a CLIP model (yuvalkirstain/PickScore_v1) from a path."""
    from transformers import AutoProcessor, CLIPModel
    try:
        model = CLIPModel.from_pretrained(path).eval().to(device)
        proc = AutoProcessor.from_pretrained(processor or path)
    except Exception as e:
        raise BadInput(f"cannot load a CLIP model from {path!r} for PickScore ({type(e).__name__}); give "
                          "--pickscore_model DIR (and --pickscore_processor DIR if the processor lives apart)") from None

    @torch.no_grad()
    def score(images, prompts):
        from PIL import Image
        pil = [Image.fromarray(to_uint8(i)) for i in images]
        x = proc(images=pil, text=[_prompt(p) for p in prompts], padding=True, truncation=True, max_length=77,
                 return_tensors="pt").to(device)
        img = model.get_image_features(pixel_values=x["pixel_values"])
        txt = model.get_text_features(input_ids=x["input_ids"], attention_mask=x["attention_mask"])
        img, txt = (getattr(f, "pooler_output", f) for f in (img, txt))  # transformers 5 returns an output object
        cos = (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1)
        return (model.logit_scale.exp().float() * cos).cpu()
    return score


def ocr_engine(name):
    """Flow-GRPO's OCR reward with a real engine: 1 - edit distance / len(target), target = the prompt's quoted text,
    spaces dropped and lower-cased on both sides. PaddleOCR 2.x (Flow-GRPO pins 2.9.1) or 3.x, whose API changed."""
    try:
        import paddleocr
    except ImportError:
        raise BadInput(f"--ocr_engine {name} needs the optional extra: pip install paddleocr paddlepaddle") from None
    if int(paddleocr.__version__.split(".")[0]) >= 3:
        engine = paddleocr.PaddleOCR(use_doc_orientation_classify=False, use_doc_unwarping=False,
                                     use_textline_orientation=False, lang="en")

        def read(arr):
            return "".join(t for res in engine.predict(arr) for t in res["rec_texts"])
    else:
        engine = paddleocr.PaddleOCR(use_angle_cls=False, lang="en", show_log=False)

        def read(arr):  # [[box, (text, confidence)], ...] per image, None when nothing was found
            return "".join(w[1][0] for line in engine.ocr(arr, cls=False) or [] for w in line or [])

    def score(images, prompts):
        out = []
        for img, p in zip(images, prompts):
            m = re.search(r'"([^"]+)"', _prompt(p))
            if not m:
                out.append(float("nan"))
                continue
            text, target = read(to_uint8(img)).replace(" ", "").lower(), m.group(1).replace(" ", "").lower()
            out.append(max(0.0, 1 - edit_distance(text, target) / len(target)))
        return torch.tensor(out)
    return score


def add_args(ap):
    g = ap.add_argument_group("real reward backends (default: the mini world's scorers)")
    g.add_argument("--pickscore_model", default=None, help="CLIP dir for PickScore (yuvalkirstain/PickScore_v1)")
    g.add_argument("--pickscore_processor", default=None, help="its processor, if apart (laion/CLIP-ViT-H-14-...)")
    g.add_argument("--ocr_engine", choices=["paddleocr"], default=None, help="an OCR engine (optional extra)")
    g.add_argument("--geneval_url", default=None, help="GenEval reward server, e.g. http://127.0.0.1:18085")
    g.add_argument("--deqa_url", default=None, help="DeQA reward server")
    g.add_argument("--reward_timeout", type=float, default=120.0, help="seconds per reward server request")
    g.add_argument("--reward_retries", type=int, default=3)


def use_backends(args, device="cpu"):
    """Install the real scorers the flags name in REWARDS (the names, and so the task labels, stay the same)."""
    if args.pickscore_model:
        REWARDS["pickscore"] = clip_pickscore(args.pickscore_model, args.pickscore_processor, device)
    if args.ocr_engine:
        REWARDS["ocr"] = ocr_engine(args.ocr_engine)
    for name in ("geneval", "deqa"):
        if getattr(args, f"{name}_url"):
            REWARDS[name] = remote(name, getattr(args, f"{name}_url"), args.reward_timeout, args.reward_retries)


def make_server(name, host="127.0.0.1", port=0):
    """The reference reward server: this file's scorer `name` behind the HTTP + JSON protocol above."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            try:
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                scores = REWARDS[name](torch.stack([from_png_b64(s) for s in req["images"]]), req["prompts"])
                code, body = 200, {"scores": [None if s != s else float(s) for s in scores.tolist()]}
            except Exception as e:  # the client gets the reason, the server keeps serving
                code, body = 400, {"error": f"{type(e).__name__}: {e}"}
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass
    return ThreadingHTTPServer((host, port), Handler)


REWARDS = {"geneval": geneval, "ocr": ocr, "pickscore": pickscore, "deqa": deqa}
SCALE = {"geneval": 1.0, "ocr": 1.0, "pickscore": 26.0, "deqa": 5.0}  # Table 2's Avg divides by these


def parse_spec(spec):
    """'ocr' or 'geneval:0.4,ocr:0.3,pickscore:0.3' -> {name: weight}; one clear ValueError otherwise."""
    out = {}
    for part in spec.split(","):
        name, _, w = part.strip().partition(":")
        if name not in REWARDS:
            raise BadInput(f"unknown reward {name!r}; choose from {', '.join(REWARDS)} (weights as name:0.5,...)")
        try:
            out[name] = float(w) if w else 1.0
        except ValueError:
            raise BadInput(f"reward weight {w!r} for {name} is not a number (write e.g. {name}:0.5)") from None
        if not out[name] > 0 or out[name] != out[name]:
            raise BadInput(f"reward weight for {name} must be a positive number, got {w}")
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
        raise BadInput(f"no reward in {list(weights)} applies to the prompt {bad!r}; add one that does")
    return num / den, each


def main(argv=None):
    ap = argparse.ArgumentParser(description="Serve one reward over HTTP + JSON (the reference reward server).")
    ap.add_argument("--serve", required=True, choices=list(REWARDS))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    server = make_server(args.serve, args.host, args.port)
    print(f"serving {args.serve} on http://{args.host}:{server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
