"""A Shoal client around a PyTorch module, a loss function and its data loaders.

PyTorch is the ``shoal[torch]`` extra: this module imports without it, and
constructing a :class:`TorchClient` without it raises
:class:`MissingExtraError`.

Batches are ``(inputs, targets)`` pairs and the loss function averages over
the batch (``reduction="mean"``, PyTorch's default). The train loader decides
the batch size; ``FitConfig.batch_size`` is not used.

Record-level DP-SGD (``dp_sgd=DpSgdSettings(...)``) runs through Opacus:
``PrivacyEngine.make_private`` wraps the module for per-example gradients
and the optimizer for per-example clipping, with Opacus' RDP accountant.
Two things are Shoal's own, because Opacus' ``secure_mode`` needs
``torchcsprng``, which cannot be installed, and its noise otherwise comes
from ``torch.normal`` on a Mersenne Twister:

- the noise: Opacus is told a noise multiplier of 0 (so it adds none), and
  a step hook, which runs after Opacus has clipped, summed and divided by
  the expected batch size, adds ``N(0, (z C / B)^2)`` drawn from Shoal's
  :class:`~shoal.privacy.noise.NoiseSource` (AES-256-CTR keyed from the OS
  CSPRNG in secure mode) and steps the accountant with the true ``z``;
- the Poisson sampling: a loader over :class:`~shoal.client.dp_sgd.PoissonBatches`
  at Opacus' rate ``q = 1 / len(train_loader)``, from the same source,
  with Opacus' collate for empty batches.

The FedProx term is added in the same hook, after the noise, since it does
not depend on the data. Modules Opacus cannot handle (BatchNorm, for one)
are refused with :class:`ClientError`.

>>> client = TorchClient(
...     torch.nn.Linear(64, 10),
...     loss_fn=torch.nn.functional.cross_entropy,
...     train_loader=train_loader,
...     eval_loader=test_loader,
... )
>>> result = client.fit(client.get_parameters(), FitConfig(round=1, seed=7))
>>> client.set_parameters(result.parameters)
>>> torch.save(client.export_state_dict(), "model.pt")
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from shoal.client.api import Client, EvaluateConfig, EvaluateResult, FitConfig, FitResult
from shoal.client.dp_sgd import DpSgdSettings, PoissonBatches, dp_sgd_metrics
from shoal.core.errors import ClientError, MissingExtraError, ModelError
from shoal.core.parameters import Parameters
from shoal.core.torch_interop import (
    import_torch,
    module_statistics,
    parameters_from_state_dict,
    state_dict_from_parameters,
)
from shoal.preprocessing import Scaler

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

    from shoal.privacy.noise import NoiseSource

LossFunction = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
OptimizerFactory = Callable[[Iterator["torch.nn.Parameter"], FitConfig], "torch.optim.Optimizer"]


class TorchClient(Client):
    """Train and evaluate an ``nn.Module`` as a federated client.

    ``fit`` loads the received parameters (buffers included), runs
    ``round(config.epochs * len(train_loader))`` optimizer steps (at least
    one), and returns the module's new state. The optimizer comes from
    ``optimizer_factory(module.parameters(), config)``, by default plain SGD
    at ``config.learning_rate``. With ``config.proximal_mu > 0``, FedProx's
    ``mu * (w - w_received)`` is added to each trainable gradient. Without
    a ``train_loader`` the client only evaluates (``fit`` raises
    :class:`ClientError`), as a server app's central evaluation does.

    ``set_parameters`` loads parameters into the module and
    ``export_state_dict`` gives its state back as a plain state dict, so a
    model trained with Shoal is saved and loaded as any PyTorch model.

    Runs are deterministic in ``config.seed`` on CPU: the global torch
    generator is forked and seeded for the fit (so shuffling without an
    explicit generator, and dropout, repeat) and restored afterwards; a
    train loader built with its own ``generator`` has it reseeded with
    ``config.seed`` at every fit.

    With ``dp_sgd`` every fit is record-level DP-SGD (see the module
    docstring); its metrics then add :func:`~shoal.client.dp_sgd.dp_sgd_metrics`
    and ``dp_sgd_epsilon``, Opacus' RDP epsilon of the fit at ``dp_sgd.delta``.

    It does not implement :class:`~shoal.client.api.TransformableData`: its
    ``train_loader`` is any ``DataLoader`` (a streaming dataset, a custom
    sampler or collate function), whose examples it cannot rewrite in
    general. For the simulator's data attacks (``label_flip``, ``backdoor``),
    subclass it with a ``with_training_data`` that rebuilds the loader from
    your in-memory tensors.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        loss_fn: LossFunction,
        train_loader: DataLoader[Any] | None = None,
        eval_loader: DataLoader[Any] | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        dp_sgd: DpSgdSettings | None = None,
    ) -> None:
        import_torch("TorchClient")
        if dp_sgd is not None:
            _import_opacus()
        self.dp_sgd = dp_sgd
        self.module = module
        self.loss_fn = loss_fn
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.optimizer_factory = optimizer_factory
        self._steps_per_epoch = 0 if train_loader is None else _loader_length(train_loader)
        self._num_train_examples = 0 if train_loader is None else _dataset_length(train_loader)
        self._scaler: Scaler | None = None  # the task's ([preprocessing]), for its batches
        self._scaling: tuple[Scaler, torch.Tensor, torch.Tensor] | None = None

    def get_parameters(self) -> Parameters:
        """The module's state dict, its floating-point buffers marked as statistics."""
        return parameters_from_state_dict(
            self.module.state_dict(), statistics=module_statistics(self.module)
        )

    def set_parameters(self, parameters: Parameters) -> None:
        """Load ``parameters`` into the module, buffers included.

        They must have the module's names and shapes (what ``get_parameters``
        gives, or a run's model); anything else is a :class:`ClientError`
        and leaves the module as it was.
        """
        like = self.module.state_dict()
        try:
            state = state_dict_from_parameters(parameters, like=like)
        except ModelError as exc:
            raise ClientError(f"the parameters do not fit the module: {exc}") from exc
        self.module.load_state_dict(state)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's state as a plain state dict: detached copies on the CPU.

        Its keys are the names of the parameters' layout, in order, and each
        tensor has the module's dtype and shape: ``torch.save`` it, or give
        it to ``load_state_dict`` of the same architecture.
        """
        return {
            name: tensor.detach().to("cpu", copy=True)
            for name, tensor in self.module.state_dict().items()
        }

    def local_features(self) -> np.ndarray:
        """The train loader's inputs, one row a record (each flattened), as given: what a
        statistics run counts (:mod:`shoal.client.statistics`)."""
        if self.train_loader is None:
            raise ClientError("this TorchClient has no train loader: it has no records")
        rows = [
            inputs.detach().to("cpu").reshape(int(inputs.shape[0]), -1).double().numpy()
            for inputs, _ in self.train_loader
        ]
        return np.concatenate(rows) if rows else np.zeros((0, 0))

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        loader = self.train_loader
        if loader is None:
            raise ClientError("this TorchClient has no train loader: it only evaluates")
        self._scaler = config.scaler
        self.set_parameters(parameters)
        num_steps = max(1, round(config.epochs * self._steps_per_epoch))
        dp_metrics: dict[str, float] = {}
        try:
            with _seeded(config.seed, self._device()):
                _reseed_loader(loader, config.seed)
                if self.dp_sgd is None:
                    mean_loss = self._train(loader, num_steps, config)
                else:
                    mean_loss, dp_metrics = self._train_private(
                        loader, num_steps, config, self.dp_sgd
                    )
        except RuntimeError as exc:
            raise ClientError(f"local training failed: {exc}") from exc
        if not math.isfinite(mean_loss):
            raise ClientError(f"local training diverged (mean loss {mean_loss})")
        metrics = {"loss": mean_loss, "steps": float(num_steps), **dp_metrics}
        return FitResult(self.get_parameters(), self._num_train_examples, metrics)

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        """Mean loss over the eval loader, and accuracy when outputs are class scores."""
        self._scaler = config.scaler
        self.set_parameters(parameters)
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

    def _device(self) -> torch.device:
        import torch

        for tensor in self.module.state_dict().values():
            if isinstance(tensor, torch.Tensor):
                return tensor.device
        return torch.device("cpu")

    def _train(self, loader: DataLoader[Any], num_steps: int, config: FitConfig) -> float:
        self.module.train()
        optimizer = self._optimizer(config)
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        anchors = [p.detach().clone() for p in trainable] if config.proximal_mu > 0 else []

        def after_backward() -> None:
            if anchors:
                _add_proximal_gradient(trainable, anchors, mu=config.proximal_mu)

        return self._run_steps(
            self.module, loader, optimizer, num_steps, after_backward=after_backward
        )

    def _train_private(
        self,
        train_loader: DataLoader[Any],
        num_steps: int,
        config: FitConfig,
        settings: DpSgdSettings,
    ) -> tuple[float, dict[str, float]]:
        """DP-SGD through Opacus with Shoal's sampling and noise; see the module docstring."""
        sampling_rate = 1 / self._steps_per_epoch  # Opacus' rate: one expected pass per epoch
        noise = settings.noise_source(np.random.default_rng(config.seed))
        loader = _poisson_loader(train_loader, sampling_rate=sampling_rate, noise=noise)
        engine = _privacy_engine()
        self.module.train()
        try:
            module, optimizer, loader = engine.make_private(
                module=self.module,
                optimizer=self._optimizer(config),
                data_loader=loader,
                noise_multiplier=0.0,  # Opacus adds none: the step hook adds Shoal's
                max_grad_norm=settings.clip_norm,
                poisson_sampling=False,  # the loader already samples, from Shoal's source
            )
        except (ValueError, NotImplementedError) as exc:
            raise ClientError(f"Opacus cannot train this module with DP-SGD: {exc}") from exc
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        anchors = [p.detach().clone() for p in trainable] if config.proximal_mu > 0 else []

        def after_step(optimizer: Any) -> None:
            _add_noise(optimizer.params, std=_noise_std(settings, optimizer), noise=noise)
            if anchors:
                _add_proximal_gradient(trainable, anchors, mu=config.proximal_mu)
            engine.accountant.step(
                noise_multiplier=settings.noise_multiplier, sample_rate=sampling_rate
            )

        optimizer.attach_step_hook(after_step)
        try:
            with warnings.catch_warnings():
                # Opacus captures gradients at the first layer's outputs, as torch notes.
                warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
                mean_loss = self._run_steps(module, loader, optimizer, num_steps)
        finally:
            _release_opacus(module, optimizer, self.module)
        metrics = dp_sgd_metrics(settings, steps=num_steps, sampling_rate=sampling_rate)
        metrics["dp_sgd_epsilon"] = _epsilon(engine, settings)
        return mean_loss, metrics

    def _run_steps(
        self,
        module: torch.nn.Module,
        loader: DataLoader[Any],
        optimizer: torch.optim.Optimizer,
        num_steps: int,
        *,
        after_backward: Callable[[], None] = lambda: None,
    ) -> float:
        """``num_steps`` optimizer steps over ``loader``, cycling; the mean loss of its batches.

        An empty batch (Poisson sampling can draw one) still steps, but has no loss to count.
        """
        device = self._device()
        total_loss, counted, step = 0.0, 0, 0
        while step < num_steps:
            for inputs, targets in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = self.loss_fn(module(self._inputs(inputs, device)), targets.to(device))
                loss.backward()  # type: ignore[no-untyped-call]
                after_backward()
                optimizer.step()
                if targets.numel() > 0:
                    total_loss += float(loss.detach())
                    counted += 1
                step += 1
                if step == num_steps:
                    break
        return total_loss / counted if counted else 0.0

    def _inputs(self, inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A batch's inputs on ``device``, standardized by the task's scaler (each record
        flattened to the scaler's features, then given its shape back)."""
        inputs = inputs.to(device)
        scaler = self._scaler
        if scaler is None:
            return inputs
        flat = inputs.reshape(int(inputs.shape[0]), -1)
        if flat.shape[1] != scaler.features:
            raise ClientError(
                f"the run's scaler standardizes {scaler.features} features, this client's "
                f"records have {flat.shape[1]}"
            )
        held = self._scaling
        if held is None or held[0] is not scaler or held[1].device != flat.device:
            import torch

            mean = torch.as_tensor(scaler.mean, dtype=torch.float64, device=flat.device)
            scale = torch.as_tensor(scaler.scale, dtype=torch.float64, device=flat.device)
            held = self._scaling = (scaler, mean, scale)
        standardized = (flat.double() - held[1]) / held[2]
        import torch  # integer inputs (uint8 pixels, counts) become the default float type

        dtype = inputs.dtype if inputs.is_floating_point() else torch.get_default_dtype()
        return standardized.to(dtype).reshape(inputs.shape)

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
                    outputs = module(self._inputs(inputs, device))
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


def _import_opacus() -> ModuleType:
    """The ``opacus`` module, or :class:`MissingExtraError` naming the extra."""
    try:
        import opacus  # type: ignore[import-untyped, unused-ignore]
    except ImportError as exc:
        raise MissingExtraError(extra="torch", package="opacus", feature="DP-SGD") from exc
    return opacus  # type: ignore[no-any-return, unused-ignore]


def _privacy_engine() -> Any:
    """Opacus' engine with its RDP accountant.

    Its warning that ``secure_mode`` is off does not apply: Shoal draws the noise and the batches.
    """
    opacus = _import_opacus()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Secure RNG turned off", UserWarning)
        return opacus.PrivacyEngine(accountant="rdp")


def _epsilon(engine: Any, settings: DpSgdSettings) -> float:
    """Opacus' RDP epsilon at ``settings.delta``; infinite without noise."""
    if settings.noise_multiplier == 0:
        return math.inf
    with warnings.catch_warnings():
        # Its advice to widen the orders when the best is at an end; the bound still holds.
        warnings.filterwarnings("ignore", "Optimal order is the", UserWarning)
        return float(engine.get_epsilon(settings.delta))


def _poisson_loader(
    loader: DataLoader[Any], *, sampling_rate: float, noise: NoiseSource
) -> DataLoader[Any]:
    """A loader over ``loader``'s dataset with Poisson batches, as many per epoch as it has."""
    from opacus.data_loader import (  # type: ignore[import-untyped, unused-ignore]
        dtype_safe,
        shape_safe,
        wrap_collate_with_empty,
    )
    from torch.utils.data import DataLoader

    dataset = loader.dataset
    first = dataset[0]
    batches = PoissonBatches(
        num_examples=_dataset_length(loader),
        sampling_rate=sampling_rate,
        num_batches=len(loader),
        noise=noise,
    )
    collate = wrap_collate_with_empty(
        collate_fn=loader.collate_fn,
        sample_empty_shapes=[(0, *shape_safe(item)) for item in first],
        dtypes=[dtype_safe(item) for item in first],
    )
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


def _noise_std(settings: DpSgdSettings, optimizer: Any) -> float:
    """``z C / B``: the noise on a gradient that Opacus has already divided by ``B``."""
    expected_batch_size = float(optimizer.expected_batch_size)
    return settings.noise_multiplier * settings.clip_norm / expected_batch_size


def _add_noise(parameters: list[torch.Tensor], *, std: float, noise: NoiseSource) -> None:
    """Add ``N(0, std^2)`` from ``noise`` to every gradient."""
    import torch

    if std == 0:
        return
    for parameter in parameters:
        if parameter.grad is not None:
            drawn = torch.from_numpy(noise.normal(parameter.grad.numel(), std=std))
            parameter.grad.add_(drawn.view_as(parameter.grad).to(parameter.grad))


def _release_opacus(wrapped: Any, optimizer: Any, module: torch.nn.Module) -> None:
    """Remove Opacus' hooks and the per-example gradients it left on ``module``."""
    optimizer.zero_grad(set_to_none=True)
    wrapped.cleanup()
    for parameter in module.parameters():
        if hasattr(parameter, "summed_grad"):
            del parameter.summed_grad


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
