"""cnnexp.plots: learning curves over whole epochs."""
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
