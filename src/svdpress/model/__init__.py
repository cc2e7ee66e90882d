"""The model runner and the architecture map: the one owner of placement and of module names."""

from .arch import FAMILIES, ArchMap, Family, TargetLayer, arch_map
from .head import Head
from .runner import OFFLOADS, Placement, Runner, State
from .weights import TensorSource

__all__ = ["FAMILIES", "ArchMap", "Family", "TargetLayer", "arch_map", "Head", "OFFLOADS", "Placement", "Runner",
           "State", "TensorSource"]
