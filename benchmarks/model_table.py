"""Print the README's model table: parameters in train and deploy form, GMACs at 224x224.

python -m benchmarks.model_table
"""

import repblocks
from repblocks.profile import model_cost


def markdown_table(names: list[str]) -> str:
    """The README's model table: parameters (train, deploy) and GMACs at 224x224."""
    rows = ["| model | params, train (M) | params, deploy (M) | GMACs (224x224) |", "|---|---:|---:|---:|"]
    for name in names:
        cost = model_cost(name)
        rows.append(
            f"| {name} | {cost.train_params / 1e6:.2f} | {cost.deploy_params / 1e6:.2f} | {cost.deploy_macs / 1e9:.2f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table([name for name in repblocks.list_models() if "tiny" not in name]))
