"""The client runtime: the client API, reference NumPy models and the PyTorch adapter."""

from shoal.client.api import (
    Client,
    EvaluateConfig,
    EvaluateResult,
    FitConfig,
    FitResult,
    fit_update,
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
from shoal.client.torch_client import TorchClient

__all__ = [
    "MLP",
    "Client",
    "EvaluateConfig",
    "EvaluateResult",
    "FitConfig",
    "FitResult",
    "LocalTrainingResult",
    "NumpyClient",
    "NumpyModel",
    "SoftmaxRegression",
    "TorchClient",
    "count_steps",
    "fit_update",
    "local_sgd",
]
