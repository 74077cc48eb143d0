"""
Baselines of about Vision Mamba 2's size (~475K parameters), trained by the same train.py (`--arch cnn`,
`--arch vit`) and timed by bench.py, so that accuracy and speed are compared like with like.

    CNN: 3 stages of two (3x3 conv -> BatchNorm -> ReLU) at widths w, 2w, 4w, 2x2 max-pool between them
         (28 -> 14 -> 7) -> global average pool -> MLP head. The classic MNIST CNN, made deeper and wider.
    ViT: Vision Mamba 2's frame with pre-norm Transformer blocks (multi-head self-attention + MLP) in place of
         its Mamba-2 blocks: the same conv stem, 7x7 tokens, 2-D position embedding, pooling and head; a little
         narrower (116) so that the MLPs, which the Mamba blocks don't have, keep the parameter count the same.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from einops import rearrange

from vision_mamba2 import ModelConfig, classifier_head, knob


@dataclass
class CNNConfig(ModelConfig):
    img_size: int = 28
    in_chans: int = 1
    num_classes: int = 10
    width: int = knob(40, "channels of the first stage; then 2x and 4x: ~475K parameters")
    dropout: float = 0.1  # in the classifier head: a recipe constant, not a flag

    def validate(self):
        super().validate()
        if self.img_size % 4:
            raise ValueError(f"img_size {self.img_size} must be divisible by 4 (two 2x2 max-pools)")


@dataclass
class ViTConfig(ModelConfig):
    img_size: int = 28
    in_chans: int = 1
    num_classes: int = 10
    patch_size: int = knob(4, "stride of the tokenizing conv, as Vision Mamba 2's: 4 gives 7x7 tokens")
    d_model: int = knob(116, "channels of the tokens: a little narrower than the Mamba model's 128, ~462K parameters")
    num_blocks: int = knob(4, "Transformer blocks")
    heads: int = knob(4, "attention heads per block; d-model must be divisible by it")
    mlp_ratio: int = knob(2, "hidden width of each block's MLP, as a multiple of d-model")
    dropout: float = 0.1  # in the classifier head: a recipe constant, not a flag

    def validate(self):
        super().validate()
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by heads {self.heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {self.patch_size}")


def conv_bn_relu(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CNN(nn.Module):
    def __init__(self, config):
        super().__init__()
        config.validate()
        self.config = c = config
        w = c.width
        self.features = nn.Sequential(
            conv_bn_relu(c.in_chans, w), conv_bn_relu(w, w), nn.MaxPool2d(2),
            conv_bn_relu(w, 2 * w), conv_bn_relu(2 * w, 2 * w), nn.MaxPool2d(2),
            conv_bn_relu(2 * w, 4 * w), conv_bn_relu(4 * w, 4 * w))
        self.head = nn.Sequential(nn.Linear(4 * w, 4 * w), nn.ReLU(inplace=True), nn.Dropout(c.dropout),
                                  nn.Linear(4 * w, c.num_classes))

    def forward(self, x):
        # x : (B, in_chans, img_size, img_size)
        self.config.check_input(x.shape)
        x = self.features(x)  # (B, 4w, img_size/4, img_size/4)
        return self.head(x.mean(dim=(2, 3)))  # (B, num_classes)


class ViT(nn.Module):
    def __init__(self, config):
        super().__init__()
        config.validate()
        self.config = c = config
        p = c.patch_size
        grid = c.img_size // p
        # Vision Mamba 2's stem and position embedding
        self.stem = nn.Conv2d(c.in_chans, c.d_model, kernel_size=2 * p - 1, stride=p, padding=p - 1)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.d_model, grid, grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.pos_embed._no_weight_decay = True
        # pre-norm blocks; attention runs through scaled_dot_product_attention (flash / memory-efficient kernels)
        self.blocks = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(c.d_model, nhead=c.heads, dim_feedforward=c.mlp_ratio * c.d_model,
                                       dropout=0.0, activation="gelu", batch_first=True, norm_first=True),
            num_layers=c.num_blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.d_model)
        self.head = classifier_head(c)

    def forward(self, x):
        # x : (B, in_chans, img_size, img_size)
        self.config.check_input(x.shape)
        x = rearrange(self.stem(x) + self.pos_embed, "b d h w -> b (h w) d")  # (B, L, D)
        x = self.norm(self.blocks(x)).mean(dim=1)  # (B, D)
        return self.head(x)  # (B, num_classes)
