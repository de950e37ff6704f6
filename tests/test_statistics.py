"""Q, K and V cross-products derived from their shared input equal the ones summed directly."""
import dataclasses

import pytest
import torch

from tfuse.arch import hf_bert, hf_vit, timm_vit
from tfuse.fusion.plan import make_plan
from tfuse.fusion.methods.ot import OTSettings
from tfuse.fusion.statistics import collect_statistics, derived_blocks
from conftest import batches_of, tiny_vit
from test_bert_fusion import batches_of as text_batches_of, inputs_only, text_batches, tiny_bert

identity = lambda batch: batch  # noqa: E731


def tiny_timm(seed, qkv_bias):
    torch.manual_seed(seed)
    args = dict(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=4,
                mlp_ratio=2.0, qkv_bias=qkv_bias, reg_tokens=1)
    return timm_vit.create("vit_tiny_patch16_224", args).eval()


def vit_case(images):
    return tiny_vit(0), tiny_vit(1), hf_vit.graph, batches_of(images, 16), identity


def hetero_case(images):  # wider parent: rectangular source and derived cross-products
    return tiny_vit(0, hidden=64, mlp=128), tiny_vit(1), hf_vit.graph, batches_of(images, 16), identity


def timm_case(images, qkv_bias):  # fused qkv: weights are views, biases may be absent
    return tiny_timm(0, qkv_bias), tiny_timm(1, qkv_bias), timm_vit.graph, lambda: ({"x": x} for x in images.split(16)), identity


def bert_case(_):  # ragged padding never counts, for the source either
    return tiny_bert("mlm", 0), tiny_bert("mlm", 1), hf_bert.graph, text_batches_of(text_batches(pad_from=5), 8), inputs_only


CASES = {
    "vit": vit_case,
    "vit_hetero": hetero_case,
    "timm_bias": lambda x: timm_case(x, True),
    "timm_no_bias": lambda x: timm_case(x, False),
    "bert": bert_case,
}


def with_random_biases(model):
    """Fresh models start with zero biases: make every bias (and LayerNorm shift) matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p))
    return model


def without_links(graph):
    """The same graph with no ``Linear`` probes: every cross-product is summed directly."""
    probes = {name: dataclasses.replace(p, linear=None) for name, p in graph.probes.items()}
    return dataclasses.replace(graph, probes=probes)


@pytest.mark.parametrize("qk", ["separate", "joint", "eq_t_map", "head_aware"])
@pytest.mark.parametrize("case", list(CASES))
def test_derived_cross_products_equal_direct_ones(case, qk, images):
    model, reference, graph_of, batches, inputs = CASES[case](images)
    model, reference = with_random_biases(model), with_random_biases(reference)
    graph = graph_of(reference)
    settings = OTSettings(tokens="random", token_count=3, qk=qk, center=True, standardize=True)
    plan = make_plan(graph, settings)
    derived = derived_blocks(graph, plan.segments)
    assert len(derived) >= 2 * len({space.split(".attn")[0] for space, _ in derived})  # Q, K, V of each layer
    fast = collect_statistics([model], reference, graph, plan, batches(), inputs, settings).pairs[0]
    slow = collect_statistics([model], reference, without_links(graph), plan, batches(), inputs, settings).pairs[0]
    assert derived_blocks(without_links(graph), plan.segments) == {}
    for space, _ in derived:
        scale = slow[space].cross.abs().max()
        torch.testing.assert_close(fast[space].cross / scale, slow[space].cross / scale, rtol=0, atol=2e-6, msg=space)
        torch.testing.assert_close(fast[space].a.sum, slow[space].a.sum)
        torch.testing.assert_close(fast[space].a.sumsq, slow[space].a.sumsq)
