"""Reading checkpoint files into named numpy arrays, without unpickling anything.

Formats (chosen by the file's content and extension, or by `format=`):

    .safetensors   read with `safetensors.numpy`; torchvision / timm ResNet names are
                   converted (see `names`). Default `names='torchvision'`.
    .npz           arrays already in the model's layout, named by '/'-joined path
                   ('layer1/0/conv1/kernel'): fedjax_sim's `export_params` files and
                   big_vision / BiT-style exports. Default `names='identity'`.
    a directory    a fedjax_sim orbax checkpoint: a `Result.save` directory, or its
                   `arrays/` directory. Its 'params' tree is matched against `params` and
                   its 'model_state' tree against `state`, by path (the result of a
                   `with_trainable` model gives its frozen parameters back as
                   parameters); a checkpoint of a plain tree (no 'params' key) is matched
                   against both.
    .pth .pt .bin .ckpt .pkl .pickle, and any file that is a Python pickle or a PyTorch
                   zip archive: REFUSED. Unpickling a file can run arbitrary code, so
                   fedjax_sim never does it; convert such files to safetensors once where
                   PyTorch is installed:
                   `safetensors.torch.save_file(model.state_dict(), 'resnet50.safetensors')`.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile

import numpy as np

from fedjax_sim.errors import UserError
from fedjax_sim.models.pretrained.names import flatten

FORMATS = ("auto", "safetensors", "npz", "orbax")
TORCH_EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle")


@dataclasses.dataclass
class Tensor:
    """One array of a checkpoint, before its name is converted to a model path."""

    name: str           # as in the file, for the report
    array: np.ndarray
    tree: str | None    # 'params' / 'state' when the file says which tree it belongs to
    key: str = ""       # the name to convert: `name` less a tree prefix ('params/')

    def __post_init__(self):
        self.key = self.key or self.name


def _torch_refusal(path: str, what: str) -> UserError:
    stem = os.path.splitext(os.path.basename(path))[0] or "model"
    return UserError(
        f"{path} is {what}; fedjax_sim never unpickles files (unpickling can run arbitrary "
        f"code): convert it once where PyTorch is installed with "
        f"safetensors.torch.save_file(model.state_dict(), '{stem}.safetensors') "
        f"and load the .safetensors file")


def _sniff(path: str) -> str:
    """What the file's bytes say it is: 'safetensors', 'npz', 'torch-zip', 'pickle',
    'zip' (another zip archive) or 'unknown'. Reads headers only; unpickles nothing."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if 2 <= header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as z:
                members = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "unknown"
        if any(m.endswith(".pkl") for m in members):
            return "torch-zip"
        if members and all(m.endswith(".npy") for m in members):
            return "npz"
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and head[1] <= 5:  # pickle PROTO opcode
        return "pickle"
    return "unknown"


def _is_orbax_dir(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f))
               for f in ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt"))


def detect(path: str, fmt: str) -> str:
    """The format to read `path` with, refusing pickles whatever `fmt` says."""
    if fmt not in FORMATS:
        raise UserError(f"format={fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; check the path")
    if os.path.isdir(path):
        if fmt not in ("auto", "orbax"):
            raise UserError(f"{path} is a directory, not a {fmt} file; pass the file's path, "
                            f"or format='orbax' for a fedjax_sim checkpoint directory")
        return "orbax"
    if path.lower().endswith(TORCH_EXTENSIONS):
        raise _torch_refusal(path, "a PyTorch pickle checkpoint (by its extension)")
    kind = _sniff(path)
    if kind == "torch-zip":
        raise _torch_refusal(path, "a PyTorch checkpoint (a zip archive holding a pickle)")
    if kind == "pickle":
        raise _torch_refusal(path, "a Python pickle")
    if fmt == "orbax":
        raise UserError(f"{path} is a file, not an orbax checkpoint directory; pass the "
                        f"directory Result.save wrote, or format='auto'")
    if fmt != "auto":
        return fmt
    if kind in ("safetensors", "npz"):
        return kind
    ext = os.path.splitext(path)[1].lower()
    if ext in (".safetensors", ".npz"):
        return ext[1:]  # let the reader say what is wrong with it
    raise UserError(f"{path} is not a checkpoint fedjax_sim can read (not safetensors, .npz "
                    f"or an orbax directory); pass a .safetensors or .npz file")


def _read_safetensors(path: str) -> list[Tensor]:
    from safetensors.numpy import load_file

    try:
        arrays = load_file(path)
    except Exception as e:  # SafetensorError, OSError, ...: a damaged or foreign file
        raise UserError(f"{path} is not a readable safetensors file ({_short(e)}); "
                        f"re-create it with safetensors' save_file") from None
    return [Tensor(name, arrays[name], None) for name in sorted(arrays)]


def _read_npz(path: str) -> list[Tensor]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return [Tensor(name, npz[name], None) for name in sorted(npz.files)]
    except Exception as e:  # bad zip, object arrays (which would need pickle), ...
        raise UserError(f"{path} is not a readable .npz file of numeric arrays ({_short(e)}); "
                        f"write it with numpy.savez or fedjax_sim's export_params") from None


def _read_orbax(path: str) -> list[Tensor]:
    import logging

    import orbax.checkpoint as ocp

    arrays_dir = os.path.join(path, "arrays")
    if not os.path.isdir(arrays_dir):
        arrays_dir = path
    if not _is_orbax_dir(arrays_dir):
        raise UserError(f"{path} is neither a saved Result (Result.save) nor an orbax "
                        f"checkpoint directory; pass a .safetensors / .npz file or such a "
                        f"directory")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            tree = ckpt.restore(os.path.abspath(arrays_dir))
    except Exception as e:
        raise UserError(f"cannot read the orbax checkpoint in {arrays_dir} ({_short(e)}); "
                        f"check that it was completely written") from None
    if isinstance(tree, dict) and "params" in tree:
        parts = [("params", tree["params"], "params")]
        model_state = tree.get("model_state")
        if isinstance(model_state, dict) and set(model_state) == {"frozen", "model"}:
            # A `with_trainable` model's result: its frozen parameters are parameters of
            # the underlying model, and its inner state is that model's state.
            parts.append(("model_state/frozen", model_state["frozen"], "params"))
            parts.append(("model_state/model", model_state["model"], "state"))
        elif model_state is not None:
            parts.append(("model_state", model_state, "state"))
    else:
        parts = [("", tree, None)]
    out = []
    for prefix, subtree, which in parts:
        for name, leaf in flatten(subtree):
            out.append(Tensor(f"{prefix}/{name}" if prefix else name, np.asarray(leaf),
                               which, key=name))
    return out


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160]}" if text else type(error).__name__


def read(path: str, fmt: str) -> list[Tensor]:
    """The tensors of the checkpoint at `path` in format `fmt` (as `detect` gives it)."""
    return {"safetensors": _read_safetensors, "npz": _read_npz, "orbax": _read_orbax}[fmt](path)
