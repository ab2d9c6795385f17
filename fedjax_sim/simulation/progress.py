"""What a run shows while it trains: a tqdm progress bar over rounds (loss, accuracy,
rounds/s), silent when disabled."""

from __future__ import annotations


class ProgressBar:
    """tqdm over rounds showing loss, accuracy and rounds/s; silent when disabled."""

    def __init__(self, total: int, enabled: bool, initial: int = 0):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=initial, unit="round", dynamic_ncols=True)
        self._shown: dict = {}

    def update(self, n: int, row: dict, rounds_per_second: float):
        if self._bar is None:
            return
        self._shown["loss"] = f"{row['train_loss']:.4f}"
        for key, label in (("test_accuracy", "test_acc"), ("test_mse", "test_mse")):
            if key in row:
                self._shown[label] = f"{row[key]:.4f}"
        self._shown["rounds/s"] = f"{rounds_per_second:.1f}"
        self._bar.set_postfix(self._shown, refresh=False)
        self._bar.update(n)

    def close(self):
        if self._bar is not None:
            self._bar.close()
