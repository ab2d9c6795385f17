"""Pretrained weights for federated transfer learning: load a checkpoint into a model.

`load_pretrained(params, state, path)` takes the trees of a freshly initialised model
(`params, state = model.init(rng)`) and returns new trees in which every leaf the file
has a tensor for is replaced (cast to the leaf's dtype), plus a `LoadReport` saying what
was loaded, what the file had that the model does not use, and which leaves kept their
initial values. Nothing is modified in place.

    readers   the formats read (safetensors, .npz, fedjax_sim orbax directories) and the
              PyTorch pickles refused
    names     how a file's tensor names become model paths (torchvision / timm ResNets)
    loading   `load_pretrained`, its `LoadReport`, and the rules for shapes and heads
"""

from fedjax_sim.models.pretrained.loading import HEAD, LoadReport, load_pretrained
from fedjax_sim.models.pretrained.names import NameFn, identity_name, torchvision_name
from fedjax_sim.models.pretrained.readers import FORMATS, TORCH_EXTENSIONS

__all__ = ["FORMATS", "HEAD", "LoadReport", "NameFn", "TORCH_EXTENSIONS", "identity_name",
           "load_pretrained", "torchvision_name"]
