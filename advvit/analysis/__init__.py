"""Analyses of trained models: plain functions on an ``nn.Module`` taking [0, 1] pixels.

``advvit.analysis.blocks`` knows each architecture's residual blocks and their parts;
``advvit.analysis.internals`` measures inside the model (block Jacobian norms, layer-wise
propagation of perturbations, layer similarity, lesions).

``advvit.analysis.blocks`` here is the function (``blocks(model)``); the module of the same name
stays importable with ``from advvit.analysis.blocks import ...``.
"""
from advvit.analysis.blocks import (
    Block, BlockLayout, Part, UnsupportedArchitectureError, blocks, eager_model, find_block,
    register_architecture, register_block_type, supported_architectures,
)
from advvit.analysis.internals import (
    JacobianNorms, LayerSimilarity, LesionStudy, Propagation, jacobian_norms, layer_similarity,
    lesion, lesion_study, linear_cka, propagation, relative_change, representation_correlation,
)

__all__ = [
    "Block", "BlockLayout", "Part", "UnsupportedArchitectureError", "blocks", "eager_model",
    "find_block", "register_architecture", "register_block_type", "supported_architectures",
    "JacobianNorms", "LayerSimilarity", "LesionStudy", "Propagation", "jacobian_norms",
    "layer_similarity", "lesion", "lesion_study", "linear_cka", "propagation", "relative_change",
    "representation_correlation",
]
