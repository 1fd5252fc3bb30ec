"""The hand-written study a user would write instead of `mlflow run . -e tune`: the `study` benchmark's baseline.

Optuna TPE + median pruner, one MLflow run per trial (its params and per-epoch val accuracy, what
optuna-integration's MLflowCallback logged; no model, which cnnexp logs), a torchvision DataLoader with
ToTensor, the tutorial network. Prints the best trial as one JSON line.
    python benchmarks/handwritten_tune.py ROOT N_TRIALS EPOCHS SEED     (ROOT holds FashionMNIST/raw/)
"""
import json
import sys

import mlflow
import optuna
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchvision import datasets, transforms


class Network(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 12, 5)
        self.fc1, self.fc2, self.out = nn.Linear(192, 120), nn.Linear(120, 60), nn.Linear(60, 10)

    def forward(self, t):
        t = F.max_pool2d(F.relu(self.conv1(t)), 2, 2)
        t = F.max_pool2d(F.relu(self.conv2(t)), 2, 2)
        return self.out(F.relu(self.fc2(F.relu(self.fc1(t.flatten(1))))))


def main(root: str, n_trials: int, epochs: int, seed: int) -> None:
    full = datasets.FashionMNIST(root, train=True, download=False, transform=transforms.ToTensor())
    n_val = len(full) // 10
    train_set, val_set = random_split(full, [len(full) - n_val, n_val], generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(val_set, batch_size=1000)

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        batch_size = trial.suggest_categorical("batch_size", [16, 32, 64, 128, 256, 512, 1024])
        torch.manual_seed(seed)
        model = Network()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        loader = DataLoader(train_set, batch_size=batch_size, shuffle=True)
        with mlflow.start_run(run_name=f"trial-{trial.number}"):
            mlflow.log_params({"lr": lr, "batch_size": batch_size})
            for epoch in range(1, epochs + 1):
                for images, labels in loader:
                    loss = F.cross_entropy(model(images), labels)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                with torch.no_grad():
                    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in val_loader)
                accuracy = correct / n_val
                mlflow.log_metric("val_accuracy", accuracy, step=epoch)
                trial.report(accuracy, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()
        return accuracy

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner())
    study.optimize(objective, n_trials=n_trials)
    print(json.dumps({"best_value": study.best_value, "best_params": study.best_params}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
