"""The conformance zoo: today's vision classifiers, shrunk so that brute-force autograd in float64
stays cheap (small inputs, fewer blocks and widths where the constructor allows).

Each entry: builder() -> nn.Module with C = 3 logits on 3×32×32 inputs, and the paths some of its
parameters must take (name → path of :attr:`dntk.FeatureResult.paths`).
"""

from __future__ import annotations

from functools import partial

import torchvision

ZOO: dict = {}


def entry(name, expect=None, needs_timm=False):
    def deco(fn):
        ZOO[name] = (fn, expect or {}, needs_timm)
        return fn
    return deco


@entry("resnet18", {"conv1.weight": "factored", "bn1.weight": "closed", "fc.weight": "factored", "fc.bias": "closed"})
def resnet18():
    return torchvision.models.resnet18(num_classes=3)


@entry("mobilenet_v3_small", {"features.1.block.0.0.weight": "closed"})  # depthwise 3×3
def mobilenet_v3_small():
    return torchvision.models.mobilenet_v3_small(num_classes=3, width_mult=0.25)


@entry("efficientnet_b0", {"features.1.0.block.0.0.weight": "closed"})
def efficientnet_b0():
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    setting, last = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return EfficientNet(setting, 0.2, last_channel=last, num_classes=3)


@entry("convnext_tiny", {"features.1.0.layer_scale": "op-vjp", "features.1.0.block.0.weight": "closed",
                         "features.1.0.block.3.weight": "factored"})
def convnext_tiny():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], stochastic_depth_prob=0.1,
                    layer_scale=0.5, num_classes=3)


@entry("regnet_y_400mf", {"trunk_output.block1.block1-0.f.b.0.weight": "closed"})  # grouped 3×3
def regnet_y_400mf():
    from torchvision.models.regnet import BlockParams, RegNet

    return RegNet(BlockParams.from_init_params(depth=3, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25),
                  num_classes=3)


@entry("vit_b_16", {"class_token": "op-vjp", "encoder.pos_embedding": "op-vjp", "conv_proj.weight": "factored",
                    "encoder.layers.encoder_layer_0.self_attention.in_proj_weight": "factored",
                    "encoder.layers.encoder_layer_0.mlp.0.weight": "factored"})
def vit_b_16():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=3)


@entry("swin_t", {"features.1.0.attn.relative_position_bias_table": "op-vjp",
                  "features.1.0.attn.qkv.weight": "factored", "features.1.0.attn.proj.weight": "factored"})
def swin_t():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2],
                           stochastic_depth_prob=0.1, num_classes=3)


@entry("timm_resnetv2_stdconv", {"stem.conv.weight": "closed", "stages.0.blocks.0.conv1.weight": "closed"},
       needs_timm=True)
def timm_resnetv2():
    from timm.layers import GroupNormAct
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(layers=[1, 1], channels=(32, 64), num_classes=3, stem_chs=32,
                    norm_layer=partial(GroupNormAct, num_groups=8))


@entry("timm_vit_layerscale", {"cls_token": "op-vjp", "pos_embed": "op-vjp", "blocks.0.ls1.gamma": "op-vjp",
                               "blocks.0.attn.qkv.weight": "factored"}, needs_timm=True)
def timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, init_values=0.5,
                             num_classes=3)


@entry("timm_deit_distilled", {"cls_token": "op-vjp", "dist_token": "op-vjp", "head_dist.weight": "factored"},
       needs_timm=True)
def timm_deit():
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)


@entry("timm_convnext", {"stages.0.blocks.0.gamma": "op-vjp", "stages.0.blocks.0.conv_dw.weight": "closed",
                         "stages.0.blocks.0.norm.weight": "closed"}, needs_timm=True)
def timm_convnext():
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=3, ls_init_value=0.5)
