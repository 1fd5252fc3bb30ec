"""cnnexp.plots: learning curves over whole epochs, the samples of each class as one tiled image."""
import torch

from cnnexp import plots


def test_learning_curves_tick_whole_epochs_only():
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "train_accuracy": 0.5 + e / 10,
                "val_accuracy": 0.4 + e / 10} for e in (1, 2)]
    fig = plots.learning_curves(history)
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks == [1, 2]  # matplotlib's own choice for 2 epochs: 1.0, 1.2, ... 2.0
    plots.close(fig)


def test_samples_per_class_is_one_tiled_image_a_row_per_class_and_a_missing_class_blank():
    images = torch.full((6, 28, 28), 200, dtype=torch.uint8)
    fig = plots.samples_per_class(images, torch.tensor([0, 0, 0, 1, 1, 1]), ["a", "b", "c"], per_class=2)
    (image,) = fig.axes[0].get_images()
    grid = image.get_array()
    assert grid.shape == (3 * 30 - 2, 2 * 30 - 2)  # 28-pixel tiles, 2 pixels apart
    assert (grid[:28, :28] == 200).all() and (grid[30:58, 30:] == 200).all() and (grid[60:] == 0).all()
    assert [label.get_text() for label in fig.axes[0].get_yticklabels()] == ["a", "b", "c"]
    plots.close(fig)


def test_accuracy_vs_lr_has_a_panel_per_dataset_named_after_it():
    fig = plots.accuracy_vs_lr([0.01, 0.1, 0.01], [0.8, 0.7, 0.98], [32, 64, 32], ["fashion-mnist", "fashion-mnist", "mnist"])
    assert [ax.get_title() for ax in fig.axes] == ["fashion-mnist: validation accuracy vs learning rate",
                                                   "mnist: validation accuracy vs learning rate"]
    assert [sum(len(c.get_offsets()) for c in ax.collections) for ax in fig.axes] == [2, 1]
    plots.close(fig)
