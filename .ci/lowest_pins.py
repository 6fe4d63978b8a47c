"""Print pip constraints pinning every requirement of setup.cfg (install_requires and the `dev` extra) to its lower
bound: `transformers>=5.23,<6` -> `transformers==5.23`. Used by `.ci/run` to build the
environment on the lowest versions hf_moe claims to support."""

import configparser
import sys
from pathlib import Path

from packaging.requirements import Requirement


def lowest_pins(setup_cfg: Path) -> list[str]:
    config = configparser.ConfigParser()
    config.read(setup_cfg)
    lines = config["options"]["install_requires"].splitlines() + config["options.extras_require"]["dev"].splitlines()
    pins = {}
    for line in filter(None, (line.strip() for line in lines)):
        requirement = Requirement(line)
        lower = [spec.version for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
        if lower:
            pins[requirement.name] = f"{requirement.name}=={lower[0]}"
    return sorted(pins.values())


if __name__ == "__main__":
    print("\n".join(lowest_pins(Path(sys.argv[1] if len(sys.argv) > 1 else "setup.cfg"))))
