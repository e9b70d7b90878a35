"""Analyses of trained models: plain functions on an ``nn.Module`` taking [0, 1] pixels.

``advvit.analysis.blocks`` knows each architecture's residual blocks and their parts;
``advvit.analysis.internals`` measures inside the model (block Jacobian norms, layer-wise
propagation of perturbations, layer similarity, lesions); ``advvit.analysis.perturbations``
shows what attacks reveal (perturbation images, class visualization, the semantic score of
perturbations, the transfer matrix); ``advvit.analysis.shifts`` measures robustness beyond Lp
balls (the ImageNet-C corruptions through their reference library, rotation x translation grids).

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
from advvit.analysis.perturbations import (
    SEMANTIC_KINDS, TRANSFER_ATTACKS, ClassVisualization, PerturbationImages, SemanticScore,
    TransferMatrix, class_visualization, default_class_viz_eps, perturbation_images,
    perturbation_viz, random_sign_perturbation, semantic_images, semantic_score, to_grey,
    topk_correct, transfer_matrix,
)
from advvit.analysis.shifts import (
    CORRUPTIONS, SEVERITIES, CorruptionAccuracy, CorruptionCache, MeanCorruptionError,
    SpatialAccuracy, SpatialGrid, corrupt, evaluate_corruptions, evaluate_spatial,
    generate_corruptions, mean_corruption_error, spatial_transform,
)

__all__ = [
    "Block", "BlockLayout", "Part", "UnsupportedArchitectureError", "blocks", "eager_model",
    "find_block", "register_architecture", "register_block_type", "supported_architectures",
    "JacobianNorms", "LayerSimilarity", "LesionStudy", "Propagation", "jacobian_norms",
    "layer_similarity", "lesion", "lesion_study", "linear_cka", "propagation", "relative_change",
    "representation_correlation",
    "SEMANTIC_KINDS", "TRANSFER_ATTACKS", "ClassVisualization", "PerturbationImages",
    "SemanticScore", "TransferMatrix", "class_visualization", "default_class_viz_eps",
    "perturbation_images", "perturbation_viz", "random_sign_perturbation", "semantic_images",
    "semantic_score", "to_grey", "topk_correct", "transfer_matrix",
    "CORRUPTIONS", "SEVERITIES", "CorruptionAccuracy", "CorruptionCache", "MeanCorruptionError",
    "SpatialAccuracy", "SpatialGrid", "corrupt", "evaluate_corruptions", "evaluate_spatial",
    "generate_corruptions", "mean_corruption_error", "spatial_transform",
]
