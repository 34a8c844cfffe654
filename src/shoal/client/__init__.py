"""The client runtime: the client API, reference NumPy models and the PyTorch adapter."""

from shoal.client.api import (
    Client,
    DataTransform,
    EvaluateConfig,
    EvaluateResult,
    FitConfig,
    FitResult,
    TransformableData,
    fit_update,
)
from shoal.client.dp_sgd import (
    DpSgdSettings,
    PerExampleGradientModel,
    PoissonBatches,
    dp_sgd_gradient,
    dp_sgd_metrics,
    dp_sgd_training,
    per_example_clip_factors,
    poisson_sampling_rate,
    record_level_epsilon,
)
from shoal.client.numpy_models import (
    MLP,
    LocalTrainingResult,
    NumpyClient,
    NumpyModel,
    SoftmaxRegression,
    count_steps,
    local_sgd,
)
from shoal.client.statistics import LocalFeatures, StatisticsClient
from shoal.client.torch_client import TorchClient

__all__ = [
    "MLP",
    "Client",
    "DataTransform",
    "DpSgdSettings",
    "EvaluateConfig",
    "EvaluateResult",
    "FitConfig",
    "FitResult",
    "LocalFeatures",
    "LocalTrainingResult",
    "NumpyClient",
    "NumpyModel",
    "PerExampleGradientModel",
    "PoissonBatches",
    "SoftmaxRegression",
    "StatisticsClient",
    "TorchClient",
    "TransformableData",
    "count_steps",
    "dp_sgd_gradient",
    "dp_sgd_metrics",
    "dp_sgd_training",
    "fit_update",
    "local_sgd",
    "per_example_clip_factors",
    "poisson_sampling_rate",
    "record_level_epsilon",
]
