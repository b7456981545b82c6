"""The optimizer's layer groups: discriminative learning rates and gradual unfreezing (ULMFiT)."""

from __future__ import annotations

import torch

from seqtrain.config import ModelConfig, TrainConfig
from seqtrain.model import Classifier, build_model
from seqtrain.optim import make_optimizer, set_lr


def tiny_classifier(num_layers: int = 2) -> Classifier:
    torch.manual_seed(0)
    cfg = ModelConfig(cell="lstm", embedding_dim=8, hidden_size=8, num_layers=num_layers, dropout=0.0)
    return build_model(cfg, vocab_size=30, num_classes=2)


def one_step(model: Classifier, optimizer: torch.optim.Optimizer, lr: float, step: int) -> None:
    torch.manual_seed(step)
    ids, lengths = torch.randint(2, 30, (4, 6)), torch.tensor([6, 5, 4, 3])
    set_lr(optimizer, lr, step)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(ids, lengths), torch.tensor([0, 1, 0, 1])).backward()
    optimizer.step()


def snapshot(model: Classifier) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_layer_lr_decay_scales_each_group_below_the_head() -> None:
    """Plain SGD's first step moves each parameter by lr * scale * grad: the head at lr, the top recurrent
    layer at lr * d, the one below at lr * d^2, the embeddings at lr * d^3. Catches a reversed order, a
    scale applied to the wrong group, or the option being ignored."""
    model = tiny_classifier(num_layers=2)
    train = TrainConfig(optimizer="sgd", lr=0.1, weight_decay=0.0, layer_lr_decay=0.5)
    optimizer = make_optimizer(model, train)
    before = snapshot(model)
    one_step(model, optimizer, train.lr, step=0)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    expected_scale = {"head.": 1.0, "layers.1.": 0.5, "layers.0.": 0.25, "embedding.": 0.125}
    for name, p in model.named_parameters():
        scale = next(s for prefix, s in expected_scale.items() if name.startswith(prefix))
        moved = before[name] - p.detach()
        torch.testing.assert_close(moved, train.lr * scale * grads[name], msg=name)


def test_unfreeze_every_trains_the_head_first_then_one_group_at_a_time() -> None:
    """With unfreeze_every=2 on a one-layer model: steps 0-1 move only the head, steps 2-3 also the
    recurrent layer, from step 4 the embeddings too (AdamW with weight decay: a frozen group must not
    decay either)."""
    model = tiny_classifier(num_layers=1)
    train = TrainConfig(lr=0.01, weight_decay=0.1, unfreeze_every=2)
    optimizer = make_optimizer(model, train)

    def changed_groups(step: int) -> set[str]:
        before = snapshot(model)
        one_step(model, optimizer, train.lr, step)
        after = snapshot(model)
        return {name.split(".")[0] for name in before if not torch.equal(before[name], after[name])}

    assert changed_groups(0) == {"head"}
    assert changed_groups(1) == {"head"}
    assert changed_groups(2) == {"head", "layers"}
    assert changed_groups(3) == {"head", "layers"}
    assert changed_groups(4) == {"head", "layers", "embedding"}


def test_one_learning_rate_keeps_the_two_groups_older_checkpoints_resume_into() -> None:
    """The default optimizer has the two groups (decay, no decay) that checkpoints from before the layer
    options hold; more groups would make load_state_dict fail on resume."""
    model = tiny_classifier()
    optimizer = make_optimizer(model, TrainConfig())
    assert [g["weight_decay"] for g in optimizer.param_groups] == [TrainConfig().weight_decay, 0.0]
    layered = make_optimizer(model, TrainConfig(layer_lr_decay=0.5))
    assert len(layered.param_groups) == 1 + 2 + 2 + 2  # embeddings (weights only), 2 layers, head
