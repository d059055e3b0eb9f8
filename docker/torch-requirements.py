"""Print pyproject.toml's torch and torchvision requirements, one a line (pip -r format).

The images install these first, in a layer of their own, so that a change of the
project's sources does not reinstall several GB of PyTorch.
Usage: python docker/torch-requirements.py pyproject.toml
"""

import re
import sys
import tomllib

HEAVY = {"torch", "torchvision"}

with open(sys.argv[1], "rb") as file:
    requirements = tomllib.load(file)["project"]["dependencies"]
for requirement in requirements:
    name = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()
    if name in HEAVY:
        print(requirement)
