"""Weight-matrix layouts behind one Linear protocol; the model picks none of them, the loaders do."""

from engine.linear.base import Linear
from engine.linear.block import BlockQuantLinear
from engine.linear.dense import DenseLinear
from engine.linear.ternary import TernaryLinear

__all__ = ["BlockQuantLinear", "DenseLinear", "Linear", "TernaryLinear"]
