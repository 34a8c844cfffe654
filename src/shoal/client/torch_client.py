"""A Shoal client around a PyTorch module, a loss function and its data loaders.

PyTorch is the ``shoal[torch]`` extra: this module imports without it, and
constructing a :class:`TorchClient` without it raises
:class:`MissingExtraError`.

Batches are ``(inputs, targets)`` pairs and the loss function averages over
the batch (``reduction="mean"``, PyTorch's default). The train loader decides
the batch size; ``FitConfig.batch_size`` is not used.

>>> client = TorchClient(
...     torch.nn.Linear(64, 10),
...     loss_fn=torch.nn.functional.cross_entropy,
...     train_loader=train_loader,
...     eval_loader=test_loader,
... )
>>> result = client.fit(client.get_parameters(), FitConfig(round=1, seed=7))
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from shoal.client.api import Client, EvaluateConfig, EvaluateResult, FitConfig, FitResult
from shoal.core.errors import ClientError, ModelError
from shoal.core.parameters import Parameters
from shoal.core.torch_interop import (
    import_torch,
    parameters_from_state_dict,
    state_dict_from_parameters,
)

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

LossFunction = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
OptimizerFactory = Callable[[Iterator["torch.nn.Parameter"], FitConfig], "torch.optim.Optimizer"]


class TorchClient(Client):
    """Train and evaluate an ``nn.Module`` as a federated client.

    ``fit`` loads the received parameters (buffers included), runs
    ``round(config.epochs * len(train_loader))`` optimizer steps (at least
    one), and returns the module's new state. The optimizer comes from
    ``optimizer_factory(module.parameters(), config)``, by default plain SGD
    at ``config.learning_rate``. With ``config.proximal_mu > 0``, FedProx's
    ``mu * (w - w_received)`` is added to each trainable gradient.

    Runs are deterministic in ``config.seed`` on CPU: the global torch
    generator is forked and seeded for the fit (so shuffling without an
    explicit generator, and dropout, repeat) and restored afterwards; a
    train loader built with its own ``generator`` has it reseeded with
    ``config.seed`` at every fit.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        loss_fn: LossFunction,
        train_loader: DataLoader[Any],
        eval_loader: DataLoader[Any] | None = None,
        optimizer_factory: OptimizerFactory | None = None,
    ) -> None:
        import_torch("TorchClient")
        self.module = module
        self.loss_fn = loss_fn
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.optimizer_factory = optimizer_factory
        self._steps_per_epoch = _loader_length(train_loader)
        self._num_train_examples = _dataset_length(train_loader)

    def get_parameters(self) -> Parameters:
        return parameters_from_state_dict(self.module.state_dict())

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        self._load(parameters)
        num_steps = max(1, round(config.epochs * self._steps_per_epoch))
        try:
            with _seeded(config.seed, self._device()):
                _reseed_loader(self.train_loader, config.seed)
                mean_loss = self._train(num_steps, config)
        except RuntimeError as exc:
            raise ClientError(f"local training failed: {exc}") from exc
        if not math.isfinite(mean_loss):
            raise ClientError(f"local training diverged (mean loss {mean_loss})")
        metrics = {"loss": mean_loss, "steps": float(num_steps)}
        return FitResult(self.get_parameters(), self._num_train_examples, metrics)

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        """Mean loss over the eval loader, and accuracy when outputs are class scores."""
        self._load(parameters)
        if self.eval_loader is None:
            return EvaluateResult(loss=0.0, num_examples=0, metrics={})
        try:
            total_loss, correct, count, scored = self._evaluate_batches(self.eval_loader)
        except RuntimeError as exc:
            raise ClientError(f"local evaluation failed: {exc}") from exc
        if count == 0:
            return EvaluateResult(loss=0.0, num_examples=0, metrics={})
        metrics = {"accuracy": correct / count} if scored else {}
        return EvaluateResult(loss=total_loss / count, num_examples=count, metrics=metrics)

    def _load(self, parameters: Parameters) -> None:
        like = self.module.state_dict()
        try:
            state = state_dict_from_parameters(parameters, like=like)
        except ModelError as exc:
            raise ClientError(f"received parameters do not fit the module: {exc}") from exc
        self.module.load_state_dict(state)

    def _device(self) -> torch.device:
        import torch

        for tensor in self.module.state_dict().values():
            if isinstance(tensor, torch.Tensor):
                return tensor.device
        return torch.device("cpu")

    def _train(self, num_steps: int, config: FitConfig) -> float:
        module, device = self.module, self._device()
        module.train()
        optimizer = self._optimizer(config)
        trainable = [p for p in module.parameters() if p.requires_grad]
        anchors = [p.detach().clone() for p in trainable] if config.proximal_mu > 0 else []
        total_loss, step = 0.0, 0
        while step < num_steps:
            for inputs, targets in self.train_loader:
                optimizer.zero_grad(set_to_none=True)
                loss = self.loss_fn(module(inputs.to(device)), targets.to(device))
                loss.backward()  # type: ignore[no-untyped-call]
                if anchors:
                    _add_proximal_gradient(trainable, anchors, mu=config.proximal_mu)
                optimizer.step()
                total_loss += float(loss.detach())
                step += 1
                if step == num_steps:
                    break
        return total_loss / num_steps

    def _optimizer(self, config: FitConfig) -> torch.optim.Optimizer:
        if self.optimizer_factory is not None:
            return self.optimizer_factory(self.module.parameters(), config)
        import torch

        return torch.optim.SGD(self.module.parameters(), lr=config.learning_rate)

    def _evaluate_batches(self, loader: DataLoader[Any]) -> tuple[float, int, int, bool]:
        """(summed loss, correct predictions, examples, whether outputs were class scores)."""
        import torch

        module, device = self.module, self._device()
        was_training = module.training
        module.eval()
        total_loss, correct, count, scored = 0.0, 0, 0, True
        try:
            with torch.no_grad():
                for inputs, targets in loader:
                    outputs = module(inputs.to(device))
                    targets = targets.to(device)
                    batch = int(targets.shape[0])
                    total_loss += float(self.loss_fn(outputs, targets)) * batch
                    count += batch
                    scored = scored and _is_classification(outputs, targets)
                    if scored:
                        correct += int((outputs.argmax(dim=1) == targets).sum())
        finally:
            module.train(was_training)
        return total_loss, correct, count, scored


def _add_proximal_gradient(
    parameters: list[torch.nn.Parameter], anchors: list[torch.Tensor], *, mu: float
) -> None:
    """Add ``mu * (w - w_anchor)``, the gradient of ``mu / 2 * ||w - w_anchor||^2``."""
    for parameter, anchor in zip(parameters, anchors, strict=True):
        if parameter.grad is not None:
            parameter.grad.add_(parameter.detach() - anchor, alpha=mu)


def _is_classification(outputs: torch.Tensor, targets: torch.Tensor) -> bool:
    """Outputs are (n, classes) scores and targets (n,) integer class indices."""
    return bool(
        outputs.ndim == 2
        and targets.ndim == 1
        and not targets.is_floating_point()
        and not targets.is_complex()
    )


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Fork the global torch generators (CPU, and the module's CUDA device) and seed them."""
    import torch

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _reseed_loader(loader: DataLoader[Any], seed: int) -> None:
    """Reseed the generator a loader (or its sampler) was given explicitly, if any."""
    for owner in (loader, getattr(loader, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if generator is not None and hasattr(generator, "manual_seed"):
            generator.manual_seed(seed)


def _loader_length(loader: DataLoader[Any]) -> int:
    try:
        length = len(loader)
    except TypeError as exc:
        raise ClientError(
            "TorchClient needs a train loader with a length (a sized dataset)"
        ) from exc
    if length == 0:
        raise ClientError("the train loader yields no batches")
    return length


def _dataset_length(loader: DataLoader[Any]) -> int:
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ClientError("TorchClient needs a train dataset with a length") from exc
