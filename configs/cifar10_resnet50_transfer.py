"""Federated transfer learning: an ImageNet ResNet-50 fine-tuned on CIFAR-10 by 5 clients.

    fedjax-sim train --config configs/cifar10_resnet50_transfer.py --workdir runs/r50 \
        --config.model.pretrained.path=resnet50.safetensors

A torchvision/timm ResNet-50 pretrained on ImageNet (a safetensors file with torchvision
names; see docs/models.md, "Federated transfer learning", for how to get one) loses its
1000-class `fc` (the file's head has another shape, so it is skipped and reported) and
gets a new 10-class head, here with a hidden ReLU layer of 512 units
(`model.args.head_hidden`; 0 for a single dense layer). CIFAR-10's 50,000 training images
are split IID over 5 clients of 10,000 each, every client takes part in every round, FedAvg
weights the updates by client size, 10 rounds; `test_*` is the 10,000-image test split.

Images are resized on the device from 32x32 to the 224x224 the backbone was trained on and
normalised with ImageNet's mean and std. `model.trainable='head'` freezes the backbone,
whose BatchNorm keeps its pretrained statistics (`batch_norm='auto'` means 'frozen' here),
so the feature cache computes every image's 2048 pooled features once and the 10 rounds
train the head alone. Compare `model.trainable='layer4+head'` (partial fine-tuning) and
`'all'` (full fine-tuning; give `preprocess.crop_padding=4, flip=True` for augmentation),
or `model.pretrained=None` for random initialisation.

Needs the dataset (downloaded and prepared through tensorflow-datasets on the first run,
see docs/data.md, "Public and natural datasets") and the weights file; an accelerator is
advised (the feature pass is 50,000 + 10,000 ResNet-50 forward passes at 224x224).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.rounds = 10
    c.clients_per_round = 5
    c.eval_every = 1
    c.task = "classification"
    c.data = dict(source="tfds", name="cifar10", data_dir=None, download=True, label_key=None,
                  num_clients=5, partition="iid", partition_args={},
                  client_test_fraction=0.0, heldout_clients=None, seed=0)
    c.preprocess = dict(scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                        crop_padding=0, flip=False, resize=(224, 224))
    c.model = dict(name="resnet50", num_outputs=None,
                   args=dict(norm="batch", stem="imagenet", width=64, head_hidden=512),
                   trainable="head",
                   pretrained=dict(path="resnet50.safetensors", format="safetensors", skip=[],
                                   strip_prefix=None, strict=False))
    c.batch_norm = "auto"
    c.feature_cache = "auto"
    c.algorithm = dict(
        name="fedavg",
        client_optimizer=dict(name="sgd", learning_rate=0.01, args=dict(momentum=0.9)),
        server_optimizer=dict(name="sgd", learning_rate=1.0, args={}),
        local_epochs=1, local_steps=None, batch_size=64, weighting="num_examples")
    c.engine = dict(clients_per_chunk="auto", unroll="auto", rounds_per_call="auto",
                    data_placement="auto", device_data_budget=None)
    c.checkpoint = dict(every_rounds=None, every_seconds=300.0, max_to_keep=3)
    return ml_collections.ConfigDict(c)
