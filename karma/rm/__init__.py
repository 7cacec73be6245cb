"""The KARMA reward model: input templates, the saved-folder format (`karma_rm.json`), training and eval."""

from karma.rm.model import KarmaRMConfig, RewardModel, RMInput
from karma.rm.template import VARIANTS, render

__all__ = ["VARIANTS", "KarmaRMConfig", "RMInput", "RewardModel", "render"]
