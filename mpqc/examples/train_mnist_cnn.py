"""Train the bundled ``mnist-cnn`` (or ``mnist-dsnet``) example on the fixed 4,000-digit MNIST train split.

    python -m mpqc.examples.train_mnist_cnn [--model mnist-dsnet] [--out mpqc/examples/weights/mnist_cnn.safetensors]

Deterministic for a given seed and thread count: all randomness (init, shuffling,
augmentation) comes from seeded torch generators, deterministic algorithms are
enforced and the intra-op thread count is fixed. Writes the weights (safetensors,
or ``torch.save`` for a ``.pt`` path) and a JSON record next to them with the
recipe, accuracies and the weights' sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mpqc.data.mnist import MNIST_MEAN, MNIST_STD, mnist_split, split_sha256
from mpqc.examples import mnist_cnn, mnist_dsnet

# name -> (model class, default weights path)
MODELS = {mnist_cnn.NAME: (mnist_cnn.MnistCNN, mnist_cnn.WEIGHTS_PATH),
          mnist_dsnet.NAME: (mnist_dsnet.MnistDSNet, mnist_dsnet.WEIGHTS_PATH)}

RECIPE = {
    "optimizer": "SGD(momentum=0.9, nesterov=True)",
    "peak_lr": 0.1,
    "schedule": "linear warmup 1 epoch, then cosine to 0 (per step)",
    "weight_decay": 5e-4,
    "weight_decay_on": "conv/linear weights only (not BN parameters or biases)",
    "batch_size": 64,
    "label_smoothing": 0.05,
    "augmentation": "random affine per image: rotation +-12 deg, scale 0.9-1.1, shear +-0.15, shift +-3 px",
    "checkpoint": "weights after the last epoch (no selection on the test split)",
}


def random_affine(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Warp each normalized image by its own small random affine transform."""
    n = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=gen)

    angle = uniform(-12.0, 12.0) * math.pi / 180.0
    scale = uniform(0.9, 1.1)
    shear = uniform(-0.15, 0.15)
    # affine_grid works in [-1, 1] coordinates spanning 28 px, so 1 px = 2/28.
    shift = (torch.rand(n, 2, generator=gen) * 2.0 - 1.0) * (3.0 * 2.0 / 28.0)

    cos, sin = torch.cos(angle), torch.sin(angle)
    # The grid maps output coordinates to input coordinates, i.e. the inverse
    # transform; for small random parameters the distinction does not matter.
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos / scale
    theta[:, 0, 1] = (-sin + shear * cos) / scale
    theta[:, 1, 0] = sin / scale
    theta[:, 1, 1] = (cos + shear * sin) / scale
    theta[:, :, 2] = shift

    # Warp in [0, 1] pixel space so that zero padding is the black background.
    pixels = images * MNIST_STD + MNIST_MEAN
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (warped - MNIST_MEAN) / MNIST_STD


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch):
        logits = model(images[start : start + batch])
        correct += int((logits.argmax(dim=1) == labels[start : start + batch]).sum())
    return correct / len(images)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(epochs: int, seed: int, threads: int, name: str = mnist_cnn.NAME) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)

    x_train, y_train = (torch.from_numpy(a) for a in mnist_split("train"))
    x_test, y_test = (torch.from_numpy(a) for a in mnist_split("test"))

    model = MODELS[name][0]()
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {params} parameters, {len(x_train)} train / {len(x_test)} test digits")

    # No weight decay on BN affine parameters and biases.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": RECIPE["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=RECIPE["peak_lr"],
        momentum=0.9,
        nesterov=True,
    )
    batch = RECIPE["batch_size"]
    steps_per_epoch = math.ceil(len(x_train) / batch)
    total_steps = epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(seed)

    step = 0
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        seen = correct = 0
        loss_sum = 0.0
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            images = random_affine(x_train[idx], gen)
            labels = y_train[idx]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, steps_per_epoch, RECIPE["peak_lr"])
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=RECIPE["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += len(idx)
            correct += int((logits.argmax(dim=1) == labels).sum())
            loss_sum += loss.item() * len(idx)
        test_acc = accuracy(model, x_test, y_test)
        print(
            f"epoch {epoch:3d}/{epochs}  loss {loss_sum / seen:.4f}  "
            f"train(aug) {100 * correct / seen:6.2f}%  test {100 * test_acc:6.2f}%  "
            f"[{time.perf_counter() - start:6.1f}s]",
            flush=True,
        )
    seconds = time.perf_counter() - start

    model.eval()
    record = {
        "model": name,
        "parameters": params,
        "seed": seed,
        "epochs": epochs,
        "threads": threads,
        "recipe": RECIPE,
        "train_split": "mpqc.data.mnist.mnist_split('train') (4,000 digits)",
        "test_split": "mpqc.data.mnist.mnist_split('test') (1,000 digits)",
        "train_split_sha256": split_sha256("train"),
        "test_split_sha256": split_sha256("test"),
        "final_train_accuracy": accuracy(model, x_train, y_train),
        "final_test_accuracy": accuracy(model, x_test, y_test),
        "train_seconds": round(seconds, 1),
        "torch_version": torch.__version__,
    }
    return model, record


def save(model: torch.nn.Module, record: dict, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out))
    else:
        torch.save(state, out)
    record["weights_file"] = out.name
    record["weights_sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    record_path = out.with_suffix(".json")
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default=mnist_cnn.NAME)
    parser.add_argument("--out", type=Path, help="weights path (.safetensors or .pt; default: the example's own)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (fixed for reproducibility)")
    args = parser.parse_args(argv)

    model, record = train(args.epochs, args.seed, args.threads, args.model)
    out = args.out or MODELS[args.model][1]
    record_path = save(model, record, out)
    print(
        f"final train {100 * record['final_train_accuracy']:.2f}%  "
        f"test {100 * record['final_test_accuracy']:.2f}%  in {record['train_seconds']}s"
    )
    print(f"wrote {out} and {record_path}")


if __name__ == "__main__":
    main()
