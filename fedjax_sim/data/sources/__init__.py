"""Where datasets come from: one module per source or file format.

    builtin   scikit-learn's digits and diabetes (shipped, offline) and FedProx
              Synthetic(alpha, beta)
    tfds      TensorFlow Datasets image-classification sets, read without TensorFlow
    tff_h5    TensorFlow Federated HDF5 files (EMNIST, Shakespeare, CIFAR-100, ...)
    leaf      LEAF JSON files (FEMNIST, Shakespeare, ...)
    common    what the file readers share

The natural datasets (`tff_h5`, `leaf`) come split by their real users (writers,
speaking roles, ...), so no partitioner is involved: every user becomes one client, with
the clients in sorted id order (Python string order) whatever the order in the file.
Their dataset loaders (`tff_emnist`, `tff_shakespeare`, `tff_cifar100`, `leaf_femnist`,
`leaf_shakespeare`) return `(train, test, info)`: the training clients, the test clients
(None without a test path; each keeps its own ids, so a client of both files is the same
user) and an `info` dict with what a model needs (`num_classes`, `input_shape`,
`input_dtype`, for text also `vocab_size`, `seq_len`, `pad_id`) and `source_files`. Their
features are `x` (uint8 images or int32 character ids) and `y` (int32 labels or
per-position next-character ids, see `fedjax_sim.data.text`).

Bad input raises `UserError` with a one-line message naming the file, the client and the
field. A training client without examples is an error unless `drop_empty=True`, which
drops such clients (and, to keep the splits aligned, the same ids and any empty clients
from test).

The public names are exported by `fedjax_sim.data`.
"""
