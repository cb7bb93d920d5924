"""The real world's rewards: for Stable Diffusion 3.5 the names of rewards.py get real scorers (flags from add_args,
installed into rewards.REWARDS by use_backends, so task labels and mixes stay the same):
  pickscore  transformers' CLIPModel + processor from a path: logit_scale * cos(image, text), PickScore's formula
  ocr        an OCR engine (optional extra: paddleocr), 1 - edit distance / len(the prompt's quoted text)
  any        a reward server over HTTP + JSON, as Flow-GRPO's reward-server: POST {"images": [base64 PNG],
             "prompts": [str]} -> {"scores": [float | null]}; a total deadline, bounded retries, one clear error.
             Never pickle.
`python real_rewards.py --serve geneval --port 8000` is a reference server (standard library + rewards.py).
"""
import base64
import http.client
import io
import json
import re
import threading
import time
import urllib.error
import urllib.request

import torch
import torch.nn.functional as F

import miniworld as mw
import runs
from rewards import REWARDS, _prompt, edit_distance
from runs import BadInput


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


def _post(url, body, deadline):
    """POST body and return the answer's bytes, within a total deadline (a server that trickles bytes is cut off);
    a stop signal (Ctrl-C, SIGTERM) ends the wait at once with runs.Interrupted."""
    box = {}

    def work():
        try:
            req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=max(deadline - time.monotonic(), 0.01)) as r:
                box["answer"] = r.read()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.05)
        if runs.stop_signalled():
            raise runs.Interrupted("a stop signal arrived during a reward call")
        if time.monotonic() > deadline and worker.is_alive():
            raise TimeoutError("no complete answer in time")
    if "error" in box:
        raise box["error"]
    return box["answer"]


def remote(name, url, timeout=120.0, retries=3, backoff=2.0):
    """A reward served over HTTP + JSON. Each call has a total deadline of `timeout` seconds; down, slow or failing
    (HTTP 5xx): retried `retries` times, then one clear error; a refusal (HTTP 4xx) is reported at once, with the
    server's own reason."""
    def score(images, prompts):
        body = json.dumps({"images": [png_b64(i) for i in images], "prompts": [_prompt(p) for p in prompts]}).encode()
        for attempt in range(retries):
            try:
                answer = _post(url, body, time.monotonic() + timeout)
                break
            except urllib.error.HTTPError as e:
                why = f"HTTP {e.code}: {e.read()[:200].decode('utf-8', 'replace')!r}"
                if e.code < 500:
                    raise BadInput(f"the {name} reward server at {url} refused the request ({why}); fix the server or "
                                   f"--{name}_url") from None
            except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException, ValueError) as e:
                why = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt + 1 == retries:
                raise BadInput(f"the {name} reward server at {url} is down, too slow or failing ({why}) after "
                               f"{retries} tries of at most {timeout:g} s; start it (python real_rewards.py --serve {name}), "
                               f"fix --{name}_url or raise --reward_timeout") from None
            runs.pause(backoff * 2 ** attempt)
        try:
            scores = json.loads(answer)["scores"]
            assert isinstance(scores, list) and len(scores) == len(prompts)
            return torch.tensor([float("nan") if s is None else float(s) for s in scores])
        except (ValueError, KeyError, TypeError, AssertionError, RecursionError, OverflowError):
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
    g = ap.add_argument_group("real reward backends (default: the mini world's scorers, which only the mini world may use)")
    g.add_argument("--pickscore_model", default=None, help="CLIP dir for PickScore (yuvalkirstain/PickScore_v1)")
    g.add_argument("--pickscore_processor", default=None, help="its processor, if apart (laion/CLIP-ViT-H-14-...)")
    g.add_argument("--ocr_engine", choices=["paddleocr"], default=None, help="an OCR engine (optional extra)")
    for name in REWARDS:
        g.add_argument(f"--{name}_url", default=None, help=f"a {name} reward server (HTTP + JSON), e.g. "
                       "http://127.0.0.1:18085")
    g.add_argument("--reward_timeout", type=float, default=120.0, help="seconds a reward server may take per call")
    g.add_argument("--reward_retries", type=int, default=3, help="tries per call before the run stops")


def use_backends(args, names, model_path, device="cpu"):
    """Install the real scorers the flags name in REWARDS (the names, and so the task labels, stay the same).
    Real images (any --model but a mini checkpoint) need a real scorer for every reward in `names`: the mini
    world's programmatic scorers would score them silently and meaninglessly."""
    if not (1 <= args.reward_retries <= 100 and 0 < args.reward_timeout <= 86400):
        raise BadInput(f"--reward_retries must be >= 1 and --reward_timeout a positive number of seconds, got "
                       f"{args.reward_retries} and {args.reward_timeout}")
    if not model_path.endswith(".safetensors"):
        flag = {"pickscore": "--pickscore_model DIR (or --pickscore_url)", "ocr": "--ocr_engine paddleocr (or --ocr_url)",
                "geneval": "--geneval_url URL", "deqa": "--deqa_url URL"}
        missing = [n for n in names if not getattr(args, f"{n}_url") and not (n == "pickscore" and args.pickscore_model)
                   and not (n == "ocr" and args.ocr_engine)]
        if missing:
            raise BadInput(f"{model_path} makes real images, and the mini world's scorers cannot judge them: give a real "
                           f"backend for {', '.join(missing)} ({'; '.join(flag[n] for n in missing)})")
    if args.pickscore_model:
        REWARDS["pickscore"] = clip_pickscore(args.pickscore_model, args.pickscore_processor, device)
    if args.ocr_engine:
        REWARDS["ocr"] = ocr_engine(args.ocr_engine)
    for name in list(REWARDS):
        if getattr(args, f"{name}_url"):
            REWARDS[name] = remote(name, getattr(args, f"{name}_url"), args.reward_timeout, args.reward_retries)


def make_server(name, host="127.0.0.1", port=0):
    """The reference reward server: this file's scorer `name` behind the HTTP + JSON protocol above. Its scorers read
    the mini world's 32x32 pictures, so larger images are area-resized to that first (a stand-in for real SD3 runs;
    a real deployment serves Flow-GRPO's reward-server models). The scorer is taken when the server is made, so a
    client in the same process that points REWARDS at servers never has a server call itself."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    score = REWARDS[name]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            try:
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                images = torch.stack([from_png_b64(s) for s in req["images"]])
                if images.shape[-1] != mw.SIZE:
                    images = torch.nn.functional.interpolate(images, size=(mw.SIZE, mw.SIZE), mode="area")
                scores = score(images, req["prompts"])
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


def main(argv=None):
    ap = runs.parser("Serve one reward over HTTP + JSON (the reference reward server).")
    ap.add_argument("--serve", required=True, choices=list(REWARDS), help="the reward to serve")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    args = ap.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise BadInput(f"--port must be in 0..65535 (0: any free port), got {args.port}")
    try:
        server = make_server(args.serve, args.host, args.port)
    except OSError as e:
        raise BadInput(f"cannot serve on {args.host}:{args.port} ({e.strerror}); choose another --host or --port") from None
    print(f"serving {args.serve} on http://{args.host}:{server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    runs.run(main)
