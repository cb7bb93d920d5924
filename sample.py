"""Look at what a checkpoint draws: a grid of samples with the ODE or the SDE (Eq. 5), and rollout throughput.

    python sample.py                                   # the base's held-out prompts, ODE, into samples.png
    python sample.py --lora ckpts/teachers/ocr.safetensors --noise_level 0.7 --out ocr_sde.png
    python sample.py --bench 32                        # SDE rollouts per second against their floor
"""
import math
import textwrap
import time

import torch
from PIL import Image, ImageDraw

import checkpoints
import flow_matching as fm
import lora
import miniworld as mw
import runs
from runs import BadInput


def grid(images, captions, cols=8, scale=None):
    """Images (B, 3, H, W) in [0, 1] with each caption under its image, as one PIL image; small images are
    enlarged (nearest) to about 128 px, large ones shrunk to 256."""
    B, _, H, W = images.shape
    scale = scale or (max(1, 128 // W) if W <= 256 else 256 / W)
    w, cap = int(W * scale), 40
    rows = math.ceil(B / cols)
    canvas = Image.new("RGB", (cols * w, rows * (w + cap)), "white")
    draw = ImageDraw.Draw(canvas)
    arr = (images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().cpu().numpy()
    for i in range(B):
        x, y = (i % cols) * w, (i // cols) * (w + cap)
        canvas.paste(Image.fromarray(arr[i]).resize((w, w), Image.NEAREST if scale >= 1 else Image.BILINEAR), (x, y))
        draw.multiline_text((x + 2, y + w + 1), "\n".join(textwrap.wrap(captions[i], 24)[:3]), fill="black")
    return canvas


def main(argv=None):
    ap = runs.parser("Sample a grid from a checkpoint with the ODE or the SDE (Eq. 5).")
    ap.add_argument("--model", default="ckpts/base.safetensors", help="mini checkpoint, or an SD3 dir / hub id")
    ap.add_argument("--lora", default=None, help="a LoRA teacher / student to apply")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable); default: held-out prompts of each task")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps")
    ap.add_argument("--guidance", type=float, default=1.0, help="CFG scale (1: none; SD3.5: 4.5)")
    ap.add_argument("--noise_level", type=float, default=0.0, help="a of Eq. 5, the SDE's noise; 0 samples the ODE")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initial (and SDE) noise")
    ap.add_argument("--resolution", type=int, default=512, help="SD3 image size (the mini world is 32x32)")
    ap.add_argument("--max_sequence_length", type=int, default=128, help="SD3: T5 prompt tokens (Flow-GRPO: 128)")
    ap.add_argument("--out", default="samples.png", help="the grid to write (a .png)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--bench", type=int, default=0, metavar="B", help="time B-sample SDE rollouts against the floor")
    args = ap.parse_args(argv)
    runs.check_finite(args)
    runs.check_sampling_args(args.steps, args.guidance, args.noise_level, "--steps")
    if args.bench < 0:
        raise BadInput(f"--bench must be a positive batch size, got {args.bench}")
    if args.bench and (args.lora or args.prompt or args.out != ap.get_default("out")):
        raise BadInput("--bench times the base's rollouts alone: --lora, --prompt and --out have no effect; drop them")
    long = [p for p in args.prompt or [] if fm.is_mini(args.model) and len(mw.tokenize(p)) > mw.MAX_TOKENS]
    if long:  # the mini text encoder would read only its first tokens
        raise BadInput(f"--prompt {mw.short(long[0])} is longer than the mini text encoder's {mw.MAX_TOKENS} tokens")
    if not args.bench:
        if not args.out.lower().endswith(".png"):
            raise BadInput(f"--out {args.out}: the grid is written as a PNG; give a .png path")
        checkpoints.check_out(args.out, {"--model": args.model, "--lora": args.lora}, args.overwrite, resumable=False)
        checkpoints.lock_out(args.out, 0, 1)  # two samplers never write one grid
    model = fm.load_model(args.model, resolution=args.resolution)
    model.max_sequence_length = args.max_sequence_length
    if args.bench:
        return bench(model, args)
    if args.lora:
        meta = lora.load_lora(args.lora, model.transformer, "lora")
        if meta.get("base_hash") not in (None, fm.fingerprint(model)):
            raise BadInput(f"--lora {args.lora} was trained on another base than --model {args.model} (hash "
                           f"{meta['base_hash']}); give the base it records ({meta.get('base_path')})")
        lora.set_adapter(model.transformer, "lora")
    prompts = args.prompt or [p["prompt"] for t in mw.TASKS for p in mw.eval_prompts(t, 8)]
    g = torch.Generator().manual_seed(args.seed)
    out = fm.rollout(model, fm.encode_prompts(model, prompts), args.steps, args.guidance, args.noise_level,
                     sde=None if args.noise_level > 0 else [], generator=g, resolution=args.resolution)
    grid(fm.to_images(model, out["states"][:, -1]), prompts).save(args.out)
    print(f"wrote {args.out}")


def bench(model, args):
    """Rollout throughput (trajectories/s) against its floor: `steps` batched forwards and nothing else."""
    prompts = [next(mw.train_prompts()) for _ in range(args.bench)]
    enc = fm.encode_prompts(model, prompts)
    x = torch.randn((args.bench, *model.latent_shape(args.resolution)))
    a = args.noise_level or 0.7

    def timed(fn, reps=5):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[reps // 2]

    with torch.no_grad():
        forward = timed(lambda: fm.velocity(model, x, 0.5, enc, args.guidance))
    rollout = timed(lambda: fm.rollout(model, enc, args.steps, args.guidance, a, x=x))
    floor = args.steps * forward
    print(f"batch {args.bench}, {args.steps} steps, guidance {args.guidance}: one forward {forward * 1e3:.1f} ms; "
          f"rollout {rollout * 1e3:.0f} ms = {args.bench / rollout:.1f} trajectories/s; floor {floor * 1e3:.0f} ms "
          f"= {args.bench / floor:.1f}/s; overhead {100 * (rollout / floor - 1):.1f}%")


if __name__ == "__main__":
    runs.run(main)
