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

import flow_matching as fm
import lora
import miniworld as mw
import rewards
import runs
import sde_sampler as sampler

HERE = os.path.dirname(os.path.abspath(__file__))
TMP = tempfile.mkdtemp(prefix="flow-opd-test-")


def tiny_model(seed=0):
    m = fm.new_mini_model(seed)
    with torch.no_grad():  # random but not degenerate (SD3 zero-inits its output layer)
        for p in m.transformer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def close(a, b, tol, what=""):
    err = (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.1g}"


def cli(*args, expect=0):
    """Run one of our scripts; returns (stdout, stderr)."""
    p = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=600)
    assert p.returncode == expect, f"{args}: exit {p.returncode} (wanted {expect})\n{p.stdout[-800:]}\n{p.stderr[-1500:]}"
    return p.stdout, p.stderr


# ----------------------------------------------------------------------------------------------- Eq. 1, 5, 6
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
    sig = sampler.sigma_schedule(10)
    for t in (0, 3, 8):
        a, b = float(sig[t]), float(sig[t + 1])
        s = 0.7 * math.sqrt(a / (1 - (a if a < 1 else float(sig[1]))))
        dt = b - a
        # Flow-GRPO's expanded form: x (1 + s^2 dt / 2 sigma) + v (1 + s^2 (1 - sigma) / 2 sigma) dt
        mean = x * (1 + s ** 2 / (2 * a) * dt) + v * (1 + s ** 2 * (1 - a) / (2 * a)) * dt
        x_next, lp, mu, std = sampler.sde_step(x, v, sig, t, 0.7)
        close(mu, mean, 1e-5, f"mean at t={t}")
        assert abs(std - s * math.sqrt(-dt)) < 1e-9
        close(lp, sampler.log_prob(x_next, mean, s * math.sqrt(-dt)), 1e-5, "log-prob of the sample")


def test_ode_matches_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    steps = 10
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).numpy())  # as StableDiffusion3Pipeline does
    close(sampler.sigma_schedule(steps, 3.0), sch.sigmas, 1e-6, "sigma schedule")
    model = tiny_model()
    enc = fm.encode_prompts(model, ["a red circle", 'the text "12"'])
    x0 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    # ours, with noise level 0 on every step
    out = sampler.sample(model, enc, steps, guidance=2.0, noise_level=0.0, sde=list(range(steps)), x=x0.clone())
    x = x0.clone()
    with torch.no_grad():
        for t in sch.timesteps:
            v = fm.velocity(model, x, float(t) / 1000, enc, 2.0)
            x = sch.step(v, t, x).prev_sample
    close(out["states"][:, -1], x, 1e-5, "final sample vs diffusers")


def test_sampler_trajectory_log_probs_rescore():
    model = tiny_model()
    enc = fm.encode_prompts(model, ["a blue square", "the sea at noon"])
    out = sampler.sample(model, enc, 6, noise_level=0.7, generator=torch.Generator().manual_seed(0))
    assert out["states"].shape == (2, 7, 3, 32, 32) and out["sde"] == [0, 1, 2, 3, 4]
    assert out["log_probs"][:, :5].isfinite().all() and out["log_probs"][:, 5].isnan().all()
    sig = out["sigmas"]
    with torch.no_grad():  # re-scoring the stored transitions gives the stored log-probs (ratio 1 on-policy)
        for t in out["sde"]:
            v = fm.velocity(model, out["states"][:, t], float(sig[t]), enc)
            _, lp, _, _ = sampler.sde_step(out["states"][:, t], v, sig, t, 0.7, x_next=out["states"][:, t + 1])
            close(lp, out["log_probs"][:, t], 1e-5, f"step {t}")
    assert sampler.sde_steps(10, window=(2, 5)) == [2, 3, 4]


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


# ----------------------------------------------------------------------------------------------- LoRA
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


# ----------------------------------------------------------------------------------------------- the mini world
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
    assert acc_clean >= 0.97 and acc_wrong >= 0.90


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
    noisy = rewards.ocr((mw.render_batch(ps, 0) + 0.08 * torch.randn(300, 3, 32, 32)).clamp(0, 1), ps)
    print(f"    ocr: exact on faithful renders {acc_clean:.3f}, exact 1-1/n on one wrong digit {acc_wrong:.3f}, "
          f"mean under noise 0.08 {float(noisy.mean()):.3f} (n=300)")
    assert acc_clean >= 0.98 and acc_wrong >= 0.95 and noisy.mean() > 0.9
    assert rewards.edit_distance("kitten", "sitting") == 3


def test_deqa_and_pickscore_on_renderer():
    ps = _cases("deqa", 300, 3)
    clean = mw.render_batch(ps, 0)
    noisy = (clean + 0.08 * torch.randn_like(clean)).clamp(0, 1)
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
    assert noise_acc >= 0.97 and blur_acc >= 0.9 and pref_acc >= 0.95 and dull_acc >= 0.95


def test_heldout_prompts_never_trained():
    for task in mw.TASKS:
        held = {p["prompt"] for p in mw.eval_prompts(task, 64)}
        g = mw.train_prompts((task,), seed=0)
        seen = {next(g)["prompt"] for _ in range(3000)}
        assert held and not held & seen, task
        assert mw.eval_prompts(task, 5) == mw.eval_prompts(task, 5)
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
    assert mw.read_prompt_file("geneval=" + path) == [{"prompt": "a photo of a cat left of a dog", "task": "geneval",
                                                       "tag": "position"}]


def test_table2_avg_formula():
    import eval as ev
    paper = {"SD-3.5-M": (0.63, 0.59, 4.07, 21.64, 0.7166), "Flow-OPD (Merge)": (0.92, 0.94, 4.35, 23.08, 0.9044),
             "GRPO-Mix": (0.73, 0.83, 4.33, 21.84, 0.8165)}
    for name, (g, o, d, p, avg) in paper.items():
        scores = {"geneval": [g, g], "ocr": [o, o], "deqa": [d, d], "pickscore": [p, p]}
        assert abs(ev.summarise(scores)["Avg"][0] - avg) < 6e-5, name


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


# ----------------------------------------------------------------------------------------------- SD3 backend
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
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, shift_factor=0.06, scaling_factor=1.5)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                                    text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None)
    pipe.save_pretrained(path)
    return path


def test_sd3_backend_tiny_pipeline():
    model = fm.load_model(tiny_sd3_pipeline())
    assert model.kind == "sd3"
    prompts = ["a red circle", 'the text "47"']
    enc = fm.encode_prompts(model, prompts)
    assert enc["seq"].shape[0] == 2 and enc["pooled"].shape == (2, 64)
    shape = model.latent_shape(64)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        v = fm.velocity(model, x, 0.7, enc, 4.5)
        assert v.shape == x.shape and v.isfinite().all()
        out = sampler.sample(model, enc, 4, guidance=4.5, noise_level=0.7, resolution=64)
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
    model = fm.load_model(path)
    lora.add_lora(model.transformer, "ours", rank=4, alpha=8)
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
        none = dict(text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None)
        pipe = StableDiffusion3Pipeline.from_pretrained(path, **none)
        pipe.load_lora_weights(file)
        v_diffusers = pipe.transformer(hidden_states=x, encoder_hidden_states=enc["seq"], pooled_projections=enc["pooled"],
                                       timestep=torch.full((2,), 600.0), return_dict=False)[0]
    assert (v_ours - v_base).abs().max() > 1e-2, "the adapter must matter for this test to mean anything"
    close(v_diffusers, v_ours, 1e-5, "diffusers' load_lora_weights output = ours")


def test_sd3_pipeline_through_every_script():
    """The real-world path on a tiny random SD3 pipeline: a teacher step, merge, an OPD step (a peft-format teacher
    among the teachers), eval on 2 prompts. Prompts come from Flow-GRPO-style files (TASK=PATH, .txt / .jsonl)."""
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
             "--steps", "1", "--rank", "2", "--alpha", "4", "--guidance", "4.5", "--prompt_file", *files]
    for task in ("ocr", "geneval"):
        cli("grpo_teacher.py", *small, "--reward", task, "--out", f"{d}/teachers/{task}.safetensors",
            "--log_file", f"{d}/log_{task}.jsonl")
        rec = read_log(f"{d}/log_{task}.jsonl")[0]
        assert math.isfinite(rec["loss"]) and rec["ratio_dev"] < 1e-4, rec
    # the ocr teacher again, as a peft directory (adapter_config.json + adapter_model.safetensors)
    pairs, r, alpha, meta = lora.read_lora(f"{d}/teachers/ocr.safetensors")
    peft = os.path.join(d, "peft_ocr")
    os.makedirs(peft, exist_ok=True)
    from safetensors.torch import save_file
    save_file({f"base_model.model.{m}.lora_{ab}.weight": t.contiguous() for m, (A, B) in pairs.items()
               for ab, t in (("A", A), ("B", B))}, os.path.join(peft, "adapter_model.safetensors"))
    json.dump({"r": r, "lora_alpha": alpha, "target_modules": list(lora.LORA_TARGETS), "peft_type": "LORA"},
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
        "3", "--resolution", "64", "--prompt_file", *files, "--out", f"{d}/eval")
    table = json.load(open(f"{d}/eval/table.json"))
    assert len(table["scores"]["student"]["ocr"]) == 2 and len(table["scores"]["full"]["ocr"]) == 2


def _rendered(task, n, seed):
    prompts, rng = _cases(task, n, seed), random.Random(seed)
    return torch.stack([mw.render(p["prompt"], rng, defects=True) for p in prompts]), prompts


def _png_roundtrip(images):
    return (images * 255).round() / 255


def test_reward_server_protocol_and_failures():
    import http.server
    import threading
    imgs, prompts = _rendered("geneval", 12, seed=3)
    server = rewards.make_server("geneval")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    got = rewards.remote("geneval", url, timeout=30)(imgs, prompts)
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
    cases = [("down", url, "is down or too slow"), ("slow", Slow, "is down or too slow"), ("garbage", Garbage, "answered garbage")]
    for what, target, needle in cases:
        if not isinstance(target, str):
            srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), target)
            threading.Thread(target=srv.serve_forever, daemon=True).start()
            target = f"http://127.0.0.1:{srv.server_port}"
        t0 = time.time()
        try:
            rewards.remote("geneval", target, timeout=0.3, retries=2, backoff=0.05)(imgs[:2], prompts[:2])
            raise AssertionError(f"{what} server accepted")
        except runs.BadInput as e:
            msg = str(e)
        assert needle in msg and "\n" not in msg, msg
        print(f"    {what}: {time.time() - t0:.2f}s -> {msg[:110]}")


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
            got = rewards.ocr_engine("paddleocr")(imgs, prompts)
            assert kw in seen["kw"] and seen["shape"] == (16, 16, 3), (version, seen)
            close(got[[0, 2]], torch.tensor([want[0], want[2]]), 1e-6, f"paddleocr {version}")
            assert got[1].isnan()
        sys.modules["paddleocr"] = None  # what an absent package looks like to import
        try:
            rewards.ocr_engine("paddleocr")
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
    ours = rewards.clip_pickscore(path)(imgs, prompts)
    from PIL import Image
    pil = [Image.fromarray((i * 255).round().byte().permute(1, 2, 0).numpy()) for i in imgs]
    with torch.no_grad():
        x = proc(images=pil, text=[p["prompt"] for p in prompts], padding=True, return_tensors="pt")
        ref = model(**x).logits_per_image.diag()  # CLIP's own forward: logit_scale * cos
    close(ours, ref, 1e-4, "PickScore = CLIP logits")


# ----------------------------------------------------------------------------------------------- Stage 1 and merge
def base_ckpt():
    path = os.path.join(TMP, "base.safetensors")
    if not os.path.exists(path):
        fm.save_model(tiny_model(), path)
    return path


TINY_RUN = ["--sample_steps", "4", "--prompts", "2", "--group", "4", "--log_every", "1", "--rank", "2", "--alpha", "4"]


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
    pa, ra, _, ma = lora.read_lora(os.path.join(TMP, "g1.safetensors"))
    pb, _, _, _ = lora.read_lora(os.path.join(TMP, "g2.safetensors"))
    assert ma["role"] == "teacher" and ma["tasks"] == ["pickscore"] and ma["base_hash"] == fm.fingerprint(fm.load_model(base))
    assert max((pa[k][1] - pb[k][1]).abs().max().item() for k in pa) < 1e-5, "the same LoRA after one update"


def test_group_advantages_and_clipped_surrogate():
    import grpo_teacher as grpo
    R = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    adv = grpo.group_advantages(R, 3)
    sd = math.sqrt(2 / 3)
    close(adv, torch.tensor([-1 / (sd + 1e-4), 0, 1 / (sd + 1e-4), 0, 0, 0]), 1e-6, "group advantages")
    lp, old = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])), torch.zeros(4)
    loss, ratio = grpo.clipped_surrogate(lp, old, torch.tensor([1.0, 1.0, -1.0, -1.0]), 0.2)
    close(loss, torch.tensor([-1.2, -0.5, 1.5, 0.8]), 1e-6, "Eq. 11 pessimistic clip")


def _random_teacher(path, seed, rank, alpha, base_hash, modules=None):
    g = torch.Generator().manual_seed(seed)
    model = tiny_model()
    pairs = {}
    for m in modules or ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_add_out"]:
        lin = model.transformer.get_submodule(m)
        pairs[m] = (torch.randn(rank, lin.in_features, generator=g) * 0.1, torch.randn(lin.out_features, rank, generator=g) * 0.1)
    lora.write_lora(path, pairs, rank, alpha, {"role": "teacher", "tasks": [f"t{seed}"], "base_hash": base_hash})
    return pairs


def test_merge_is_exact_sum_of_deltas():
    import merge
    paths = [os.path.join(TMP, f"m{k}.safetensors") for k in range(3)]
    specs = [(2, 4.0), (3, 3.0), (4, 16.0)]
    teachers = [_random_teacher(p, k, r, a, "h0", None if k else ["transformer_blocks.0.attn.to_q"])
                for k, (p, (r, a)) in enumerate(zip(paths, specs))]
    w = [0.5, 0.3, 0.2]
    pairs, rank, meta = merge.merge_files(paths, w)
    assert rank == 9 and [m["weight"] for m in meta["merged_from"]] == w
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
    _, err = cli("merge.py", a, b, "--out", out, expect=2)
    assert len(err.strip().splitlines()) == 1 and "different base" in err and not os.path.exists(out)


# ----------------------------------------------------------------------------------------------- Stage 2
def test_eq9_dense_reward_is_the_gaussian_kl():
    import opd_student as opd
    torch.manual_seed(0)
    sig = sampler.sigma_schedule(10)
    x, v, v_star = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    for t in (0, 4, 8):
        mu, std = sampler.gaussian_step(x, v, sig, t, 0.7)
        mu_star, _ = sampler.gaussian_step(x, v_star, sig, t, 0.7)
        kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu.double(), std),
                                               torch.distributions.Normal(mu_star.double(), std)).flatten(1).sum(1)
        r = opd.dense_reward(v, v_star, sig, t, 0.7)
        close(r / kl, -torch.ones(3), 1e-4, f"Eq. 10 = -KL at t={t}")
        close(sampler.kl_per_dim(mu, mu_star, std) * mu[0].numel(), kl, 1e-3 * kl.max().item(), "kl_per_dim x D")


def test_policy_gradient_of_the_dense_reward():
    """The sampled log-ratio's policy gradient is -grad KL, and `analytic` is that expectation in closed form;
    Eq. 10's state reward (A_t = r_t) gives zero."""
    import grpo_teacher as grpo
    torch.manual_seed(0)
    D, M, std = 4, 200000, 0.5
    theta = torch.tensor([0.3, -0.2, 0.5, 0.0], requires_grad=True)  # the student's mean
    mu_star = torch.tensor([0.0, 0.4, 0.1, -0.3])                     # the teacher's mean
    x = (theta.detach() + std * torch.randn(M, D))                     # on-policy actions
    old = sampler.log_prob(x, theta.detach().expand(M, D), std)
    lp = sampler.log_prob(x, theta.expand(M, D), std)
    kl = ((theta.detach() - mu_star) ** 2).sum() / (2 * std ** 2)
    grads = {}
    for name, adv in [("logratio", D * (sampler.log_prob(x, mu_star.expand(M, D), std) - old)),
                      ("paper", -kl.expand(M))]:
        loss, _ = grpo.clipped_surrogate(lp, old, adv, 1e-4)
        grads[name] = torch.autograd.grad(loss.mean(), theta, retain_graph=True)[0]
    true = (theta.detach() - mu_star) / (std ** 2 * D)  # grad of KL per dimension
    print(f"    mean sampled log-ratio {float((D * (sampler.log_prob(x, mu_star.expand(M, D), std) - old)).mean()):.4f} "
          f"vs -KL {-float(kl):.4f}; grad logratio {grads['logratio'].tolist()} vs {true.tolist()}; paper {grads['paper'].tolist()}")
    close(grads["logratio"], true, 0.03, "logratio gradient = grad KL")
    assert grads["paper"].abs().max() < 0.01, "A_t = r_t(x_t) carries no gradient for the step's own action"
    analytic = torch.autograd.grad(sampler.kl_per_dim(theta[None], mu_star[None], std).sum(), theta)[0]
    close(analytic, true, 1e-6, "analytic = closed-form grad KL")
    # and why it exists: one sample's log-ratio gradient is mostly noise (its spread exceeds the signal, here in 4
    # dimensions; it grows with D)
    per_sample = (D * (sampler.log_prob(x, mu_star.expand(M, D), std) - old))[:, None] * (x - theta.detach()) / (std ** 2 * D)
    assert per_sample.std(0).min() > true.abs().max(), (per_sample.std(0), true)


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
    sig = sampler.sigma_schedule(10)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mu_a = mar.anchor_mean(model, "anchor", x, sig, 3, enc, 1.0, 0.7)

    def loss():
        lora.set_adapter(model.transformer, "student")
        mu, std = sampler.gaussian_step(x, fm.velocity(model, x, float(sig[3]), enc), sig, 3, 0.7)
        return mar.mar_loss(mu, mu_a, std, beta=0.04)

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
    meta = lora.read_lora(out1)[3]
    assert meta["role"] == "student" and [t["task"] for t in meta["teachers"]] == ["geneval", "ocr"]
    # routing errors: a label no teacher covers, two teachers for one label
    _, err = cli("opd_student.py", *common, "--tasks", "geneval", "pickscore", "--out", os.path.join(TMP, "x.safetensors"), expect=2)
    assert "'pickscore' has no teacher" in err and len(err.strip().splitlines()) == 1
    _, err = cli("opd_student.py", "--model", base, "--teachers", f"ocr={paths['geneval']}", paths["ocr"],
                 "--out", os.path.join(TMP, "x.safetensors"), expect=2)
    assert "two teachers claim task 'ocr'" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(os.path.join(TMP, "x.safetensors"))


def test_opd_full_student_fsdp():
    """--full: the merge cold start folded into dense weights equals the merged LoRA; two steps under 2-process
    torchrun with FSDP give the same student as one process; one step then --resume gives the two-step student
    bitwise, on one process and from FSDP shards."""
    import opd_student as opd
    import merge
    base, paths = _opd_setup()
    model = fm.load_model(base)
    copy_ = __import__("copy").deepcopy(model.transformer)
    pairs, r, _ = merge.merge_files([paths["geneval"], paths["ocr"]])
    lora.add_lora_pairs(model.transformer, "student", pairs, r, float(r))
    lora.set_adapter(model.transformer, "student")
    student = opd.full_student(model, copy_, pairs, world=1)
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
    close(a[0]["grad_norm"], b[0]["grad_norm"], 1e-5 * a[0]["grad_norm"], "first update's grad norm, 1 vs 2 processes")
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
    for launcher, ref in (([sys.executable], outs[0]), (torchrun, outs[1])):
        cut = ref.replace(".safetensors", "_cut.safetensors")
        for extra in (["--steps", "1"], ["--steps", "2", "--resume"]):
            p = subprocess.run([*launcher, "opd_student.py", *without_steps, *extra, "--out", cut,
                                "--log_file", cut + ".jsonl"], cwd=HERE, capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, p.stderr[-2000:]
        assert "resumed" in p.stdout
        a, b = fm.load_model(ref).transformer.state_dict(), fm.load_model(cut).transformer.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{len(launcher)} launcher: resumed student differs"
    print("    --full: 1 step + --resume equals 2 steps bitwise, on 1 process and under 2-process FSDP")


def safe_meta(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return f.metadata()


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


def test_eval_cli_lora_row_equals_base_when_delta_is_zero():
    base = base_ckpt()
    model = fm.load_model(base)
    lora.add_lora(model.transformer, "t", 2, 4)  # B = 0: a zero delta
    path = os.path.join(TMP, "zero.safetensors")
    lora.save_lora(path, model.transformer, "t", {"role": "teacher", "tasks": ["ocr"], "base_path": base,
                                                "base_hash": fm.fingerprint(model)})
    out = os.path.join(TMP, "eval_out")
    cli("eval.py", f"Base={base}", f"Zero LoRA={path}", "--n", "4", "--steps", "3", "--out", out)
    table = json.load(open(os.path.join(out, "table.json")))
    assert list(table["rows"]) == ["Base", "Zero LoRA"] and table["scores"]["Base"] == table["scores"]["Zero LoRA"]
    assert os.path.exists(os.path.join(out, "compare.png")) and os.path.exists(os.path.join(out, "Zero_LoRA.png"))
    assert "| Zero LoRA |" in open(os.path.join(out, "table.md")).read()


# ----------------------------------------------------------------------------------------------- runs survive
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


def _sigkill_resume(launcher, tag):
    base = base_ckpt()
    run = ["grpo_teacher.py", "--model", base, "--reward", "pickscore", "--steps", "6", "--save_every", "1", *TINY_RUN]
    ref, cut = os.path.join(TMP, f"{tag}_ref.safetensors"), os.path.join(TMP, f"{tag}_cut.safetensors")
    subprocess.run([*launcher, *run, "--out", ref, "--log_file", ref + ".jsonl"], cwd=HERE, check=True, capture_output=True)
    rc = _sigkill_after([*launcher, *run, "--out", cut, "--log_file", cut + ".jsonl"], runs.state_dir(cut), 3)
    killed_at = lora.read_lora(cut)[3]["step"]  # what a crash leaves: a complete adapter of some earlier step
    assert rc != 0 and 3 <= killed_at < 6, (rc, killed_at)
    p = subprocess.run([*launcher, *run, "--out", cut, "--log_file", cut + ".jsonl", "--resume"], cwd=HERE,
                       capture_output=True, text=True)
    assert p.returncode == 0 and "resumed" in p.stdout + p.stderr, p.stderr[-2000:]
    _same_lora(ref, cut)
    steps = [r["step"] for r in read_log(cut + ".jsonl")]
    print(f"    {tag}: killed after step {killed_at}, resumed, final adapter equal bitwise; log steps {steps}")
    assert steps[-1] == 6


def test_sigkill_then_resume_is_bitwise_one_process():
    _sigkill_resume([sys.executable], "kill1")


def test_sigkill_then_resume_is_bitwise_torchrun_two_processes():
    _sigkill_resume([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], "kill2")


def test_pretraining_sigkill_then_resume_is_bitwise():
    run = ["flow_matching.py", "--steps", "8", "--batch", "4", "--save_every", "1"]
    ref, cut = os.path.join(TMP, "pre_ref.safetensors"), os.path.join(TMP, "pre_cut.safetensors")
    cli(*run, "--out", ref)
    rc = _sigkill_after([sys.executable, *run, "--out", cut], runs.state_dir(cut), 3)
    assert rc != 0 and not os.path.exists(cut)
    cli(*run, "--out", cut, "--resume")
    a, b = fm.load_model(ref), fm.load_model(cut)
    sa, sb = a.transformer.state_dict(), b.transformer.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and all(
        torch.equal(x, y) for x, y in zip(a.text_encoder.parameters(), b.text_encoder.parameters()))


def test_sigterm_saves_exits_0_and_opd_resume_checks_the_teacher_set():
    base, paths = _opd_setup()
    run = ["opd_student.py", "--model", base, "--teachers", paths["geneval"], paths["ocr"], "--anchor", paths["deqa"],
           "--steps", "8", "--save_every", "100", *TINY_RUN]
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
    stopped = lora.read_lora(cut)[3]["step"]
    assert 1 <= stopped < 8, stopped
    # resuming with a teacher of other content under the same path is refused, and nothing is written
    swapped = os.path.join(TMP, "teachers_swapped")
    os.makedirs(swapped, exist_ok=True)
    shutil.copy(paths["ocr"], os.path.join(swapped, "geneval.safetensors"))
    before = open(cut, "rb").read()
    _, err = cli(*[a if a != paths["geneval"] else "geneval=" + os.path.join(swapped, "geneval.safetensors") for a in run],
                 "--out", cut, "--log_file", cut + ".jsonl", "--resume", expect=2)
    assert "another teacher set" in err and "geneval:" in err and len(err.strip().splitlines()) == 1, err
    assert open(cut, "rb").read() == before
    cli(*run, "--out", cut, "--log_file", cut + ".jsonl", "--resume")
    _same_lora(ref, cut)
    print(f"    SIGTERM after step {stopped}: exit 0; resumed to step 8, equal bitwise to the uninterrupted run")


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
    assert lora.read_lora(out)[3]["step"] == 5
    _same_lora(ref, out)
    assert all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in lora.read_lora(out)[0].values())
    print("    skipped steps 2, 4, 5; stopped at step 6; the checkpoint holds step 3's weights, bitwise")


# ----------------------------------------------------------------------------------------------- bad input
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
    open(os.path.join(d, "empty.jsonl"), "w").close()
    open(os.path.join(d, "bad.jsonl"), "w").write('{"prompt": "a circle", "task": "geneval"}\nnot json\n')
    model = fm.load_model(base)
    h = fm.fingerprint(model)
    lora.add_lora(model.transformer, "t", 2, 4)
    pairs = {m: (torch.zeros(2, 64), torch.zeros(l.base.out_features, 2)) for m, l in lora.lora_layers(model.transformer).items()}
    lora.write_lora(os.path.join(d, "narrow.safetensors"), pairs, 2, 4.0, {"role": "teacher", "tasks": ["ocr"],
                                                                          "base_hash": h, "base_path": base})
    _random_teacher(os.path.join(d, "foreign.safetensors"), 3, 2, 4.0, "0123456789abcdef")
    cli("grpo_teacher.py", "--model", base, "--reward", "pickscore", "--steps", "1", *TINY_RUN,
        "--out", os.path.join(d, "run", "t.safetensors"), "--log_file", os.path.join(TMP, "t.jsonl"))
    return d


def _files(d):
    return {os.path.join(r, f): open(os.path.join(r, f), "rb").read() for r, _, fs in os.walk(d) for f in fs}


CATALOGUE = [  # name, the command ({I}: the inputs folder), what the one line must say; run in an empty folder
    ("missing_checkpoint", ["grpo_teacher.py"], "ckpts/base.safetensors does not exist"),
    ("truncated_checkpoint", ["eval.py", "{I}/truncated.safetensors"], "not a readable safetensors"),
    ("lora_given_as_base", ["grpo_teacher.py", "--model", "{I}/ocr.safetensors"], "not a flow-opd base model"),
    ("lora_of_another_architecture", ["eval.py", "{I}/narrow.safetensors"], "the model wants"),
    ("teacher_of_another_base", ["opd_student.py", "--model", "{I}/base.safetensors", "--teachers",
                                 "geneval={I}/foreign.safetensors"], "trained on another base"),
    ("unknown_reward", ["grpo_teacher.py", "--model", "{I}/base.safetensors", "--reward", "aesthetic"], "unknown reward"),
    ("bad_reward_weight", ["grpo_teacher.py", "--model", "{I}/base.safetensors", "--reward", "geneval:0.5,ocr:x"],
     "not a number"),
    ("negative_reward_weight", ["grpo_teacher.py", "--reward", "ocr:-1"], "positive"),
    ("empty_prompt_file", ["grpo_teacher.py", "--model", "{I}/base.safetensors", "--prompt_file", "{I}/empty.jsonl"],
     "is empty"),
    ("malformed_prompt_file", ["grpo_teacher.py", "--model", "{I}/base.safetensors", "--prompt_file", "{I}/bad.jsonl"],
     "bad.jsonl:2:"),
    ("label_without_teacher", ["opd_student.py", "--model", "{I}/base.safetensors", "--teachers", "{I}/geneval.safetensors",
                               "--tasks", "geneval", "ocr"], "'ocr' has no teacher"),
    ("two_teachers_one_label", ["opd_student.py", "--model", "{I}/base.safetensors", "--teachers",
                                "ocr={I}/geneval.safetensors", "{I}/ocr.safetensors"], "two teachers claim task 'ocr'"),
    ("no_teacher_at_all", ["opd_student.py", "--teachers", "{I}/base.safetensors"], "no teachers among"),
    ("only_the_anchor_teacher", ["opd_student.py", "--model", "{I}/base.safetensors", "--teachers",
                                 "deqa={I}/ocr.safetensors"], "no task to distil"),
    ("full_resume_without_checkpoint", ["opd_student.py", "--model", "{I}/base.safetensors", "--teachers",
                                        "{I}/geneval.safetensors", "--full", "--resume"], "--resume: no checkpoint"),
    ("missing_anchor", ["opd_student.py", "--model", "{I}/base.safetensors", "--teachers", "{I}/geneval.safetensors",
                        "--anchor", "{I}/nope.safetensors"], "anchor"),
    ("zero_group", ["grpo_teacher.py", "--group", "0"], "--group must be >= 1"),
    ("negative_steps", ["flow_matching.py", "--steps", "-3"], "--steps"),
    ("zero_eval_prompts", ["eval.py", "{I}/base.safetensors", "--n", "0"], "--n"),
    ("negative_guidance", ["eval.py", "{I}/base.safetensors", "--guidance", "-1"], "--guidance must be >= 0"),
    ("noise_level_out_of_range", ["sde_sampler.py", "--model", "{I}/base.safetensors", "--noise_level", "5"], "[0, 2]"),
    ("training_without_noise", ["grpo_teacher.py", "--noise_level", "0"], "exploration"),
    ("sde_window_outside_the_steps", ["grpo_teacher.py", "--sde_window", "5", "20"], "--sde_window 5 20"),
    ("unknown_word", ["sde_sampler.py", "--model", "{I}/base.safetensors", "--prompt", "a flying unicorn"], "no word 'flying'"),
    ("out_not_writable", ["flow_matching.py", "--out", "/proc/nope/base.safetensors"], "choose another --out"),
    ("resume_with_another_lora_rank", ["grpo_teacher.py", "--model", "{I}/base.safetensors", "--reward", "pickscore",
                                       *TINY_RUN[:-4], "--rank", "4", "--alpha", "4", "--resume", "--out",
                                       "{I}/run/t.safetensors"], "--rank was 2, now 4"),
    ("resume_without_checkpoint", ["grpo_teacher.py", "--model", "{I}/base.safetensors", "--resume"], "no checkpoint"),
    ("merge_of_different_bases", ["merge.py", "{I}/ocr.safetensors", "{I}/foreign.safetensors", "--out", "m.safetensors"],
     "base"),
]


_BAD = {}  # the catalogue's one-process cases, all started at the first one's test, two at a time (they mostly import)


def _run_bad(args, torchrun=False):
    inputs = _inputs()
    cwd = tempfile.mkdtemp(dir=TMP)
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [])]
    cmd += [os.path.join(HERE, args[0]), *[a.replace("{I}", inputs) for a in args[1:]]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if not torchrun else None
    return cwd, subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def _bad_input_test(args, needle, torchrun=False):
    def test():
        inputs = _inputs()
        if not _BAD:
            from concurrent.futures import ThreadPoolExecutor
            _BAD["before"] = _files(inputs)
            with ThreadPoolExecutor(2) as pool:
                _BAD.update({tuple(a): pool.submit(_run_bad, a) for _, a, _ in CATALOGUE})
        before = _BAD["before"]
        cwd, p = _run_bad(args, True) if torchrun else _BAD[tuple(args)].result()
        ours = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
        if torchrun:  # torchrun adds its own report of the failed workers; ours is one line, said once
            assert p.returncode != 0 and len(ours) == 1 and needle in ours[0], p.stderr[-1500:]
        else:
            lines = p.stderr.strip().splitlines()
            assert p.returncode == 2 and len(lines) == 1 and lines == ours and needle in lines[0], \
                f"exit {p.returncode}: {p.stderr[-1500:]}"
        assert os.listdir(cwd) == [], f"wrote {os.listdir(cwd)}"
        assert _files(inputs) == before
        print(f"    {(ours or [''])[0][:150]}")
    return test


for _name, _args, _needle in CATALOGUE:
    globals()[f"test_bad_input_{_name}"] = _bad_input_test(_args, _needle)
globals()["test_bad_input_world_size_does_not_divide_the_batch"] = _bad_input_test(
    ["grpo_teacher.py", "--model", "{I}/base.safetensors", "--prompts", "1", "--group", "1"], "does not divide", True)
globals()["test_bad_input_resume_with_another_world_size"] = _bad_input_test(
    ["grpo_teacher.py", "--model", "{I}/base.safetensors", "--reward", "pickscore", *TINY_RUN, "--resume", "--out",
     "{I}/run/t.safetensors"], "--nproc_per_node=1", True)


# ----------------------------------------------------------------------------------------------- runner
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
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
