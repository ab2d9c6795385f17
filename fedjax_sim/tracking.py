"""Experiment tracking: TensorBoard event files and callbacks for Weights & Biases and
MLflow (the implementation is `fedjax_sim.simulation.tracking`).

    result = fs.simulate(..., workdir="runs/a", tensorboard=True)   # runs/a/tensorboard/
    run = wandb.init(project="fl")
    result = fs.simulate(..., callback=fs.tracking.wandb_callback(run))
    with mlflow.start_run():
        result = fs.simulate(..., callback=fs.tracking.mlflow_callback())
"""

from fedjax_sim.simulation.tracking import (TENSORBOARD_DIR, TensorBoardLog, mlflow_callback,
                                            scalars, wandb_callback)

__all__ = ["wandb_callback", "mlflow_callback", "TensorBoardLog", "TENSORBOARD_DIR", "scalars"]
