"""Descriptor memory and parameter counts of the Fig. 1 model, measured from the model itself.

The paper's first claim (§V): the 320-d embedding needs a quarter of the memory of
MobileNetV2's 1280-d descriptor.  This prints the bytes per stored vector of each (from
real outputs, float32), what a reference index of N images costs, and how the parameters
split between the backbone (tapped part and the 1280-d head) and the two branches.

    python benchmarks/model_memory.py [--references 1000000]
"""

from __future__ import annotations

import argparse

import torch

from mtl.backbones import BACKBONES
from mtl.model import ModelConfig, MTLNet, count_parameters


def descriptor_bytes(model: MTLNet, image_size: int = 112) -> dict[str, int]:
    """Bytes per image of each descriptor, from one real forward pass."""
    with torch.no_grad():
        out = model.eval().describe(torch.zeros(1, 3, image_size, image_size))
    return {"mtl_embedding": out.embedding[0].numel() * out.embedding.element_size(),
            "backbone_gap1280": out.gap[0].numel() * out.gap.element_size()}


def parameter_counts(model: MTLNet) -> dict[str, int]:
    head = count_parameters(model.backbone.conv_head) + count_parameters(model.backbone.bn2)
    return {"backbone (to the 320-ch tap)": count_parameters(model.backbone) - head,
            "backbone head (320->1280, baseline only)": head,
            "embedding branch": count_parameters(model.embedding),
            "classification branch": count_parameters(model.classifier),
            "total": count_parameters(model)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--references", type=int, default=1_000_000, help="index size to price")
    args = parser.parse_args(argv)

    for name in sorted(BACKBONES):
        model = MTLNet(ModelConfig(backbone=name, pretrained=False))
        sizes = descriptor_bytes(model)
        print(f"\n{name}")
        for method, nbytes in sizes.items():
            print(f"  {method:<18} {nbytes:>6} B/vector   {nbytes * args.references / 2**30:7.2f} GiB "
                  f"for {args.references:,} references")
        print(f"  ratio 1280-d / 320-d: {sizes['backbone_gap1280'] / sizes['mtl_embedding']:.2f}x")
        for part, n in parameter_counts(model).items():
            print(f"  params {part:<42} {n:>10,}")


if __name__ == "__main__":
    main()
