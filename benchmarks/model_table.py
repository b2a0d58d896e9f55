"""Print the README's model table: parameters in train and deploy form, GMACs at 224x224, published weights.

python -m benchmarks.model_table
"""

import repblocks
from repblocks.profile import model_cost


def markdown_table(names: list[str]) -> str:
    """The README's model table: parameters (train, deploy), GMACs at 224x224, and whether timm publishes weights."""
    rows = [
        "| model | params, train (M) | params, deploy (M) | GMACs (224x224) | `pretrained=True` |",
        "|---|---:|---:|---:|:---:|",
    ]
    for name in names:
        cost = model_cost(name)
        published = "yes" if repblocks.get_pretrained_cfg(name).get("hf_hub_id") else "no"
        rows.append(
            f"| {name} | {cost.train_params / 1e6:.2f} | {cost.deploy_params / 1e6:.2f} "
            f"| {cost.deploy_macs / 1e9:.2f} | {published} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table([name for name in repblocks.list_models() if "tiny" not in name]))
