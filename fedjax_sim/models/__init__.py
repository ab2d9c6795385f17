"""Models: the functional adapter, tasks (loss + metrics) and the model zoo."""

from fedjax_sim.models.adapter import MaskedBatchNorm, Model, from_linen, from_nnx
from fedjax_sim.models.pretrained import LoadReport, load_pretrained, torchvision_name
from fedjax_sim.models.substitute import substitute_kernels
from fedjax_sim.models.trainable import with_trainable
from fedjax_sim.models.tasks import (Task, classification, custom, get_task, regression,
                                     sequence)
from fedjax_sim.models.zoo import (ZOO, char_lstm, char_transformer, cnn, get_model,
                                   logistic_regression, mlp, resnet18, resnet20, resnet34,
                                   resnet50)

__all__ = ["Model", "from_nnx", "from_linen", "Task", "classification", "regression",
           "sequence", "custom", "get_task", "ZOO", "get_model", "cnn", "mlp",
           "logistic_regression", "char_lstm", "char_transformer", "resnet18", "resnet34",
           "resnet50", "resnet20", "load_pretrained", "LoadReport", "torchvision_name",
           "with_trainable", "MaskedBatchNorm", "substitute_kernels"]
