"""A custom backbone made of RepBlocks: train it as branches, deploy it as plain convs.

python examples/custom_backbone.py
"""

import sys

import torch
from torch import nn

import repblocks
from repblocks.numerics import max_errors

torch.manual_seed(0)
model = nn.Sequential(
    repblocks.RepBlock(3, 32, stride=2),  # (B, 32, 16, 16)
    repblocks.RepBlock(32, 32, groups=32),  # depthwise, with an identity branch
    repblocks.RepBlock(32, 64, stride=2, groups=4),  # grouped, (B, 64, 8, 8)
    repblocks.RepBlock(64, 64, groups=4),  # grouped, with an identity branch
    nn.AdaptiveAvgPool2d(1),
    nn.Flatten(),
    nn.Linear(64, 10),
)

# A few steps on random data, so the weights and BN statistics are no longer their initial values.
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for _ in range(20):
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    loss = nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(f"trained 20 steps, last loss {loss.item():.3f}")

model.eval()
deploy = repblocks.switch_to_deploy(model)  # every RepBlock becomes one conv with a bias
print(deploy[:4])

images = torch.randn(8, 3, 32, 32)
with torch.inference_mode():
    abs_err, rel_err = max_errors(model(images), deploy(images))
print(f"max error, deploy vs train form: {abs_err:.2e} abs, {rel_err:.2e} relative")
if rel_err > 1e-5:
    sys.exit("the deploy form does not compute what the train form does")
