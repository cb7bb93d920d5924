"""What Flow-OPD costs on the real model: one OPD iteration against one GRPO iteration at the same batch, and the
memory of the teachers as LoRA adapters on one base against full model copies (the official code's layout).

    python benchmark.py                 # a CUDA GPU: SD3.5-Medium's transformer (its config, random init, ~2.5B)
    python benchmark.py --tiny          # the same code on a tiny config, on CPU, in seconds (what the test runs)

Both iterations run this repo's own functions (flow_matching.rollout, grpo_teacher.policy_step, opd_student's routed
teachers, mar.anchor_mean) in bf16 with fp32 SDE math, CFG 4.5, 10 steps, gradient checkpointing, as the real runs:
  GRPO  rollout (10 steps) + per trained step: the frozen reference's velocity (KL to the base) + forward/backward
  OPD   rollout (10 steps) + per trained step: the routed teacher's and the anchor's velocities + forward/backward
GRPO's reward models are left out (they would only make it slower), so the ratio favours GRPO.
Prompt encodings are random tensors of the real shapes: the text encoders run once per prompt and are cached.
Targets (issue 5): OPD <= 1.3x GRPO per iteration; three teachers plus the anchor as adapters <= 10% over one model.
"""
import copy
import time
from types import SimpleNamespace

import torch
from diffusers import SD3Transformer2DModel

import flow_matching as fm
import grpo_teacher as grpo
import lora
import mar
import opd_student as opd
import runs
import sde_sampler as sampler
from runs import BadInput

SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                   qk_norm="rms_norm")
TINY = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
            pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
TASKS = ("geneval", "ocr", "pickscore")


def memory(device):
    """Bytes held now: CUDA's allocator, or on CPU the tensors of the models we built (counted by tensor)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def model_bytes(*modules):
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def timed(fn, device, repeats):
    """Seconds per call (after one warm-up) and the peak memory of the calls."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return (time.perf_counter() - t0) / repeats, peak


def main(argv=None):
    ap = runs.parser("OPD vs GRPO iteration time and memory; adapters vs full copies.")
    ap.add_argument("--tiny", action="store_true", help="a tiny config on CPU (a smoke run of this script)")
    ap.add_argument("--batch", type=int, default=8, help="samples per process per iteration")
    ap.add_argument("--resolution", type=int, default=512, help="image size")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps of a rollout")
    ap.add_argument("--guidance", type=float, default=4.5, help="CFG scale")
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank of each adapter")
    ap.add_argument("--alpha", type=float, default=64, help="LoRA alpha of each adapter")
    ap.add_argument("--repeats", type=int, default=3, help="timed iterations of each kind (after one warm-up)")
    args = ap.parse_args(argv)
    runs.check_finite(args)
    runs.check_sampling_args(args.steps, args.guidance, 0.7, "--steps")
    if min(args.batch, args.rank, args.repeats) < 1 or not args.alpha > 0 or args.resolution % 16 or args.resolution < 16:
        raise BadInput("--batch, --rank and --repeats must be >= 1, --alpha > 0, --resolution a positive multiple of 16")
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise BadInput("the benchmark measures SD3.5-Medium on a CUDA GPU and none is visible; --tiny runs it on CPU")
    device = torch.device("cuda" if cuda else "cpu")
    if args.tiny:
        args.batch, args.resolution, args.rank, args.alpha, args.repeats = 2, 64, 2, 4, 1
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)

    # one frozen base
    transformer = SD3Transformer2DModel(**(TINY if args.tiny else SD35_MEDIUM)).to(device, dtype).requires_grad_(False)
    transformer.enable_gradient_checkpointing()
    n_params = sum(p.numel() for p in transformer.parameters())
    base_mem = memory(device) or model_bytes(transformer)
    # the official layout: a full copy of the model per teacher and for the anchor
    copies = [copy.deepcopy(transformer) for _ in range(len(TASKS) + 1)]
    full_mem = (memory(device) - base_mem) if cuda else model_bytes(*copies)
    del copies
    cfg = transformer.config
    model = SimpleNamespace(transformer=transformer, device=device, scheduler=fm.mini_scheduler(),  # SD3's config
                            latent_shape=lambda r: (cfg.in_channels, r // 8, r // 8))
    B, T = args.batch, args.steps
    enc = {"seq": torch.randn(B, 333, cfg.joint_attention_dim, device=device, dtype=dtype),
           "pooled": torch.randn(B, cfg.pooled_projection_dim, device=device, dtype=dtype),
           "null_seq": torch.randn(1, 333, cfg.joint_attention_dim, device=device, dtype=dtype),
           "null_pooled": torch.randn(1, cfg.pooled_projection_dim, device=device, dtype=dtype)}

    # three teachers and the anchor as LoRA adapters (random B, so they are not no-ops), the student as one more
    for name in [f"teacher:{t}" for t in TASKS] + ["anchor", "student"]:
        lora.add_lora(transformer, name, args.rank, args.alpha)
        with torch.no_grad():
            for p in lora.adapter_params(transformer, name)[1::2]:
                p.normal_(0, 1e-3)
    lora_mem = (memory(device) or model_bytes(transformer)) - base_mem
    params = lora.adapter_params(transformer, "student")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    run = SimpleNamespace(guidance=args.guidance, noise_level=0.7, cfg_grad="both")
    sde = sampler.sde_steps(T)
    groups = {t: list(range(k, B, len(TASKS))) for k, t in enumerate(TASKS) if k < B}  # Eq. 7: one teacher each

    def rollout():
        lora.set_adapter(transformer, "student")
        with torch.no_grad():
            return fm.rollout(model, enc, T, args.guidance, 0.7, sde, resolution=args.resolution)

    def update(traj, frozen, loss):
        """Per trained step: the frozen forwards the method needs (no grad), then the student's forward/backward."""
        states, sigmas = traj["states"], traj["sigmas"]
        opt.zero_grad(set_to_none=True)
        for t in sde:
            with torch.no_grad():
                targets = frozen(states[:, t], sigmas, t)
            lora.set_adapter(transformer, "student")
            _, lp, mu = grpo.policy_step(model, states, sigmas, t, enc, run)
            loss(traj, t, lp, mu, targets).backward()
        opt.step()

    def mean_of(adapter, x, sigmas, t):
        lora.set_adapter(transformer, adapter)
        return sampler.sde_mean(x, fm.velocity(model, x, float(sigmas[t]), enc, args.guidance), sigmas, t, 0.7)

    def grpo_iteration():  # Eq. 11 with group advantages, plus Flow-GRPO's KL to the frozen base (no adapter)
        adv = torch.randn(B, device=device)

        def loss(traj, t, lp, mu, mu_ref):
            pg, _ = grpo.clipped_surrogate(lp, traj["log_probs"][:, t].to(device), adv, 1e-4)
            return (pg + 0.04 * mar.mar_kl(mu, mu_ref, traj["sigmas"], t, 0.7)).mean()
        update(rollout(), lambda x, sigmas, t: mean_of(None, x, sigmas, t), loss)

    def opd_iteration():  # Eq. 7's routed teachers and Eq. 12's anchor at the student's states; Eq. 9's KL + MAR
        def frozen(x, sigmas, t):
            v_star = opd.routed_velocity(model, x, float(sigmas[t]), enc, groups, args.guidance, B)
            mu_anchor = mar.anchor_mean(opd.adapter_velocity(model, "anchor", enc, args.guidance), x, sigmas, t, 0.7)
            return sampler.sde_mean(x, v_star, sigmas, t, 0.7), mu_anchor

        def loss(traj, t, lp, mu, mus):
            sig = traj["sigmas"]
            return (sampler.kl(mu, mus[0], sig, t, 0.7) + 0.04 * mar.mar_kl(mu, mus[1], sig, t, 0.7)).mean()
        update(rollout(), frozen, loss)

    t_grpo, peak_grpo = timed(grpo_iteration, device, args.repeats)
    t_opd, peak_opd = timed(opd_iteration, device, args.repeats)

    gb = lambda b: "n/a (CPU)" if b is None else f"{b / 2 ** 30:.2f} GiB" if b > 2 ** 30 else f"{b / 2 ** 20:.2f} MiB"
    name = "tiny SD3 (CPU)" if args.tiny else "SD3.5-Medium transformer (random init)"
    print(f"{name}: {n_params / 1e6:.3g}M parameters, {dtype}, batch {B}, {args.resolution} px, {T} steps, "
          f"CFG {args.guidance}, LoRA r {args.rank}, {torch.cuda.get_device_name(device) if cuda else 'CPU'}\n")
    print("| iteration | time (s) | peak memory |\n|---|---|---|")
    print(f"| GRPO (rollout + reference KL + update) | {t_grpo:.3f} | {gb(peak_grpo)} |")
    print(f"| OPD (rollout + 3 routed teachers + anchor + update) | {t_opd:.3f} | {gb(peak_opd)} |")
    print(f"\nOPD / GRPO: {t_opd / t_grpo:.2f}x (target <= 1.3x)\n")
    print("| teachers + anchor held as | memory over one model |\n|---|---|")
    print(f"| one base model | {gb(base_mem)} |")
    print(f"| + 4 LoRA adapters (and the student) | {gb(lora_mem)} ({100 * lora_mem / base_mem:.1f}%, target <= 10%) |")
    print(f"| + 4 full copies (official layout) | {gb(full_mem)} ({100 * full_mem / base_mem:.0f}%) |")
    return {"t_grpo": t_grpo, "t_opd": t_opd, "base": base_mem, "lora": lora_mem, "full": full_mem}


if __name__ == "__main__":
    runs.run(main)
