"""Federated fine-tuning of LoRA adapters on a frozen transformer encoder.

The backbone (a small transformer encoder: vocab 32, width 64, 2 layers, 4
heads) stands in for a pretrained model already on every device: it is built
from the fixed seed ``BACKBONE_SEED``, so every client and the coordinator
hold the same weights, and it is frozen. Each of its linear layers (the
attention's query, key, value and output projections and the feed-forward's
two layers) is wrapped in a :class:`LoRALinear` of rank 8:
``y = W x + (alpha / r) * B(A(x))`` with ``W`` frozen, ``A`` random and ``B``
zero, so the untrained adapters leave the backbone's output as it was.

Only the adapters and the classification head are trainable, and only they
are federated: :class:`AdapterClient` is a ``TorchClient`` whose parameters
are the module's trainable tensors. The backbone never leaves the device and
the coordinator aggregates 15% of the model.

The task is synthetic and made locally from the client's partition index and
the run's seed: sequences of 16 tokens, labelled 1 when token 3 appears more
often than token 5. The clients are non-IID: client ``i`` of ``N`` has a
share of positives rising from 20% to 80% across the population. The
coordinator evaluates each new model on a balanced test set of its own.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from shoal import ClientApp, ClientContext, ServerApp, ServerContext
from shoal.client.api import EvaluateConfig, FitConfig
from shoal.client.torch_client import TorchClient
from shoal.core.errors import ClientError, ModelError
from shoal.core.parameters import Parameters
from shoal.core.torch_interop import parameters_from_state_dict, state_dict_from_parameters

BACKBONE_SEED = 20240601  # the "pretrained" weights: the same on every device, never sent
VOCAB, LENGTH, WIDTH, LAYERS, HEADS, FEED_FORWARD = 32, 16, 64, 2, 4, 256
RANK, ALPHA = 8, 16.0
PLUS, MINUS = 3, 5  # the label: token PLUS appears more often than token MINUS
TRAIN_EXAMPLES, EVAL_EXAMPLES, TEST_EXAMPLES = 256, 64, 1000

torch.set_num_threads(1)  # a tiny model: one thread each; the simulator runs clients in parallel


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``W x + (alpha / r) B(A(x))``."""

    def __init__(self, base: nn.Linear, *, rank: int = RANK, alpha: float = ALPHA) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)  # random (Kaiming uniform)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_b.weight)  # zero: the adapter starts as a no-op
        self.scale = alpha / rank

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        update: torch.Tensor = self.lora_b(self.lora_a(inputs))
        frozen: torch.Tensor = self.base(inputs)
        return frozen + self.scale * update


class EncoderBlock(nn.Module):
    """Pre-norm self-attention and feed-forward, each with a residual connection."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH)
        self.query = nn.Linear(WIDTH, WIDTH)
        self.key = nn.Linear(WIDTH, WIDTH)
        self.value = nn.Linear(WIDTH, WIDTH)
        self.out = nn.Linear(WIDTH, WIDTH)
        self.norm2 = nn.LayerNorm(WIDTH)
        self.ff1 = nn.Linear(WIDTH, FEED_FORWARD)
        self.ff2 = nn.Linear(FEED_FORWARD, WIDTH)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden.shape
        normed = self.norm1(hidden)

        def heads(projection: nn.Module) -> torch.Tensor:
            projected: torch.Tensor = projection(normed)
            return projected.view(batch, length, HEADS, -1).transpose(1, 2)

        attended = functional.scaled_dot_product_attention(
            heads(self.query), heads(self.key), heads(self.value)
        )
        hidden = hidden + self.out(attended.transpose(1, 2).reshape(batch, length, WIDTH))
        fed_forward: torch.Tensor = self.ff2(functional.gelu(self.ff1(self.norm2(hidden))))
        return hidden + fed_forward


class Encoder(nn.Module):
    """Token and position embeddings, the blocks and a final norm: the frozen backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, WIDTH)
        self.positions = nn.Parameter(0.02 * torch.randn(LENGTH, WIDTH))
        self.blocks = nn.ModuleList(EncoderBlock() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.tokens(tokens) + self.positions
        for block in self.blocks:
            hidden = block(hidden)
        normed: torch.Tensor = self.norm(hidden)
        return normed


class LoRAClassifier(nn.Module):
    """The backbone with LoRA on its linear layers, mean-pooled into a two-class head."""

    def __init__(self, backbone: Encoder, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        scores: torch.Tensor = self.head(self.backbone(tokens).mean(dim=1))
        return scores


def add_lora(module: nn.Module) -> None:
    """Wrap every ``nn.Linear`` inside ``module`` in a :class:`LoRALinear`, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, LoRALinear(child))
        else:
            add_lora(child)


def make_model(seed: int) -> LoRAClassifier:
    """The frozen backbone from ``BACKBONE_SEED``; the adapters and head drawn from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(BACKBONE_SEED)
        backbone = Encoder().requires_grad_(False)
        torch.manual_seed(seed)
        add_lora(backbone)  # the adapters are new modules: trainable
        return LoRAClassifier(backbone, nn.Linear(WIDTH, 2))


def federated_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors Shoal federates: the trainable ones (adapters and head), by name."""
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def frozen_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's frozen tensors, by name: what stays on the device."""
    return {name: p.detach() for name, p in module.named_parameters() if not p.requires_grad}


class AdapterClient(TorchClient):
    """A ``TorchClient`` that sends and receives only the trainable tensors.

    ``export_state_dict`` still gives the whole model, backbone included, to save locally.
    """

    def get_parameters(self) -> Parameters:
        return parameters_from_state_dict(federated_state(self.module))

    def set_parameters(self, parameters: Parameters) -> None:
        try:
            state = state_dict_from_parameters(parameters, like=federated_state(self.module))
        except ModelError as exc:
            raise ClientError(f"the parameters are not this model's adapters: {exc}") from exc
        self.module.load_state_dict(state, strict=False)


def adam(parameters: object, config: FitConfig) -> torch.optim.Optimizer:
    """Adam on the trainable tensors only, at the round's learning rate."""
    trainable = [p for p in parameters if p.requires_grad]  # type: ignore[attr-defined]
    return torch.optim.Adam(trainable, lr=config.learning_rate)


def sequences(rng: np.random.Generator, count: int, positive: float) -> TensorDataset:
    """``count`` sequences, a share ``positive`` of them with more PLUS tokens than MINUS."""
    others = np.setdiff1d(np.arange(VOCAB), [PLUS, MINUS])
    tokens = rng.choice(others, size=(count, LENGTH))
    labels = (rng.random(count) < positive).astype(np.int64)
    for row, label in enumerate(labels):
        low, high = sorted(rng.choice(7, size=2, replace=False))  # two different counts
        plus, minus = (high, low) if label else (low, high)
        places = rng.permutation(LENGTH)[: plus + minus]
        tokens[row, places[:plus]] = PLUS
        tokens[row, places[plus:]] = MINUS
    return TensorDataset(torch.from_numpy(tokens), torch.from_numpy(labels))


def client_data(seed: int, index: int, count: int) -> tuple[TensorDataset, TensorDataset]:
    """Client ``index`` of ``count``: its (train, local evaluation) sequences, label-skewed."""
    rng = np.random.default_rng([seed, index])
    positive = 0.2 + 0.6 * index / max(1, count - 1)
    return sequences(rng, TRAIN_EXAMPLES, positive), sequences(rng, EVAL_EXAMPLES, positive)


def client_fn(context: ClientContext) -> AdapterClient:
    """The frozen backbone with this client's adapters, on its own synthetic sequences."""
    train, local_eval = client_data(context.seed, *context.require_partition())
    return AdapterClient(
        make_model(context.seed),
        loss_fn=functional.cross_entropy,
        train_loader=DataLoader(train, batch_size=context.config.client.batch_size, shuffle=True),
        eval_loader=DataLoader(local_eval, batch_size=256),
        optimizer_factory=adam,
    )


client_app = ClientApp(client_fn, num_examples=lambda _: (TRAIN_EXAMPLES, EVAL_EXAMPLES))


def server_app(context: ServerContext) -> ServerApp:
    """The initial adapters and head, and each new model evaluated on a balanced test set."""
    test = sequences(np.random.default_rng([context.seed, 1 << 20]), TEST_EXAMPLES, 0.5)
    evaluator = AdapterClient(
        make_model(context.seed),
        loss_fn=functional.cross_entropy,
        eval_loader=DataLoader(test, batch_size=500),
    )

    def evaluate(parameters: Parameters, round_number: int) -> dict[str, float]:
        result = evaluator.evaluate(parameters, EvaluateConfig(round=round_number))
        return {"loss": result.loss, "accuracy": result.metrics["accuracy"]}

    return ServerApp(
        initial_parameters=lambda _: evaluator.get_parameters(),
        evaluate=evaluate,
        architecture="lora-transformer-r8",
    )


if __name__ == "__main__":  # the sizes the README quotes
    model = make_model(0)
    federated = sum(t.numel() for t in federated_state(model).values())
    total = sum(p.numel() for p in model.parameters())
    print(f"federated (adapters + head): {federated}, whole model: {total}")
    print(f"backbone (frozen, stays on the device): {total - federated}")
    print(f"federated share: {federated / total:.1%}")
