"""python test_all.py [name ...]: every check against an independent computation. Last line: N passed, M failed."""
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import torch

import checkpoints
import flow_matching as fm
import lora
import miniworld as mw
import real_rewards
import rewards
import runs
import sde_sampler as sampler

for _lib in ("diffusers", "transformers"):  # a green run reads clean: the libraries' notices and loading bars off
    __import__(f"{_lib}.utils.logging").utils.logging.set_verbosity_error()
    __import__(f"{_lib}.utils.logging").utils.logging.disable_progress_bar()

HERE = os.path.dirname(os.path.abspath(__file__))
TMP = tempfile.mkdtemp(prefix="flow-opd-test-")


# ---------- flow_matching.py and sde_sampler.py: Eq. 1, 5, 6, SD3's sigma grid and the pipeline's own sampler
def tiny_model(seed=0):
    m = fm.new_mini_model(seed)
    with torch.no_grad():  # random but not degenerate (SD3 zero-inits its output layer)
        for p in m.transformer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def close(a, b, tol, what=""):
    err = (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.1g}"
    return err


def run_inprocess(args, cwd=None):
    """`python script.py args...` as its `__main__` runs it (runs.run(main)), but in this process: a fresh interpreter
    spends some 7 s importing torch and diffusers, most of this suite's time. In cwd (default: a new empty folder).
    Returns (folder, exit code, stdout, stderr). What a run may change process-wide is restored after it: rewards'
    backends, the RNGs it seeds, torch's threads, signal handlers, runs' stop flag and created folders, the lock."""
    import contextlib
    import importlib
    import io
    import numpy as np
    module, argv = importlib.import_module(args[0][:-3]), list(args[1:])
    cwd, here, out, err = cwd or tempfile.mkdtemp(dir=TMP), os.getcwd(), io.StringIO(), io.StringIO()
    runs.CREATED.clear()  # (folders earlier in-process runs of this suite made are theirs)
    saved = dict(rewards.REWARDS), signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    state = torch.get_rng_state(), random.getstate(), np.random.get_state(), torch.get_num_threads()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                runs.run(lambda: module.main(argv))
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except Exception:  # a traceback: what the interpreter would print, and its exit status
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(here)
        rewards.REWARDS.update(saved[0])
        signal.signal(signal.SIGINT, saved[1]), signal.signal(signal.SIGTERM, saved[2])
        torch.set_rng_state(state[0]), random.setstate(state[1]), np.random.set_state(state[2]), torch.set_num_threads(state[3])
        runs.STOP.clear()
        runs.CREATED.clear()
        runs.IN_LOOP = False
        for f in checkpoints.LOCK.values():
            f.close()
        checkpoints.LOCK.clear()
    return cwd, code, out.getvalue(), err.getvalue()


def cli(*args, expect=0):
    """Run one of our scripts (in this process, run_inprocess); returns (stdout, stderr). The tests of what only a
    process shows (signals, SIGKILL, torchrun, the lock) start real ones."""
    _, code, out, err = run_inprocess(args, cwd=HERE)
    assert code == expect, f"{args}: exit {code} (wanted {expect})\n{out[-800:]}\n{err[-1500:]}"
    return out, err


def test_eq6_log_prob_is_the_gaussian_density():
    torch.manual_seed(0)
    mu, x = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    std = 0.37
    by_hand = (-0.5 * ((x - mu) / std) ** 2 - math.log(std * math.sqrt(2 * math.pi))).flatten(1).mean(1)
    close(sampler.log_prob(x, mu, std), by_hand, 1e-6, "hand-written density")
    close(sampler.log_prob(x, mu, std), torch.distributions.Normal(mu, std).log_prob(x).flatten(1).mean(1), 1e-5, "torch.distributions")


def test_eq5_sde_mean_and_std():
    torch.manual_seed(0)
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    sig = sampler.sigma_schedule(fm.mini_scheduler(), 10)
    for t in (0, 3, 8):
        a, b = float(sig[t]), float(sig[t + 1])
        s = 0.7 * math.sqrt(a / (1 - (a if a < 1 else float(sig[1]))))
        dt = b - a
        # Flow-GRPO's expanded form: x (1 + s^2 dt / 2 sigma) + v (1 + s^2 (1 - sigma) / 2 sigma) dt
        mean = x * (1 + s ** 2 / (2 * a) * dt) + v * (1 + s ** 2 * (1 - a) / (2 * a)) * dt
        x_next, lp, mu = sampler.sde_step(x, v, sig, t, 0.7)
        close(mu, mean, 1e-5, f"mean at t={t}")
        assert abs(sampler.step_noise(sig, t, 0.7)[1] - s * math.sqrt(-dt)) < 1e-9
        close(lp, sampler.log_prob(x_next, mean, s * math.sqrt(-dt)), 1e-5, "log-prob of the sample")


def test_eq5_sde_keeps_the_odes_marginals_on_a_gaussian():
    """Eq. 5's reason to exist: on a toy whose exact velocity field is known (x_0 ~ N(m, c^2), so x_sigma ~
    N((1 - sigma) m, (1 - sigma)^2 c^2 + sigma^2) and v(x, sigma) = E[eps - x_0 | x_sigma = x] in closed form), the SDE
    sampler (a = 0.7) lands at every step on the flow's marginal, as the ODE does; dropping Eq. 5's drift correction
    (noise alone) does not. 50k samples, 200 steps of the SD3 grid; mean and std within 0.015 (the SDE's
    Euler-Maruyama error near sigma = 1 shrinks with the steps: 0.018, 0.011, 0.007 at 100, 300, 1000)."""
    m, c, M, T = 0.8, 0.3, 50_000, 200

    def v_exact(x, sigma):  # written out: Gaussian conditioning of the linear path
        a = 1 - sigma
        var = a * a * c * c + sigma * sigma
        return (sigma - a * c * c) * (x - a * m) / var - m

    sig = sampler.sigma_schedule(fm.mini_scheduler(), T)
    x = torch.randn(M, 1, generator=torch.Generator().manual_seed(0))
    want = [((1 - float(s)) * m, math.sqrt((1 - float(s)) ** 2 * c * c + float(s) ** 2)) for s in sig]
    for name, a in (("ODE", 0.0), ("SDE", 0.7)):
        out = sampler.sample(v_exact, x.clone(), sig, a, generator=torch.Generator().manual_seed(1))["states"]
        for t in (T // 3, 2 * T // 3, T):
            close(torch.tensor([out[:, t].mean(), out[:, t].std()]), torch.tensor(want[t]), 0.015, f"{name} at step {t}")
    drift_free = x.clone()  # Eq. 5's noise without its drift correction: the marginals spread
    for t in range(T - 1):
        _, std = sampler.step_noise(sig, t, 0.7)
        drift_free = drift_free + (float(sig[t + 1]) - float(sig[t])) * v_exact(drift_free, float(sig[t])) \
            + std * torch.randn(M, 1, generator=torch.Generator().manual_seed(t))
    assert abs(float(drift_free.std()) - c) > 0.05, float(drift_free.std())
    print(f"    final std: SDE {float(out[:, -1].std()):.4f}, target {c}, without the correction {float(drift_free.std()):.3f}")


def test_sigma_grid_is_the_sd3_pipelines():
    """The grid is what StableDiffusion3Pipeline uses: its scheduler's set_timesteps(T) with its own config (shift
    3): shift(linspace(1, sigma_min, T)) and a final 0. The numbers are diffusers' (written out here)."""
    grid10 = [1.0, 0.9601293206, 0.9133489728, 0.8576923013, 0.7903682590, 0.7072784901, 0.6021505594,
              0.4648760259, 0.2780487835, 0.0089285718, 0.0]
    close(sampler.sigma_schedule(fm.mini_scheduler(), 10), torch.tensor(grid10), 1e-7, "T=10")
    close(sampler.sigma_schedule(fm.mini_scheduler(), 3), torch.tensor([1.0, 0.7511211038, 0.0089285718, 0.0]), 1e-7, "T=3")
    from diffusers import FlowMatchEulerDiscreteScheduler
    other = FlowMatchEulerDiscreteScheduler(shift=1.0)  # a model's own config decides
    assert abs(float(sampler.sigma_schedule(other, 10)[8]) - (1 - 8 * (1 - 0.001) / 9)) < 1e-6


def test_ode_and_cfg_equal_the_sd3_pipeline_call():
    """Our ODE sampler against diffusers' own StableDiffusion3Pipeline.__call__ (output_type="latent") on the same
    latents and prompt embeddings, on a tiny random SD3.5-style pipeline (dual attention, rms qk-norm), at CFG 1
    and 4.5, for 10 and 3 steps."""
    from diffusers import StableDiffusion3Pipeline
    path = tiny_sd3_pipeline()
    model = fm.load_model(path, resolution=64)
    pipe = StableDiffusion3Pipeline.from_pretrained(path, **NONE)
    enc = fm.encode_prompts(model, ["a red circle", 'the text "47"'])
    x = torch.randn(2, *model.latent_shape(64), generator=torch.Generator().manual_seed(1))
    for steps, guidance in ((10, 1.0), (10, 4.5), (3, 4.5)):
        ours = fm.rollout(model, enc, steps, guidance, sde=[], x=x.clone())["states"][:, -1]
        with torch.no_grad():
            theirs = pipe(prompt_embeds=enc["seq"], pooled_prompt_embeds=enc["pooled"],
                          negative_prompt_embeds=enc["null_seq"].expand_as(enc["seq"]),
                          negative_pooled_prompt_embeds=enc["null_pooled"].expand_as(enc["pooled"]), latents=x.clone(),
                          guidance_scale=guidance, num_inference_steps=steps, output_type="latent").images
        err = close(ours, theirs, 1e-4, f"{steps} steps, CFG {guidance}")
        assert (theirs - x).abs().max() > 0.1  # it moved
        print(f"    {steps} steps, CFG {guidance}: max |ours - pipe(...)| = {err:.2e}")


def test_eq1_loss_by_hand():
    model = tiny_model()

    class Identity(torch.nn.Module):  # v(x) = x, so the loss has a closed form
        dtype = torch.float32

        def parameters(self):
            return iter([torch.zeros(1)])

        def forward(self, hidden_states, **kw):
            return (hidden_states,)

    model.transformer = Identity()
    x0 = torch.full((1, 3, 32, 32), 0.5)
    eps = torch.full((1, 3, 32, 32), -1.0)
    sigma = torch.tensor([0.25])
    # x_s = 0.75 * 0.5 + 0.25 * -1 = 0.125 ; target = -1 - 0.5 = -1.5 ; (0.125 + 1.5)^2 = 2.640625
    loss = fm.flow_matching_loss(model, x0, fm.encode_prompts(model, ["a circle"]), sigma, eps)
    close(loss, torch.tensor([2.640625]), 1e-6, "Eq. 1")


def test_cfg_is_one_batched_forward_of_the_formula():
    model = tiny_model()
    enc = fm.encode_prompts(model, ["a red circle", "three squares"])
    null = fm.encode_prompts(model, ["", ""])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        vc, vu = fm.velocity(model, x, 0.6, enc), fm.velocity(model, x, 0.6, null)
        close(fm.velocity(model, x, 0.6, enc, 4.5), vu + 4.5 * (vc - vu), 1e-4, "CFG")


# ------------------------------------------------ lora.py: adapters against peft's and diffusers' own forward
def test_base_fingerprint_sees_every_weight():
    """fm.fingerprint changes when any single weight changes (the last element of the largest tensor too), is the
    same for a bf16 and a float32 copy of the same bf16 weights, and ignores adapters."""
    m = tiny_model()
    h = fm.fingerprint(m)
    name, p = max(m.transformer.named_parameters(), key=lambda kv: kv[1].numel())
    with torch.no_grad():
        p.view(-1)[-1] += 1e-4
    assert fm.fingerprint(m) != h, name
    with torch.no_grad():
        p.view(-1)[-1] -= 1e-4
    m.transformer.to(torch.bfloat16)
    h16 = fm.fingerprint(m)
    m.transformer.float()
    assert fm.fingerprint(m) == h16
    lora.add_lora(m.transformer, "t", 2, 4)
    assert fm.fingerprint(m) == h16
    print(f"    one weight of {p.numel()} in {name} changed: a new fingerprint")


def test_cfg_grad_cond_detaches_the_unconditional_branch():
    """grpo.policy_step (both stages' update) with CFG 4.5: --cfg_grad both differentiates v_u + g (v_c - v_u), --cfg_grad
    cond (Flow-GRPO's) holds v_u fixed; each equals autograd of the formula over two separate forwards written here
    (the conditional one, and the null prompt's)."""
    import grpo_teacher as grpo
    from types import SimpleNamespace
    m = tiny_model()
    lora.add_lora(m.transformer, "p", 2, 4)
    lora.set_adapter(m.transformer, "p")
    q = lora.adapter_params(m.transformer, "p")
    with torch.no_grad():
        for k in q:
            k.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    q[1].requires_grad_(True)
    enc = fm.encode_prompts(m, ["a red circle", 'the text "47"'])
    sig = sampler.sigma_schedule(m.scheduler, 10)
    states = torch.randn(2, 11, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t, g = 2, 4.5
    null = {"seq": enc["null_seq"].expand_as(enc["seq"]), "pooled": enc["null_pooled"].expand_as(enc["pooled"])}
    grads = {}
    for mode in ("both", "cond"):
        args = SimpleNamespace(guidance=g, cfg_grad=mode, noise_level=0.7)
        v, lp, mu = grpo.policy_step(m, states, sig, t, enc, args)
        ours = torch.autograd.grad(mu.sum(), q[1])[0]
        v_c = fm.velocity(m, states[:, t], float(sig[t]), enc)
        v_u = fm.velocity(m, states[:, t], float(sig[t]), null)
        v_u = v_u.detach() if mode == "cond" else v_u
        v_hand = v_u + g * (v_c - v_u)
        mu_hand = sampler.sde_mean(states[:, t], v_hand, sig, t, 0.7)
        theirs = torch.autograd.grad(mu_hand.sum(), q[1])[0]
        close(v, v_hand, 1e-4, f"{mode}: v")
        close(ours, theirs, 1e-4 * theirs.abs().max().item(), f"{mode}: gradient")
        grads[mode] = ours
    assert (grads["both"] - grads["cond"]).abs().max() > 0.01 * grads["both"].abs().max()  # the branch matters
    print("    both and cond: gradients equal the formula's over two forwards, and differ from each other")


def test_lora_save_load_identical_and_switchable():
    model = tiny_model()
    lora.add_lora(model.transformer, "a", rank=4, alpha=8)
    lora.add_lora(model.transformer, "b", rank=2, alpha=2)
    with torch.no_grad():
        for p in lora.adapter_params(model.transformer, "a") + lora.adapter_params(model.transformer, "b"):
            p.normal_(0, 0.05)
    enc = fm.encode_prompts(model, ["a green triangle"])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        lora.set_adapter(model.transformer, None)
        v0 = fm.velocity(model, x, 0.5, enc)
        lora.set_adapter(model.transformer, "a")
        va = fm.velocity(model, x, 0.5, enc)
        lora.set_adapter(model.transformer, "b")
        vb = fm.velocity(model, x, 0.5, enc)
    assert (va - v0).abs().max() > 1e-3 and (va - vb).abs().max() > 1e-3, "adapters should change the output"
    path = os.path.join(TMP, "a.safetensors")
    lora.save_lora(path, model.transformer, "a", {"reward": "ocr"})
    other = tiny_model()
    meta = lora.load_lora(path, other.transformer, "a")
    lora.set_adapter(other.transformer, "a")
    with torch.no_grad():
        close(fm.velocity(other, x, 0.5, enc), va, 1e-6, "reloaded adapter")
    assert meta == {"reward": "ocr"}
    # diffusers / peft key names and alpha in the metadata diffusers reads
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        keys, md = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert md["transformer.r"] == 4 and md["transformer.lora_alpha"] == 8


def test_peft_format_adapter_loads_with_dense_delta():
    from safetensors.torch import save_file
    model = tiny_model()
    torch.manual_seed(3)
    d = os.path.join(TMP, "peft_adapter")
    os.makedirs(d, exist_ok=True)
    r, alpha, mods = 2, 6, ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_k_proj"]
    sd = {}
    for m in mods:
        lin = model.transformer.get_submodule(m)
        sd[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, lin.in_features) * 0.1
        sd[f"base_model.model.{m}.lora_B.weight"] = torch.randn(lin.out_features, r) * 0.1
    save_file(sd, os.path.join(d, "adapter_model.safetensors"))
    json.dump({"r": r, "lora_alpha": alpha, "target_modules": ["to_q", "add_k_proj"], "peft_type": "LORA"},
              open(os.path.join(d, "adapter_config.json"), "w"))
    reference = tiny_model()  # the same base with W + (alpha / r) B A written into the weights
    with torch.no_grad():
        for m in mods:
            reference.transformer.get_submodule(m).weight += (alpha / r) * sd[f"base_model.model.{m}.lora_B.weight"] @ sd[f"base_model.model.{m}.lora_A.weight"]
    lora.load_lora(d, model.transformer, "peft")
    lora.set_adapter(model.transformer, "peft")
    enc = fm.encode_prompts(model, ["a purple square"])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        close(fm.velocity(model, x, 0.3, enc), fm.velocity(reference, x, 0.3, enc), 1e-5, "peft adapter")


TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
                pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")  # SD3.5-Medium's block kinds


FLOW_GRPO_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                     "attn.to_out.0", "attn.to_q", "attn.to_v"]  # train_sd3.py's list


BARE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _sd3_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, 16, 16, generator=g), encoder_hidden_states=torch.randn(2, 7, 64, generator=g),
                pooled_projections=torch.randn(2, 64, generator=g), timestep=torch.tensor([300.0, 800.0]))


def _peft_adapter(d, seed, **config):
    """A real peft adapter (peft's own get_peft_model + save_pretrained, random B) on a tiny SD3.5-style transformer.
    Returns peft's own output on _sd3_inputs(), and the base output."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    base = SD3Transformer2DModel(**TINY_SD3)
    with torch.no_grad():
        ref = base(**_sd3_inputs(), return_dict=False)[0]
    torch.manual_seed(seed)
    config.setdefault("init_lora_weights", True if config.get("lora_bias") else "gaussian")  # peft: lora_bias needs True
    model = get_peft_model(base, LoraConfig(**config))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_magnitude" in n or (".bias" in n and p.requires_grad):
                p.add_(torch.randn_like(p) * 0.2)
        out = model(**_sd3_inputs(), return_dict=False)[0]
    model.save_pretrained(d)
    return out, ref


def _ours(*adapters):
    """Our transformer (the same base) with adapters loaded in this order: {name: path}."""
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    t = SD3Transformer2DModel(**TINY_SD3)
    for name, path in adapters:
        lora.load_lora(path, t, name)
    return t


def test_adapters_equal_peft_forward_or_are_refused_by_name():
    """Real peft adapters (peft's forward is the reference): plain LoRA with bare or attn.* names at r 4..32, and
    use_rslora (alpha / sqrt(r)), load exactly; DoRA, lora_bias, trained biases and modules_to_save are refused
    with one line naming the field; peft matches Flow-GRPO's attn.* list to attn only, not SD3.5's attn2."""
    exact = [dict(r=4, lora_alpha=8, target_modules=BARE_TARGETS), dict(r=8, lora_alpha=16, target_modules=FLOW_GRPO_TARGETS),
             dict(r=32, lora_alpha=64, target_modules=FLOW_GRPO_TARGETS),
             dict(r=16, lora_alpha=32, use_rslora=True, target_modules=FLOW_GRPO_TARGETS)]
    for i, config in enumerate(exact):
        d = os.path.join(TMP, f"peft_exact{i}")
        want, ref = _peft_adapter(d, i, **config)
        t = _ours(("a", d))
        lora.set_adapter(t, "a")
        with torch.no_grad():
            got = t(**_sd3_inputs(), return_dict=False)[0]
        assert (want - ref).abs().max() > 1e-2, "the adapter must matter"
        err = close(got, want, 1e-5, f"peft forward, {config}")
        print(f"    {', '.join(f'{k}={v}' for k, v in config.items() if k != 'target_modules')}: max |ours - peft| = {err:.1e}")
        attn2 = [n for n in lora.lora_layers(t) if ".attn2." in n]
        assert bool(attn2) == (config["target_modules"] == BARE_TARGETS), attn2
    refused = [("use_dora", dict(use_dora=True)), ("lora_bias", dict(lora_bias=True)), ("bias", dict(bias="all")),
               ("modules_to_save", dict(modules_to_save=["proj_out"]))]
    for field, extra in refused:
        d = os.path.join(TMP, f"peft_{field}")
        _peft_adapter(d, 0, r=4, lora_alpha=8, target_modules=FLOW_GRPO_TARGETS, **extra)
        try:
            _ours(("a", d))
            raise AssertionError(f"{field} loaded")
        except runs.BadInput as e:
            assert field in str(e) and "\n" not in str(e), str(e)
            print(f"    {field}: {str(e)[:120]}")


def test_teachers_adapting_different_modules_side_by_side():
    """A Flow-GRPO teacher (attn only) and an adapter that also covers attn2, loaded in either order: each gives
    its own peft output, and the bare base stays the base."""
    d1, d2 = os.path.join(TMP, "side_attn"), os.path.join(TMP, "side_attn2")
    want1, ref = _peft_adapter(d1, 1, r=4, lora_alpha=8, target_modules=FLOW_GRPO_TARGETS)
    want2, _ = _peft_adapter(d2, 2, r=8, lora_alpha=8, target_modules=BARE_TARGETS)
    for order in ((("one", d1), ("two", d2)), (("two", d2), ("one", d1))):
        t = _ours(*order)
        with torch.no_grad():
            for name, want in (("one", want1), ("two", want2), (None, ref)):
                lora.set_adapter(t, name)
                close(t(**_sd3_inputs(), return_dict=False)[0], want, 1e-5, f"{name} after loading {[n for n, _ in order]}")


def test_diffusers_lora_files_without_metadata_load_as_diffusers_does():
    """diffusers' save_lora_weights writes no adapter config by default; diffusers then takes alpha = r. A folder
    with pytorch_lora_weights.safetensors and the bare file both load with that scale, equal to diffusers' own
    pipe.load_lora_weights forward."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    path = tiny_sd3_pipeline()
    pipe = StableDiffusion3Pipeline.from_pretrained(path, **NONE)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=FLOW_GRPO_TARGETS))
    with torch.no_grad():
        for n, p in pipe.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    d = os.path.join(TMP, "diffusers_lora")
    StableDiffusion3Pipeline.save_lora_weights(d, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    fresh = StableDiffusion3Pipeline.from_pretrained(path, **NONE)
    x = _sd3_inputs()
    with torch.no_grad():
        base = fresh.transformer(**x, return_dict=False)[0]
        fresh.load_lora_weights(d)
        want = fresh.transformer(**x, return_dict=False)[0]
    assert (want - base).abs().max() > 1e-2
    for source in (d, os.path.join(d, "pytorch_lora_weights.safetensors")):
        model = fm.load_model(path, resolution=64)
        lora.load_lora(source, model.transformer, "x")
        lora.set_adapter(model.transformer, "x")
        with torch.no_grad():
            close(model.transformer(**x, return_dict=False)[0], want, 1e-5, source)
    assert lora.read_lora(d)[1] == 1.0


# ------------------------------- miniworld.py and rewards.py: the world, its held-out prompts and its scorers
def _cases(task, n, seed):
    g = mw.train_prompts((task,), seed=seed)
    return [next(g) for _ in range(n)]


def test_geneval_scorer_on_renderer():
    rng = random.Random(0)
    ps = _cases("geneval", 300, 1)
    clean = rewards.geneval(mw.render_batch(ps, 0), ps)
    acc_clean = float((clean == 1).float().mean())
    wrong, prompts = [], []
    for p in ps:  # a definite error: a wrong count, a wrong colour, a wrong shape, or reversed positions
        spec = mw.parse(p["prompt"])
        objs = [list(o) for o in spec["objects"]]
        if spec["relation"]:
            objs.reverse()
        elif objs[0][2] > 1:
            objs[0][2] += rng.choice([-1, 1])
        elif objs[0][1]:
            objs[0][1] = rng.choice([c for c in mw.COLORS if c not in {o[1] for o in objs}])
        else:
            objs[0][0] = rng.choice([s for s in mw.SHAPES if s not in {o[0] for o in objs}])
        wrong.append(mw.render_geneval({**spec, "objects": [tuple(o) for o in objs]}, rng))
        prompts.append(p)
    bad = rewards.geneval(torch.stack(wrong), prompts)
    acc_wrong = float((bad < 1).float().mean())
    print(f"    geneval: faithful renders scored 1: {acc_clean:.3f}; wrong renders scored < 1: {acc_wrong:.3f} (n=300)")
    assert acc_clean == 1 and acc_wrong == 1  # every one of 300, each way (seeded)


# ------------------------------------------------ Tables 3 and 4: compositions no stage sees, metrics no reward trains
def _signature(spec):
    """What a picture of this spec holds, in the terms of ood.py's kinds."""
    objs = spec.get("objects") or ([spec["object"]] if spec.get("object") else [])
    return {"three": len({s for s, _, _ in objs}) >= 3,
            "numeracy": len(objs) >= 2 and any(k > 1 for _, _, k in objs),
            "spatial": spec.get("relation") in ("above", "below") and any(c for _, c, _ in objs),  # side by side,
            "binding": bool(mw.bindings(spec) & mw.OOD_BINDINGS)}  # coloured shapes are colour attribution's picture


def test_ood_prompts_are_seen_by_no_stage():
    """ood.py's five kinds: each at least 64 distinct prompts in the model's words and 10-token window, none drawn by
    the pretraining or the Stage 1/2 prompt streams (20,000 draws each); and no picture pretraining shows has a
    kind's defining feature: every in-distribution prompt of the grammar, and 20 one-error corruptions of each
    (pretraining's defects), parsed by miniworld.parse: no three shapes, no count beside another shape, no coloured
    shape above or below another, no held-out binding. Every prompt of a kind has its feature."""
    import ood
    seen = set()
    for pretrain in (False, True):
        stream = mw.train_prompts(seed=3, pretrain=pretrain)
        seen |= {next(stream)["prompt"] for _ in range(20000)}
    rng, trained = random.Random(0), {}
    for task in ("geneval", "ocr", "pickscore"):
        for p in mw.all_prompts(task):
            if not mw.is_ood(p):
                specs = [mw.parse(p)] + [s for s in (mw.corrupt(p, rng) for _ in range(20)) if s]
                for spec in specs:
                    for k, v in _signature(spec).items():
                        trained[k] = trained.get(k, False) or v
    assert not any(trained.values()), trained
    feature = {"binding": "binding", "three": "three", "numeracy": "numeracy", "spatial": "spatial", "scene": "binding"}
    for kind in ood.KINDS:
        ps = ood.all_prompts(kind)
        assert len(ps) >= 64 and len(set(ps)) == len(ps) and not set(ps) & seen, kind
        assert max(len(mw.tokenize(p)) for p in ps) <= mw.MAX_TOKENS, kind
        assert all(_signature(mw.parse(p))[feature[kind]] for p in ps), kind
        every = [p["prompt"] for p in ood.eval_prompts(kind, 10_000)]  # none twice: a kind's prompts, all of them
        assert sorted(every) == sorted(ps) and [p["prompt"] for p in ood.eval_prompts(kind, 64)] == every[:64], kind
    print("    " + ", ".join(f"{k} {len(ood.all_prompts(k))}" for k in ood.KINDS) + " prompts; none trained on")


def test_ood_scorer_on_renderer():
    """64 prompts of each kind (evenly spread over its list), drawn right, score 1, the compositions also with a
    speck of clutter beside them; drawn with one definite error, 0: a held-out binding in its shape's usual colour, the third object
    left out, one fewer of the counted shape (or one more of the singular one), the two objects' places swapped, the
    scene's object in its usual colour or at a ground's size; and a speck of clutter is no object (a 3-px circle in the asked colour)."""
    import ood
    rng = random.Random(0)
    for kind in ood.KINDS:
        ps = ood.all_prompts(kind)
        ps = [ps[i * len(ps) // 64] for i in range(64)]
        right = ood.score(torch.stack([mw.render(p, rng) for p in ps]), ps)
        wrong = []
        for p in ps:
            spec = mw.parse(p)
            if kind == "scene":  # (or in its colour, but as wide as a ground: 24 px)
                s, c, k = spec["object"]
                wrong.append(mw.render_general({**spec, "object": (s, mw.USUAL_COLOR[s], k)}, rng) if len(wrong) % 2
                             else _draw([(s, c, 16, 16)], r=12))
                continue
            objs = [list(o) for o in spec["objects"]]
            if kind == "binding":
                o = next(o for o in objs if (o[1] or mw.USUAL_COLOR[o[0]], o[0]) in mw.OOD_BINDINGS)
                o[1] = mw.USUAL_COLOR[o[0]]
            elif kind == "three":
                objs = objs[:2]
            elif kind == "numeracy":
                o = next(o for o in objs if o[2] > 1) if len(wrong) % 2 else min(objs, key=lambda o: o[2])
                o[2] += 1 if o[2] == 1 else -1
            else:
                objs.reverse()
            wrong.append(mw.render_geneval({**spec, "objects": [tuple(o) for o in objs]}, rng))
        wrong = ood.score(torch.stack(wrong), ps)
        assert right.tolist() == [1.0] * len(ps) and wrong.tolist() == [0.0] * len(ps), (kind, right.mean(), wrong.mean())
        specked = torch.stack([mw.render(p, rng) for p in ps])
        for img in specked if kind != "scene" else []:  # clutter as pretraining paints it, on plain background
            x, y = next((x, y) for x in range(4, 29) for y in range(4, 29)  # 2 px clear of any object
                        if (img[:, y - 3:y + 3, x - 3:x + 3].amax((1, 2)) - img[:, y - 3:y + 3, x - 3:x + 3].amin((1, 2))).max() < 0.05)
            mw.paint(img, mw.shape_mask("circle", x, y, 1.5), mw.COLORS[rng.choice(list(mw.COLORS))])
        assert ood.score(specked, ps).tolist() == [1.0] * len(ps), kind
    speck = torch.full((3, 32, 32), 0.15)  # a blue square, and a blue speck that a blob of 8 px would call a circle
    mw.paint(speck, mw.shape_mask("square", 8, 16, 6), mw.COLORS["blue"])
    mw.paint(speck, mw.shape_mask("circle", 24, 16, 1.5), mw.COLORS["blue"])
    assert ood.score(speck[None], ["a blue circle"]).tolist() == [0.0]
    print(f"    {64 * len(ood.KINDS)} prompts: right renders 1, wrong renders 0, each")


def test_quality_metrics_by_hand():
    """quality.py against a computation written out here with numpy: a picture's 16x16 features are its 2x2 block
    means; agreement = 1 - the smallest mean absolute difference to the 16 clean pictures of its prompt; diversity =
    the mean over ordered pairs of distinct pictures. A clean picture is itself in the aesthetic bank (1.0); and the
    metrics see what they are for: defective pictures score lower than clean ones, a wrong prompt lower agreement,
    one picture repeated has diversity 0."""
    import numpy as np
    import quality
    ps = [p for t in mw.TASKS for p in mw.eval_prompts(t, 6)]
    rng = random.Random(3)
    clean = torch.stack([mw.render(p["prompt"], rng) for p in ps])
    bad = torch.stack([mw.render(p["prompt"], rng, defects=True) for p in ps])

    def feats(x):  # (3, 32, 32) -> 768 block means
        a = x.numpy().astype(np.float64)
        return np.array([[[a[c, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean() for j in range(16)] for i in range(16)]
                         for c in range(3)]).ravel()
    for k in (0, 7, 13, 22):
        r = random.Random(f"reference-{ps[k]['prompt']}")
        refs = [feats(mw.render(ps[k]["prompt"], r)) for _ in range(16)]
        want = 1 - min(np.abs(feats(bad[k]) - f).mean() for f in refs)
        assert abs(float(quality.agreement(bad[k:k + 1], ps[k:k + 1])) - want) < 1e-5, k
    four = bad[:8].view(2, 4, 3, 32, 32)
    f = [[feats(x) for x in group] for group in four]
    want = [np.mean([np.abs(g[i] - g[j]).mean() for i in range(4) for j in range(4) if i != j]) for g in f]
    close(quality.diversity(four), torch.tensor(want, dtype=torch.float32), 1e-5, "diversity")
    assert quality.diversity(clean[:1].expand(4, 3, 32, 32)[None]).item() == 0
    bank_pic = mw.render(mw.all_prompts("geneval")[0], random.Random("aesthetic-bank"))  # the bank's first
    assert abs(float(quality.aesthetic(bank_pic[None])) - 1) < 1e-6
    a_clean, a_bad = quality.agreement(clean, ps).mean(), quality.agreement(bad, ps).mean()
    e_clean, e_bad = quality.aesthetic(clean).mean(), quality.aesthetic(bad).mean()
    shuffled = quality.agreement(clean, ps[1:] + ps[:1]).mean()
    assert a_clean > a_bad and e_clean > e_bad and shuffled < a_clean - 0.1, (a_clean, a_bad, e_clean, e_bad, shuffled)
    print(f"    agreement clean {a_clean:.3f} > defective {a_bad:.3f} > wrong prompt {shuffled:.3f}; "
          f"aesthetic {e_clean:.3f} > {e_bad:.3f}")


def _draw(objects, r=6):
    """An image with these (shape, colour, cx, cy) objects on a plain background, at the renderer's size r."""
    img = torch.full((3, 32, 32), 0.15)
    for shape, color, cx, cy in objects:
        mw.paint(img, mw.shape_mask(shape, cx, cy, r), mw.COLORS[color])
    return img


def test_geneval_reward_partial_credit_and_strict_metric():
    """Flow-GRPO's reward server's partial credit, worked by hand, and GenEval's strict 0/1 metric on the same
    images: three wanted, two drawn: 2/3; right shape, wrong colour: 1/2; five of two: count floored at 0."""
    cases = [  # prompt, objects drawn, training reward, strict
        ("three circles", [("circle", "red", 8, 8), ("circle", "blue", 24, 24)], 2 / 3, 0.0),
        ("three circles", [("circle", "red", 8, 8), ("circle", "blue", 24, 24), ("circle", "green", 8, 24)], 1.0, 1.0),
        ("a red circle", [("circle", "blue", 16, 16)], 1 / 2, 0.0),
        ("two red squares", [("square", "red", 8, 8), ("square", "blue", 24, 24)], (1 + 1 / 2) / 2, 0.0),
        ("two red squares", [("square", "red", x, y) for x, y in ((5, 5), (27, 5), (16, 16), (5, 27), (27, 27))], 0.0, 0.0),
        ("a ring left of a diamond", [("ring", "red", 8, 16), ("diamond", "blue", 24, 16)], 1.0, 1.0),
        ("a ring left of a diamond", [("ring", "red", 24, 16), ("diamond", "blue", 8, 16)], 2 / 3, 0.0),
        ("a ring left of a diamond", [("ring", "red", 24, 16)], 1 / 3, 0.0),
        ("a red triangle and a blue square", [("triangle", "red", 8, 16), ("square", "green", 24, 16)], 3 / 4, 0.0),
        ("a circle", [("circle", "green", 8, 8), ("circle", "red", 24, 24)], 0.0, 1.0),  # GenEval: at least one
    ]
    imgs = torch.stack([_draw(objs, 4 if len(objs) == 5 else 6) for _, objs, _, _ in cases])
    prompts = [p for p, *_ in cases]
    close(rewards.geneval(imgs, prompts), torch.tensor([c[2] for c in cases]), 1e-6, "partial credit")
    close(rewards.geneval_strict(imgs, prompts), torch.tensor([c[3] for c in cases]), 0, "strict")
    assert rewards.geneval(imgs[:1], ['the text "4"'])[0].isnan()


NOISY_OCR_EXACT = 300  # the reader is exact on all 300 texts under seeded noise of std 0.08


def test_ocr_scorer_on_renderer():
    rng = random.Random(0)
    ps = _cases("ocr", 300, 2)
    clean = rewards.ocr(mw.render_batch(ps, 0), ps)
    wrong = []
    for p in ps:
        s = list(mw.parse(p["prompt"])["text"])
        k = rng.randrange(len(s))
        s[k] = rng.choice([d for d in "0123456789" if d != s[k]])
        wrong.append(mw.render_ocr("".join(s), rng))
    bad = rewards.ocr(torch.stack(wrong), ps)
    # one wrong digit of n costs exactly 1/n
    expect = torch.tensor([1 - 1 / len(mw.parse(p["prompt"])["text"]) for p in ps])
    acc_clean, acc_wrong = float((clean == 1).float().mean()), float(((bad - expect).abs() < 1e-6).float().mean())
    noise = torch.randn(300, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    noisy = rewards.ocr((mw.render_batch(ps, 0) + 0.08 * noise).clamp(0, 1), ps)
    print(f"    ocr: exact on faithful renders {acc_clean:.3f}, exact 1-1/n on one wrong digit {acc_wrong:.3f}, "
          f"mean under noise 0.08 {float(noisy.mean()):.3f} (n=300)")
    assert acc_clean == 1 and acc_wrong == 1 and int((noisy == 1).sum()) == NOISY_OCR_EXACT, int((noisy == 1).sum())
    assert rewards.edit_distance("kitten", "sitting") == 3


def test_deqa_and_pickscore_on_renderer():
    ps = _cases("deqa", 300, 3)
    clean = mw.render_batch(ps, 0)
    noisy = (clean + 0.08 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    blurred = mw.blur(clean)
    q, qn, qb = rewards.deqa(clean), rewards.deqa(noisy), rewards.deqa(blurred)
    noise_acc, blur_acc = float((q > qn).float().mean()), float((q > qb).float().mean())
    # preference: an image under its own prompt beats the same image under another scene's prompt
    other = [{"prompt": ps[(i + 7) % 300]["prompt"], "task": "pickscore"} for i in range(300)]
    differs = torch.tensor([mw.parse(a["prompt"])["time"] != mw.parse(b["prompt"])["time"] for a, b in zip(ps, other)])
    own, theirs = rewards.pickscore(clean, ps), rewards.pickscore(clean, other)
    pref_acc = float((own > theirs)[differs].float().mean())
    dull = clean.mean(1, keepdim=True) + 0.4 * (clean - clean.mean(1, keepdim=True))
    dull_acc = float((own > rewards.pickscore(dull, ps)).float().mean())
    print(f"    deqa: clean > noisy {noise_acc:.3f}, clean > blurred {blur_acc:.3f}; clean mean {float(q.mean()):.2f} "
          f"noisy {float(qn.mean()):.2f} blurred {float(qb.mean()):.2f}")
    print(f"    pickscore: own prompt > another time of day {pref_acc:.3f}, vivid > dull {dull_acc:.3f}; "
          f"clean mean {float(own.mean()):.2f}")
    # exact counts of 300 (seeded): the 16 blurred images DeQA does not rank below their clean one are scenes of snow
    # or hills at night and of the forest at noon
    assert (int((q > qn).sum()), int((q > qb).sum()), pref_acc, dull_acc) == (300, 284, 1.0, 1.0), (q > qb).sum()


def test_heldout_prompts_never_trained():
    """The finite split, checked exactly: held-out and Stage 1/2 prompts partition each task's in-distribution
    prompts; Stage 1/2's stream draws exactly the train side, pretraining's exactly both sides; the
    out-of-distribution bindings appear in no stream and in no pretraining image (no wrong colour, wrong shape or
    clutter draws one)."""
    ood = {("purple", "triangle"), ("yellow", "square"), ("green", "ring"), ("red", "diamond"), ("blue", "circle")}
    for task in mw.TASKS:
        held, train = mw._split(task)
        held = {p for ps in (held.values() if isinstance(held, dict) else [held]) for p in ps}
        train = {p for ps in (train.values() if isinstance(train, dict) else [train]) for p in ps}
        everything = set(mw.all_prompts(task))
        in_dist = {p for p in everything
                   if not any(f"{c} {s}" in p or f"{c} {mw.PLURAL[s]}" in p for c, s in ood)}  # by the words
        if task in ("pickscore", "deqa"):  # the two scene tasks split one grammar between them
            other = mw._split("deqa" if task == "pickscore" else "pickscore")
            assert not (held | train) & set(other[0] + other[1]), task
            assert len(held | train) == len(in_dist) // 2, task
        else:
            assert held | train == in_dist, task
        assert held and not held & train, task
        assert {p["prompt"] for p in mw.eval_prompts(task, 1000)} == held, task
        g, gp = mw.train_prompts((task,), seed=0), mw.train_prompts((task,), seed=0, pretrain=True)
        assert {next(g)["prompt"] for _ in range(20000)} == train, task
        assert {next(gp)["prompt"] for _ in range(20000)} == held | train, task
        assert mw.eval_prompts(task, 5) == mw.eval_prompts(task, 5)
    assert sum(map(mw.is_ood, mw.all_prompts("geneval"))) == 620 - 460
    rng = random.Random(0)
    for p in mw.all_prompts("geneval"):
        if not mw.is_ood(p):
            for _ in range(10):
                spec = mw.corrupt(p, rng)
                drawn = {(c or mw.USUAL_COLOR[s], s) for s, c, _ in spec["objects"]}
                assert not drawn & ood, (p, spec)
    assert not set(mw.CLUTTER) & ood and len(mw.CLUTTER) == 20
    for task in mw.TASKS:  # every prompt parses back to its task and tokenizes
        for p in mw.all_prompts(task)[:50]:
            mw.tokenize(p)
            assert mw.parse(p)["task"] == {"pickscore": "general", "deqa": "general"}.get(task, task)


def test_geneval_by_category():
    """Every held-out composition prompt knows its GenEval category; eval.py's per-category accuracy is the plain mean
    of strict scores within each category, and a prompt file's GenEval `tag` is kept."""
    import eval as ev
    cats = mw.geneval_categories()
    for p in mw.eval_prompts("geneval", 60):
        assert p["prompt"] in cats[mw.geneval_category(p["prompt"])]
    assert mw.geneval_category("three triangles") == "counting" and mw.geneval_category('the text "4"') is None
    scores = {"geneval": [1.0, 0.0, 1.0, 1.0, 0.0], "geneval_category": ["counting", "counting", "colors", None, "counting"]}
    assert ev.by_category(scores) == {"counting": (1 / 3, 3), "colors": (1.0, 1)}
    table = ev.category_markdown({"a": scores})
    assert "counting (n=3)" in table and "| a | 0.333 | 1.000 |" in table, table
    path = os.path.join(TMP, "geneval_meta.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"tag": "position", "include": [], "prompt": "a photo of a cat left of a dog"}) + "\n")
    assert mw.read_prompt_file("geneval=" + path, mini=False) == [{"prompt": "a photo of a cat left of a dog",
                                                                   "task": "geneval", "tag": "position"}]


def test_reward_spec_and_combine():
    assert rewards.parse_spec("geneval:0.4,ocr:0.3,pickscore:0.3") == {"geneval": 0.4, "ocr": 0.3, "pickscore": 0.3}
    for bad in ("clip", "ocr:x", "ocr:-1", "ocr:0"):
        try:
            rewards.parse_spec(bad)
            raise AssertionError(f"{bad} accepted")
        except runs.BadInput:
            pass
    ps = [{"prompt": "a red circle", "task": "geneval"}, {"prompt": 'the text "5"', "task": "ocr"}]
    img = mw.render_batch(ps, 0)
    total, each = rewards.combine({"geneval": 1.0, "deqa": 1.0}, img, ps)
    close(total[0], (each["geneval"][0] + each["deqa"][0] / 5) / 2, 1e-6, "both apply")
    close(total[1], each["deqa"][1] / 5, 1e-6, "geneval skipped on an OCR prompt")
    # GRPO-Mix's unequal weights, worked by hand on three prompts: each reward over its Table 2 scale, the weights of
    # the rewards that apply renormalised to 1
    ps = ps + [{"prompt": "the sea at dawn", "task": "pickscore"}]
    img = mw.render_batch(ps, 0)
    total, each = rewards.combine({"geneval": 0.4, "ocr": 0.3, "pickscore": 0.3}, img, ps)
    g, o, p = float(each["geneval"][0]), float(each["ocr"][1]), [float(each["pickscore"][i]) / 26 for i in range(3)]
    want = [(0.4 * g + 0.3 * p[0]) / 0.7, (0.3 * o + 0.3 * p[1]) / 0.6, p[2]]
    close(total, torch.tensor(want), 1e-6, "unequal weights")
    assert g == 1.0 and o == 1.0 and len({round(v, 4) for v in want}) == 3  # (three different mixes, so all count)


# --- the real world: a tiny random SD3.5-style pipeline through every script, real_rewards.py's backends
NONE = dict(text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None)


def tiny_sd3_pipeline():
    """A random-init SD3 pipeline small enough for a CPU test, saved to a temp dir (no downloads)."""
    path = os.path.join(TMP, "tiny-sd3")
    if os.path.isdir(path):
        return path
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
    torch.manual_seed(0)
    words = sorted({w for t in mw.TASKS for p in mw.all_prompts(t)[:200] for w in p.replace('"', ' " ').split()})
    chars = sorted(set("".join(words)) | set('"'))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab)); vocab.setdefault(c + "</w>", len(vocab))
    os.makedirs(os.path.join(TMP, "tok"), exist_ok=True)
    json.dump(vocab, open(os.path.join(TMP, "tok", "vocab.json"), "w"))
    open(os.path.join(TMP, "tok", "merges.txt"), "w").write("#version: 0.2\n")
    tok = CLIPTokenizer(os.path.join(TMP, "tok", "vocab.json"), os.path.join(TMP, "tok", "merges.txt"), model_max_length=77)
    cfg = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
               vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    te1 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    transformer = SD3Transformer2DModel(**TINY_SD3)  # dual attention (attn2) and rms qk-norm, like SD3.5-Medium
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, shift_factor=0.06, scaling_factor=1.5)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                                    text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None)
    pipe.save_pretrained(path)
    return path


def test_sd3_backend_tiny_pipeline():
    model = fm.load_model(tiny_sd3_pipeline(), resolution=64)
    assert model.kind == "sd3"
    prompts = ["a red circle", 'the text "47"']
    enc = fm.encode_prompts(model, prompts)
    assert enc["seq"].shape[0] == 2 and enc["pooled"].shape == (2, 64)
    shape = model.latent_shape(64)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        v = fm.velocity(model, x, 0.7, enc, 4.5)
        assert v.shape == x.shape and v.isfinite().all()
        out = fm.rollout(model, enc, 4, guidance=4.5, noise_level=0.7, resolution=64)
        img = fm.to_images(model, out["states"][:, -1])
    assert img.shape == (2, 3, 64, 64) and 0 <= img.min() and img.max() <= 1
    assert len(model.cache) == 3  # the prompts and "" encoded once, then cached
    lora.add_lora(model.transformer, "t", rank=2, alpha=4)
    assert len(lora.lora_layers(model.transformer)) == 15  # 8 per block; the last block has no to_add_out


def test_our_adapter_loads_into_diffusers():
    """An adapter we save loads with diffusers' own pipe.load_lora_weights and gives our velocities. (diffusers needs
    peft for that; .ci/run installs it, as a test-only package.)"""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise AssertionError("this test needs peft (pip install peft; .ci/run installs it)") from None
    from diffusers import StableDiffusion3Pipeline
    path = tiny_sd3_pipeline()
    model = fm.load_model(path, resolution=64)
    lora.add_lora(model.transformer, "ours", rank=4, alpha=8, targets=BARE_TARGETS)  # attn2 too
    assert any(".attn2." in n for n in lora.lora_layers(model.transformer))
    g = torch.Generator().manual_seed(0)
    for layer in lora.lora_layers(model.transformer).values():  # B != 0, so the adapter changes the output
        layer.lora_B["ours"].weight.data = torch.randn(layer.lora_B["ours"].weight.shape, generator=g) * 0.1
    lora.set_adapter(model.transformer, "ours")
    file = os.path.join(TMP, "ours_for_diffusers.safetensors")
    lora.save_lora(file, model.transformer, "ours", {"role": "test"})
    enc = fm.encode_prompts(model, ["a red circle", 'the text "47"'])
    x = torch.randn(2, *model.latent_shape(64), generator=g)
    with torch.no_grad():
        v_ours = fm.velocity(model, x, 0.6, enc)
        lora.set_adapter(model.transformer, None)
        v_base = fm.velocity(model, x, 0.6, enc)
        pipe = StableDiffusion3Pipeline.from_pretrained(path, **NONE)
        pipe.load_lora_weights(file)
        v_diffusers = pipe.transformer(hidden_states=x, encoder_hidden_states=enc["seq"], pooled_projections=enc["pooled"],
                                       timestep=torch.full((2,), 600.0), return_dict=False)[0]
    assert (v_ours - v_base).abs().max() > 1e-2, "the adapter must matter for this test to mean anything"
    close(v_diffusers, v_ours, 1e-5, "diffusers' load_lora_weights output = ours")


def _reward_servers():
    """One reference reward server per reward (real_rewards.py --serve, in threads): real-backend flags for SD3 runs."""
    import threading
    if "servers" not in _REWARD_SERVERS:
        flags = []
        for name in rewards.REWARDS:
            server = real_rewards.make_server(name)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            flags += [f"--{name}_url", f"http://127.0.0.1:{server.server_port}"]
        _REWARD_SERVERS["servers"] = flags
    return _REWARD_SERVERS["servers"]


_REWARD_SERVERS = {}


def test_sd3_pipeline_through_every_script():
    """The real-world path on a tiny random SD3.5-style pipeline: a teacher step, merge, an OPD step (a peft-format
    teacher among the teachers), eval on 2 prompts. Prompts come from Flow-GRPO-style files (TASK=PATH, .txt /
    .jsonl); real images get real scorers (reward servers here)."""
    pipe = tiny_sd3_pipeline()
    d = os.path.join(TMP, "sd3run")
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, "ocr.txt"), "w").write('the text "12"\nthe text "7"\n')
    with open(os.path.join(d, "geneval.jsonl"), "w") as f:
        for p in ["a red circle", "two blue squares"]:
            f.write(json.dumps({"prompt": p, "tag": "x", "include": []}) + "\n")
    files = [f"ocr={d}/ocr.txt", f"geneval={d}/geneval.jsonl"]
    assert [p["task"] for p in mw.read_prompt_file(files[1])] == ["geneval", "geneval"]
    small = ["--model", pipe, "--resolution", "64", "--sample_steps", "3", "--prompts", "2", "--group", "2",
             "--steps", "1", "--rank", "2", "--alpha", "4", "--guidance", "4.5", "--prompt_file", *files,
             "--ema_decay", "0"]
    servers = _reward_servers()
    for task in ("ocr", "geneval"):
        cli("grpo_teacher.py", *small, "--reward", task, "--out", f"{d}/teachers/{task}.safetensors",
            "--log_file", f"{d}/log_{task}.jsonl", *servers)
        rec = read_log(f"{d}/log_{task}.jsonl")[0]
        assert math.isfinite(rec["loss"]) and rec["ratio_dev"] < 1e-4, rec
    # the ocr teacher again, as a peft directory (adapter_config.json + adapter_model.safetensors)
    pairs, scale, meta = lora.read_lora(f"{d}/teachers/ocr.safetensors")
    peft = os.path.join(d, "peft_ocr")
    os.makedirs(peft, exist_ok=True)
    from safetensors.torch import save_file
    save_file({f"base_model.model.{m}.lora_{ab}.weight": t.contiguous() for m, (A, B) in pairs.items()
               for ab, t in (("A", A), ("B", B))}, os.path.join(peft, "adapter_model.safetensors"))
    json.dump({"r": 2, "lora_alpha": 2 * scale, "target_modules": FLOW_GRPO_TARGETS, "peft_type": "LORA"},
              open(os.path.join(peft, "adapter_config.json"), "w"))
    cli("merge.py", f"{d}/teachers/ocr.safetensors", f"{d}/teachers/geneval.safetensors", "--out", f"{d}/merged.safetensors")
    cli("opd_student.py", *small, "--teachers", f"geneval={d}/teachers/geneval.safetensors", f"ocr={peft}",
        "--anchor", "none", "--out", f"{d}/student.safetensors", "--log_file", f"{d}/opd.jsonl")
    rec = read_log(f"{d}/opd.jsonl")[0]
    assert math.isfinite(rec["loss"]) and any(k.startswith("opd/vel_mse/") for k in rec), rec  # 2 random prompts
    # a full-weight student (--full): a diffusers transformer folder that eval.py takes as a row on --model
    cli("opd_student.py", *small, "--teachers", f"geneval={d}/teachers/geneval.safetensors", f"ocr={peft}",
        "--anchor", "none", "--full", "--lr", "1e-4", "--out", f"{d}/student_full", "--log_file", f"{d}/opd_full.jsonl")
    assert os.path.isfile(f"{d}/student_full/config.json")
    cli("eval.py", f"student={d}/student.safetensors", f"full={d}/student_full", "--model", pipe, "--n", "2", "--steps",
        "3", "--resolution", "64", "--prompt_file", *files, "--out", f"{d}/eval", *servers)
    table = json.load(open(f"{d}/eval/table.json"))
    assert len(table["scores"]["student"]["ocr"]) == 2 and len(table["scores"]["full"]["ocr"]) == 2


def _rendered(task, n, seed):
    prompts, rng = _cases(task, n, seed), random.Random(seed)
    return torch.stack([mw.render(p["prompt"], rng, defects=True) for p in prompts]), prompts


def _png_roundtrip(images):
    return (images * 255).round() / 255


def _quiet_server(handler):
    """A test HTTP server on a free port that keeps quiet when a client it stalls hangs up (a broken pipe)."""
    import http.server

    class Quiet(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass
    return Quiet(("127.0.0.1", 0), handler)


def test_reward_server_protocol_and_failures():
    import http.server
    import threading
    imgs, prompts = _rendered("geneval", 12, seed=3)
    server = real_rewards.make_server("geneval")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    got = real_rewards.remote("geneval", url, timeout=30)(imgs, prompts)
    close(got, rewards.geneval(_png_roundtrip(imgs), prompts), 0, "server scores = local scores of the same PNGs")
    server.shutdown()

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            time.sleep(1.0)
            self.send_response(200), self.end_headers(), self.wfile.write(b'{"scores": []}')

        def log_message(self, *a):
            pass

    class Garbage(Slow):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200), self.end_headers(), self.wfile.write(b"<html>oops</html>")
    cases = [("down", url, "is down, too slow or failing"), ("slow", Slow, "is down, too slow or failing"), ("garbage", Garbage, "answered garbage")]
    for what, target, needle in cases:
        if not isinstance(target, str):
            srv = _quiet_server(target)
            threading.Thread(target=srv.serve_forever, daemon=True).start()
            target = f"http://127.0.0.1:{srv.server_port}"
        t0 = time.time()
        try:
            real_rewards.remote("geneval", target, timeout=0.3, retries=2, backoff=0.05)(imgs[:2], prompts[:2])
            raise AssertionError(f"{what} server accepted")
        except runs.BadInput as e:
            msg = str(e)
        assert needle in msg and "\n" not in msg, msg
        print(f"    {what}: {time.time() - t0:.2f}s -> {msg[:110]}")


def test_reward_calls_have_a_deadline_report_http_errors_and_honour_a_stop():
    """Counted by the servers, on a clock the test moves, not timed: a server that trickles a byte every 0.1 s (of that
    clock) is cut off by each try's --reward_timeout deadline, 0.5 s in total (a per-read timeout never fires: it
    would read all 50 bytes and fail on the short answer, IncompleteRead, not TimeoutError);
    HTTP 4xx is reported after one request with the server's reason, 5xx after every retry, with it too; a stop
    signal ends a pending call with no further try."""
    import http.server
    import threading
    from types import SimpleNamespace
    requests, clock = [0], [0.0]  # the clock the deadline reads: the trickling server moves it

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            requests[0] += 1
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200), self.send_header("Content-Length", "100"), self.end_headers()
            for _ in range(50):
                self.wfile.write(b" "), self.wfile.flush()
                clock[0] += 0.1  # a byte every 0.1 s of the controlled clock
                time.sleep(0.02)

        def log_message(self, *a):
            pass

    def refusing(code):
        class Refuse(Trickle):
            def do_POST(self):
                requests[0] += 1
                self.rfile.read(int(self.headers["Content-Length"]))
                body = json.dumps({"error": f"no model loaded ({code})"}).encode()
                self.send_response(code), self.send_header("Content-Length", str(len(body))), self.end_headers()
                self.wfile.write(body)
        return Refuse

    imgs, prompts = _rendered("geneval", 2, seed=3)
    for handler, timeout, needle, tries in ((Trickle, 0.5, "TimeoutError", 2), (refusing(400), 5, "HTTP 400", 1),
                                            (refusing(503), 5, "HTTP 503", 2)):
        srv = _quiet_server(handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        requests[0] = 0
        real_time, real_rewards.time = real_rewards.time, SimpleNamespace(monotonic=lambda: clock[0])
        try:
            real_rewards.remote("geneval", f"http://127.0.0.1:{srv.server_port}", timeout=timeout, retries=2,
                                backoff=0.1)(imgs, prompts)
            raise AssertionError("accepted")
        except runs.BadInput as e:
            assert needle in str(e) and ("no model loaded" in str(e) or handler is Trickle), str(e)
            assert requests[0] == tries, (needle, requests[0])
            print(f"    {requests[0]} request(s): {str(e)[:120]}")
        finally:
            real_rewards.time = real_time
        srv.shutdown()
    srv = _quiet_server(Trickle)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    requests[0] = 0
    threading.Timer(0.3, lambda: runs.STOP.update(signal="SIGTERM")).start()
    try:
        real_rewards.remote("geneval", f"http://127.0.0.1:{srv.server_port}", timeout=30, retries=3)(imgs, prompts)
        raise AssertionError("not interrupted")
    except runs.Interrupted:
        assert requests[0] == 1, requests[0]  # no retry after the stop
    finally:
        runs.STOP.clear()
        srv.shutdown()


def test_ocr_engine_both_paddleocr_apis_and_missing_extra():
    """--ocr_engine paddleocr against stand-in modules of both APIs (2.x: ocr(img, cls=False); 3.x: predict(img)):
    Flow-GRPO's 1 - edit distance / len of the quoted text, spaces dropped, case folded; NaN without a quote; the
    extra missing is one clear error."""
    import types
    seen = {}

    class Engine:
        def __init__(self, **kw):
            seen["kw"] = kw

        def ocr(self, arr, cls=True):  # 2.x: per image a list of [box, (text, confidence)], or None
            seen["shape"] = arr.shape
            return [[[None, ("Flow", 0.9)], [None, ("0PD", 0.8)]]]

        def predict(self, arr):  # 3.x: results with rec_texts
            seen["shape"] = arr.shape
            return [{"rec_texts": ["Flow", "0PD"]}]

    imgs = torch.rand(3, 3, 16, 16)
    prompts = ['a sign that says "flow opd"', "no text here", 'the text "Flowx"']
    want = [1 - 1 / 7, float("nan"), 1 - 3 / 5]  # "flow0pd" -> "flowopd": 1 edit; -> "flowx": 0->x, drop p, d
    saved = sys.modules.get("paddleocr")
    try:
        for version, kw in (("2.9.1", "show_log"), ("3.7.0", "use_textline_orientation")):
            sys.modules["paddleocr"] = types.SimpleNamespace(__version__=version, PaddleOCR=Engine)
            got = real_rewards.ocr_engine("paddleocr")(imgs, prompts)
            assert kw in seen["kw"] and seen["shape"] == (16, 16, 3), (version, seen)
            close(got[[0, 2]], torch.tensor([want[0], want[2]]), 1e-6, f"paddleocr {version}")
            assert got[1].isnan()
        sys.modules["paddleocr"] = None  # what an absent package looks like to import
        try:
            real_rewards.ocr_engine("paddleocr")
            raise AssertionError("no error without the extra")
        except runs.BadInput as e:
            assert "pip install paddleocr" in str(e)
    finally:
        if saved is None:
            sys.modules.pop("paddleocr", None)
        else:
            sys.modules["paddleocr"] = saved


def test_pickscore_clip_backend_equals_clip_logits():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    tiny_sd3_pipeline()  # writes the tiny CLIP vocabulary
    torch.manual_seed(0)
    vocab = json.load(open(os.path.join(TMP, "tok", "vocab.json")))
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(vocab),
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    tok = CLIPTokenizer(os.path.join(TMP, "tok", "vocab.json"), os.path.join(TMP, "tok", "merges.txt"), model_max_length=77)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32), tokenizer=tok)
    path = os.path.join(TMP, "tiny-pickscore")
    model.save_pretrained(path), proc.save_pretrained(path)
    imgs, prompts = _rendered("pickscore", 4, seed=1)
    ours = real_rewards.clip_pickscore(path)(imgs, prompts)
    from PIL import Image
    pil = [Image.fromarray((i * 255).round().byte().permute(1, 2, 0).numpy()) for i in imgs]
    with torch.no_grad():
        x = proc(images=pil, text=[p["prompt"] for p in prompts], padding=True, return_tensors="pt")
        ref = model(**x).logits_per_image.diag()  # CLIP's own forward: logit_scale * cos
    close(ours, ref, 1e-4, "PickScore = CLIP logits")


# ----------------------------------------------------------------------------------- grpo_teacher.py: Stage 1
def base_ckpt():
    path = os.path.join(TMP, "base.safetensors")
    if not os.path.exists(path):
        fm.save_model(tiny_model(), path)
    return path


TINY_RUN = ["--sample_steps", "4", "--prompts", "2", "--group", "4", "--log_every", "1", "--rank", "2", "--alpha", "4",
            "--ema_decay", "0", "--eval_every", "0"]  # the trained weights themselves, no held-out evaluation


def read_log(path):
    return [json.loads(l) for l in open(path)]


def test_grpo_on_policy_ratio_and_two_process_update():
    base = base_ckpt()
    common = ["--model", base, "--reward", "pickscore", "--steps", "1", "--beta", "0.04", *TINY_RUN]
    one, two = os.path.join(TMP, "g1.jsonl"), os.path.join(TMP, "g2.jsonl")
    cli("grpo_teacher.py", *common, "--out", os.path.join(TMP, "g1.safetensors"), "--log_file", one)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "grpo_teacher.py", *common, "--out", os.path.join(TMP, "g2.safetensors"), "--log_file", two],
                       cwd=HERE, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    a, b = read_log(one)[0], read_log(two)[0]
    print(f"    1 process: loss {a['loss']:.8f} grad norm {a['grad_norm']:.8f} | 2 processes: loss {b['loss']:.8f} "
          f"grad norm {b['grad_norm']:.8f} | max |rho - 1| on-policy {a['ratio_dev']:.2e}")
    assert a["ratio_dev"] < 1e-5, "the first inner step is on-policy: rho = 1"
    assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"] and abs(a["reward"] - b["reward"]) < 1e-6
    pa, _, ma = lora.read_lora(os.path.join(TMP, "g1.safetensors"))
    pb, _, _ = lora.read_lora(os.path.join(TMP, "g2.safetensors"))
    assert ma["role"] == "teacher" and ma["tasks"] == ["pickscore"] and ma["base_hash"] == fm.fingerprint(fm.load_model(base))
    assert max((pa[k][1] - pb[k][1]).abs().max().item() for k in pa) < 1e-5, "the same LoRA after one update"


def test_group_advantages_and_clipped_surrogate():
    """Flow-GRPO's advantages (group mean, global std + 1e-4, clipped at 5; all-equal groups exactly 0), and Eq. 11."""
    import grpo_teacher as grpo
    R = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    g = float(torch.tensor([1.0, 2, 3, 10, 10, 10], dtype=torch.float64).std(unbiased=False))  # every reward
    close(grpo.group_advantages(R, 3), torch.tensor([-1 / (g + 1e-4), 0, 1 / (g + 1e-4), 0, 0, 0]), 1e-6, "global std")
    sd = math.sqrt(2 / 3)
    close(grpo.group_advantages(R, 3, "group"), torch.tensor([-1 / (sd + 1e-4), 0, 1 / (sd + 1e-4), 0, 0, 0]), 1e-6,
          "group std")
    close(grpo.group_advantages(R, 3, "group", clip=1.0), torch.tensor([-1.0, 0, 1.0, 0, 0, 0]), 1e-6, "clipped")
    assert (grpo.group_advantages(torch.tensor([0.3, 0.3, 0.3, 0.1, 0.1, 0.1]), 3) == 0).all()
    lp, old = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])), torch.zeros(4)
    loss, ratio = grpo.clipped_surrogate(lp, old, torch.tensor([1.0, 1.0, -1.0, -1.0]), 0.2)
    close(loss, torch.tensor([-1.2, -0.5, 1.5, 0.8]), 1e-6, "Eq. 11 pessimistic clip")


def test_ema_of_the_trained_weights_is_flow_grpos():
    """grpo.update's EMA equals Flow-GRPO's (scripts/train_sd3.py at ac4c86e with flow_grpo/ema.py), written out here:
    each optimizer step closes a window of training batches; global_step += 1 at the window's last batch; after
    every batch ema.step(params, global_step) moves the EMA when (global_step + 1) % interval == 0, by
    one_minus_decay = 1 - min((1 + global_step) / (10 + global_step), decay). Toy quadratic loss, SGD, 6 rollout
    batches; several batch sizes, parts, inner epochs and intervals."""
    import grpo_teacher as grpo
    from types import SimpleNamespace
    for N, micro, opt_steps, epochs, every in [(64, 64, 2, 1, 8), (64, 8, 2, 1, 8), (48, 4, 2, 2, 3), (30, 7, 3, 1, 2)]:
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5))
        opt = torch.optim.SGD([p], lr=0.1)
        args = SimpleNamespace(opt_steps=opt_steps, inner_epochs=epochs, micro_batch=micro, max_grad_norm=1e9,
                               max_bad_steps=5, out="x", ema_decay=0.9, ema_every=every)
        ema, c, snaps = {"w": [p.detach().clone()]}, torch.randn(N, 5), [p.detach().clone()]
        step = opt.step
        opt.step = lambda: (step(), snaps.append(p.detach().clone()))
        theirs, global_step = p.detach().clone(), 0
        for it in range(6):
            first = len(snaps)
            grpo.update([p], opt, ema, torch.ones(N, dtype=torch.bool), list(range(N)), [0, 1],
                        lambda t, mb: (((p - c[mb]) ** 2).sum(1), {}), (), args, 1, random.Random(it), it, 0)
            for k in range(first, len(snaps)):  # one window per optimizer step
                part = len(range(N)[(k - first) % opt_steps::opt_steps])
                batches = math.ceil(part / micro)
                for b in range(batches):
                    if b == batches - 1:
                        global_step += 1
                    params = snaps[k] if b == batches - 1 else snaps[k - 1]
                    if (global_step + 1) % every == 0:
                        theirs += (1 - min((1 + global_step) / (10 + global_step), 0.9)) * (params - theirs)
        close(ema["w"][0], theirs, 1e-6, f"EMA, {N} samples, micro-batch {micro}, {opt_steps} parts, every {every}")
        assert (theirs - snaps[0]).abs().max() > 0.01  # it moved
    grpo.swap_ema(ema, [p])
    close(p.detach(), theirs, 1e-6, "swapped in")
    print("    equal to Flow-GRPO's EMA for 4 settings (batches per optimizer step 1 to 5, 1 or 2 inner epochs)")


# ----------------------------------------------------------------------------- merge.py: the merge cold start
def _random_teacher(path, seed, rank, alpha, base_hash, modules=None):
    g = torch.Generator().manual_seed(seed)
    model = tiny_model()
    pairs = {}
    for m in modules or ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_add_out"]:
        lin = model.transformer.get_submodule(m)
        pairs[m] = (torch.randn(rank, lin.in_features, generator=g) * 0.1, torch.randn(lin.out_features, rank, generator=g) * 0.1)
    lora.write_lora(path, pairs, alpha / rank, {"role": "teacher", "tasks": [f"t{seed}"], "base_hash": base_hash})
    return pairs


def test_merge_is_exact_sum_of_deltas():
    import merge
    paths = [os.path.join(TMP, f"m{k}.safetensors") for k in range(3)]
    specs = [(2, 4.0), (3, 3.0), (4, 16.0)]
    teachers = [_random_teacher(p, k, r, a, "h0", None if k else ["transformer_blocks.0.attn.to_q"])
                for k, (p, (r, a)) in enumerate(zip(paths, specs))]
    w = [0.5, 0.3, 0.2]
    pairs, meta = merge.merge_files(paths, w)
    assert all(A.shape[0] == 9 for A, _ in pairs.values()) and [m["weight"] for m in meta["merged_from"]] == w
    for mod, (A, B) in pairs.items():
        exact = sum(wk * (a / r) * t[mod][1] @ t[mod][0] for wk, (r, a), t in zip(w, specs, teachers) if mod in t)
        close(B @ A, exact, 1e-6, f"merged delta of {mod}")
    # the official code's average of A and B separately is not the average of the deltas
    mod = "transformer_blocks.0.attn.to_q"
    A2 = [t[mod][0] for t in teachers[:2]]
    B2 = [t[mod][1] for t in teachers[:2]]
    naive = ((B2[0][:, :2] + B2[1][:, :2]) / 2) @ ((A2[0] + A2[1][:2]) / 2)
    assert (naive - (B2[0] @ A2[0] + B2[1][:, :2] @ A2[1][:2]) / 2).abs().max() > 1e-3
    # a merged LoRA file applies the same delta as the dense sum
    out = os.path.join(TMP, "merged.safetensors")
    cli("merge.py", *paths, "--weights", *map(str, w), "--out", out)
    model, reference = tiny_model(), tiny_model()
    lora.load_lora(out, model.transformer, "m")
    lora.set_adapter(model.transformer, "m")
    with torch.no_grad():
        for mod, (A, B) in pairs.items():
            reference.transformer.get_submodule(mod).weight += B @ A
    enc = fm.encode_prompts(model, ["a red square"])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        close(fm.velocity(model, x, 0.4, enc), fm.velocity(reference, x, 0.4, enc), 1e-5, "merged file")


def test_merge_refuses_teachers_of_different_bases():
    a, b = os.path.join(TMP, "ba.safetensors"), os.path.join(TMP, "bb.safetensors")
    _random_teacher(a, 1, 2, 2.0, "base-one")
    _random_teacher(b, 2, 2, 2.0, "base-two")
    out = os.path.join(TMP, "never.safetensors")
    err = refused("merge.py", a, b, "--out", out)
    assert len(err.strip().splitlines()) == 1 and "different base" in err and not os.path.exists(out)


# ----------------------------------------------------------- opd_student.py and mar.py: Stage 2 (Eq. 7, 9-12)
def test_eq9_dense_reward_is_the_gaussian_kl():
    """Eq. 9's exact KL (torch.distributions), Eq. 10's r_t, and the one convention the losses use: Flow-GRPO's
    ||mu_a - mu_b||^2 / (2 s_t^2) per dimension (written out here from its code), = exact KL x (-dt) / D."""
    import opd_student as opd
    torch.manual_seed(0)
    sig = sampler.sigma_schedule(fm.mini_scheduler(), 10)
    x, v, v_star = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    D = x[0].numel()
    for t in (0, 4, 8):
        a, b = float(sig[t]), float(sig[t + 1])
        mu, mu_star = sampler.sde_mean(x, v, sig, t, 0.7), sampler.sde_mean(x, v_star, sig, t, 0.7)
        std = sampler.step_noise(sig, t, 0.7)[1]
        exact = torch.distributions.kl_divergence(torch.distributions.Normal(mu.double(), std),
                                                  torch.distributions.Normal(mu_star.double(), std)).flatten(1).sum(1)
        close(sampler.exact_kl(mu, mu_star, sig, t, 0.7) / exact, torch.ones(3), 1e-4, f"exact KL at t={t}")
        _, lam = sampler.kappa_lambda(sig, t, 0.7)
        close(lam * ((v - v_star) ** 2).flatten(1).sum(1) / exact, torch.ones(3), 1e-4, f"Eq. 9 lambda at t={t}")
        std_dev_t = 0.7 * math.sqrt(a / (1 - (a if a < 1 else float(sig[1]))))  # Flow-GRPO's std_dev_t
        flow_grpo = ((mu - mu_star) ** 2).mean((1, 2, 3)) / (2 * std_dev_t ** 2)
        close(sampler.kl(mu, mu_star, sig, t, 0.7) / flow_grpo, torch.ones(3), 1e-5, f"Flow-GRPO's KL at t={t}")
        close(flow_grpo * D / (a - b) / exact, torch.ones(3), 1e-4, "their KL = exact x (-dt) / D")
        close(opd.dense_reward(v, v_star, sig, t, 0.7) / flow_grpo, -torch.ones(3), 1e-4, f"Eq. 10 = -KL at t={t}")


def test_opd_loss_gradients_match_the_closed_forms():
    """opd_student.opd_loss, as the script calls it, on one Gaussian step of the real grid (t = 4, a = 0.7), the
    student's velocity v the parameter. Written out here: mu = x + [v + s^2/(2 sigma)(x + (1 - sigma) v)] dt, so
    d mu / d v = kappa dt, kappa = 1 + s^2 (1 - sigma) / (2 sigma); the losses' KL ||mu - mu*||^2 / (2 s^2) per
    dimension has gradient (mu - mu*) kappa dt / (D s^2). analytic is it exactly; logratio is it in expectation;
    paper (A_t = r_t(x_t)) gives zero; rtg adds -E[D A grad log pi] = -w kappa dt for a return-to-go A = w . x_t+1;
    --query low is the velocity MSE, gradient 2 (v - v*) / D."""
    import opd_student as opd
    from types import SimpleNamespace
    torch.manual_seed(0)
    sig, t, a, D, M = sampler.sigma_schedule(fm.mini_scheduler(), 10), 4, 0.7, 4, 200000
    sigma, sigma_next = float(sig[t]), float(sig[t + 1])
    dt = sigma_next - sigma                                               # < 0
    s = a * math.sqrt(sigma / (1 - sigma))                                # Flow-GRPO's std_dev_t
    std, kappa = s * math.sqrt(-dt), 1 + s ** 2 * (1 - sigma) / (2 * sigma)
    x_t = torch.tensor([0.5, -0.4, 0.2, 0.1]).expand(M, D)
    v = torch.tensor([0.3, -0.2, 0.5, 0.0], requires_grad=True)
    v_star = torch.tensor([0.0, 0.4, 0.1, -0.3]).expand(M, D)
    mu = x_t + (v + s ** 2 / (2 * sigma) * (x_t + (1 - sigma) * v)) * dt  # by hand (M, D)
    mu_star = x_t + (v_star + s ** 2 / (2 * sigma) * (x_t + (1 - sigma) * v_star)) * dt
    x_next = mu.detach() + std * torch.randn(M, D)
    lp = -((x_next - mu) ** 2) / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    lp, old = lp.mean(1), lp.detach().mean(1)
    w = torch.tensor([0.2, -0.1, 0.3, 0.05])
    reward = opd.dense_reward(v.detach().expand(M, D), v_star, sig, t, a)
    true = (mu[0] - mu_star[0]).detach() * kappa * dt / (D * s ** 2)
    grads = {}
    for name, query, later in [("analytic", "dense", None), ("logratio", "dense", None), ("paper", "dense", None),
                               ("rtg", "dense", x_next @ w), ("analytic", "low", None)]:
        args = SimpleNamespace(query=query, advantage=name, noise_level=a, clip=1e-4)
        loss = opd.opd_loss(args, v.expand(M, D), lp, mu, x_t, x_next, v_star, old, reward, later, sig, t)
        grads[f"{name}/{query}"] = torch.autograd.grad(loss.mean(), v, retain_graph=True)[0]
    print("    " + "; ".join(f"{k} {[round(g, 4) for g in v_.tolist()]}" for k, v_ in grads.items())
          + f"; closed form {[round(g, 4) for g in true.tolist()]}")
    close(grads["analytic/dense"], true, 1e-5 * true.abs().max().item(), "analytic = the KL's gradient")
    close(grads["logratio/dense"], true, 0.03 * true.abs().max().item(), "logratio = the KL's gradient, in expectation")
    assert grads["paper/dense"].abs().max() < 0.01 * true.abs().max(), "A_t = r_t(x_t) gives the step's action no push"
    want = true - w * kappa * dt
    close(grads["rtg/dense"], want, 0.03 * want.abs().max().item(), "rtg = analytic - w kappa dt")
    close(grads["analytic/low"], 2 * (v.detach() - v_star[0]) / D, 1e-6, "low query: velocity MSE")


def test_return_to_go_gives_the_trajectory_kl_gradient():
    """A two-step linear-Gaussian chain: student x1 ~ N(x0 + theta, s1^2), x2 ~ N(x1 + theta, s2^2); teacher means
    x0 + a and x1 / 2. The gradient of the trajectory KL, in closed form here, equals analytic (each step's KL at
    the visited state, pathwise) plus Eq. 11 with A_1 = the later step's dense reward (opd.return_to_go);
    analytic alone misses a third of step 2's part."""
    import grpo_teacher as grpo
    import opd_student as opd
    torch.manual_seed(0)
    D, M, s1, s2 = 3, 400000, 0.7, 0.5
    x0, a = torch.tensor([0.4, -0.3, 0.2]), torch.tensor([0.1, 0.2, -0.1])
    theta = torch.tensor([0.2, 0.1, -0.3], requires_grad=True)
    x1 = (x0 + theta.detach()) + s1 * torch.randn(M, D)
    kl1 = ((x0 + theta - x0 - a) ** 2).sum() / (2 * s1 ** 2)                  # at x0: one value
    kl2 = ((x1 + theta - 0.5 * x1) ** 2).sum(1) / (2 * s2 ** 2)               # at the visited x1
    reward = -torch.stack([kl1.detach().expand(M), kl2.detach()], 1)          # (M, T) dense rewards
    later = opd.return_to_go(reward)
    lp = sampler.log_prob(x1, (x0 + theta).expand(M, D), s1)  # per dimension, as Flow-GRPO's: hence D A (opd_student)
    pg, _ = grpo.clipped_surrogate(lp, lp.detach(), D * later[:, 0], 1e-4)
    analytic = torch.autograd.grad((kl1 + kl2).mean(), theta, retain_graph=True)[0]
    rtg = torch.autograd.grad((kl1 + kl2 + pg).mean(), theta)[0]
    true = (theta.detach() - a) / s1 ** 2 + 1.5 * (0.5 * x0 + 1.5 * theta.detach()) / s2 ** 2  # d/dtheta E[KL]
    print(f"    closed form {[round(g, 3) for g in true.tolist()]}, rtg {[round(g, 3) for g in rtg.tolist()]}, "
          f"analytic {[round(g, 3) for g in analytic.tolist()]}")
    close(rtg, true, 0.02 * true.abs().max().item(), "analytic + return-to-go = grad of the trajectory KL")
    assert (analytic - true).abs().max() > 0.1 * true.abs().max()


def _opd_setup():
    """A base and two teachers (geneval, ocr) with different random adapters, plus a deqa anchor."""
    base = base_ckpt()
    h = fm.fingerprint(fm.load_model(base))
    paths = {}
    for k, task in enumerate(["geneval", "ocr", "deqa"]):
        model = fm.load_model(base)
        lora.add_lora(model.transformer, "t", 2, 4)
        with torch.no_grad():
            for p in lora.adapter_params(model.transformer, "t"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(k))
        paths[task] = os.path.join(TMP, "teachers", f"{task}.safetensors")
        lora.save_lora(paths[task], model.transformer, "t", {"role": "teacher", "tasks": [task], "base_hash": h,
                                                           "base_path": base})
    return base, paths


def test_nothing_routed_is_dropped_in_silence():
    """A teacher that serves no distilled task and prompt-file prompts that no teacher distils are said (in the
    'skipped' line, before any work); a teacher whose metadata names no task is refused."""
    import opd_student as opd
    base, paths = _opd_setup()
    pf = os.path.join(TMP, "mixed_prompts.jsonl")
    with open(pf, "w") as f:
        for p, t in (("a circle", "geneval"), ('the text "3"', "ocr"), ("the sea at dawn", "pickscore")):
            f.write(json.dumps({"prompt": p, "task": t}) + "\n")
    args = opd.parse_args(["--model", base, "--teachers", paths["geneval"], paths["ocr"], paths["deqa"], "--tasks",
                           "geneval", "--prompt_file", pf])
    routes, skipped, tasks, anchor = opd.resolve_inputs(args)
    assert tasks == ["geneval"] and anchor == paths["deqa"]
    assert skipped == [(paths["ocr"], "serves ocr, which is not distilled: add it to --tasks"),
                       ("the --prompt_file prompts of task ocr", "no teacher distils it"),
                       ("the --prompt_file prompts of task pickscore", "no teacher distils it")], skipped
    empty = os.path.join(TMP, "teachers_empty", "t.safetensors")
    pairs, scale, meta = lora.read_lora(paths["ocr"])
    lora.write_lora(empty, pairs, scale, {**meta, "tasks": []})
    try:
        lora.resolve_teachers([empty])
        raise AssertionError("a teacher of no task was accepted")
    except runs.BadInput as e:
        assert "its metadata names no task" in str(e), e


def test_merge_cold_start_is_the_routed_teachers_only():
    """opd_student.py --init merge (the default) with GenEval, OCR and the DeQA anchor as teachers: the cold start it
    writes is theta_base + (Delta_geneval + Delta_ocr) / 2, each Delta = s B A read from the teacher's file and summed
    here by hand; the anchor is not merged (the official merge.sh); folding it in would fail."""
    base, paths = _opd_setup()
    out = os.path.join(TMP, "coldstart.safetensors")
    cli("opd_student.py", "--model", base, "--teachers", os.path.dirname(paths["geneval"]), "--steps", "0",
        "--out", out, "--overwrite", *TINY_RUN)
    pairs, scale, meta = lora.read_lora(out)
    assert meta["role"] == "merge" and meta["tasks"] == ["geneval", "ocr"], meta
    teachers = {t: lora.read_lora(paths[t]) for t in ("geneval", "ocr", "deqa")}
    for mod, (A, B) in pairs.items():
        want = sum(0.5 * s * (p[mod][1] @ p[mod][0]) for p, s, _ in (teachers["geneval"], teachers["ocr"]))
        close(scale * B @ A, want, 1e-6, f"cold start at {mod}")
        anchor = teachers["deqa"][1] * teachers["deqa"][0][mod][1] @ teachers["deqa"][0][mod][0]
        assert (scale * B @ A - (want * 2 + anchor) / 3).abs().max() > 1e-4  # what merging the anchor too would give
    print(f"    {len(pairs)} modules: (Delta_geneval + Delta_ocr) / 2, the deqa anchor left out")


def test_mar_as_the_script_runs_it_is_the_kl_to_its_anchor():
    """opd_student.py, one step (one optimizer step, so every sample is scored at the cold start): the logged MAR KL
    equals, to float precision, Eq. 12's KL recomputed here by hand: the student as the base with the merged
    teachers folded into its weights (W + (s_g B_g A_g + s_o B_o A_o) / 2), its SDE rollout from the run's noise
    (Eq. 5 written out), the anchor as the base with the DeQA teacher folded in (--anchor auto) or the bare base
    (--anchor base, the official w/o MAR), per dimension / 2 s_t^2, averaged over samples and trained steps."""
    import mar  # noqa: F401  (the script's)
    base, paths = _opd_setup()

    def folded(adapters):
        m = fm.load_model(base)
        with torch.no_grad():
            for path, w in adapters:
                pairs, scale, _ = lora.read_lora(path)
                for mod, (A, B) in pairs.items():
                    m.transformer.get_submodule(mod).weight += w * scale * B @ A
        return m
    student = folded([(paths["geneval"], 0.5), (paths["ocr"], 0.5)])
    stream = mw.train_prompts(["geneval", "ocr"], seed=0)
    batch = [next(stream) for _ in range(2)]
    prompts = [batch[i // 4] for i in range(8)]
    enc = fm.encode_prompts(student, prompts)
    sig, a = sampler.sigma_schedule(student.scheduler, 4), 0.7
    logged = {}
    for flag, anchor in (("auto", folded([(paths["deqa"], 1.0)])), ("base", fm.load_model(base))):
        out = os.path.join(TMP, f"mar_{flag}.safetensors")
        cli("opd_student.py", "--model", base, "--teachers", os.path.dirname(paths["geneval"]), "--steps", "1",
            "--opt_steps", "1", "--anchor", flag, "--out", out, "--log_file", out + ".jsonl", "--overwrite", *TINY_RUN)
        logged[flag] = read_log(out + ".jsonl")[0]["mar_kl"]
        x, eps = runs.sample_noise(0, 0, range(8), (3, 32, 32), 4)
        kls = []
        with torch.no_grad():
            for t in range(4):
                sigma, dt = float(sig[t]), float(sig[t + 1]) - float(sig[t])
                s = a * math.sqrt(sigma / (1 - (sigma if sigma < 1 else float(sig[1]))))
                v = fm.velocity(student, x, sigma, enc)
                if t < 2:  # the mini world's window: the first half of the 4 steps
                    mean = lambda v_: x + (v_ + s ** 2 / (2 * sigma) * (x + (1 - sigma) * v_)) * dt  # noqa: E731
                    mu, mu_anchor = mean(v), mean(fm.velocity(anchor, x, sigma, enc))
                    kls.append(((mu - mu_anchor) ** 2).flatten(1).mean(1) / (2 * s ** 2))
                    x = mu + s * math.sqrt(-dt) * eps[:, t]
                else:
                    x = x + dt * v
        want = float(torch.stack(kls).mean())
        assert abs(logged[flag] - want) <= 1e-3 * want, (flag, logged[flag], want)
    assert abs(logged["auto"] - logged["base"]) > 0.05 * logged["base"], logged  # the anchor matters
    print(f"    MAR KL to the DeQA teacher {logged['auto']:.4g}, to the base {logged['base']:.4g}, both as recomputed")


def test_resume_from_an_sft_cold_start_keeps_it():
    """opd_student.py --init sft --steps 0 writes the SFT cold start and a checkpoint of step 0; --steps 1 --resume
    goes on from it, bitwise the run that did both at once (it used to restart from a fresh adapter)."""
    from safetensors.torch import load_file
    base, paths = _opd_setup()
    common = ["--model", base, "--teachers", paths["geneval"], paths["ocr"], "--init", "sft", "--sft_samples", "8",
              "--sft_steps", "3", *TINY_RUN]
    a, b = (os.path.join(TMP, "sft_resume", f"{n}.safetensors") for n in ("straight", "parts"))
    cli("opd_student.py", *common, "--steps", "1", "--out", a, "--log_file", a + ".jsonl")
    for extra in (["--steps", "0"], ["--steps", "1", "--resume"]):
        cli("opd_student.py", *common, *extra, "--out", b, "--log_file", b + ".jsonl")
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), "the resumed student differs"


def test_sft_cold_start_moves_the_student_toward_each_routed_teacher():
    """opd_student.py --init sft --steps 0 (Table 2's SFT cold start): Eq. 1 on images each prompt's routed teacher
    draws. Teachers made far apart (large random adapters): after it, the student's ODE samples of each task's
    held-out prompts are nearer that task's teacher's samples (mean squared pixel distance) than the base's are, and
    nearer their own teacher's than the other teacher's."""
    base = base_ckpt()
    h = fm.fingerprint(fm.load_model(base))
    d = os.path.join(TMP, "sft_teachers")
    for k, task in enumerate(["geneval", "ocr"]):
        model = fm.load_model(base)
        lora.add_lora(model.transformer, "t", 2, 4)
        with torch.no_grad():
            for q in lora.adapter_params(model.transformer, "t"):
                q.normal_(0, 0.5, generator=torch.Generator().manual_seed(10 + k))
        lora.save_lora(os.path.join(d, f"{task}.safetensors"), model.transformer, "t",
                       {"role": "teacher", "tasks": [task], "base_hash": h, "base_path": base})
    out = os.path.join(TMP, "sft.safetensors")
    cli("opd_student.py", "--model", base, "--teachers", d, "--init", "sft", "--steps", "0", "--sft_samples", "64",
        "--sft_steps", "60", "--sft_lr", "1e-2", "--out", out, "--overwrite", *TINY_RUN, "--micro_batch", "16")

    def samples(path, task):
        m = fm.load_model(base)
        if path:
            lora.load_lora(path, m.transformer, "x")
            lora.set_adapter(m.transformer, "x")
        enc = fm.encode_prompts(m, mw.eval_prompts(task, 16))
        return fm.rollout(m, enc, 4, sde=[], generator=torch.Generator().manual_seed(0))["states"][:, -1]
    for task, other in (("geneval", "ocr"), ("ocr", "geneval")):
        teacher = samples(os.path.join(d, f"{task}.safetensors"), task)
        dist = {k: float(((samples(p, task) - teacher) ** 2).mean()) for k, p in
                (("student", out), ("base", None), ("other teacher", os.path.join(d, f"{other}.safetensors")))}
        assert dist["student"] < 0.75 * dist["base"] and dist["student"] < dist["other teacher"], (task, dist)
        print(f"    {task}: distance to its teacher's samples {', '.join(f'{k} {v:.4f}' for k, v in dist.items())}")


def test_routing_gives_each_task_its_teacher():
    import opd_student as opd
    base, paths = _opd_setup()
    model = fm.load_model(base)
    for task in ("geneval", "ocr"):
        lora.load_lora(paths[task], model.transformer, f"teacher:{task}")
    prompts = [{"prompt": "a red circle", "task": "geneval"}, {"prompt": 'the text "3"', "task": "ocr"},
               {"prompt": "two squares", "task": "geneval"}]
    groups = opd.route(prompts, {"geneval": paths["geneval"], "ocr": paths["ocr"]})
    assert groups == {"geneval": [0, 2], "ocr": [1]}
    enc = fm.encode_prompts(model, prompts)
    x = torch.randn(3, 3, 32, 32)
    v_star = opd.routed_velocity(model, x, 0.5, enc, groups, 1.0, 2)
    for i, task in enumerate(["geneval", "ocr", "geneval"]):
        ref = fm.load_model(base)
        lora.load_lora(paths[task], ref.transformer, "x")
        lora.set_adapter(ref.transformer, "x")
        with torch.no_grad():
            close(v_star[i], fm.velocity(ref, x[i:i + 1], 0.5, fm.select(enc, [i]))[0], 1e-5, f"sample {i} -> {task}")


def test_mar_gradient_matches_finite_differences():
    import mar
    import opd_student as opd
    base, paths = _opd_setup()
    model = fm.load_model(base)
    lora.load_lora(paths["deqa"], model.transformer, "anchor")
    lora.add_lora(model.transformer, "student", 2, 4)
    with torch.no_grad():
        for q in lora.adapter_params(model.transformer, "student"):
            q.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    p = lora.adapter_params(model.transformer, "student")[1]  # a lora_B
    p.requires_grad_(True)
    enc = fm.encode_prompts(model, ["the sea at noon", "a blue circle"])
    sig = sampler.sigma_schedule(model.scheduler, 10)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mu_a = mar.anchor_mean(opd.adapter_velocity(model, "anchor", enc, 1.0), x, sig, 3, 0.7)

    def loss():
        lora.set_adapter(model.transformer, "student")
        mu = sampler.sde_mean(x, fm.velocity(model, x, float(sig[3]), enc), sig, 3, 0.7)
        return mar.mar_loss(mu, mu_a, sig, 3, 0.7, beta=0.04)

    g = torch.autograd.grad(loss(), p)[0]
    i = g.abs().flatten().argmax()
    h = 1e-3
    with torch.no_grad():
        p.view(-1)[i] += h
        up = loss()
        p.view(-1)[i] -= 2 * h
        down = loss()
        p.view(-1)[i] += h
    fd = (up - down) / (2 * h)
    print(f"    autograd {g.flatten()[i].item():.6e} finite difference {fd.item():.6e}")
    assert abs(fd - g.flatten()[i]) <= 1e-2 * abs(g.flatten()[i])  # float32 forward: 1% is its resolution


def test_opd_two_process_update_and_routing_errors():
    base, paths = _opd_setup()
    common = ["--model", base, "--teachers", paths["geneval"], paths["ocr"], "--anchor", paths["deqa"],
              "--steps", "1", "--init", "merge", *TINY_RUN]
    one, two = os.path.join(TMP, "o1.jsonl"), os.path.join(TMP, "o2.jsonl")
    out1 = os.path.join(TMP, "students", "o1.safetensors")
    cli("opd_student.py", *common, "--out", out1, "--log_file", one)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "opd_student.py", *common, "--out", os.path.join(TMP, "students", "o2.safetensors"), "--log_file", two],
                       cwd=HERE, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    a, b = read_log(one)[0], read_log(two)[0]
    print(f"    1 process: loss {a['loss']:.8f} grad norm {a['grad_norm']:.8f} mar {a['mar_kl']:.6f} | "
          f"2 processes: loss {b['loss']:.8f} grad norm {b['grad_norm']:.8f}")
    assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"] and abs(a["loss"] - b["loss"]) < 1e-4 * abs(a["loss"])
    assert a["mar_kl"] > 0 and "opd/vel_mse/geneval" in a and "opd/vel_mse/ocr" in a
    meta = lora.read_lora(out1)[2]
    assert meta["role"] == "student" and [t["task"] for t in meta["teachers"]] == ["geneval", "ocr"]
    # routing errors: a label no teacher covers, two teachers for one label
    err = refused("opd_student.py", *common, "--tasks", "geneval", "pickscore", "--out", os.path.join(TMP, "x.safetensors"))
    assert "'pickscore' has no teacher" in err and len(err.strip().splitlines()) == 1
    err = refused("opd_student.py", "--model", base, "--teachers", f"ocr={paths['geneval']}", paths["ocr"],
                  "--out", os.path.join(TMP, "x.safetensors"))
    assert "two teachers claim task 'ocr'" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(os.path.join(TMP, "x.safetensors"))


def safe_meta(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return f.metadata()


def test_opd_full_student_fsdp():
    """--full: the merge cold start folded into dense weights equals the merged LoRA; two steps under 2-process
    torchrun with FSDP give the same student as one process; one step then --resume gives the two-step student
    bitwise, on one process and from FSDP shards."""
    import opd_student as opd
    import merge
    base, paths = _opd_setup()
    model = fm.load_model(base)
    copy_ = __import__("copy").deepcopy(model.transformer)
    pairs, _ = merge.merge_files([paths["geneval"], paths["ocr"]])
    lora.add_lora_pairs(model.transformer, "student", pairs, 1.0)
    lora.set_adapter(model.transformer, "student")
    student = fm.full_student(model, copy_, pairs, 1.0, world=1)
    enc = fm.encode_prompts(model, [{"prompt": "a red circle", "task": "geneval"}, {"prompt": 'the text "4"', "task": "ocr"}])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        close(fm.velocity(student, x, 0.7, enc), fm.velocity(model, x, 0.7, enc), 1e-5, "dense fold = merged LoRA")
    common = ["--model", base, "--teachers", paths["geneval"], paths["ocr"], "--anchor", paths["deqa"], "--steps", "2",
              "--full", "--lr", "1e-4", *TINY_RUN]
    outs = [os.path.join(TMP, "students", f"full{n}.safetensors") for n in (1, 2)]
    cli("opd_student.py", *common, "--out", outs[0], "--log_file", outs[0] + ".jsonl")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "opd_student.py", *common, "--out", outs[1], "--log_file", outs[1] + ".jsonl"],
                       cwd=HERE, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    a, b = read_log(outs[0] + ".jsonl"), read_log(outs[1] + ".jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):  # every update, not only the first (the second starts from FSDP's own step)
        close(ra["grad_norm"], rb["grad_norm"], 1e-5 * ra["grad_norm"], f"step {ra['step']}'s grad norm, 1 vs 2 processes")
    w1, w2, w0 = (fm.load_model(f).transformer.state_dict() for f in (*outs, base))
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w0)
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w0)
    print(f"    full student moved up to {moved:.3g} from the base; 1 vs 2 processes (FSDP) differ by {diff:.3g}")
    assert moved > 1e-4 and diff < 1e-5 * max(1.0, moved * 100)
    assert json.loads(safe_meta(outs[0])["flow_opd"])["full"] is True
    # resume: stop after step 1 (its checkpoint holds the weights and AdamW state), go on to step 2
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    i = common.index("--steps")
    without_steps = common[:i] + common[i + 2:]
    for launcher, ref in ((None, outs[0]), (torchrun, outs[1])):
        cut = ref.replace(".safetensors", "_cut.safetensors")
        for extra in (["--steps", "1"], ["--steps", "2", "--resume"]):
            args = ["opd_student.py", *without_steps, *extra, "--out", cut, "--log_file", cut + ".jsonl"]
            if launcher is None:
                stdout = cli(*args)[0]
            else:
                p = subprocess.run([*launcher, *args], cwd=HERE, capture_output=True, text=True, timeout=600)
                assert p.returncode == 0, p.stderr[-2000:]
                stdout = p.stdout
        assert "resumed" in stdout
        a, b = fm.load_model(ref).transformer.state_dict(), fm.load_model(cut).transformer.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{'FSDP' if launcher else 'one process'}: resumed student differs"
    print("    --full: 1 step + --resume equals 2 steps bitwise, on 1 process and under 2-process FSDP")


def test_teacher_discovery_of_the_cards_command():
    """`--teachers ckpts/*` after the README's pipeline: folders are searched one level deep, hidden resume folders
    skipped, teachers taken by their metadata, and a base, a mix, a merge, a student or a log skipped and said why;
    a folder holding adapter_config.json is an adapter; a truncated teacher is an error. Then the literal command
    under 2-process torchrun distils them, saying what it skipped once."""
    base, paths = _opd_setup()
    d = tempfile.mkdtemp(dir=TMP)
    ck = os.path.join(d, "ckpts")
    for sub_ in ("teachers/.ocr.safetensors.resume/step_00000001", "baselines", "students"):
        os.makedirs(os.path.join(ck, sub_))
    shutil.copy(base, os.path.join(ck, "base.safetensors"))
    for task, p in paths.items():
        shutil.copy(p, os.path.join(ck, "teachers", f"{task}.safetensors"))
    shutil.copy(paths["ocr"], os.path.join(ck, "teachers", ".ocr.safetensors.resume", "step_00000001", "state.safetensors"))
    pairs = lora.read_lora(paths["ocr"])[0]
    for folder, name, role in (("baselines", "grpo-mix", "mix"), ("baselines", "merge", "merge"), ("students", "opd-merge", "student")):
        lora.write_lora(os.path.join(ck, folder, f"{name}.safetensors"), pairs, 2.0, {"role": role, "tasks": ["ocr"]})
    open(os.path.join(ck, "teachers", "notes.jsonl"), "w").write("{}\n")
    specs = sorted(os.path.join(ck, f) for f in os.listdir(ck))  # what the shell makes of ckpts/*
    routes, skipped = lora.resolve_teachers(specs)
    assert routes == {t: os.path.join(ck, "teachers", f"{t}.safetensors") for t in ("deqa", "geneval", "ocr")}, routes
    why = {os.path.relpath(p, ck): w for p, w in skipped}
    assert why == {"base.safetensors": "a base model", "baselines/grpo-mix.safetensors": "a mix",
                   "baselines/merge.safetensors": "a merge", "students/opd-merge.safetensors": "a student",
                   "teachers/notes.jsonl": "not a checkpoint"}, why
    # a mixed list: a teacher file, LABEL=PATH of a non-teacher, a peft folder (an adapter, not a folder of them)
    peft = os.path.join(d, "peft_ocr")
    os.makedirs(peft)
    from safetensors.torch import save_file
    save_file({f"base_model.model.{m}.lora_{ab}.weight": t.contiguous() for m, (A, B) in pairs.items()
               for ab, t in (("A", A), ("B", B))}, os.path.join(peft, "adapter_model.safetensors"))
    json.dump({"r": 2, "lora_alpha": 4}, open(os.path.join(peft, "adapter_config.json"), "w"))
    routes, _ = lora.resolve_teachers([paths["geneval"], f"pickscore={ck}/baselines/merge.safetensors", f"ocr={peft}"])
    assert routes == {"geneval": paths["geneval"], "pickscore": f"{ck}/baselines/merge.safetensors", "ocr": peft}
    open(os.path.join(ck, "teachers", "broken.safetensors"), "wb").write(b"\x00" * 10)
    try:
        lora.resolve_teachers(specs)
        raise AssertionError("a truncated teacher was skipped")
    except runs.BadInput as e:
        assert "broken.safetensors cannot be read" in str(e)
    os.remove(os.path.join(ck, "teachers", "broken.safetensors"))
    # the card's literal command (its flags but for a tiny run), under torchrun, in the folder the pipeline made
    p = subprocess.run(["bash", "-c", f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2 "
                        f"{HERE}/opd_student.py --teachers ckpts/* --model ckpts/base.safetensors " + " ".join(TINY_RUN)
                        + " --steps 1"], cwd=d, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("skipped ") == 1 and "routes (Eq. 7): geneval -> ckpts/teachers/geneval.safetensors, ocr -> " \
        "ckpts/teachers/ocr.safetensors; MAR anchor (Eq. 12): ckpts/teachers/deqa.safetensors" in p.stdout, p.stdout
    assert lora.read_lora(os.path.join(d, "ckpts", "students", "opd.safetensors"))[2]["role"] == "student"
    print("    " + [l for l in p.stdout.splitlines() if l.startswith("skipped")][0][:160])


# ----------------------------------------------------------------------------------- eval.py and benchmark.py
def test_ctrl_c_in_eval_writes_nothing():
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) during eval.py's sampling: one line, exit 130,
    and no --out folder at all (a table of the rows done so far would pass for a whole one)."""
    base = base_ckpt()
    out = os.path.join(TMP, "eval_ctrl_c")
    p = subprocess.Popen([sys.executable, "eval.py", f"A={base}", f"B={base}", f"C={base}", "--n", "120", "--batch", "8",
                          "--steps", "3", "--out", out], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    assert p.stdout.readline().startswith("| A |")  # the first row is done: the second is sampling
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip().splitlines() == ["error: interrupted"], (p.returncode, err[-800:])
    assert not os.path.exists(out)


def test_ctrl_c_in_reproduce_sh_stops_the_stage_resumably():
    """Ctrl-C during reproduce.sh's first stage: the stage checkpoints and the script says how to go on (exit 130),
    no stage is marked done, and the same command resumes that stage (it is given --resume) rather than redoing it."""
    d = tempfile.mkdtemp(dir=TMP)
    for f in os.listdir(HERE):
        if f.endswith(".py") or f == "reproduce.sh":
            shutil.copy(os.path.join(HERE, f), d)
    os.makedirs(os.path.join(d, "ckpts"))
    shutil.copy(base_ckpt(), os.path.join(d, "ckpts", "base.safetensors"))
    log = os.path.join(d, "runs", "quick0", "geneval.jsonl")
    p = subprocess.Popen(["bash", "reproduce.sh", "--quick"], cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    t0 = time.time()
    while not (os.path.exists(log) and open(log).read().count("\n") >= 1):
        assert p.poll() is None and time.time() - t0 < 300, "the first stage never logged a step"
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130 and "stopped during geneval; run the same command again to resume it" in err, err[-800:]
    state = os.path.join(d, "ckpts", "quick0", "teachers", ".geneval.safetensors.resume")
    assert any(s.startswith("step_") for s in os.listdir(state))
    assert not [f for f in os.listdir(os.path.join(d, "runs", "quick0")) if f.endswith(".done")]


def test_the_shipped_base_and_teachers():
    """The model files the project ships, as docs/base.md lists them: each file's sha256 is the one quoted there, each
    is marked in its metadata (so that no run writes over it), each is at most 40 MB, the base is the 4x128 mini
    MMDiT, and each teacher is of its task and records the shipped base's fingerprint."""
    import hashlib
    import re
    doc = open(os.path.join(HERE, "docs", "base.md")).read()
    quoted = dict(re.findall(r"`(ckpts/[\w/.-]+\.safetensors)` \| `([0-9a-f]{64})`", doc))
    assert sorted(quoted) == ["ckpts/base.safetensors"] + sorted(f"ckpts/teachers/{t}.safetensors" for t in mw.TASKS)
    for rel, sha in quoted.items():
        path = os.path.join(HERE, rel)
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() == sha, rel
        assert checkpoints.shipped(path) == ("base" if rel == "ckpts/base.safetensors" else "teacher")
        assert os.path.getsize(path) <= 40e6
    base = fm.load_model(os.path.join(HERE, "ckpts", "base.safetensors"))
    assert base.config == fm.mini_config(4, 128)
    for t in mw.TASKS:
        meta = lora.read_lora(os.path.join(HERE, "ckpts", "teachers", f"{t}.safetensors"))[2]
        assert (meta["role"], meta["tasks"], meta["base_hash"]) == ("teacher", [t], fm.fingerprint(base)), t


def test_readme_recipe_is_reproduce_sh():
    """The README's by-hand Table 2 and reproduce.sh evaluate the same rows from the same files ($CK in both), and
    every file reproduce.sh writes is written by the recipe."""
    import re
    readme = open(os.path.join(HERE, "README.md")).read()
    recipe = readme[readme.index("## Table 2, end to end"):].split("```bash", 1)[1].split("```", 1)[0]
    sh = open(os.path.join(HERE, "reproduce.sh")).read()
    rows = re.compile(r'"([A-Z][^"=\n]*)=([^"\n]+)"')
    ours = rows.findall(recipe)
    theirs = [(n, p.replace("$BASE", "ckpts/base.safetensors")) for n, p in rows.findall(sh[sh.index("python eval.py"):])]
    assert ours == theirs and len(ours) == 12, (ours, theirs)
    assert "--ood --quality" in recipe and "python eval.py $EVAL --ood --quality" in sh  # Tables 3 and 4 in both
    stages = re.findall(r'^stage (\S+) "([^"]+)"', sh, re.M)
    for name, out in stages:  # every file reproduce.sh writes is one the README's recipe writes
        assert out in recipe, (name, out)
    assert len(stages) == 8 and 'stage "$r" "$CK/teachers/$r.safetensors"' in sh, stages  # + the four teachers
    assert '\n  stage base "$BASE" python flow_matching.py --seed "$SEED"' in sh  # --pretrain only
    assert "for r in geneval ocr pickscore deqa; do python grpo_teacher.py --reward $r --out $CK/teachers/$r.safetensors; " \
        "done" in recipe and "CK=ckpts/seed0" in recipe


def test_time_to_mix_by_hand():
    """curves.time_to_reach on hand-made logs: training time is the step times the median step time (a stalled step
    does not count), and the student's first evaluation at or above GRPO-Mix's final Avg is when it reaches it."""
    import curves as ev
    mix = [{"step": s, "t_rollout": 1.0, "t_update": 1.0, **({"eval/Avg": a} if a else {})}
           for s, a in ((1, 0.50), (5, None), (10, 0.60), (15, None), (20, 0.70))]          # 2 s a step
    student = [{"step": s, "t_rollout": t, "t_update": 0.5, **({"eval/Avg": a} if a else {})}
               for s, t, a in ((1, 0.5, 0.55), (5, 0.5, None), (10, 60.0, 0.65), (15, 0.5, None), (20, 0.5, 0.72))]
    teacher = [{"step": s, "t_rollout": 1.0, "t_update": 2.0} for s in (1, 5, 10)]            # 3 s a step
    level, alone, with_teachers, whole = ev.time_to_reach(student, mix, [teacher, teacher])
    assert (level, alone, with_teachers, whole) == (0.70, 20 * 1.0, 20 * 1.0 + 2 * 10 * 3.0, 20 * 2.0)
    assert ev.time_to_reach(student[:3], mix) is None  # never reaches 0.70


def test_table2_avg_formula():
    import eval as ev
    paper = {"SD-3.5-M": (0.63, 0.59, 4.07, 21.64, 0.7166), "Flow-OPD (Merge)": (0.92, 0.94, 4.35, 23.08, 0.9044),
             "GRPO-Mix": (0.73, 0.83, 4.33, 21.84, 0.8165)}
    for name, (g, o, d, p, avg) in paper.items():
        scores = {"geneval": [g, g], "ocr": [o, o], "deqa": [d, d], "pickscore": [p, p]}
        assert abs(ev.summarise(scores)["Avg"][0] - avg) < 6e-5, name


def test_paired_and_pooled_intervals_are_the_textbook_ones():
    """eval.summarise / paired / pool against the textbook formulas, by hand with the statistics module: a column's
    standard error s / sqrt(n) (s with n - 1), a paired difference's over the pooled per-prompt differences of all
    seeds, Avg's combining its four columns' errors (each / its scale) in quadrature; the mean table's +- is the
    seeds' sample standard deviation. Unequal scores, two seeds of 5 prompts each."""
    import statistics
    import eval as ev
    rng = random.Random(1)
    cols = {"geneval": 1, "ocr": 1, "deqa": 5, "pickscore": 26}
    tables = []
    for seed in (0, 1):
        scores = {r: {t: [round(rng.uniform(0, s), 3) for _ in range(5)] for t, s in cols.items()} for r in ("A", "B")}
        tables.append({"args": {"seed": seed}, "scores": scores,
                       "rows": {r: ev.summarise(scores[r]) for r in ("A", "B")}})
    row = ev.summarise(tables[0]["scores"]["A"])
    for name, task in ev.COLUMNS:
        x = tables[0]["scores"]["A"][task]
        close(torch.tensor(row[name]), torch.tensor([statistics.mean(x), statistics.stdev(x) / math.sqrt(5)]), 1e-6, name)
    d = ev.paired(tables, "A", "B")
    se = {}
    for name, task in ev.COLUMNS:
        diff = [a - b for t in tables for a, b in zip(t["scores"]["A"][task], t["scores"]["B"][task])]
        se[task] = statistics.stdev(diff) / math.sqrt(len(diff))
        close(torch.tensor(d[name]), torch.tensor([statistics.mean(diff), se[task]]), 1e-6, f"paired {name}")
    avg_se = math.sqrt(sum((se[t] / s) ** 2 for t, s in cols.items())) / 4
    assert abs(d["Avg"][1] - avg_se) < 1e-9 and abs(d["Avg"][0] - sum(d[n][0] / cols[t] for n, t in ev.COLUMNS) / 4) < 1e-9
    paths = []
    for k, t in enumerate(tables):
        paths.append(os.path.join(TMP, f"pool{k}.json"))
        json.dump(t, open(paths[-1], "w"))
    text = ev.pool(paths)
    g = [t["rows"]["A"]["GenEval"][0] for t in tables]
    assert f"| A | {statistics.mean(g):.3f} ± {statistics.stdev(g):.3f} |" in text, text
    import ood  # Table 3's columns, when every table has them: the same formulas, its mean unscaled
    for t in tables:
        for r in ("A", "B"):
            t["scores"][r].update({f"ood:{k}": [float(rng.random() < 0.5) for _ in range(5)] for k in ood.KINDS})
            t["rows"][r] = ev.summarise(t["scores"][r])
    for k, t in enumerate(tables):
        json.dump(t, open(paths[k], "w"))
    text = ev.pool(paths)
    b = [t["rows"]["A"]["Binding"][0] for t in tables]
    assert f"| A | {statistics.mean(b):.3f} ± {statistics.stdev(b):.3f} |" in text.split("Table 3")[1], text
    d3 = ev.paired(tables, "A", "B", ev.TABLES[1])
    diffs = {k: [a - b for t in tables for a, b in zip(t["scores"]["A"][f"ood:{k}"], t["scores"]["B"][f"ood:{k}"])]
             for k in ood.KINDS}
    assert abs(d3["OOD mean"][0] - statistics.mean(statistics.mean(v) for v in diffs.values())) < 1e-6
    assert abs(d3["OOD mean"][1] - math.sqrt(sum((statistics.stdev(v) / math.sqrt(10)) ** 2 for v in diffs.values())) / 5) < 1e-6
    print(f"    paired GenEval {d['GenEval'][0]:+.4f} ± {d['GenEval'][1]:.4f}; Avg ± {avg_se:.5f}")


def test_the_quoted_results_are_the_pooled_tables():
    """Every row of the 3-seed tables that docs/results.md and the README quote is what eval.py --pool prints
    from results/seed0-2/table.json (the shipped base) or results/earlier-base/seed0-2/table.json, to the last digit."""
    import eval as ev
    text = ev.pool([os.path.join(HERE, "results", "earlier-base", f"seed{k}", "table.json") for k in range(3)])
    text += "\n" + ev.pool([os.path.join(HERE, "results", f"seed{k}", "table.json") for k in range(3)])
    seed0 = os.path.join(HERE, "results", "seed0")  # and the shipped base's seed 0, quoted from its own table
    text += "\n" + ev.pool([os.path.join(seed0, "table.json")]) + "\n" + open(os.path.join(seed0, "table.md")).read()
    pooled = {line for line in text.splitlines() if line.startswith("| ")}
    quoted = [line for f in ("README.md", "docs/results.md") for line in open(os.path.join(HERE, f)).read().splitlines()
              if line.startswith("| ") and " ± " in line and ("seeds" in line or line.split(" | ")[0][2:] in text)]
    rows = [line for line in quoted if not line.startswith("| Model") and not line.startswith("| paired")]
    assert len(rows) >= 25 and all(line in pooled for line in rows), [line for line in rows if line not in pooled]
    print(f"    {len(rows)} quoted rows equal eval.py --pool's")


def test_eval_cli_lora_row_equals_base_when_delta_is_zero():
    base = base_ckpt()
    model = fm.load_model(base)
    lora.add_lora(model.transformer, "t", 2, 4)  # B = 0: a zero delta
    path = os.path.join(TMP, "zero.safetensors")
    lora.save_lora(path, model.transformer, "t", {"role": "teacher", "tasks": ["ocr"], "base_path": base,
                                                "base_hash": fm.fingerprint(model)})
    with torch.no_grad():  # and a LoRA that does change the model
        for p in lora.adapter_params(model.transformer, "t"):
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    nz = os.path.join(TMP, "nonzero.safetensors")
    lora.save_lora(nz, model.transformer, "t", {"role": "teacher", "tasks": ["ocr"], "base_path": base,
                                              "base_hash": fm.fingerprint(fm.load_model(base))})
    out = os.path.join(TMP, "eval_out")
    import ood
    scored, real_score = [], ood.score  # the pictures Table 3 scores (the run is in this process)
    ood.score = lambda images, prompts: scored.append(images.clone()) or real_score(images, prompts)
    try:
        cli("eval.py", f"Base={base}", f"Zero LoRA={path}", f"Other={nz}", "--n", "4", "--steps", "3", "--out", out,
            "--ood", "--quality")
    finally:
        ood.score = real_score
    table = json.load(open(os.path.join(out, "table.json")))
    assert list(table["rows"]) == ["Base", "Zero LoRA", "Other"] and table["scores"]["Base"] == table["scores"]["Zero LoRA"]
    import eval as ev  # the non-zero row is the base with s B A folded into its weights here, by hand
    folded = fm.load_model(base)
    pairs, scale, _ = lora.read_lora(nz)
    with torch.no_grad():
        for mod, (A, B) in pairs.items():
            folded.transformer.get_submodule(mod).weight += scale * B @ A
    import numpy as np
    import sample
    from PIL import Image
    scores, images, shown, _ = ev.evaluate(folded, n=4, steps=3)
    mine = np.asarray(sample.grid(images, shown)).astype(int)
    grid = {r: np.asarray(Image.open(os.path.join(out, f"{r}.png"))).astype(int) for r in ("base", "zero-lora", "other")}
    assert (grid["base"] == grid["zero-lora"]).all()
    assert mine.shape == grid["other"].shape and np.abs(mine - grid["other"]).max() <= 1  # (8-bit rounding)
    assert np.abs(grid["other"] - grid["base"]).max() > 20, "the non-zero LoRA changed nothing"
    # Table 3's row, by hand: each kind's first 4 prompts from the noise of seed 10 + k, the pictures and their scores
    assert len(scored) == 3 * len(ood.KINDS)  # rows in order, one batch per kind
    for k, kind in enumerate(ood.KINDS):
        ps = ood.eval_prompts(kind, 4)
        x = torch.randn((4, 3, 32, 32), generator=torch.Generator().manual_seed(10 + k))
        with torch.no_grad():
            mine = fm.to_images(folded, fm.rollout(folded, fm.encode_prompts(folded, ps), 3, 1.0, sde=[], x=x)["states"][:, -1]).float()
        close(mine, scored[2 * len(ood.KINDS) + k], 1e-3, f"Table 3's {kind} pictures")
        assert ood.score(mine, ps).tolist() == table["scores"]["Other"][f"ood:{kind}"]
    assert len(table["scores"]["Other"]["quality:diversity"]) == 16 and len(table["scores"]["Other"]["quality:agreement"]) == 16
    md = open(os.path.join(out, "table.md")).read()
    assert "| Other |" in md.split("Table 3")[1] and "| Other |" in md.split("Table 4")[1] and \
        os.path.exists(os.path.join(out, "variety.png"))
    assert os.path.exists(os.path.join(out, "compare.png")) and os.path.exists(os.path.join(out, "zero-lora.png"))
    assert "| Zero LoRA |" in open(os.path.join(out, "table.md")).read()


def test_benchmark_tiny_memory_counts():
    """benchmark.py --tiny runs both iterations, and its memory figures equal counts made here: four full copies
    are 4x the base; five rank-2 adapters are 5 x 2 x (in + out) float32 numbers per adapted layer."""
    import benchmark
    res = benchmark.main(["--tiny"])
    t = __import__("diffusers").SD3Transformer2DModel(**benchmark.TINY)
    base = sum(p.numel() * 4 for p in t.parameters()) + sum(b.numel() * 4 for b in t.buffers())
    lora.add_lora(t, "x", 2, 4)
    adapters = sum(5 * 2 * (l.base.in_features + l.base.out_features) * 4 for l in lora.lora_layers(t).values())
    assert res["base"] == base and res["full"] == 4 * base and res["lora"] == adapters, (res, base, adapters)
    assert res["t_opd"] > 0 and res["t_grpo"] > 0


# ------- runs.py and checkpoints.py: runs survive (resume after SIGKILL, signals, the NaN guard, one run per --out)
def _descendants(pid):
    parent = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            pass
    out, frontier = [], {pid}
    while frontier:
        frontier = {c for c, p in parent.items() if p in frontier}
        out += frontier
    return out


def _sigkill_after(cmd, state, at_least):
    """Start a run and SIGKILL it, with every worker torchrun started, once it has checkpointed step >= at_least."""
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not any(d.startswith("step_") and int(d[5:]) >= at_least for d in (os.listdir(state) if os.path.isdir(state) else [])):
        assert p.poll() is None, f"the run ended before it could be killed:\n{p.stdout.read()[-1500:]}"
        assert time.time() - t0 < 300, "no checkpoint in 300 s"
        time.sleep(0.002)
    for pid in [p.pid, *_descendants(p.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.communicate(timeout=300)
    return p.returncode


def _same_lora(a, b):
    pa, pb = lora.read_lora(a)[0], lora.read_lora(b)[0]
    assert pa.keys() == pb.keys()
    diff = [k for k in pa if not (torch.equal(pa[k][0], pb[k][0]) and torch.equal(pa[k][1], pb[k][1]))]
    assert not diff, f"{len(diff)} adapted layers differ, e.g. {diff[0]}"


def _sigkill_resume(launcher, tag, stage):
    """SIGKILL a run at the default recipe's EMA (decay 0.9, here every 2 optimizer steps so that it moves within 6
    steps), --resume, and compare with the run that never stopped: the final --out bitwise, the log, and --out
    holding the EMA weights (the resume state's ema.*, not its param.*)."""
    base = base_ckpt()
    ema = ["--ema_decay", "0.9", "--ema_every", "2"]
    if stage == 1:
        run = ["grpo_teacher.py", "--model", base, "--reward", "pickscore", "--steps", "6", "--save_every", "1",
               *TINY_RUN, *ema]
    else:
        _, paths = _opd_setup()
        run = ["opd_student.py", "--model", base, "--teachers", paths["geneval"], paths["ocr"], "--anchor",
               paths["deqa"], "--steps", "6", "--save_every", "1", *TINY_RUN, *ema]
    ref, cut = os.path.join(TMP, f"{tag}_ref.safetensors"), os.path.join(TMP, f"{tag}_cut.safetensors")
    subprocess.run([*launcher, *run, "--out", ref, "--log_file", ref + ".jsonl"], cwd=HERE, check=True, capture_output=True)
    rc = _sigkill_after([*launcher, *run, "--out", cut, "--log_file", cut + ".jsonl"], checkpoints.state_dir(cut), 3)
    killed_at = lora.read_lora(cut)[2]["step"]  # what a crash leaves: a complete adapter of some earlier step
    assert rc != 0 and 3 <= killed_at < 6, (rc, killed_at)
    p = subprocess.run([*launcher, *run, "--out", cut, "--log_file", cut + ".jsonl", "--resume"], cwd=HERE,
                       capture_output=True, text=True)
    assert p.returncode == 0 and "resumed" in p.stdout + p.stderr, p.stderr[-2000:]
    _same_lora(ref, cut)
    steps = [r["step"] for r in read_log(cut + ".jsonl")]
    print(f"    {tag}: killed after step {killed_at}, resumed, final adapter equal bitwise; log steps {steps}")
    assert steps == [1, 2, 3, 4, 5, 6], "the resumed log holds every step once"
    from safetensors import safe_open
    with safe_open(os.path.join(checkpoints.state_dir(ref), "step_00000006", "state.safetensors"), "pt") as f:
        ema_w = [f.get_tensor(k) for k in sorted((k for k in f.keys() if k.startswith("ema.")), key=lambda k: int(k[4:]))]
        raw = [f.get_tensor(k) for k in sorted((k for k in f.keys() if k.startswith("param.")), key=lambda k: int(k[6:]))]
    held = [t for _, pair in lora.read_lora(ref)[0].items() for t in pair]
    assert len(held) == len(ema_w) and all(any(torch.equal(e, h) for h in held) for e in ema_w), "--out holds the EMA"
    assert any(not torch.equal(e, r) for e, r in zip(ema_w, raw)), "the EMA moved away from the raw weights"


def test_sigkill_then_resume_is_bitwise_one_process():
    _sigkill_resume([sys.executable], "kill1", stage=1)


def test_sigkill_then_resume_is_bitwise_torchrun_two_processes():
    _sigkill_resume([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], "kill2",
                    stage=1)


def test_opd_sigkill_then_resume_is_bitwise_torchrun_two_processes():
    _sigkill_resume([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], "kill3",
                    stage=2)


def test_pretraining_sigkill_then_resume_is_bitwise():
    run = ["flow_matching.py", "--steps", "8", "--batch", "4", "--save_every", "1"]
    ref, cut = os.path.join(TMP, "pre_ref.safetensors"), os.path.join(TMP, "pre_cut.safetensors")
    cli(*run, "--out", ref)
    rc = _sigkill_after([sys.executable, *run, "--out", cut], checkpoints.state_dir(cut), 3)
    assert rc != 0 and not os.path.exists(cut)
    cli(*run, "--out", cut, "--resume")
    a, b = fm.load_model(ref), fm.load_model(cut)
    sa, sb = a.transformer.state_dict(), b.transformer.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and all(
        torch.equal(x, y) for x, y in zip(a.text_encoder.parameters(), b.text_encoder.parameters()))


def test_sigterm_saves_exits_0_and_opd_resume_checks_the_teacher_set():
    base, paths = _opd_setup()
    run = ["opd_student.py", "--model", base, "--teachers", paths["geneval"], paths["ocr"], "--anchor", paths["deqa"],
           "--steps", "4", "--save_every", "100", *TINY_RUN]
    ref, cut = os.path.join(TMP, "students", "term_ref.safetensors"), os.path.join(TMP, "students", "term_cut.safetensors")
    cli(*run, "--out", ref, "--log_file", ref + ".jsonl")
    # SIGTERM as soon as the first step is logged: the run checkpoints at the end of that step and exits 0
    p = subprocess.Popen([sys.executable, *run, "--out", cut, "--log_file", cut + ".jsonl"], cwd=HERE,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (os.path.exists(cut + ".jsonl") and os.path.getsize(cut + ".jsonl") > 0):
        assert p.poll() is None, p.stdout.read()[-1500:]
        time.sleep(0.005)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0 and "stopped by SIGTERM" in out, out[-1500:]
    stopped = lora.read_lora(cut)[2]["step"]
    assert 1 <= stopped < 4, stopped
    # resuming with a teacher of other content under the same path is refused, and nothing is written
    swapped = os.path.join(TMP, "teachers_swapped")
    os.makedirs(swapped, exist_ok=True)
    shutil.copy(paths["ocr"], os.path.join(swapped, "geneval.safetensors"))
    before = open(cut, "rb").read()
    err = refused(*[a if a != paths["geneval"] else "geneval=" + os.path.join(swapped, "geneval.safetensors") for a in run],
                  "--out", cut, "--log_file", cut + ".jsonl", "--resume")
    assert "another teacher set" in err and "geneval:" in err and len(err.strip().splitlines()) == 1, err
    assert open(cut, "rb").read() == before
    cli(*run, "--out", cut, "--log_file", cut + ".jsonl", "--resume")
    _same_lora(ref, cut)
    print(f"    SIGTERM after step {stopped}: exit 0; resumed to step 4, equal bitwise to the uninterrupted run")


def test_sigterm_during_a_reward_call_checkpoints_at_once_and_resumes_bitwise():
    """SIGTERM while a reward server holds the call: the run gives up that step at once (not after the retries),
    checkpoints the steps done, exits 0; --resume then ends bitwise where a run that was never stopped ends."""
    import http.server
    import threading
    base = base_ckpt()
    hold, calls, arrived = threading.Event(), [0], threading.Event()

    class Server(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls[0] += 1
            if calls[0] == SLOW[0]:
                arrived.set()
                hold.wait(60)
            scores = rewards.pickscore(torch.stack([real_rewards.from_png_b64(s) for s in req["images"]]), req["prompts"])
            body = json.dumps({"scores": scores.tolist()}).encode()
            try:
                self.send_response(200), self.send_header("Content-Length", str(len(body))), self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up (it was told to stop)
                pass

        def log_message(self, *a):
            pass
    SLOW = [0]
    srv = _quiet_server(Server)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    run = ["grpo_teacher.py", "--model", base, "--reward", "pickscore", "--steps", "4", *TINY_RUN,
           "--pickscore_url", f"http://127.0.0.1:{srv.server_port}", "--reward_timeout", "120"]
    ref, cut = os.path.join(TMP, "held_ref.safetensors"), os.path.join(TMP, "held_cut.safetensors")
    cli(*run, "--out", ref, "--log_file", ref + ".jsonl")
    calls[0], SLOW[0] = 0, 3
    p = subprocess.Popen([sys.executable, *run, "--out", cut, "--log_file", cut + ".jsonl"], cwd=HERE,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert arrived.wait(120), p.stdout.read()
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=60)[0]
    took = time.time() - t0
    hold.set()
    assert p.returncode == 0 and "stopped by SIGTERM after step 2" in out, out[-1500:]
    assert calls[0] == SLOW[0], calls  # the held call was given up: no retry of it, no later step's call
    assert lora.read_lora(cut)[2]["step"] == 2
    cli(*run, "--out", cut, "--log_file", cut + ".jsonl", "--resume")
    _same_lora(ref, cut)
    assert [r["step"] for r in read_log(cut + ".jsonl")] == [1, 2, 3, 4]
    print(f"    stopped in the 3rd reward call (no retry), {took:.2f}s after SIGTERM; checkpoint at step 2; resumed bitwise")
    srv.shutdown()


def test_sigterm_under_torchrun_checkpoints_every_worker():
    """SIGTERM to torchrun: it passes the signal to its workers, which finish their step, checkpoint and exit 0;
    torchrun itself then reports the signal and exits non-zero (what the README says)."""
    base = base_ckpt()
    out = os.path.join(TMP, "term2.safetensors")
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "grpo_teacher.py", "--model", base, "--reward", "pickscore", "--steps", "200", *TINY_RUN,
                          "--save_every", "1000", "--out", out, "--log_file", out + ".jsonl"],
                         cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.time()
    while not (os.path.exists(out + ".jsonl") and len(read_log(out + ".jsonl")) >= 2):
        assert p.poll() is None and time.time() - t0 < 300, p.stderr.read()[-1500:]
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    step = lora.read_lora(out)[2]["step"]
    print(f"    torchrun exit {p.returncode}; workers checkpointed step {step}; torchrun's last line: "
          f"{stderr.strip().splitlines()[-1][:100] if stderr.strip() else ''}")
    assert "stopped by SIGTERM after step" in stdout and 2 <= step < 200, stdout[-1000:] + stderr[-1500:]
    assert p.returncode == 1 and "SignalException" in stderr and "got signal: 15" in stderr, (p.returncode, stderr[-800:])
    done = sorted(d for d in os.listdir(checkpoints.state_dir(out)) if d.startswith("step_"))
    assert done == [f"step_{step:08d}"], done  # the resumable checkpoint is complete, at the step --out holds
    steps = [r["step"] for r in read_log(out + ".jsonl")]
    assert steps[-1] <= step


def test_nan_updates_are_skipped_and_k_in_a_row_stop_the_run():
    import grpo_teacher as grpo
    base = base_ckpt()
    real = rewards.combine

    def nan_at(steps):  # NaN rewards (so NaN advantages, loss and gradients) at these steps
        calls = []

        def combine(weights, images, prompts):
            calls.append(1)
            total, each = real(weights, images, prompts)
            return (total * float("nan") if steps(len(calls)) else total), each
        return combine

    run = ["--model", base, "--reward", "pickscore", "--save_every", "1", *TINY_RUN]
    ref, out = os.path.join(TMP, "nan_ref.safetensors"), os.path.join(TMP, "nan.safetensors")
    try:
        rewards.combine = nan_at(lambda s: s == 2)
        grpo.main([*run, "--steps", "3", "--out", ref, "--log_file", ref + ".jsonl"])
        rewards.combine = nan_at(lambda s: s == 2 or s >= 4)
        grpo.main([*run, "--steps", "20", "--max_bad_steps", "3", "--out", out, "--log_file", out + ".jsonl"])
        raise AssertionError("3 NaN updates in a row did not stop the run")
    except runs.Diverged as e:
        assert "3 updates in a row" in str(e) and "step 6" in str(e), e
    finally:
        rewards.combine = real
        signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert [r["bad_steps"] for r in read_log(ref + ".jsonl")] == [0, 1, 1]
    assert [r["bad_steps"] for r in read_log(out + ".jsonl")] == [0, 1, 1, 2, 3]
    # the checkpoint left behind (written at step 5) holds the last good update, step 3's: the same as a run that
    # stopped at step 3, bitwise, and finite
    assert lora.read_lora(out)[2]["step"] == 5
    _same_lora(ref, out)
    assert all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in lora.read_lora(out)[0].values())
    print("    skipped steps 2, 4, 5; stopped at step 6; the checkpoint holds step 3's weights, bitwise")


def test_two_runs_on_one_out_and_reruns_are_refused():
    """A second run on an --out that a running run writes is refused (a lock that dies with its process); a
    finished run is not replaced without --overwrite, and --overwrite replaces it."""
    base = base_ckpt()
    out = os.path.join(TMP, "locked", "t.safetensors")
    run = [sys.executable, "grpo_teacher.py", "--model", base, "--reward", "pickscore", *TINY_RUN, "--out", out,
           "--log_file", out + ".jsonl"]
    first = subprocess.Popen([*run, "--steps", "200"], cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not os.path.exists(out + ".jsonl"):
            assert first.poll() is None and time.time() - t0 < 120, first.stderr.read()
            time.sleep(0.05)
        err = refused(*run[1:], "--steps", "2", "--overwrite")
        assert "another run is writing" in err and len(err.strip().splitlines()) == 1, err
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    err = refused(*run[1:], "--steps", "2")
    assert "pass --resume" in err
    cli(*run[1:], "--steps", "1", "--overwrite")
    assert lora.read_lora(out)[2]["step"] == 1


# ----------------------------------------------- runs.py: bad input, one line before any work (the catalogue)
def _inputs():
    """The files the catalogue feeds the scripts (built once)."""
    d = os.path.join(TMP, "inputs")
    if os.path.isdir(d):
        return d
    os.makedirs(d)
    base, paths = _opd_setup()
    shutil.copy(base, os.path.join(d, "base.safetensors"))
    for task, p in paths.items():
        shutil.copy(p, os.path.join(d, f"{task}.safetensors"))
    open(os.path.join(d, "truncated.safetensors"), "wb").write(open(base, "rb").read()[:5000])
    os.makedirs(os.path.join(d, "teachers_one_truncated"))
    shutil.copy(paths["ocr"], os.path.join(d, "teachers_one_truncated", "ocr.safetensors"))
    open(os.path.join(d, "teachers_one_truncated", "geneval.safetensors"), "wb").write(open(paths["geneval"], "rb").read()[:3000])
    open(os.path.join(d, "empty.jsonl"), "w").close()
    open(os.path.join(d, "bad.jsonl"), "w").write('{"prompt": "a circle", "task": "geneval"}\nnot json\n')
    open(os.path.join(d, "latin1.txt"), "wb").write('the text "12"\ncaf\xe9 au lait\n'.encode("latin-1"))
    open(os.path.join(d, "not_grammar.txt"), "w").write("a circle\na circle and\n")
    open(os.path.join(d, "empty_quotes.txt"), "w").write('the text "7"\nthe text ""\n')
    open(os.path.join(d, "ocr_prompts.txt"), "w").write('the text "12"\n')
    open(os.path.join(d, "huge.txt"), "w").write('the text "' + "7" * 100_000 + '" please\n')
    open(os.path.join(d, "list.jsonl"), "w").write("[1, 2]\n")
    open(os.path.join(d, "exists.png"), "wb").write(b"not a picture")
    for sub, name, text in (("damaged_eval", "table.json", '{"rows": '), ("evalout", "table.md", 'the text "1"\n')):
        os.makedirs(os.path.join(d, sub))
        open(os.path.join(d, sub, name), "w").write(text)
    model = fm.load_model(base)
    h = fm.fingerprint(model)
    lora.add_lora(model.transformer, "t", 2, 4)
    pairs = {m: (torch.zeros(2, 64), torch.zeros(l.base.out_features, 2)) for m, l in lora.lora_layers(model.transformer).items()}
    lora.write_lora(os.path.join(d, "narrow.safetensors"), pairs, 2.0, {"role": "teacher", "tasks": ["ocr"],
                                                                          "base_hash": h, "base_path": base})
    pairs = lora.read_lora(paths["ocr"])[0]
    lora.write_lora(os.path.join(d, "orphan.safetensors"), pairs, 2.0, {"role": "teacher", "tasks": ["ocr"],
                                                                          "base_hash": h, "base_path": "gone/base.safetensors"})
    _random_teacher(os.path.join(d, "foreign.safetensors"), 3, 2, 4.0, "0123456789abcdef")
    for name, config in (("peft_not_json", None), ("peft_no_r", {"lora_alpha": 8, "target_modules": ["to_q"]}),
                         ("peft_dora", {"r": 2, "lora_alpha": 4, "use_dora": True}),
                         ("peft_wrong_rank", {"r": 8, "lora_alpha": 8})):
        os.makedirs(os.path.join(d, name))
        from safetensors.torch import save_file
        save_file({f"base_model.model.{m}.lora_{ab}.weight": t.contiguous() for m, (A, B) in pairs.items()
                   for ab, t in (("A", A), ("B", B))}, os.path.join(d, name, "adapter_model.safetensors"))
        open(os.path.join(d, name, "adapter_config.json"), "w").write("{r: 2," if config is None else json.dumps(config))
    cli("grpo_teacher.py", "--model", base, "--reward", "pickscore", "--steps", "1", *TINY_RUN,
        "--out", os.path.join(d, "run", "t.safetensors"), "--log_file", os.path.join(TMP, "t.jsonl"))
    cli("grpo_teacher.py", "--model", os.path.join(d, "base.safetensors"), "--reward", "pickscore", "--steps", "1",
        *TINY_RUN, "--out", os.path.join(d, "rng", "t.safetensors"), "--log_file", os.path.join(TMP, "rng.jsonl"))
    open(os.path.join(d, "killed.jsonl"), "w").write('{"step": 1}\n')  # the log of a run killed before a checkpoint
    open(os.path.join(d, "run_prompts.txt"), "w").write('the text "12"\nthe text "34"\n')
    cli("grpo_teacher.py", "--model", base, "--reward", "ocr", "--steps", "1", *TINY_RUN, "--prompt_file",
        "ocr=" + os.path.join(d, "run_prompts.txt"), "--out", os.path.join(d, "prun", "t.safetensors"),
        "--log_file", os.path.join(TMP, "prun.jsonl"))
    open(os.path.join(d, "run_prompts.txt"), "a").write('the text "56"\n')  # edited after the run started
    rng = os.path.join(d, "rng", ".t.safetensors.resume", "step_00000001", "rng_rank0.json")
    json.dump({**json.load(open(rng)), "torch": [1, 2, 3]}, open(rng, "w"))
    open(os.path.join(d, "deep.jsonl"), "w").write("[" * 100_000 + "]" * 100_000 + "\n")
    os.link(os.path.join(d, "base.safetensors"), os.path.join(d, "base_link.jsonl"))
    os.mkfifo(os.path.join(d, "fifo.safetensors"))
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(paths["ocr"], "pt") as f:
        tensors, m = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    for name, meta in (("tasks_int", {**json.loads(m["flow_opd"]), "tasks": 5}), ("meta_list", [1, 2])):
        save_file(tensors, os.path.join(d, f"{name}.safetensors"), metadata={**m, "flow_opd": json.dumps(meta)})
    k3 = next(k for k in tensors if "lora_A" in k)
    save_file({**tensors, k3: tensors[k3][None].contiguous()}, os.path.join(d, "lora_3d.safetensors"), metadata=m)
    save_file(tensors, os.path.join(d, "base_path_int.safetensors"),
              metadata={**m, "flow_opd": json.dumps({**json.loads(m["flow_opd"]), "base_path": 5})})
    save_file({k: v * float("nan") if "lora_B" in k else v for k, v in tensors.items()},
              os.path.join(d, "nan.safetensors"), metadata=m)  # a diverged teacher
    os.symlink("/proc/nope/x.jsonl", os.path.join(d, "dangling.jsonl"))
    with safe_open(base, "pt") as f:  # bases whose metadata or weights are damaged, each its own way
        bt, bm = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    cfg = json.loads(bm["config"])
    for name, config in (("no_config", None), ("config_not_json", "{num_layers: 4"), ("config_list", "[4, 128]"),
                         ("config_str_layers", json.dumps({**cfg, "num_layers": "4"})),
                         ("config_unknown_key", json.dumps({**cfg, "dropout": 0.1})),
                         ("config_other_width", json.dumps({**cfg, "num_attention_heads": 2, "caption_projection_dim": 64}))):
        meta = {k: v for k, v in bm.items() if k != "config"} if config is None else {**bm, "config": config}
        save_file(bt, os.path.join(d, f"base_{name}.safetensors"), metadata=meta)
    k0 = sorted(bt)[0]
    save_file({**bt, k0: bt[k0] * float("nan")}, os.path.join(d, "base_nan.safetensors"), metadata=bm)
    st_path = os.path.join(".t.safetensors.resume", "step_00000001", "state.safetensors")
    with safe_open(os.path.join(d, "run", st_path), "pt") as f:  # resume states damaged, each its own way
        st, sm = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["flow_opd_state"])
    p0 = st["param.0"]
    for name, sts, meta in (
            ("no_step", st, {k: v for k, v in sm.items() if k != "step"}), ("step_str", st, {**sm, "step": "1"}),
            ("step_negative", st, {**sm, "step": -1}), ("meta_list", st, [1, 2]), ("config_list", st, {**sm, "config": [1]}),
            ("world_str", st, {**sm, "world": "1"}), ("groups_dict", st, {**sm, "param_groups": {}}),
            ("no_param", {k: v for k, v in st.items() if k != "param.0"}, sm),
            ("param_shape", {**st, "param.0": p0.flatten()[:3].contiguous()}, sm),
            ("param_nan", {**st, "param.0": p0 * float("nan")}, sm),
            ("opt_shape", {**st, "opt.0.exp_avg": torch.zeros(3)}, sm),
            ("ema_k_two", {**st, "ema_k": torch.tensor([1, 2])}, sm)):
        shutil.copytree(os.path.join(d, "run"), os.path.join(d, f"rs_{name}"))
        if isinstance(meta, dict) and isinstance(meta.get("config"), dict):  # the flags of a run at its new place
            meta["config"] = {**meta["config"], "model": os.path.join(d, "base.safetensors"),
                              "out": os.path.join(d, f"rs_{name}", "t.safetensors")}
        save_file(sts, os.path.join(d, f"rs_{name}", st_path), metadata={"flow_opd_state": json.dumps(meta)})
    for name, meta in (("flow_opd_not_json", {**m, "flow_opd": "{tasks:"}),
                       ("tasks_a_string", {**m, "flow_opd": json.dumps({**json.loads(m["flow_opd"]), "tasks": "ocr"})}),
                       ("tasks_unknown", {**m, "flow_opd": json.dumps({**json.loads(m["flow_opd"]), "tasks": ["chess"]})})):
        save_file(tensors, os.path.join(d, f"{name}.safetensors"), metadata=meta)
    kb = k3.replace("lora_A", "lora_B")
    save_file({**tensors, k3: torch.cat([tensors[k3], tensors[k3]]), kb: tensors[kb]},
              os.path.join(d, "lora_ranks_differ.safetensors"), metadata=m)  # A of rank 4, B of rank 2
    for name, config in (("layers_zero", {**cfg, "num_layers": 0}), ("layers_past_64", {**cfg, "num_layers": 65}),
                         ("config_null", None)):
        save_file(bt, os.path.join(d, f"base_{name}.safetensors"), metadata={**bm, "config": json.dumps(config)})
    save_file({**bt, k0: bt[k0].to(torch.int32)}, os.path.join(d, "base_int_weights.safetensors"), metadata=bm)
    save_file({k: v for k, v in bt.items() if k != k0}, os.path.join(d, "base_missing_tensor.safetensors"), metadata=bm)
    save_file({**bt, "transformer.extra.weight": torch.zeros(2)}, os.path.join(d, "base_extra_tensor.safetensors"),
              metadata=bm)
    sd3_nan = os.path.join(d, "sd3_nan")  # an SD3 pipeline folder whose transformer holds one NaN
    shutil.copytree(tiny_sd3_pipeline(), sd3_nan)
    w = os.path.join(sd3_nan, "transformer", "diffusion_pytorch_model.safetensors")
    with safe_open(w, "pt") as f:
        wt, wm = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    kn = sorted(wt)[-1]
    wt[kn] = wt[kn].clone()
    wt[kn].view(-1)[-1] = float("nan")
    save_file(wt, w, metadata=wm)
    os.symlink(os.path.join(d, "damaged_eval"), os.path.join(d, "alias"))
    # the outside attack's cases: files of the wrong kind, outputs through links, drops, resume states
    save_file({**tensors, k3: tensors[k3].to(torch.int32)}, os.path.join(d, "int_lora.safetensors"), metadata=m)
    save_file(tensors, os.path.join(d, "no_scale.safetensors"), metadata={"flow_opd": m["flow_opd"]})
    open(os.path.join(d, "nan_log.jsonl"), "w").write('{"step": 1, "eval/Avg": NaN}\n')
    for sub in ("a", "b"):
        os.makedirs(os.path.join(d, "logs_" + sub))
        open(os.path.join(d, "logs_" + sub, "run.jsonl"), "w").write('{"step": 1, "eval/Avg": 0.5}\n')
    row = {c: [0.5, 0.01] for c in ("GenEval", "OCR Acc.", "DeQA", "PickScore", "Avg")}
    for name, seed, n, rows, score in (("pool_a", 0, 4, ("Base", "GRPO-OCR"), 0.5), ("pool_b", 1, 8, ("Base", "GRPO-OCR"), 0.5),
                                       ("pool_c", 1, 4, ("Base",), 0.5), ("pool_nan", 1, 4, ("Base", "GRPO-OCR"), "NaN")):
        os.makedirs(os.path.join(d, name))
        scores = {r: {t: [score] * 2 for t in mw.TASKS} for r in rows}
        open(os.path.join(d, name, "table.json"), "w").write(json.dumps({
            "rows": {r: row for r in rows}, "scores": scores, "files": [],
            "args": {"seed": seed, "n": n, "steps": 10, "guidance": 1.0, "resolution": 512, "prompt_file": None}
        }).replace('"NaN"', "NaN"))
    os.symlink(os.path.join(d, "exists.png"), os.path.join(d, "link.png"))
    os.makedirs(os.path.join(d, "evallink"))
    os.symlink(os.path.join(d, "exists.png"), os.path.join(d, "evallink", "table.md"))
    os.makedirs(os.path.join(d, "evaltmp", "table.json.tmp"))
    os.symlink(os.path.join(d, "run", ".t.safetensors.resume"), os.path.join(d, ".linked.safetensors.resume"))
    open(os.path.join(d, ".filed.safetensors.resume"), "w").write("not a folder")
    open(os.path.join(d, "mixed.jsonl"), "w").write('{"prompt": "the text \\"12\\"", "task": "ocr"}\n'
                                                     '{"prompt": "a red circle", "task": "geneval"}\n')
    for name, change in (("no_exp_avg", lambda t, j: t.pop("opt.0.exp_avg")),
                         ("ema_k_negative", lambda t, j: t.update(ema_k=torch.tensor([-11]))),
                         ("rng_loop_empty", None)):
        shutil.copytree(os.path.join(d, "run"), os.path.join(d, f"rs_{name}"))
        sts, meta = dict(st), {**sm, "config": {**sm["config"], "model": os.path.join(d, "base.safetensors"),
                                               "out": os.path.join(d, f"rs_{name}", "t.safetensors")}}
        if change:
            change(sts, meta)
        save_file(sts, os.path.join(d, f"rs_{name}", st_path), metadata={"flow_opd_state": json.dumps(meta)})
    rng_file = os.path.join(d, "rs_rng_loop_empty", ".t.safetensors.resume", "step_00000001", "rng_rank0.json")
    json.dump({**json.load(open(rng_file)), "loop": []}, open(rng_file, "w"))
    cli("flow_matching.py", "--steps", "2", "--depth", "1", "--batch", "2", "--save_every", "1", "--out",
        os.path.join(d, "pre", "b.safetensors"))  # a pretraining run, then its resume state without one EMA tensor
    pre = os.path.join(d, "pre", ".b.safetensors.resume", "step_00000002", "state.safetensors")
    with safe_open(pre, "pt") as f:
        pt, pm = {k: f.get_tensor(k) for k in f.keys() if k != "ema.3"}, f.metadata()
    save_file(pt, pre, metadata=pm)
    for name, src, kind in (("shipped_base", base, "base"), ("shipped_teacher", paths["ocr"], "teacher")):
        with safe_open(src, "pt") as f:  # a file of the project's own ckpts/ is marked in its metadata
            save_file({k: f.get_tensor(k) for k in f.keys()}, os.path.join(d, f"{name}.safetensors"),
                      metadata={**f.metadata(), "flow_opd_shipped": kind})
    return d


def _files(d):  # (a FIFO is not read: it would block)
    return {os.path.join(r, f): open(os.path.join(r, f), "rb").read() if os.path.isfile(os.path.join(r, f)) else None
            for r, _, fs in os.walk(d) for f in fs}


B = "{I}/base.safetensors"


SD3 = "{SD3}"


RESUME = ["grpo_teacher.py", "--model", B, "--reward", "pickscore", *TINY_RUN, "--resume", "--out"]  # + a damaged run


CATALOGUE = [  # name, the command ({I}: the inputs folder), what the one line must say; run in an empty folder
    # missing, damaged or wrong files
    ("missing_checkpoint", ["grpo_teacher.py"], "ckpts/base.safetensors does not exist"),
    ("truncated_checkpoint", ["eval.py", "{I}/truncated.safetensors"], "truncated"),
    ("lora_given_as_base", ["grpo_teacher.py", "--model", "{I}/ocr.safetensors"], "not a flow-opd base model"),
    ("lora_of_another_architecture", ["eval.py", "{I}/narrow.safetensors"], "the model wants"),
    ("ood_tables_of_an_sd3_model", ["eval.py", "stabilityai/stable-diffusion-3.5-medium", "--quality"],
     "--ood and --quality are the mini world's"),
    ("teacher_of_another_base", ["opd_student.py", "--model", B, "--teachers", "geneval={I}/foreign.safetensors"],
     "trained on another base"),
    ("anchor_of_another_base", ["opd_student.py", "--model", B, "--teachers", "{I}/geneval.safetensors", "--anchor",
                                "{I}/foreign.safetensors"], "anchor {I}/foreign.safetensors was trained on another base"),
    ("cold_start_of_another_base", ["grpo_teacher.py", "--model", B, "--init", "{I}/foreign.safetensors"], "another base"),
    ("truncated_teacher_in_a_folder", ["opd_student.py", "--model", B, "--teachers", "{I}/teachers_one_truncated"],
     "geneval.safetensors cannot be read"),
    ("lora_whose_base_is_gone", ["eval.py", "{I}/orphan.safetensors"], "give the base with --model"),
    ("peft_config_not_json", ["eval.py", "{I}/peft_not_json", "--model", B], "is not a JSON object"),
    ("peft_config_without_r", ["eval.py", "{I}/peft_no_r", "--model", B], "lacks the field 'r'"),
    ("peft_dora", ["eval.py", "{I}/peft_dora", "--model", B], "use_dora"),
    ("peft_rank_not_the_weights", ["eval.py", "{I}/peft_wrong_rank", "--model", B], "r=8 but the weights have rank"),
    # rewards and prompts
    ("unknown_reward", ["grpo_teacher.py", "--model", B, "--reward", "aesthetic"], "unknown reward"),
    ("bad_reward_weight", ["grpo_teacher.py", "--model", B, "--reward", "geneval:0.5,ocr:x"], "not a number"),
    ("negative_reward_weight", ["grpo_teacher.py", "--reward", "ocr:-1"], "positive"),
    ("infinite_reward_weight", ["grpo_teacher.py", "--model", B, "--reward", "ocr:inf,geneval:1"], "finite"),
    ("empty_prompt_file", ["grpo_teacher.py", "--model", B, "--prompt_file", "{I}/empty.jsonl"], "is empty"),
    ("prompt_file_of_deep_json", ["grpo_teacher.py", "--model", B, "--prompt_file", "{I}/deep.jsonl"], "deep.jsonl:1:"),
    ("teacher_whose_tasks_are_a_number", ["opd_student.py", "--model", B, "--teachers", "{I}/tasks_int.safetensors",
                                          "{I}/geneval.safetensors"], "tasks_int.safetensors: its flow_opd metadata"),
    ("teacher_with_nan_weights", ["opd_student.py", "--model", B, "--teachers", "ocr={I}/nan.safetensors",
                                  "{I}/geneval.safetensors"], "NaN or inf weights"),
    ("merge_of_a_nan_teacher", ["merge.py", "{I}/nan.safetensors", "{I}/geneval.safetensors", "--out", "m.safetensors"],
     "NaN or inf weights"),
    ("merge_of_damaged_metadata", ["merge.py", "{I}/meta_list.safetensors", "{I}/geneval.safetensors", "--out",
                                   "m.safetensors"], "meta_list.safetensors: its flow_opd metadata is damaged"),
    ("malformed_prompt_file", ["grpo_teacher.py", "--model", B, "--prompt_file", "{I}/bad.jsonl"], "bad.jsonl:2:"),
    ("prompt_file_not_utf8", ["grpo_teacher.py", "--model", B, "--prompt_file", "ocr={I}/latin1.txt"], "not UTF-8"),
    ("prompt_outside_the_grammar", ["opd_student.py", "--model", B, "--teachers", "{I}/geneval.safetensors",
                                    "--prompt_file", "geneval={I}/not_grammar.txt"], "'a circle and' is not a geneval"),
    ("ocr_prompt_with_empty_quotes", ["grpo_teacher.py", "--model", B, "--prompt_file", "ocr={I}/empty_quotes.txt"],
     "quotes no text"),
    ("prompt_of_100k_characters", ["grpo_teacher.py", "--model", B, "--prompt_file", "ocr={I}/huge.txt"],
     "(100018 characters)"),
    ("real_model_without_real_scorers", ["grpo_teacher.py", "--model", SD3, "--reward", "geneval"],
     "--geneval_url URL"),
    ("eval_of_a_real_model_without_real_scorers", ["eval.py", SD3, "--resolution", "64", "--ocr_url", "http://x"],
     "give a real backend for geneval, pickscore, deqa"),
    # routing
    ("label_without_teacher", ["opd_student.py", "--model", B, "--teachers", "{I}/geneval.safetensors", "--tasks",
                               "geneval", "ocr"], "'ocr' has no teacher"),
    ("two_teachers_one_label", ["opd_student.py", "--model", B, "--teachers", "ocr={I}/geneval.safetensors",
                                "{I}/ocr.safetensors"], "two teachers claim task 'ocr'"),
    ("no_teacher_at_all", ["opd_student.py", "--teachers", B], "no teachers among"),
    ("unknown_teacher_label", ["opd_student.py", "--model", B, "--teachers", "banana={I}/ocr.safetensors"],
     "unknown task label 'banana'"),
    ("only_the_anchor_teacher", ["opd_student.py", "--model", B, "--teachers", "deqa={I}/ocr.safetensors"],
     "no task to distil"),
    ("missing_anchor", ["opd_student.py", "--model", B, "--teachers", "{I}/geneval.safetensors", "--anchor",
                        "{I}/nope.safetensors"], "nope.safetensors does not exist; give a deqa teacher's path, --anchor base or none"),
    ("low_query_without_a_low_noise_step", ["opd_student.py", "--model", B, "--teachers", "{I}/geneval.safetensors",
                                            "--query", "low", "--sample_steps", "2"], "--query low needs"),
    # numbers out of range
    ("zero_group", ["grpo_teacher.py", "--group", "0"], "--group must be >= 1"),
    ("group_of_one", ["grpo_teacher.py", "--model", B, "--group", "1"], "at least 2 samples per prompt"),
    ("negative_steps", ["flow_matching.py", "--steps", "-3"], "--steps, --batch, --save_every, --max_bad_steps and "
                                                              "--depth must be >= 1"),
    ("zero_pretraining_batch", ["flow_matching.py", "--batch", "0"], "--steps, --batch, --save_every, --max_bad_steps "
                                                                     "and --depth must be >= 1"),
    ("negative_threads", ["flow_matching.py", "--threads", "-2"], "--threads >= 0 (0: torch's default)"),
    ("zero_eval_prompts", ["eval.py", B, "--n", "0"], "--n must be 2..10000 prompts per task and --batch >= 1, got 0 and 64"),
    ("zero_eval_batch", ["eval.py", B, "--batch", "0"], "--n must be 2..10000 prompts per task and --batch >= 1, got 128 and 0"),
    ("negative_guidance", ["eval.py", B, "--guidance", "-1"], "--guidance must be in [0, 100]"),
    ("nan_guidance", ["sample.py", "--model", B, "--guidance", "nan"], "--guidance must be a finite number, got nan"),
    ("noise_level_out_of_range", ["sample.py", "--model", B, "--noise_level", "5"], "[0, 2]"),
    ("training_without_noise", ["grpo_teacher.py", "--noise_level", "0"], "exploration"),
    ("nan_beta", ["grpo_teacher.py", "--model", B, "--beta", "nan"], "--beta must be a finite number, got nan"),
    ("infinite_lr", ["opd_student.py", "--model", B, "--teachers", "{I}/geneval.safetensors", "--lr", "inf"], "--lr must be a finite number, got inf"),
    ("clip_past_any_ratio", ["grpo_teacher.py", "--model", B, "--clip", "1e308"], "--clip in (0, 10]"),
    ("merge_weights_that_underflow", ["merge.py", "{I}/ocr.safetensors", "{I}/geneval.safetensors", "--weights", "5e-324",
                                      "5e-324", "--out", "m.safetensors"], "--weights must be numbers from 1e-6"),
    ("negative_max_grad_norm", ["grpo_teacher.py", "--model", B, "--max_grad_norm", "-1"], "--max_grad_norm"),
    ("nan_merge_weight", ["merge.py", "{I}/ocr.safetensors", "{I}/geneval.safetensors", "--weights", "nan", "1"],
     "--weights must be numbers from 1e-6 to 1e6"),
    ("reward_timeout_past_a_day", ["grpo_teacher.py", "--model", B, "--reward_timeout", "1e308"], "--reward_timeout"),
    ("guidance_past_100", ["sample.py", "--model", B, "--guidance", "1e308"], "--guidance must be in [0, 100]"),
    ("zero_reward_retries", ["grpo_teacher.py", "--model", B, "--reward_retries", "0"], "--reward_retries"),
    ("negative_reward_timeout", ["grpo_teacher.py", "--model", B, "--reward_timeout", "-5"], "--reward_timeout"),
    ("port_out_of_range", ["real_rewards.py", "--serve", "geneval", "--port", "70000"], "--port must be in 0..65535 (0: any free port), got 70000"),
    ("sde_window_outside_the_steps", ["grpo_teacher.py", "--sde_window", "5", "20"], "--sde_window 5 20"),
    ("sde_window_reversed", ["grpo_teacher.py", "--sde_window", "5", "3"], "--sde_window 5 3"),
    ("resolution_not_a_multiple_of_16", ["sample.py", "--model", SD3, "--resolution", "40"], "multiple of 16"),
    ("resolution_zero", ["sample.py", "--model", SD3, "--resolution", "0"], "multiple of 16"),
    ("resolution_negative", ["sample.py", "--model", SD3, "--resolution", "-32"], "multiple of 16"),
    ("resolution_past_the_position_embeddings", ["sample.py", "--model", SD3, "--resolution", "2048"],
     "between 16 and 128"),
    ("a_float_for_an_integer_flag", ["grpo_teacher.py", "--steps", "1e0"], "invalid int value: '1e0'; see"),
    ("an_unknown_flag", ["opd_student.py", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
    ("eval_row_name_with_a_newline", ["eval.py", "Ba\nse=" + B], "control character"),
    ("merge_out_not_safetensors", ["merge.py", "{I}/ocr.safetensors", "{I}/geneval.safetensors", "--out", "m.json"],
     "give a .safetensors path"),
    ("merge_of_one_teacher_twice", ["merge.py", "{I}/ocr.safetensors", "{I}/ocr.safetensors", "--out", "m.safetensors"],
     "a teacher is given twice"),
    ("overwrite_and_resume", ["grpo_teacher.py", "--model", B, "--overwrite", "--resume"], "give one"),
    ("seed_past_torchs", ["grpo_teacher.py", "--model", B, "--seed", str(2 ** 64)], "--seed must be"),
    ("eval_seed_past_torchs", ["eval.py", B, "--seed", str(2 ** 64 - 1)], "--seed must be"),
    ("student_negative_steps", ["opd_student.py", "--model", B, "--teachers", "{I}/geneval.safetensors", "--steps", "-1"],
     "--steps must be >= 0"),
    ("negative_eval_every", ["grpo_teacher.py", "--model", B, "--eval_every", "-1"], "--eval_every must be >= 0"),
    ("one_denoising_step", ["grpo_teacher.py", "--model", B, "--sample_steps", "1"], "--sample_steps (denoising steps)"),
    ("rank_wider_than_the_layers", ["grpo_teacher.py", "--model", B, "--rank", "1000000000"], "exceeds the adapted"),
    ("merge_weights_too_large", ["merge.py", "{I}/ocr.safetensors", "{I}/geneval.safetensors", "--weights", "1e300",
                                 "1", "--out", "m.safetensors"], "--weights must be numbers from 1e-6 to 1e6"),
    ("reward_named_twice", ["grpo_teacher.py", "--model", B, "--reward", "ocr:0.5,ocr:0.5"], "appears twice"),
    ("benchmark_one_step", ["benchmark.py", "--tiny", "--steps", "1"], "--steps (denoising steps) must be >= 2"),
    ("benchmark_negative_guidance", ["benchmark.py", "--tiny", "--guidance", "-3"], "--guidance must be in [0, 100]"),
    # outputs
    ("out_not_writable", ["flow_matching.py", "--out", "/proc/nope/base.safetensors"], "choose another --out"),
    ("merge_out_inside_a_teacher_folder", ["merge.py", "{I}/peft_wrong_rank", "{I}/ocr.safetensors", "--out",
                                          "{I}/peft_wrong_rank/adapter_model.safetensors", "--overwrite"],
     "is inside this run's teacher {I}/peft_wrong_rank (a folder)"),
    ("teacher_out_inside_the_init_folder", ["grpo_teacher.py", "--model", B, "--reward", "ocr", "--init",
                                            "{I}/peft_wrong_rank", "--out", "{I}/peft_wrong_rank/adapter_model.safetensors",
                                            "--overwrite"], "is inside this run's --init (a folder)"),
    ("student_out_inside_a_teacher_folder", ["opd_student.py", "--model", B, "--teachers", "ocr={I}/peft_wrong_rank",
                                             "geneval={I}/geneval.safetensors", "--out",
                                             "{I}/peft_wrong_rank/adapter_model.safetensors", "--overwrite"],
     "is inside this run's --teachers ocr (a folder)"),
    ("base_without_config", ["eval.py", "{I}/base_no_config.safetensors"], "its \"config\" metadata is not a mini"),
    ("base_config_not_json", ["grpo_teacher.py", "--model", "{I}/base_config_not_json.safetensors"],
     "its \"config\" metadata is not a mini model's ('{num_layers: 4')"),
    ("base_config_a_list", ["sample.py", "--model", "{I}/base_config_list.safetensors"], "is not a mini model's ('[4, 128]')"),
    ("base_config_depth_a_string", ["opd_student.py", "--model", "{I}/base_config_str_layers.safetensors", "--teachers",
                                    "{I}/geneval.safetensors"], "base_config_str_layers.safetensors: its \"config\""),
    ("base_config_unknown_key", ["eval.py", "{I}/base_config_unknown_key.safetensors", "--n", "2"],
     "base_config_unknown_key.safetensors: its \"config\" metadata is not a mini model's"),
    ("base_config_other_width_than_weights", ["eval.py", "{I}/base_config_other_width.safetensors"],
     "does not match the model its config describes"),
    ("base_with_nan_weights", ["grpo_teacher.py", "--model", "{I}/base_nan.safetensors", "--reward", "ocr"],
     "is not finite floats (NaN or inf: a diverged run?)"),
    ("merge_of_a_lora_with_a_3d_factor", ["merge.py", "{I}/lora_3d.safetensors", "{I}/ocr.safetensors", "--out",
                                         "m.safetensors"], "a LoRA pair is lora_A (r, in) and lora_B (out, r)"),
    ("eval_of_a_lora_with_a_3d_factor", ["eval.py", "{I}/lora_3d.safetensors", "--model", B],
     "a LoRA pair is lora_A (r, in) and lora_B (out, r)"),
    ("lora_whose_base_path_is_a_number", ["eval.py", "{I}/base_path_int.safetensors"], "base_path_int.safetensors: its "
                                                                                      "flow_opd metadata"),
    ("out_is_the_shipped_base", ["flow_matching.py", "--out", "{I}/shipped_base.safetensors", "--overwrite"],
     "is the base this project ships, which no run replaces"),
    ("merge_out_is_a_shipped_teacher", ["merge.py", "{I}/ocr.safetensors", "{I}/geneval.safetensors", "--out",
                                        "{I}/shipped_teacher.safetensors", "--overwrite"], "is the teacher this project ships"),
    ("teacher_out_is_a_shipped_teacher", ["grpo_teacher.py", "--model", B, "--reward", "ocr", "--out",
                                          "{I}/shipped_teacher.safetensors", "--overwrite"], "is the teacher this project ships"),
    ("out_is_the_model", ["grpo_teacher.py", "--model", B, "--out", B], "is also this run's --model"),
    ("out_is_a_teacher", ["opd_student.py", "--model", B, "--teachers", "{I}/geneval.safetensors", "{I}/ocr.safetensors",
                          "--out", "{I}/ocr.safetensors"], "is also this run's --teachers ocr"),
    ("merge_out_is_an_input", ["merge.py", "{I}/ocr.safetensors", "{I}/geneval.safetensors", "--out",
                               "{I}/ocr.safetensors"], "is also this run's teacher"),
    ("out_is_a_folder", ["grpo_teacher.py", "--model", B, "--out", "{I}"], "is a folder"),
    ("finished_run_without_resume", ["grpo_teacher.py", "--model", B, "--reward", "pickscore", *TINY_RUN, "--out",
                                     "{I}/run/t.safetensors"], "pass --resume"),
    ("log_file_is_a_folder", ["grpo_teacher.py", "--model", B, "--log_file", "{I}"], "--log_file"),
    ("log_file_is_the_model", ["grpo_teacher.py", "--model", B, "--log_file", B], "--log_file {I}/base.safetensors is "
                                                                                   "also this run's --model"),
    ("log_file_is_a_teacher", ["opd_student.py", "--model", B, "--teachers", "{I}/geneval.safetensors", "--log_file",
                               "{I}/geneval.safetensors"], "is also this run's --teachers geneval"),
    ("log_file_is_a_prompt_file", ["grpo_teacher.py", "--model", B, "--prompt_file", "ocr={I}/ocr_prompts.txt",
                                   "--log_file", "{I}/ocr_prompts.txt"], "is also this run's --prompt_file"),
    ("log_file_is_the_out", ["grpo_teacher.py", "--model", B, "--out", "t.safetensors", "--log_file", "t.safetensors"],
     "is also --out"),
    ("log_of_another_run", ["grpo_teacher.py", "--model", B, "--log_file", "{I}/bad.jsonl"], "--overwrite to replace"),
    ("log_file_not_writable", ["grpo_teacher.py", "--model", B, "--log_file", "/proc/nope/x.jsonl"],
     "choose another --log_file"),
    ("out_ending_with_a_slash", ["grpo_teacher.py", "--model", B, "--out", "new/t.safetensors/"], "ends with '/'"),
    ("merge_out_ending_with_a_slash", ["merge.py", "{I}/ocr.safetensors", "{I}/geneval.safetensors", "--out",
                                       "m.safetensors/"], "--out m.safetensors/"),
    ("log_file_hard_linked_to_the_model", ["grpo_teacher.py", "--model", B, "--log_file", "{I}/base_link.jsonl",
                                           "--overwrite"], "is also this run's --model"),
    ("out_is_a_fifo", ["merge.py", "{I}/ocr.safetensors", "{I}/geneval.safetensors", "--out", "{I}/fifo.safetensors",
                       "--overwrite"], "not a regular file"),
    ("out_name_too_long", ["grpo_teacher.py", "--model", B, "--out", "x" * 240 + ".safetensors"], "too long"),
    ("log_file_a_dangling_link", ["grpo_teacher.py", "--model", B, "--log_file", "{I}/dangling.jsonl"],
     "is a symbolic link"),
    ("out_empty", ["grpo_teacher.py", "--model", B, "--out", ""], "--out is empty"),
    ("out_under_sys", ["grpo_teacher.py", "--model", B, "--out", "/sys/fs/flowopd/t.safetensors"], "choose another --out"),
    ("grid_of_an_unknown_image_type", ["sample.py", "--model", B, "--out", "grid.jpq"], ".png"),
    ("eval_rows_of_one_name", ["eval.py", "{I}/ocr.safetensors", "{I}/ocr.safetensors"], "name the rows apart"),
    ("eval_rows_of_one_picture", ["eval.py", "A b={I}/ocr.safetensors", "a-b={I}/geneval.safetensors"], "a-b.png"),
    ("eval_row_named_compare", ["eval.py", "Compare={I}/ocr.safetensors"], "compare.png"),
    ("eval_rows_name_too_long", ["eval.py", "R" * 300 + "=" + B], "too long"),
    ("eval_n_past_any_prompt_set", ["eval.py", B, "--n", "20000000"], "--n must be 2..10000"),
    ("eval_out_empty", ["eval.py", B, "--out", ""], "--out is empty"),
    ("eval_whole_model_with_a_lora_as_model", ["eval.py", B, "--model", "{I}/ocr.safetensors"], "separate rows"),
    ("curves_of_a_log_without_evaluations", ["eval.py", "--curves", "{I}/empty.jsonl", "--out", "c.png"],
     "no held-out evaluation"),
    ("curves_of_a_deep_json_log", ["eval.py", "--curves", "{I}/deep.jsonl", "--out", "c.png"], "cannot read the logs"),
    ("eval_over_files_it_did_not_write", ["eval.py", B, "--out", "{I}/evalout"], "already holds table.md, which no "
                                                                                 "earlier evaluation wrote there"),
    ("eval_over_a_damaged_table", ["eval.py", B, "--overwrite", "--out", "{I}/damaged_eval"], "is damaged"),
    ("eval_prompt_file_it_would_write_over", ["eval.py", B, "--prompt_file", "ocr={I}/evalout/table.md", "--out",
                                              "{I}/evalout"], "would be written over"),
    ("curves_log_of_lists", ["eval.py", "--curves", "{I}/list.jsonl", "--out", "c.png"], "cannot read the logs"),
    ("curves_over_an_existing_png", ["eval.py", "--curves", "{I}/list.jsonl", "--out", "{I}/exists.png"],
     "pass --overwrite"),
    ("grid_over_an_existing_png", ["sample.py", "--model", B, "--out", "{I}/exists.png"], "--overwrite to replace it"),
    ("sampler_lora_of_another_base", ["sample.py", "--model", B, "--lora", "{I}/foreign.safetensors"],
     "trained on another base"),
    ("curves_of_a_missing_log", ["eval.py", "--curves", "{I}/nope.jsonl", "--out", "c.png"], "does not exist"),
    # --resume
    ("resume_with_another_lora_rank", ["grpo_teacher.py", "--model", B, "--reward", "pickscore", *TINY_RUN, "--rank",
                                       "4", "--resume", "--out", "{I}/run/t.safetensors"], "--rank was 2, now 4"),
    ("resume_with_another_micro_batch", ["grpo_teacher.py", "--model", B, "--reward", "pickscore", *TINY_RUN,
                                         "--micro_batch", "1", "--resume", "--out", "{I}/run/t.safetensors"],
     "--micro_batch was"),
    ("resume_with_an_edited_prompt_file", ["grpo_teacher.py", "--model", B, "--reward", "ocr", *TINY_RUN, "--steps", "2",
                                           "--prompt_file", "ocr={I}/run_prompts.txt", "--resume", "--out",
                                           "{I}/prun/t.safetensors"], "the prompt files hold other prompts"),
    ("resume_of_a_damaged_rng_record", ["grpo_teacher.py", "--model", B, "--reward", "pickscore", *TINY_RUN, "--steps",
                                        "2", "--resume", "--out", "{I}/rng/t.safetensors"], "rng_rank0.json is damaged"),
    ("rerun_of_a_run_killed_before_its_first_checkpoint", ["grpo_teacher.py", "--model", B, "--out",
                                                           "{I}/killed/t.safetensors", "--log_file", "{I}/killed.jsonl"],
     "stopped before its first checkpoint (nothing is lost by starting again: pass --overwrite)"),
    ("resume_without_checkpoint", ["grpo_teacher.py", "--model", B, "--resume"], "no checkpoint"),
    ("full_resume_without_checkpoint", ["opd_student.py", "--model", B, "--teachers", "{I}/geneval.safetensors",
                                        "--full", "--resume"], "--resume: no checkpoint"),
    ("merge_of_different_bases", ["merge.py", "{I}/ocr.safetensors", "{I}/foreign.safetensors", "--out", "m.safetensors"],
     "teachers were trained on different base models"),
    ("bench_with_a_lora", ["sample.py", "--model", B, "--bench", "2", "--lora", "{I}/ocr.safetensors"],
     "--lora, --prompt and --out have no effect"),
    ("prompt_past_the_mini_text_encoder", ["sample.py", "--model", B, "--prompt",
                                           "two red circles and two blue rings and a green triangle"], "longer than the mini"),
    # the resume state (checkpoints.load_state / restore_params): its schema and shapes, before any work
    ("resume_state_without_step", [*RESUME, "{I}/rs_no_step/t.safetensors"], "is damaged (step: missing"),
    ("resume_state_step_a_string", [*RESUME, "{I}/rs_step_str/t.safetensors"], "is damaged (step: missing"),
    ("resume_state_step_negative", [*RESUME, "{I}/rs_step_negative/t.safetensors"], "is damaged (step: missing"),
    ("resume_state_metadata_a_list", [*RESUME, "{I}/rs_meta_list/t.safetensors"], "is damaged (the metadata"),
    ("resume_state_config_a_list", [*RESUME, "{I}/rs_config_list/t.safetensors"], "is damaged (config: missing"),
    ("resume_state_world_a_string", [*RESUME, "{I}/rs_world_str/t.safetensors"], "is damaged (world: missing"),
    ("resume_state_param_groups_a_dict", [*RESUME, "{I}/rs_groups_dict/t.safetensors"], "is damaged (param_groups: missing"),
    ("resume_state_without_a_weight", [*RESUME, "{I}/rs_no_param/t.safetensors"], "param.0 is missing, out of range or of another shape"),
    ("resume_state_weight_of_another_shape", [*RESUME, "{I}/rs_param_shape/t.safetensors"], "param.0 is missing, out of range or of another shape"),
    ("resume_state_nan_weight", [*RESUME, "{I}/rs_param_nan/t.safetensors"], "(the tensor param.0: missing, of another type or not finite)"),
    ("resume_state_adam_moment_of_another_shape", [*RESUME, "{I}/rs_opt_shape/t.safetensors"], "opt.0 is missing, out of range or of another shape"),
    ("resume_state_ema_count_of_two", [*RESUME, "{I}/rs_ema_k_two/t.safetensors"], "ema_k is missing, out of range or of another shape"),
    # files readable but not what they claim
    ("teacher_metadata_not_json", ["opd_student.py", "--model", B, "--teachers", "{I}/flow_opd_not_json.safetensors",
                                   "{I}/geneval.safetensors"], "flow_opd_not_json.safetensors: its flow_opd metadata"),
    ("teacher_tasks_a_string", ["opd_student.py", "--model", B, "--teachers", "{I}/tasks_a_string.safetensors",
                                "{I}/geneval.safetensors"], "tasks_a_string.safetensors: its flow_opd metadata"),
    ("teacher_of_an_unknown_task", ["opd_student.py", "--model", B, "--teachers", "{I}/tasks_unknown.safetensors",
                                    "{I}/geneval.safetensors"], "chess"),
    ("lora_factors_of_two_ranks", ["eval.py", "{I}/lora_ranks_differ.safetensors"], "lora_ranks_differ.safetensors"),
    ("merge_of_lora_factors_of_two_ranks", ["merge.py", "{I}/lora_ranks_differ.safetensors", "{I}/ocr.safetensors",
                                            "--out", "m.safetensors"], "lora_ranks_differ.safetensors"),
    ("base_of_zero_layers", ["eval.py", "{I}/base_layers_zero.safetensors"], "its \"config\" metadata is not a mini"),
    ("base_of_65_layers", ["grpo_teacher.py", "--model", "{I}/base_layers_past_64.safetensors"],
     "its \"config\" metadata is not a mini"),
    ("base_config_null", ["sample.py", "--model", "{I}/base_config_null.safetensors"], "its \"config\" metadata is not a mini"),
    ("base_of_integer_weights", ["eval.py", "{I}/base_int_weights.safetensors"], "is not finite floats"),
    ("base_missing_a_tensor", ["eval.py", "{I}/base_missing_tensor.safetensors"], "does not match the model its config"),
    ("base_with_an_extra_tensor", ["sample.py", "--model", "{I}/base_extra_tensor.safetensors"],
     "does not match the model its config"),
    ("sd3_with_a_nan_weight", ["sample.py", "--model", "{I}/sd3_nan", "--resolution", "64"], "holds NaN or inf"),
    ("teacher_given_as_anchor_base", ["opd_student.py", "--model", "{I}/ocr.safetensors", "--teachers",
                                      "{I}/geneval.safetensors"], "not a flow-opd base model"),
    ("merge_of_a_base", ["merge.py", B, "{I}/ocr.safetensors", "--out", "m.safetensors"], "base.safetensors"),
    # outputs whose path fails only when written: now refused before any work
    ("out_name_not_utf8", ["grpo_teacher.py", "--model", B, "--out", "t\udcff.safetensors"], "holds bytes that are not UTF-8"),
    ("eval_out_not_utf8", ["eval.py", B, "--out", "r\udcff"], "holds bytes that are not UTF-8"),
    ("out_past_path_max", ["grpo_teacher.py", "--model", B, "--out", "a/" * 2100 + "t.safetensors"], "cannot write"),
    ("log_file_past_path_max", ["opd_student.py", "--model", B, "--teachers", "{I}/geneval.safetensors", "--log_file",
                                "b/" * 2100 + "l.jsonl"], "cannot write"),
    ("out_folder_name_too_long", ["merge.py", "{I}/ocr.safetensors", "{I}/geneval.safetensors", "--out",
                                  "x" * 256 + "/m.safetensors"], "File name too long"),
    ("grid_folder_name_too_long", ["sample.py", "--model", B, "--out", "y" * 256 + "/g.png"], "File name too long"),
    ("pretraining_out_past_path_max", ["flow_matching.py", "--out", "c/" * 2100 + "b.safetensors"], "cannot write"),
    ("eval_out_past_path_max", ["eval.py", B, "--out", "e/" * 2100], "cannot write"),
    ("out_through_a_link_and_up_onto_an_input", ["merge.py", "{I}/ocr.safetensors", "{I}/geneval.safetensors", "--out",
                                                 "{I}/alias/../ocr.safetensors", "--overwrite"], "is also this run's"),
    # an outside attack of 52 fresh cases: what it broke, now refused before any work
    ("lora_of_integer_factors", ["merge.py", "{I}/int_lora.safetensors", "{I}/ocr.safetensors", "--out", "m.safetensors"],
     "holds torch.int32 values"),
    ("lora_of_ours_without_its_scale", ["merge.py", "{I}/no_scale.safetensors", "{I}/ocr.safetensors", "--out",
                                        "m.safetensors"], "without its lora_adapter_metadata"),
    ("curves_log_holding_nan", ["eval.py", "--curves", "{I}/nan_log.jsonl", "--out", "c.png"], "a log holds NaN"),
    ("curves_of_two_logs_of_one_name", ["eval.py", "--curves", "{I}/logs_a/run.jsonl", "{I}/logs_b/run.jsonl", "--out",
                                        "c.png"], "two logs are named 'run'"),
    ("pool_of_a_nan_table", ["eval.py", "--pool", "{I}/pool_a/table.json", "{I}/pool_nan/table.json"], "a NaN score"),
    ("pool_of_other_settings", ["eval.py", "--pool", "{I}/pool_a/table.json", "{I}/pool_b/table.json"],
     "different --n"),
    ("pool_of_other_rows", ["eval.py", "--pool", "{I}/pool_a/table.json", "{I}/pool_c/table.json"], "different rows"),
    ("eval_checkpoints_and_curves", ["eval.py", B, "--curves", "{I}/nan_log.jsonl"], "give one of checkpoints"),
    ("curves_and_pool", ["eval.py", "--curves", "{I}/nan_log.jsonl", "--pool", "{I}/pool_a/table.json"],
     "give one of checkpoints"),
    ("pool_with_a_table_and_an_out", ["eval.py", "--pool", "{I}/pool_a/table.json", "--table", "{I}/pool_a/table.json",
                                      "--out", "x"], "give one of checkpoints"),
    ("eval_n_past_the_prompt_file", ["eval.py", B, "--n", "4", "--prompt_file", "ocr={I}/ocr_prompts.txt"],
     "--n 4 but --prompt_file holds 1 prompt(s) of task ocr"),
    ("log_file_over_a_teacher_with_overwrite", ["grpo_teacher.py", "--model", B, "--log_file", "{I}/geneval.safetensors",
                                                "--overwrite"], "is not a training log"),
    ("log_file_inside_the_runs_checkpoints", ["grpo_teacher.py", "--model", B, "--out", "o/t.safetensors",
                                              "--log_file", "o/.t.safetensors.resume/l.jsonl"],
     "inside the run's checkpoint folder"),
    ("grid_through_a_link_with_overwrite", ["sample.py", "--model", B, "--out", "{I}/link.png", "--overwrite"],
     "is a symbolic link"),
    ("eval_table_through_a_link_with_overwrite", ["eval.py", B, "--out", "{I}/evallink", "--overwrite"],
     "is a symbolic link"),
    ("eval_temp_table_a_folder", ["eval.py", B, "--out", "{I}/evaltmp"], "table.json.tmp is a folder"),
    ("resume_folder_a_link_to_another_runs", ["grpo_teacher.py", "--model", B, "--out", "{I}/linked.safetensors",
                                              "--overwrite"], "is a link or a file"),
    ("resume_folder_a_file", ["grpo_teacher.py", "--model", B, "--out", "{I}/filed.safetensors"], "is a link or a file"),
    ("merge_over_a_teacher_with_overwrite", ["merge.py", "{I}/ocr.safetensors", "{I}/geneval.safetensors", "--out",
                                             "{I}/deqa.safetensors", "--overwrite"], "is a teacher, not this script's"),
    ("student_over_a_base_with_overwrite", ["opd_student.py", "--model", B, "--teachers", "{I}/geneval.safetensors",
                                            "--out", "{I}/base_nan.safetensors", "--overwrite"], "is a base model, not"),
    ("out_ending_with_a_dot", ["grpo_teacher.py", "--model", B, "--out", "o.safetensors/."], "ends with '/' or '.'"),
    ("teacher_task_without_a_prompt", ["grpo_teacher.py", "--model", B, "--reward", "geneval:1,ocr:1", "--prompt_file",
                                       "ocr={I}/ocr_prompts.txt"], "hold no prompt of task geneval"),
    ("student_task_without_a_prompt", ["opd_student.py", "--model", B, "--teachers", "{I}/geneval.safetensors",
                                       "{I}/ocr.safetensors", "--prompt_file", "ocr={I}/ocr_prompts.txt"],
     "hold no prompt of task geneval"),
    ("advantage_with_a_low_query", ["opd_student.py", "--model", B, "--teachers", "{I}/geneval.safetensors", "--query",
                                    "low", "--advantage", "logratio"], "--advantage has no effect with --query low"),
    ("sft_flags_without_an_sft_cold_start", ["opd_student.py", "--model", B, "--teachers", "{I}/geneval.safetensors",
                                             "--sft_steps", "3"], "nor --sft_* without --init sft"),
    ("resume_state_without_an_adam_moment", [*RESUME, "{I}/rs_no_exp_avg/t.safetensors"],
     "opt.0 is missing, out of range"),
    ("resume_state_ema_count_negative", [*RESUME, "{I}/rs_ema_k_negative/t.safetensors"], "ema_k is missing, out of range"),
    ("resume_state_without_the_loop_rng", [*RESUME, "{I}/rs_rng_loop_empty/t.safetensors"], "rng_rank0.json is damaged"),
    ("pretraining_resume_without_an_ema_tensor", ["flow_matching.py", "--steps", "3", "--depth", "1", "--batch", "2",
                                                  "--save_every", "1", "--out", "{I}/pre/b.safetensors", "--resume"],
     "ema.3 is missing, out of range"),
    ("full_student_over_a_foreign_folder", ["opd_student.py", "--model", SD3, "--teachers", "{I}/geneval.safetensors",
                                            "--full", "--out", "{I}/peft_dora"], "was not written by this project"),
]


def _args(args):
    inputs = _inputs()
    return [a.replace("{I}", inputs).replace("{SD3}", tiny_sd3_pipeline()) for a in args]


def refused(*args):
    """A script that must refuse its input (run in this process): exit 2 and one line on stderr, which it returns."""
    err = cli(*args, expect=2)[1]
    assert len(err.strip().splitlines()) == 1, err
    return err


def _bad_input_test(args, needle, torchrun=False):
    def test():
        inputs = _inputs()
        before = _files(inputs)
        if torchrun:  # torchrun adds its own report of the failed workers; ours is one line, said once, before it
            cwd = tempfile.mkdtemp(dir=TMP)
            p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                os.path.join(HERE, args[0]), *_args(args)[1:]], cwd=cwd, capture_output=True, text=True,
                               timeout=600)
            ours = [l for l in p.stderr.splitlines() if l.startswith("error")]
            assert p.returncode != 0 and len(ours) == 1 and needle in ours[0], p.stderr[-1500:]
            assert p.stderr.index(ours[0]) < (p.stderr.find("Traceback") % (len(p.stderr) + 1)), "ours comes first"
        else:
            cwd, code, _, err = run_inprocess(_args(args))
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) < 600 and \
                needle.replace("{I}", inputs) in lines[0], f"exit {code}: {err[-1500:]}"
            ours = lines
        assert os.listdir(cwd) == [], f"wrote {os.listdir(cwd)}"
        assert _files(inputs) == before, "an input changed"
        print(f"    {ours[0][:150]}")
    return test


for _name, _args_, _needle in CATALOGUE:
    globals()[f"test_bad_input_{_name}"] = _bad_input_test(_args_, _needle)


globals()["test_bad_input_world_size_does_not_divide_the_batch"] = _bad_input_test(
    ["grpo_teacher.py", "--model", B, "--prompts", "1", "--group", "3"], "does not divide", True)


globals()["test_bad_input_base_without_config_under_torchrun"] = _bad_input_test(
    ["opd_student.py", "--model", "{I}/base_no_config.safetensors", "--teachers", "{I}/geneval.safetensors"],
    "its \"config\" metadata is not a mini model's", True)


globals()["test_bad_input_resume_with_another_world_size"] = _bad_input_test(
    ["grpo_teacher.py", "--model", B, "--reward", "pickscore", *TINY_RUN, "--resume", "--out",
     "{I}/run/t.safetensors"], "--nproc_per_node=1", True)


def test_bad_input_reproduce_sh_unknown_argument_and_help():
    """bash reproduce.sh refuses an unknown argument with one line (it used to start the hour-long pipeline), and
    --help prints its usage; neither writes anything."""
    cwd = tempfile.mkdtemp(dir=TMP)
    shutil.copy(os.path.join(HERE, "reproduce.sh"), cwd)
    p = subprocess.run(["bash", "reproduce.sh", "--fast"], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == ["error: unknown argument '--fast'; see bash "
                                                                   "reproduce.sh --help"], p.stderr
    p = subprocess.run(["bash", "reproduce.sh", "--help"], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--seed S" in p.stdout and "--quick" in p.stdout
    for seed in ("x", "99999999999999999999999", "-1"):
        p = subprocess.run(["bash", "reproduce.sh", "--seed", seed], cwd=cwd, capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--seed" in p.stderr, p.stderr
    p = subprocess.run(["bash", "reproduce.sh", "--quick"], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: ckpts/base.safetensors (the shipped base) does not exist; restore it (git checkout "
        "ckpts/base.safetensors) or pass --pretrain"], p.stderr
    assert os.listdir(cwd) == ["reproduce.sh"]


# ----------------------------------------------------------------------------------------------------- layout
def test_imports_form_a_tree_and_files_stay_short():
    """Every import between the project's modules (also those inside functions) counted: no cycle; runs.py imports
    none; every file but this one reads in one sitting (<= 450 lines; miniworld.py, the world's grammar, and eval.py,
    whose modes are the tables and the pooled seeds, 500); the math modules need torch alone."""
    import ast
    import glob
    mods = {os.path.basename(f)[:-3]: f for f in glob.glob(os.path.join(HERE, "*.py"))}
    graph = {}
    for m, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(open(f).read())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom) and node.module in mods:
                deps.add(node.module)
        graph[m] = deps
    assert graph["runs"] == set(), graph["runs"]
    done, order = set(), []

    def visit(m, path):
        assert m not in path, f"import cycle: {' -> '.join(path + [m])}"
        if m not in done:
            for d in sorted(graph[m]):
                visit(d, path + [m])
            done.add(m)
            order.append(m)
    for m in sorted(graph):
        visit(m, [])
    lines = {m: sum(1 for _ in open(f)) for m, f in mods.items()}
    assert all(n <= (500 if m in ("miniworld", "eval") else 450) for m, n in lines.items() if m != "test_all"), lines
    # the math modules load with torch alone: importing them pulls in no other project module, nor PIL or diffusers
    p = subprocess.run([sys.executable, "-c", "import sys, sde_sampler, mar, merge; print(' '.join(sorted(m for m in "
                        "sys.modules if m in %r or m.split('.')[0] in ('PIL', 'diffusers', 'transformers'))))"
                        % sorted(set(mods) - {"sde_sampler", "mar", "merge"})], cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "", (p.stdout, p.stderr)
    print(f"    import order: {' '.join(order)}; sde_sampler, mar and merge import torch alone")


# ----------------------------------------------------------------------------------------------------- runner
def main():
    names = sys.argv[1:]
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)
             and (not names or any(s in n for s in names))]
    passed = failed = 0
    for name, fn in tests:
        t0 = time.time()
        try:
            fn()
            passed += 1
            print(f"PASS {name} ({time.time() - t0:.1f}s)", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {name} ({time.time() - t0:.1f}s)\n{traceback.format_exc()}", flush=True)
    shutil.rmtree(TMP, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
