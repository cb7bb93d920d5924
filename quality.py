"""Table 4's analogue: quality metrics that no reward optimises, where reward hacking shows (the paper's
ImageReward, Aesthetic, HPS-v2.1: a policy that games its own reward loses on them).

  aesthetic  [LAION aesthetic]         prompt-free: nearness to the nearest clean picture the world draws for any
                                       prompt. Haze, noise, garish backgrounds and clutter move a picture away.
  agreement  [ImageReward, HPS-v2.1]   prompt and picture: nearness to the nearest of 16 clean pictures of its own
                                       prompt, the same measure for all four tasks (shapes, text, scenes).
  diversity  [Fig. 5: mode collapse]   one prompt under different noise: the mean distance between its pictures.

A distance is the mean absolute difference of two pictures at 16x16 (2x2 averages: the scale of the shapes' blocks),
so nearness = 1 - distance lies in [0, 1]. The rewards score what a picture shows (detected objects, read digits,
noise and edges, colour statistics); these compare whole pictures with the renderer's clean ones, which no stage
trains toward (pretraining's data is the defective render). What they leave out: the renderer's style is the only
good one (a picture that is right and pleasing in another way scores low), and nearness at 16x16 misses single
pixels (a digit's thin stroke weighs little).
"""
import functools
import random

import torch
import torch.nn.functional as F

import miniworld as mw

METRICS = ("aesthetic", "agreement", "diversity")


def features(images):
    """(B, 3, H, W) in [0, 1] -> (B, 3 * 16 * 16): 2x2 averages of a 32x32 picture."""
    return F.adaptive_avg_pool2d(images.float(), 16).flatten(1)


def distances(a, b):
    """Mean absolute difference between every picture of a (A, D) and of b (B, D): (A, B)."""
    return torch.cdist(a, b, p=1) / a.shape[1]


@functools.lru_cache(maxsize=None)
def references(prompt, k=16):
    """k clean pictures of one prompt (their own seeded noise: backgrounds, horizons, the sun), as features (k, D)."""
    rng = random.Random(f"reference-{prompt}")
    return features(torch.stack([mw.render(prompt, rng) for _ in range(k)]))


@functools.lru_cache(maxsize=None)
def bank(per_prompt=2):
    """Clean pictures of every prompt of the grammar (the scene tasks share one), as features (N, D)."""
    rng = random.Random("aesthetic-bank")
    prompts = [p for task in ("geneval", "ocr", "pickscore") for p in mw.all_prompts(task)]
    return features(torch.stack([mw.render(p, rng) for p in prompts for _ in range(per_prompt)]))


def aesthetic(images):
    """(B,) nearness to the nearest clean picture of any prompt."""
    return 1 - distances(features(images), bank()).min(1).values


def agreement(images, prompts):
    """(B,) nearness to the nearest of 16 clean pictures of each picture's own prompt."""
    f = features(images)
    return torch.stack([1 - distances(f[i:i + 1], references(p["prompt"] if isinstance(p, dict) else p)).min()
                        for i, p in enumerate(prompts)])


def diversity(images):
    """(P, K, 3, H, W): K pictures of each of P prompts -> (P,) their mean pairwise distance."""
    P, K = images.shape[:2]
    d = distances(features(images.flatten(0, 1)), features(images.flatten(0, 1))).view(P, K, P, K)
    within = torch.stack([d[i, :, i, :] for i in range(P)])  # (P, K, K)
    return within.sum((1, 2)) / (K * (K - 1))
