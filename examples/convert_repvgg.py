"""Train form to deploy form: build RepVGG-A0, convert it, check it computes the same, time both.

python examples/convert_repvgg.py        # `make examples` runs it with the other examples
"""

import sys
import time

import torch

import repblocks
from repblocks.bench import median, throughput, time_interleaved
from repblocks.numerics import max_errors, randomize_bn_
from repblocks.profile import count_params

torch.manual_seed(0)

# A fresh model has BN mean 0, variance 1 everywhere, which would hide folding errors: randomize them.
model = repblocks.create_model("repvgg_a0", num_classes=1000).eval()
randomize_bn_(model)

start = time.perf_counter()
deploy = repblocks.switch_to_deploy(model)  # a converted copy; `model` is untouched
print(f"converted repvgg_a0 in {1e3 * (time.perf_counter() - start):.0f} ms")

images = torch.randn(8, 3, 224, 224)  # (B, C, H, W)
with torch.inference_mode():
    logits, deploy_logits = model(images), deploy(images)
abs_err, rel_err = max_errors(logits, deploy_logits)
top1_agree = (logits.argmax(dim=1) == deploy_logits.argmax(dim=1)).float().mean().item()
print(f"max error: {abs_err:.2e} abs, {rel_err:.2e} relative; top-1 agreement {top1_agree:.0%}")
if rel_err > 1e-4 or top1_agree < 1:
    sys.exit("the deploy form does not compute what the train form does")

print(f"parameters: {count_params(model) / 1e6:.2f} M train form, {count_params(deploy) / 1e6:.2f} M deploy form")

samples = time_interleaved({"train": lambda: model(images), "deploy": lambda: deploy(images)}, rounds=5, warmup=1)
for form, times in samples.items():
    print(f"{form:>6} form: {1e3 * median(times):6.1f} ms/batch, {throughput(8, median(times)):5.1f} img/s")
print(f"speed-up of the deploy form: {median(samples['train']) / median(samples['deploy']):.2f}x")
