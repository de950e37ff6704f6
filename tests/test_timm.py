"""timm VisionTransformer: the fused qkv as a flow-graph view, permuted copies, self-fusion,
save/load, and clear errors when families or depths are mixed."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from tfuse.arch import check_same_architecture, timm_vit
from tfuse.errors import TfuseError
from tfuse.fusion.engine import check_graph, parameters
from tfuse.fusion.methods.ot import OTSettings, ot_fuse
from tfuse.symmetry import permuted_copy
from conftest import batches_of, tiny_vit

identity = lambda batch: batch  # noqa: E731


def tiny_timm(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0)
    args.update(kw)
    model = timm_vit.create("vit_tiny_patch16_224", args).eval()
    with torch.no_grad():  # LayerScale starts near zero: make it matter
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def out(model, x):
    with torch.no_grad():
        return model.eval()(x)


VARIANTS = {
    "token": {},
    "layerscale_registers": {"init_values": 1e-5, "reg_tokens": 2},
    "avg_no_class_token": {"class_token": False, "global_pool": "avg"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_permuted_copy_and_hard_fusion_give_back_the_model(variant, images):
    model = tiny_timm(**VARIANTS[variant])
    graph = timm_vit.graph(model)
    check_graph(model, graph, "timm")
    assert "blocks.0.attn.q.weight" in parameters(model, graph) and "blocks.0.attn.qkv.weight" not in parameters(model, graph)
    copy = permuted_copy(model, graph, seed=4)
    assert not torch.equal(copy.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(out(copy, images), out(model, images), atol=1e-5, rtol=1e-5)
    settings = OTSettings(solver="emd", residual="global", qk="head_aware", tokens="window", window=1)
    fused = ot_fuse([copy, model], graph, settings, 1, batches_of(images, 16), identity).model
    torch.testing.assert_close(out(fused, images), out(model, images), atol=1e-5, rtol=1e-5)
    for name, w in model.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], w, atol=1e-6, rtol=1e-5, msg=name)


def test_three_permuted_copies_with_mean_residual_and_separate_qk(images):
    model = tiny_timm(init_values=1e-5)
    graph = timm_vit.graph(model)
    parents = [permuted_copy(model, graph, seed=s) for s in (1, 2)] + [model]
    settings = OTSettings(solver="emd", residual="mean", qk="separate", tokens="all", iterations=2)
    fused = ot_fuse(parents, graph, settings, 2, batches_of(images, 16), identity).model
    torch.testing.assert_close(out(fused, images), out(model, images), atol=1e-5, rtol=1e-5)


def test_self_fusion(images):
    model = tiny_timm()
    graph = timm_vit.graph(model)
    hard = ot_fuse([model, model], graph, OTSettings(solver="emd", tokens="all"), 0, batches_of(images, 16), identity).model
    torch.testing.assert_close(out(hard, images), out(model, images), atol=1e-6, rtol=1e-6)
    soft = OTSettings(solver="sinkhorn", reg=0.01, residual="global", qk="head_aware", tokens="all")
    fused = ot_fuse([model, model], graph, soft, 0, batches_of(images, 16), identity).model
    assert (out(fused, images) - out(model, images)).abs().max() < 1e-3


def test_weight_cost_through_the_view(images):
    model = tiny_timm()
    graph = timm_vit.graph(model)
    copy = permuted_copy(model, graph, seed=9)
    settings = OTSettings(solver="emd", cost="weights", residual="global", qk="head_aware")
    fused = ot_fuse([copy, model], graph, settings, 1, None, identity).model
    torch.testing.assert_close(out(fused, images), out(model, images), atol=1e-5, rtol=1e-5)


def test_saved_model_loads_with_timm_alone(tmp_path, images):
    model = tiny_timm(init_values=1e-5, reg_tokens=1)
    timm_vit.save(model, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    plain = timm.create_model(config["architecture"], pretrained=False, **config["kwargs"])
    plain.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    torch.testing.assert_close(out(plain, images), out(model, images))
    torch.testing.assert_close(out(timm_vit.load(str(tmp_path)), images), out(model, images))


def test_mixing_families_or_depths_is_a_clear_error(images):
    with pytest.raises(TfuseError, match="different architectures"):
        check_same_architecture([tiny_timm(), tiny_vit()], allow_widths=True)
    with pytest.raises(TfuseError, match="different depths"):
        check_same_architecture([tiny_timm(depth=2), tiny_timm(depth=3)], allow_widths=True)
    model = tiny_timm()
    with pytest.raises(TfuseError, match="flow graph does not describe"):
        ot_fuse([model, tiny_vit()], timm_vit.graph(model), OTSettings(tokens="all"), 0, batches_of(images, 16), identity)
