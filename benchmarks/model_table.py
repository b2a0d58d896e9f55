"""Print the README's model table: parameters in train and deploy form, GMACs at 224x224.

python benchmarks/model_table.py
"""

import repblocks
from repblocks.profile import markdown_table

if __name__ == "__main__":
    print(markdown_table([name for name in repblocks.list_models() if "tiny" not in name]))
